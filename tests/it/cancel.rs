//! Cancellation through the contract: a plain core-NATS publish on
//! `<prefix>.cancel.<tenant>.<job_id>`, effective only on that tenant's job.

use std::time::Duration;

use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;

use crate::helpers::{TestApp, collect_reply, collect_results, next_event, openai_provider};

/// Publish `tenant`'s cancel request the way any orchestrator would: core NATS, empty body.
async fn cancel(app: &TestApp, tenant: &str, job_id: uuid::Uuid) {
    app.client
        .publish(
            app.config.nats.cancel_subject(tenant, &job_id),
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    app.client.flush().await.unwrap();
}

/// Wait (bounded) until the fake provider has no response open: the worker closed it.
async fn provider_stream_closed(fake: &FakeLlmServer) {
    let closed = tokio::time::Instant::now() + Duration::from_secs(5);
    while fake.open_responses() > 0 {
        assert!(
            tokio::time::Instant::now() < closed,
            "the provider stream stayed open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_cancelled_while_queued_is_answered_cancelled_without_a_call_even_by_a_later_worker()
{
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    // Streams exist, no worker runs: the request is remembered by the cancel stream.
    llm_worker::nats::ensure_streams(&app.js, &app.config.nats)
        .await
        .unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let doomed = app
        .publish(json!({"prompt": "a", "reply_to": reply_to, "stream": false}))
        .await;
    cancel(&app, "default", doomed).await;
    // Wait until the stream holds the request (a JetStream fact, not a sleep).
    let mut stream = app
        .js
        .get_stream(&app.config.nats.cancel_stream)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream.info().await.unwrap().state.messages == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancel request was not stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live = app
        .publish(json!({"prompt": "b", "reply_to": reply_to, "stream": false}))
        .await;
    app.start_worker().await;
    let results = collect_results(&mut sub, 2).await;
    let r = &results[&doomed.to_string()];
    assert_eq!(r["error"]["code"], "cancelled", "{r}");
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(results[&live.to_string()]["status"], "ok");
    assert_eq!(
        fake.request_count(),
        1,
        "only the other job reached the provider"
    );
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id = '{doomed}' AND error_code = 'cancelled'"
        ),
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn a_streaming_job_cancelled_stops_its_provider_stream_and_records_the_partial_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    // Forty seconds of answer, a word every 200 ms.
    fake.set_default(Reply::Answer {
        deltas: (0..200).map(|i| format!("w{i} ")).collect(),
        usage: Some((5, 200)),
        done_marker: true,
        chunk_delay: Duration::from_millis(200),
    });
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let id = app
        .publish(json!({"prompt": "long", "reply_to": reply_to}))
        .await;
    // The answer is streaming: its first chunk is here.
    assert_eq!(next_event(&mut sub).await["type"], "chunk");
    assert_eq!(fake.open_responses(), 1);
    let asked = tokio::time::Instant::now();
    llm_worker::cancel::request(&app.js, &app.config.nats, "default", id)
        .await
        .unwrap();
    let reply = collect_reply(&mut sub).await;
    let took = asked.elapsed();
    let r = &reply.result;
    assert_eq!(r["error"]["code"], "cancelled", "{r}");
    // Far sooner than the answer's 40 s (the bound asked for is 100 ms; a loaded test machine
    // gets slack, the benchmark-free margin is still two orders of magnitude).
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The provider's stream was closed, not left running.
    provider_stream_closed(&fake).await;
    assert_eq!(fake.request_count(), 1);
    // The partial call is billed as estimated.
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_calls WHERE job_id = '{id}' AND error_code = 'cancelled' \
             AND tokens_estimated AND output_tokens > 0"
        ),
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn on_three_workers_a_waiting_and_a_streaming_job_are_cancelled_and_an_expired_job_is_not_run()
 {
    let fake = FakeLlmServer::start().await.unwrap();
    // Forty seconds of answer, a word every 200 ms.
    fake.set_default(Reply::Answer {
        deltas: (0..200).map(|i| format!("w{i} ")).collect(),
        usage: Some((5, 200)),
        done_marker: true,
        chunk_delay: Duration::from_millis(200),
    });
    // One job of `solo` at a time across the fleet: its second job waits, parked.
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n[tenants.solo]\nmax_in_flight = 1\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let app = TestApp::new(&toml).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(app.spawn_process("", &["run"]).await);
    }
    let (reply_to, mut sub) = app.reply_inbox().await;
    // A job whose deadline passed before any worker saw it: never run.
    let past = (chrono::Utc::now() - chrono::TimeDelta::seconds(1)).to_rfc3339();
    let expired = app
        .publish(json!({"prompt": "late", "reply_to": reply_to, "stream": false, "deadline": past}))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["job_id"], expired.to_string());
    assert_eq!(r["error"]["code"], "timeout", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("expired")
    );
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(fake.request_count(), 0);

    let streaming = app
        .publish(json!({"prompt": "long", "tenant": "solo", "reply_to": reply_to}))
        .await;
    assert_eq!(next_event(&mut sub).await["type"], "chunk");
    let waiting = app
        .publish(json!({"prompt": "next", "tenant": "solo", "reply_to": reply_to}))
        .await;
    // The waiting job is cancelled first (it cannot start while the other runs), then the
    // streaming one, whichever workers hold them.
    cancel(&app, "solo", waiting).await;
    cancel(&app, "solo", streaming).await;
    let mut results = std::collections::HashMap::new();
    while results.len() < 2 {
        let reply = collect_reply(&mut sub).await;
        results.insert(
            reply.result["job_id"].as_str().unwrap().to_string(),
            reply.result,
        );
    }
    let s = &results[&streaming.to_string()];
    assert_eq!(s["error"]["code"], "cancelled", "{s}");
    assert_eq!(s["attempts"].as_array().unwrap().len(), 1, "{s}");
    let w = &results[&waiting.to_string()];
    assert_eq!(w["error"]["code"], "cancelled", "{w}");
    assert_eq!(w["attempts"], json!([]), "cancelled before it started: {w}");
    // The provider's stream was closed, and only the streaming job reached it.
    provider_stream_closed(&fake).await;
    assert_eq!(fake.request_count(), 1);
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_calls WHERE job_id = '{streaming}' AND error_code = 'cancelled' \
             AND tokens_estimated AND output_tokens > 0"
        ),
        1,
    )
    .await;
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id IN ('{waiting}', '{expired}') AND attempts = 0"
        ),
        2,
    )
    .await;
    drop(workers);
    app.teardown().await;
}
