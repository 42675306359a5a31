//! Prometheus metrics and health endpoints, scraped over HTTP after jobs went through NATS.

use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;

use crate::helpers::{ALL_ROLES, TestApp, collect_reply, openai_provider};

pub async fn scrape(url: &str) -> String {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    r.text().await.unwrap()
}

/// The value of the sample `series` (its name and labels, exactly as exposed).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test]
async fn a_worker_exposes_job_call_token_and_queue_metrics_and_health() {
    llm_worker::tls::install_crypto_provider();
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker_with(ALL_ROLES, |c| {
        c.telemetry.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let addr = app.workers[0].metrics_addr.unwrap();

    // Two answers, one of them after a failed call (a retry on the same provider), and one
    // job refused as invalid.
    fake.push(Reply::answer(&["a"], (3, 1)));
    fake.push(Reply::status(500, "boom"));
    fake.push(Reply::answer(&["b"], (4, 2)));
    for prompt in ["one", "two"] {
        let (reply_to, mut sub) = app.reply_inbox().await;
        app.publish(json!({"prompt": prompt, "reply_to": reply_to, "stream": false}))
            .await;
        let reply = collect_reply(&mut sub).await;
        assert_eq!(reply.result["status"], "ok", "{}", reply.result);
    }
    let (reply_to, mut sub) = app.reply_inbox().await;
    app.publish(json!({"reply_to": reply_to})).await;
    collect_reply(&mut sub).await;

    let text = scrape(&format!("http://{addr}/metrics")).await;
    let s = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        s(r#"llm_jobs_total{kind="generate",status="ok",error_code=""}"#),
        2.0
    );
    assert_eq!(
        s(r#"llm_jobs_total{kind="generate",status="error",error_code="invalid_job"}"#),
        1.0
    );
    assert_eq!(
        s(r#"llm_provider_calls_total{provider="openai",model="gpt-test",outcome="ok"}"#),
        2.0
    );
    assert_eq!(
        s(r#"llm_provider_calls_total{provider="openai",model="gpt-test",outcome="server_error"}"#),
        1.0
    );
    assert_eq!(
        s(r#"llm_tokens_total{provider="openai",model="gpt-test",direction="output",tenant=""}"#),
        3.0
    );
    assert_eq!(s(r#"llm_job_duration_seconds_count{kind="generate"}"#), 3.0);
    assert_eq!(
        s(r#"llm_provider_call_duration_seconds_count{provider="openai",model="gpt-test"}"#),
        3.0
    );
    assert_eq!(
        s(r#"llm_provider_ttft_seconds_count{provider="openai",model="gpt-test"}"#),
        2.0
    );
    assert_eq!(
        s(r#"llm_circuit_state{provider="openai",model="gpt-test"}"#),
        0.0
    );
    assert_eq!(s(r#"llm_consumer_pending{kind="generate"}"#), 0.0);
    assert_eq!(s("llm_jobs_in_flight"), 0.0);
    assert!(s("llm_recorder_backlog") >= 0.0);
    assert!(text.contains("llm_recorder_lag_seconds"), "{text}");

    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    app.teardown().await;
}
