//! Trace propagation: a job message with a W3C `traceparent` continues the caller's trace.
//! A worker process exports its spans with OTLP (HTTP, JSON) to a receiver in this test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider};

/// An OTLP/HTTP receiver: every span POSTed to `/v1/traces`, flattened.
struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (s, a) = (spans.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (s, a) = (s.clone(), a.clone());
                async move {
                    let export: Value = serde_json::from_slice(&body).unwrap();
                    let mut got = s.lock().unwrap();
                    for rs in export["resourceSpans"].as_array().into_iter().flatten() {
                        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                            got.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                        }
                    }
                    a.notify_waiters();
                    axum::Json(json!({}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            spans,
            arrived,
        }
    }

    /// Wait (bounded) until a span satisfies `pred`; returns every span received.
    async fn wait_for(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.arrived.notified();
            {
                let spans = self.spans.lock().unwrap();
                if pred(&spans) {
                    return spans.clone();
                }
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the expected spans were not exported: {:?}",
                self.spans.lock().unwrap()
            );
        }
    }
}

#[tokio::test]
async fn a_job_with_a_traceparent_continues_the_trace_in_exported_spans_and_usage_rows() {
    let receiver = Receiver::start().await;
    let fake = FakeLlmServer::start().await.unwrap();
    let app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"http://{}\"\n",
        receiver.addr
    );
    let _worker = app
        .spawn_process_with(&extra, &["run"], &[("OTEL_BSP_SCHEDULE_DELAY", "100")])
        .await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    fake.push(Reply::answer(&["traced"], (2, 1)));
    let (reply_to, mut sub) = app.reply_inbox().await;
    let job_id = uuid::Uuid::now_v7();
    let job = json!({"job_id": job_id, "prompt": "hi", "reply_to": reply_to, "stream": false});
    let publish = PublishMessage::build()
        .payload(serde_json::to_vec(&job).unwrap().into())
        .message_id(job_id.to_string())
        .header("traceparent", format!("00-{trace}-{caller_span}-01"));
    app.js
        .send_publish(
            format!("{}.jobs.generate", app.config.nats.subject_prefix),
            publish,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let reply = collect_reply(&mut sub).await;
    assert_eq!(reply.result["status"], "ok", "{}", reply.result);
    assert_eq!(reply.result["trace_id"], trace);

    let spans = receiver
        .wait_for(|spans| {
            ["job", "attempt", "store_result"]
                .iter()
                .all(|name| spans.iter().any(|s| s["name"] == *name))
        })
        .await;
    let job_span = spans.iter().find(|s| s["name"] == "job").unwrap();
    assert_eq!(job_span["traceId"], trace, "{job_span}");
    assert_eq!(job_span["parentSpanId"], caller_span, "{job_span}");
    for name in ["attempt", "store_result"] {
        let child = spans.iter().find(|s| s["name"] == name).unwrap();
        assert_eq!(child["traceId"], trace, "{child}");
        assert_eq!(child["parentSpanId"], job_span["spanId"], "{child}");
    }

    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}' AND trace_id = '{trace}'"
        ),
        1,
    )
    .await;
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_calls WHERE job_id = '{job_id}' AND trace_id = '{trace}'"
        ),
        1,
    )
    .await;
    app.teardown().await;
}
