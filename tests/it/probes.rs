//! Active health probes (`[health]`): with no job published at all, probes open the circuit of
//! a failing provider and close it once the provider answers again; the states show in
//! `/readyz`, `llm-worker status` (over NATS) and Prometheus; a probe that used tokens is a
//! priced `health_probe` row in the ledger.

use std::time::Duration;

use llm_worker_testkit::{FakeLlmServer, Reply};

use crate::helpers::{ALL_ROLES, TestApp, openai_provider};
use crate::metrics::{sample, scrape};

/// Poll `/readyz` until its body has a line starting with `line`; the body then.
async fn readyz_line(addr: std::net::SocketAddr, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        if body.lines().any(|l| l.starts_with(line)) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never showed {line:?}; last:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn probes_open_and_close_a_circuit_with_no_job_traffic_and_show_the_state_everywhere() {
    llm_worker::tls::install_crypto_provider();
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::status(500, "down for maintenance"));
    let mut app = TestApp::new(
        &openai_provider("openai", &fake.base_url(), "gpt-test")
            .replace("max_retries = 1", "max_retries = 0"),
    )
    .await;
    app.set_price("openai", "gpt-test", 1000.0, 2000.0).await;
    app.start_worker_with(ALL_ROLES, |c| {
        c.telemetry.metrics_listen = Some("127.0.0.1:0".into());
        c.circuit_breaker.failure_threshold = 2;
        // Far beyond the test: only a probe can close the circuit, not a job's half-open call.
        c.circuit_breaker.cooldown_secs = 3600;
        c.health.probe_interval_secs = 1;
    })
    .await;
    let addr = app.workers[0].metrics_addr.unwrap();

    // Failing probes open the circuit.
    let body = readyz_line(addr, "provider openai gpt-test UNAVAILABLE probe failed").await;
    assert!(body.starts_with("ready\n"), "{body}");
    let metrics = scrape(&format!("http://{addr}/metrics")).await;
    let labels = r#"{provider="openai",model="gpt-test"}"#;
    assert_eq!(
        sample(&metrics, &format!("llm_circuit_state{labels}")),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, &format!("llm_provider_probe_ok{labels}")),
        Some(0.0)
    );

    // The provider recovers: the next probe closes the circuit, with no job sent.
    fake.set_default(Reply::answer(&["pong"], (3, 1)));
    readyz_line(addr, "provider openai gpt-test HEALTHY probe ok").await;
    let metrics = scrape(&format!("http://{addr}/metrics")).await;
    assert_eq!(
        sample(&metrics, &format!("llm_circuit_state{labels}")),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, &format!("llm_provider_probe_ok{labels}")),
        Some(1.0)
    );
    assert!(sample(&metrics, &format!("llm_provider_probe_seconds{labels}")).is_some());

    // `llm-worker status` over NATS says so too.
    let workers =
        llm_worker::status::collect(&app.client, &app.config.nats, Duration::from_secs(1))
            .await
            .unwrap();
    let entry = workers[0]
        .providers
        .iter()
        .find(|p| p.model == "gpt-test")
        .expect("the route's entry in the status");
    assert_eq!(entry.state, llm_worker::health::State::Healthy);
    assert!(entry.last_probe.as_ref().is_some_and(|p| p.ok), "{entry:?}");
    let table = llm_worker::status::render(&workers);
    assert!(table.contains("HEALTHY"), "{table}");

    // Every request the fake saw was a probe: tiny, and no job was ever published.
    let requests = fake.requests();
    assert!(requests.len() >= 3, "{}", requests.len());
    for r in &requests {
        assert_eq!(r["max_tokens"], 1, "{r}");
        assert_eq!(r["messages"][0]["content"], "ping", "{r}");
    }
    // Probes that were billed are in the ledger, priced, under their own task type.
    app.wait_count(
        "SELECT least(count(*), 1) FROM llm_jobs WHERE task_type = 'health_probe' \
         AND tenant = 'llm-worker' AND status = 'ok' AND input_tokens = 3 AND output_tokens = 1 \
         AND abs(cost_usd - 0.005) < 1e-9",
        1,
    )
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM llm_jobs WHERE task_type IS DISTINCT FROM 'health_probe'")
            .await,
        0
    );
    app.teardown().await;
}
