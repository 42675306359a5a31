//! Tenant rate and concurrency limits through the contract, on three worker processes sharing
//! the counters: jobs over `requests_per_minute` or `tokens_per_minute` wait for the next
//! minute and are then answered (not failed), other tenants' jobs do not wait for them, and
//! a job that would wait past its timeout is answered `timeout` without a call; a tenant
//! never has more than `max_in_flight` jobs running across the fleet.
//!
//! The per-minute tests wait for a UTC minute boundary (up to a minute).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, WorkerProcess, openai_provider};

/// A job's timeout long enough to wait for the next minute (a job waits at most that long).
const WAIT_MS: u64 = 90_000;

async fn fleet(policy: &str) -> (FakeLlmServer, TestApp, Vec<WorkerProcess>) {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n{policy}",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let app = TestApp::new(&toml).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(app.spawn_process("", &["run"]).await);
    }
    (fake, app, workers)
}

/// The next result on `sub` (chunks skipped), waiting long enough for a minute to turn.
async fn next_result(sub: &mut async_nats::Subscriber) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(90), sub.next())
            .await
            .expect("no result within 90 s")
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        if event["type"] == "result" {
            return event;
        }
    }
}

/// Make sure at least 10 s of the current UTC minute are left, so a burst of jobs lands in
/// one minute: without the limit it would, and the test would see it. (Waiting for a clock
/// position: there is no event to await.)
pub(crate) async fn minute_with_room() {
    use chrono::Timelike;
    let second = Utc::now().second();
    if second >= 50 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - second))).await;
    }
}

/// The UTC minute a job started in (`received_at`: when a worker began it).
fn minute(result: &Value) -> String {
    let at: DateTime<Utc> = result["received_at"].as_str().unwrap().parse().unwrap();
    at.format("%H:%M").to_string()
}

