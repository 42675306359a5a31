//! The NATS micro-services API: every worker process answers `$SRV.PING`, `INFO` and `STATS`
//! (ADR-32 shapes), and its stats count the jobs it answered.

use std::time::Duration;

use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider};

/// Answers to `subject` from this test's workers (other tests' workers answer too: they are
/// told apart by their subject prefix), once `expected` have arrived (bounded wait).
async fn ask_fleet(app: &TestApp, subject: &str, expected: usize) -> Vec<Value> {
    let inbox = app.client.new_inbox();
    let mut sub = app.client.subscribe(inbox.clone()).await.unwrap();
    app.client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .unwrap();
    let prefix = &app.config.nats.subject_prefix;
    let mut ours = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ours.len() < expected {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {expected} answers to {subject}", ours.len()))
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        if v["metadata"]["subject_prefix"] == json!(prefix) {
            ours.push(v);
        }
    }
    ours
}

#[tokio::test]
async fn every_worker_answers_srv_ping_info_and_stats_with_its_job_counts() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (3, 1)));
    let app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    let _a = app.spawn_process("", &["run"]).await;
    let _b = app.spawn_process("", &["run"]).await;

    let pings = ask_fleet(&app, "$SRV.PING", 2).await;
    let mut ids: Vec<&str> = pings.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 2, "two processes, two ids: {pings:?}");
    for p in &pings {
        assert_eq!(p["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(p["name"], "llm-worker");
        assert!(p["version"].as_str().unwrap().split('.').count() == 3);
    }
    let info = ask_fleet(&app, "$SRV.INFO.llm-worker", 2).await;
    let subjects: Vec<&Value> = info[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["subject"])
        .collect();
    let jobs = app
        .config
        .nats
        .job_subject(llm_worker::contract::JobKind::Generate);
    assert!(subjects.contains(&&json!(jobs)), "{info:?}");

    // Two good jobs and one invalid one, answered by either process.
    let (reply_to, mut sub) = app.reply_inbox().await;
    for job in [
        json!({"prompt": "a"}),
        json!({"prompt": "b"}),
        json!({"prompt": ""}),
    ] {
        let mut job = job;
        job["reply_to"] = json!(reply_to);
        app.publish(job).await;
        collect_reply(&mut sub).await;
    }
    let stats = ask_fleet(&app, "$SRV.STATS.llm-worker", 2).await;
    let generate = |s: &Value| -> Value {
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "generate")
            .cloned()
            .unwrap()
    };
    let sum = |field: &str| -> u64 {
        stats
            .iter()
            .map(|s| generate(s)[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (sum("num_requests"), sum("num_errors")),
        (3, 1),
        "{stats:?}"
    );
    assert!(
        stats
            .iter()
            .any(|s| generate(s)["last_error"] == "invalid_job"),
        "{stats:?}"
    );
    assert_eq!(stats[0]["type"], "io.nats.micro.v1.stats_response");
    // One instance by its id.
    let one = ask_fleet(&app, &format!("$SRV.PING.llm-worker.{}", ids[0]), 1).await;
    assert_eq!(one[0]["id"], ids[0]);
    app.teardown().await;
}
