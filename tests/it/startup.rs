//! Start-up as real deployments do it: the worker started at the same instant as a fresh
//! 3-node cluster (before any node listens, so it must wait for every step), a node killed
//! while it starts, and a NATS that never comes (start-up gives up at its deadline, naming the
//! step). Each test starts its own servers on free loopback ports.

use std::time::Duration;

use llm_worker::client::Client;
use llm_worker::contract::{JobKind, Status};
use llm_worker_testkit::nats::{ClusterPlan, free_port};
use serde_json::json;

use crate::faults::world;
use crate::helpers::ALL_ROLES;
use crate::servers::NatsServer;

/// `/readyz`'s status and body; `None` while nothing listens.
async fn readyz(port: u16) -> Option<(u16, String)> {
    llm_worker::tls::install_crypto_provider();
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

/// Poll `/readyz` until `want` holds, returning what it said then.
async fn readyz_until(port: u16, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((status, body)) = readyz(port).await
            && want(status, &body)
        {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never said what the test waits for"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One job through the started worker, answered.
async fn one_job_answered(urls: &str, config: &llm_worker::config::Config) {
    let mut nats = config.nats.clone();
    nats.url = urls.to_string();
    let client = Client::connect(&nats).await.unwrap();
    let result = client
        .submit(JobKind::Generate, json!({"prompt": "hello"}), None, &[])
        .await
        .unwrap()
        .wait(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(result.status, Status::Ok, "{result:?}");
    assert_eq!(result.output.as_deref(), Some("ok"));
}

/// A 3-node cluster planned (not started), R3 streams, a worker's configuration for it with
/// `/metrics` on a known port: the plan, its URLs, the fake, the database, the
/// configuration and that port.
async fn cluster_world() -> (
    ClusterPlan,
    String,
    llm_worker_testkit::FakeLlmServer,
    llm_worker_testkit::ScratchDatabase,
    llm_worker::config::Config,
    u16,
) {
    let plan = ClusterPlan::new().unwrap();
    let urls = plan.urls();
    let (fake, _services, database, mut config) = world(Some(&urls), Duration::ZERO).await;
    config.nats.replicas = 3;
    let metrics = free_port().unwrap();
    config.telemetry.metrics_listen = Some(format!("127.0.0.1:{metrics}"));
    (plan, urls, fake, database, config, metrics)
}

#[tokio::test]
async fn a_worker_started_with_a_fresh_cluster_waits_for_it_and_serves_jobs_without_a_restart() {
    let (plan, urls, _fake, database, config, metrics) = cluster_world().await;

    // The worker first: no node listens yet.
    let starting = tokio::spawn(llm_worker::app::start(config.clone(), ALL_ROLES));
    let (status, body) = readyz_until(metrics, |_, body| {
        body.starts_with("starting: waiting for the deployment's streams")
    })
    .await;
    assert_eq!(status, 503, "{body}");

    let _nodes = NatsServer::planned(plan).await;
    let worker = starting
        .await
        .unwrap()
        .expect("the worker gave up on a cluster that came up");
    let (status, body) = readyz(metrics).await.unwrap();
    assert_eq!(
        (status, body.lines().next()),
        (200, Some("ready")),
        "{body}"
    );
    one_job_answered(&urls, &config).await;

    worker.shutdown().await;
    database.drop().await;
}

#[tokio::test]
async fn a_cluster_node_killed_during_start_up_delays_the_worker_but_does_not_hang_it() {
    let (plan, urls, _fake, database, config, metrics) = cluster_world().await;

    let mut nodes = NatsServer::planned(plan).await;
    let starting = tokio::spawn(llm_worker::app::start(config.clone(), ALL_ROLES));
    // The cluster has just started: its nodes are still electing their leaders, and the
    // worker cannot have made its R3 streams yet when a node goes.
    nodes[1].kill().await;
    assert!(
        !starting.is_finished(),
        "the worker started before the node was killed: the test made no fault"
    );
    // Without the third node no R3 stream can be placed: start-up waits, and says so.
    let (status, body) = readyz_until(metrics, |_, body| body.matches(": ").count() >= 2).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("starting: waiting for "), "{body}");
    assert!(!starting.is_finished(), "started without its third node");
    nodes[1].restart().await;

    let worker = starting
        .await
        .unwrap()
        .expect("the worker gave up although the node came back");
    one_job_answered(&urls, &config).await;

    worker.shutdown().await;
    database.drop().await;
}

#[tokio::test]
async fn start_up_gives_up_at_its_deadline_naming_what_it_waited_for() {
    // Nothing listens on this port.
    let nowhere = format!("nats://127.0.0.1:{}", free_port().unwrap());
    let (_fake, _services, database, mut config) = world(Some(&nowhere), Duration::ZERO).await;
    config.nats.start_timeout_secs = 3;
    let error = match llm_worker::app::start(config, ALL_ROLES).await {
        Ok(_) => panic!("started without NATS"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.starts_with("gave up waiting for the deployment's streams after 3 s"),
        "{error}"
    );
    database.drop().await;
}

#[tokio::test]
async fn worker_and_gateway_are_not_ready_while_nats_is_gone_and_ready_again_when_it_is_back() {
    llm_worker::tls::install_crypto_provider();
    let mut server = NatsServer::start("").await;
    let (_fake, _services, database, mut config) = world(Some(&server.url()), Duration::ZERO).await;
    let metrics = free_port().unwrap();
    config.telemetry.metrics_listen = Some(format!("127.0.0.1:{metrics}"));
    let worker = llm_worker::app::start(config.clone(), ALL_ROLES)
        .await
        .unwrap();
    let gateway = llm_worker::gateway::start(config.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let gateway_port = gateway.addr.port();
    for port in [metrics, gateway_port] {
        let (status, body) = readyz(port).await.unwrap();
        assert_eq!(
            (status, body.lines().next()),
            (200, Some("ready")),
            "{body}"
        );
    }

    server.kill().await;
    for port in [metrics, gateway_port] {
        let (_, body) = readyz_until(port, |status, _| status == 503).await;
        assert_eq!(body, "NATS is not connected");
    }

    server.restart().await;
    for port in [metrics, gateway_port] {
        readyz_until(port, |status, _| status == 200).await;
    }
    gateway.shutdown().await;
    worker.shutdown().await;
    database.drop().await;
}