#[tokio::test]
async fn jobs_over_the_requests_per_minute_wait_for_the_next_minute_on_three_workers() {
    let (fake, app, workers) = fleet(
        "[tenants.metered]\nrequests_per_minute = 6\n[tenants.tight]\nrequests_per_minute = 1\n",
    )
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    minute_with_room().await;
    for _ in 0..9 {
        app.publish(json!({"prompt": "x", "tenant": "metered", "reply_to": reply_to, "stream": false, "timeout_ms": WAIT_MS}))
            .await;
    }
    for _ in 0..4 {
        app.publish(
            json!({"prompt": "x", "tenant": "free", "reply_to": reply_to, "stream": false}),
        )
        .await;
    }
    let mut per_minute: BTreeMap<String, usize> = BTreeMap::new();
    let mut free_done_before_metered = 0;
    let mut metered_done = 0;
    for _ in 0..13 {
        let r = next_result(&mut sub).await;
        assert_eq!(
            r["status"], "ok",
            "waiting jobs are answered, not failed: {r}"
        );
        if r["tenant"] == "metered" {
            metered_done += 1;
            *per_minute.entry(minute(&r)).or_default() += 1;
        } else if metered_done < 9 {
            free_done_before_metered += 1;
        }
    }
    // Never more than the limit started in one minute, fleet-wide; the rest waited.
    assert!(per_minute.values().all(|n| *n <= 6), "{per_minute:?}");
    assert!(per_minute.len() >= 2, "{per_minute:?}");
    // The other tenant's jobs did not wait behind the metered ones.
    assert_eq!(free_done_before_metered, 4);
    assert_eq!(fake.request_count(), 13);
    // A job that cannot wait for the next minute is answered `timeout`, without a call.
    app.publish(json!({"prompt": "x", "tenant": "tight", "reply_to": reply_to, "stream": false}))
        .await;
    let first = next_result(&mut sub).await;
    assert_eq!(first["status"], "ok");
    app.publish(json!({"prompt": "x", "tenant": "tight", "reply_to": reply_to, "stream": false, "timeout_ms": 1}))
        .await;
    let second = next_result(&mut sub).await;
    if second["status"] == "ok" {
        // Only possible in the next minute (the first job started at its very end).
        assert_ne!(minute(&second), minute(&first), "{second}");
    } else {
        assert_eq!(second["error"]["code"], "timeout", "{second}");
        let message = second["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("expired: waited"), "{message}");
        assert!(message.contains("limits"), "{message}");
        assert_eq!(second["attempts"], json!([]));
        assert_eq!(fake.request_count(), 14);
    }
    drop(workers);
    app.teardown().await;
}

#[tokio::test]
async fn jobs_over_the_tokens_per_minute_wait_for_the_next_minute_on_three_workers() {
    // 20 tokens a job: the fourth job of a minute finds 60 of 50 tokens used.
    let (fake, app, workers) = fleet("[tenants.metered]\ntokens_per_minute = 50\n").await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut per_minute: BTreeMap<String, usize> = BTreeMap::new();
    minute_with_room().await;
    for _ in 0..6 {
        // One at a time: each job's tokens are counted before the next is published.
        app.publish(json!({"prompt": "x", "tenant": "metered", "reply_to": reply_to, "stream": false, "timeout_ms": WAIT_MS}))
            .await;
        let r = next_result(&mut sub).await;
        assert_eq!(r["status"], "ok", "{r}");
        *per_minute.entry(minute(&r)).or_default() += 1;
    }
    // A job starts while the minute's tokens are under the limit: three jobs (60 tokens),
    // one more at most when a worker's copy of the counter lags by the last charge.
    assert!(per_minute.values().all(|n| *n <= 4), "{per_minute:?}");
    assert!(per_minute.len() >= 2, "{per_minute:?}");
    assert_eq!(fake.request_count(), 6);
    drop(workers);
    app.teardown().await;
}

/// Most jobs running at once among `results` (each from its receipt to its result).
fn max_overlap(results: &[&Value]) -> usize {
    let at = |r: &Value, key: &str| -> DateTime<Utc> { r[key].as_str().unwrap().parse().unwrap() };
    crate::helpers::peak_overlap(
        results
            .iter()
            .map(|r| (at(r, "received_at"), at(r, "finished_at"))),
    )
}

#[tokio::test]
async fn a_tenant_never_runs_more_jobs_than_its_max_in_flight_on_three_workers() {
    let (fake, app, workers) = fleet("[tenants.capped]\nmax_in_flight = 2\n").await;
    fake.set_latency(Duration::from_millis(150));
    let (reply_to, mut sub) = app.reply_inbox().await;
    for i in 0..20 {
        let tenant = if i % 2 == 0 { "capped" } else { "free" };
        app.publish(
            json!({"prompt": "x", "tenant": tenant, "reply_to": reply_to, "stream": false}),
        )
        .await;
    }
    let mut results = Vec::new();
    for _ in 0..20 {
        results.push(next_result(&mut sub).await);
    }
    assert!(results.iter().all(|r| r["status"] == "ok"));
    let of = |t: &str| -> Vec<&Value> { results.iter().filter(|r| r["tenant"] == t).collect() };
    let capped = max_overlap(&of("capped"));
    let free = max_overlap(&of("free"));
    eprintln!("max in flight: capped {capped}, free {free}");
    assert!(
        capped <= 2,
        "{capped} of the capped tenant's jobs ran at once"
    );
    // The limit is the tenant's, not everyone's.
    assert!(free > 2, "the other tenant ran at most {free} at once");
    assert_eq!(fake.request_count(), 20);
    drop(workers);
    app.teardown().await;
}

#[tokio::test]
async fn a_slot_held_by_a_killed_worker_is_freed_within_the_stated_30_s() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n[tenants.capped]\nmax_in_flight = 1\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let app = TestApp::new(&toml).await;
    // The first worker takes the tenant's only slot with a call that never answers.
    let first = app.spawn_process("", &["run"]).await;
    fake.push(Reply::Hang);
    let (reply_to, mut sub) = app.reply_inbox().await;
    let job = json!({"prompt": "x", "tenant": "capped", "reply_to": reply_to, "stream": false,
                     "timeout_ms": WAIT_MS});
    app.publish(job.clone()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fake.request_count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = app.spawn_process("", &["run"]).await;
    first.kill().await;
    let killed = Utc::now();
    // The killed worker's job comes back (after the ack wait), and one more is published:
    // both wait for the slot its holding keeps counted until it goes stale.
    app.publish(job).await;
    let results = [next_result(&mut sub).await, next_result(&mut sub).await];
    let mut starts = Vec::new();
    for r in &results {
        assert_eq!(r["status"], "ok", "{r}");
        let attempts = r["attempts"].as_array().unwrap();
        let start: DateTime<Utc> = attempts[0]["started_at"].as_str().unwrap().parse().unwrap();
        starts.push((start - killed).num_milliseconds() as f64 / 1e3);
    }
    starts.sort_by(f64::total_cmp);
    eprintln!("slot of a killed worker: the tenant's jobs started {starts:?} s after the kill");
    // Confirmed every 10 s and stale 30 s after the last confirmation (here: the slot was
    // taken about a second before the kill): free 20 to 30 s after the kill, plus the
    // parked job's next look at its tenant's limits and a loaded machine's slack.
    assert!(
        starts[0] >= 15.0,
        "the tenant ran {:.1} s after the kill: the killed worker's slot was not held",
        starts[0]
    );
    assert!(
        starts[0] <= 35.0,
        "the slot was freed only {:.1} s after the kill (stated: 30 s)",
        starts[0]
    );
    // One at a time still.
    assert!(starts[1] >= starts[0]);
    drop(second);
    app.teardown().await;
}
