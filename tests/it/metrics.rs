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

/// Poll `/metrics` until `series` satisfies `ok`; its value then.
async fn metric_until(addr: std::net::SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = scrape(&format!("http://{addr}/metrics")).await;
        if let Some(v) = sample(&text, series).filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached the value the test waits for:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn gauges_show_what_is_happening_a_stalled_job_a_backlog_an_open_circuit_and_a_recorder_cut_off()
 {
    llm_worker::tls::install_crypto_provider();
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(
        &openai_provider("openai", &fake.base_url(), "gpt-test")
            .replace("max_retries = 1", "max_retries = 0"),
    )
    .await;
    llm_worker::usage::migrate(&app.db).await.unwrap();
    // The recorder reaches the database through a proxy that is cut from the start.
    let (outage, proxied) = crate::servers::Outage::for_database(&app).await;
    outage.set_up(false);
    app.start_worker_with(ALL_ROLES, |c| {
        c.database.url = Some(proxied.into());
        c.telemetry.metrics_listen = Some("127.0.0.1:0".into());
        c.worker.max_in_flight = 1;
        c.worker.fair_window = 1;
        c.worker.shutdown_grace_secs = 1;
        c.circuit_breaker.failure_threshold = 2;
        c.circuit_breaker.cooldown_secs = 3600;
    })
    .await;
    let addr = app.workers[0].metrics_addr.unwrap();

    // Two provider faults: the circuit of openai:gpt-test opens.
    for _ in 0..2 {
        fake.push(Reply::status(500, "boom"));
        let (reply_to, mut sub) = app.reply_inbox().await;
        app.publish(json!({"prompt": "x", "reply_to": reply_to, "stream": false}))
            .await;
        let reply = collect_reply(&mut sub).await;
        assert_eq!(reply.result["status"], "error", "{}", reply.result);
    }
    let open = r#"llm_circuit_state{provider="openai",model="gpt-test"}"#;
    assert_eq!(metric_until(addr, open, |v| v == 2.0).await, 2.0);

    // A job on another model stalls mid-answer and holds the only slot; five more queue.
    fake.push(Reply::Stall {
        deltas: vec!["thinking".into()],
    });
    app.publish(json!({"prompt": "slow", "model": "gpt-slow"}))
        .await;
    assert_eq!(
        metric_until(addr, "llm_jobs_in_flight", |v| v == 1.0).await,
        1.0
    );
    for _ in 0..5 {
        app.publish(json!({"prompt": "queued"})).await;
    }
    let pending = metric_until(addr, r#"llm_consumer_pending{kind="generate"}"#, |v| {
        v >= 4.0
    })
    .await;
    assert!(pending >= 4.0, "{pending}");

    // Results wait for the database: the recorder's backlog holds them.
    let backlog = metric_until(addr, "llm_recorder_backlog", |v| v >= 2.0).await;
    assert!(backlog >= 2.0, "{backlog}");
    assert_eq!(app.count("SELECT count(*) FROM llm_jobs").await, 0);

    outage.set_up(true);
    app.teardown().await;
}
