//! Fair share between tenants through the contract: tenant A floods the queue with 20,000
//! jobs, then tenant B publishes 20; B's jobs are answered while A's backlog is still
//! there (first in, first out would answer every one of A's jobs first), on one worker
//! process and on three.

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, collect_results_within, openai_provider};

const FLOOD: usize = 20_000;
const SMALL: usize = 20;

async fn a_flood_does_not_starve_a_small_tenant(workers: usize) {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (1, 1)));
    // Slow enough that the flood takes minutes to drain even on a loaded machine, where
    // publishing it can take half a minute: at most 16 jobs of 400 ms at a time per worker
    // (40 jobs/s each; 20,000 jobs take 500 s on one worker, 167 s on three). B's jobs, with
    // every other free slot, still take a few rounds of 400 ms.
    fake.set_latency(Duration::from_millis(400));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let app = TestApp::new(&toml).await;
    let env = [("LLM_WORKER__WORKER__MAX_IN_FLIGHT", "16")];
    let mut procs = Vec::new();
    for _ in 0..workers {
        procs.push(app.spawn_process_with("", &["run"], &env).await);
    }
    // Tenant A: 20,000 jobs nobody waits for live (their results are stored).
    let subject = format!("{}.jobs.generate", app.config.nats.subject_prefix);
    for _ in 0..FLOOD / 500 {
        let mut acks = Vec::with_capacity(500);
        for _ in 0..500 {
            let id = Uuid::now_v7().to_string();
            let job = json!({"job_id": id, "prompt": "x", "tenant": "A", "stream": false});
            let publish = PublishMessage::build()
                .payload(serde_json::to_vec(&job).unwrap().into())
                .message_id(id);
            acks.push(app.js.send_publish(subject.clone(), publish).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    // Tenant B: 20 jobs, published after all of A's.
    let (reply_to, mut sub) = app.reply_inbox().await;
    let started = Instant::now();
    for _ in 0..SMALL {
        app.publish(json!({"prompt": "y", "tenant": "B", "reply_to": reply_to, "stream": false}))
            .await;
    }
    // A worker pulls the whole flood into its window before it sees B's jobs: on a loaded
    // machine that takes tens of seconds (17 s beside the fault tests).
    let results = collect_results_within(&mut sub, SMALL, Duration::from_secs(120)).await;
    let took = started.elapsed();
    // What is left of A's jobs (in the stream: not yet answered, parked or waiting).
    let a_left = app.jobs_in_stream().await;
    eprintln!(
        "fairness, {workers} worker(s): B's {SMALL} jobs answered in {took:?}; {a_left} of A's {FLOOD} jobs still waiting"
    );
    assert!(results.values().all(|r| r["status"] == "ok"));
    assert!(results.values().all(|r| r["tenant"] == "B"));
    assert!(
        a_left >= (FLOOD / 4) as u64,
        "B waited for A's backlog: only {a_left} of A's jobs were left when B's were answered"
    );
    drop(procs);
    app.teardown().await;
}

#[tokio::test]
async fn a_flood_does_not_starve_a_small_tenant_on_one_worker() {
    a_flood_does_not_starve_a_small_tenant(1).await;
}

#[tokio::test]
async fn a_flood_does_not_starve_a_small_tenant_on_three_workers() {
    a_flood_does_not_starve_a_small_tenant(3).await;
}
