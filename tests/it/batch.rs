//! The batch lane (docs/batch.md), from the outside: jobs published with
//! `service_tier: "batch"` against the fake's OpenAI Batch API, answered on their reply
//! subjects and in the results stream, recorded in `llm_calls` at the batch price; deadlines,
//! failed lines and cancels through the online chain; worker processes killed while batches
//! are open.

use std::collections::HashMap;
use std::time::Duration;

use llm_worker_testkit::{BatchPlan, FakeLlmServer};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider};

/// The lane's settings for tests: batches sent after 1 s, polled every 100 ms.
const FAST_LANE: &str = "\n[batch]\nmax_wait_secs = 1\npoll_ms = 100\nlease_secs = 2\n";

/// An OpenAI provider on `fake` that has OpenAI's service tiers and Batch API.
fn batch_provider(fake: &FakeLlmServer) -> String {
    format!(
        "{}service_tiers = true\n\n[routes]\ndefault = [\"openai\"]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    )
}

async fn app_with_lane(fake: &FakeLlmServer, lane: &str) -> TestApp {
    let app = TestApp::new(&format!("{}{lane}", batch_provider(fake))).await;
    app.set_price("openai", "gpt-test", 2.0, 8.0).await;
    app
}

/// Every live result on `sub` until `n` distinct jobs are answered, and how many results each
/// job got (a second result for a job would count 2).
async fn results(
    sub: &mut async_nats::Subscriber,
    n: usize,
    within: Duration,
) -> HashMap<String, (Value, usize)> {
    use futures::StreamExt;
    let mut got: HashMap<String, (Value, usize)> = HashMap::new();
    let end = tokio::time::Instant::now() + within;
    while got.len() < n {
        let msg = tokio::time::timeout_at(end, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} jobs answered in {within:?}", got.len()))
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(
            event["type"], "result",
            "a batch job sends no chunks: {event}"
        );
        let id = event["job_id"].as_str().unwrap().to_string();
        got.entry(id).or_insert((event, 0)).1 += 1;
    }
    got
}

/// Wait (bounded) until the lane holds nothing: no job in its stream, no open batch.
async fn lane_empty(app: &TestApp, within: Duration) {
    let end = tokio::time::Instant::now() + within;
    loop {
        let mut stream = app
            .js
            .get_stream(&app.config.nats.batch_stream)
            .await
            .unwrap();
        let held = stream.info().await.unwrap().state.messages;
        // Keys, not messages: a removed record leaves its purge marker in the bucket.
        let records = app
            .js
            .get_key_value(&app.config.nats.batch_bucket)
            .await
            .unwrap();
        let open = futures::TryStreamExt::try_collect::<Vec<String>>(records.keys().await.unwrap())
            .await
            .unwrap()
            .len();
        if held == 0 && open == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the lane still holds {held} jobs and {open} records"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn batch_job(tenant: &str, prompt: &str, reply_to: &str) -> Value {
    json!({"tenant": tenant, "prompt": prompt, "reply_to": reply_to, "service_tier": "batch"})
}

#[tokio::test]
async fn batch_jobs_are_answered_from_one_provider_batch_at_the_batch_price() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_millis(500),
        ..Default::default()
    });
    let mut app = app_with_lane(&fake, FAST_LANE).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let tenant = ["acme", "globex", "initech"][i % 3];
        ids.push(
            app.publish(batch_job(tenant, &format!("q{i}"), &reply_to))
                .await,
        );
    }
    // A job that must not wait is answered online at once, streamed, whatever the lane does.
    let (online_to, mut online) = app.reply_inbox().await;
    app.publish(json!({"prompt": "now", "reply_to": online_to}))
        .await;
    let reply = collect_reply(&mut online).await;
    assert!(!reply.chunks.is_empty(), "the standard job streams");
    assert!(
        reply.result.get("service_tier").is_none(),
        "{}",
        reply.result
    );

    let got = results(&mut sub, 30, Duration::from_secs(30)).await;
    for (i, id) in ids.iter().enumerate() {
        let (r, n) = &got[&id.to_string()];
        assert_eq!(*n, 1);
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["service_tier"], "batch", "{r}");
        assert_eq!(r["output"], format!("batched: q{i}"));
        assert_eq!(r["attempts"][0]["service_tier"], "batch");
        assert_eq!(app.wait_stored_result(*id).await["output"], r["output"]);
    }
    let stats = fake.batch_stats();
    assert_eq!(stats.lines, 30, "{stats:?}");
    assert!((1..=2).contains(&stats.created), "{stats:?}");
    assert_eq!(
        fake.request_count(),
        1,
        "only the standard job was an online call"
    );

    // Recorded per job, at half the price: tokens x price x 0.5.
    app.wait_count(
        "SELECT count(*) FROM llm_calls WHERE service_tier = 'batch' AND status = 'ok'",
        30,
    )
    .await;
    let off: i64 = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE service_tier = 'batch' AND abs(cost_usd -
                 (input_tokens * 2.0 + output_tokens * 8.0) / 1e6 * 0.5) > 1e-12",
        )
        .await;
    assert_eq!(off, 0, "every batch call costs half the standard price");
    let saved: f64 = sqlx::query_scalar(
        "SELECT sum(saved_usd)::float8 FROM llm_tier_savings WHERE tenant = 'acme'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    let paid: f64 = sqlx::query_scalar(
        "SELECT sum(cost_usd)::float8 FROM llm_calls WHERE tenant = 'acme' AND service_tier = 'batch'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        paid > 0.0 && (saved - paid).abs() < 1e-9,
        "saved {saved}, paid {paid}"
    );
    lane_empty(&app, Duration::from_secs(10)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_job_near_its_deadline_leaves_its_batch_and_is_answered_online_in_time() {
    let fake = FakeLlmServer::start().await.unwrap();
    // The batch would take ten minutes.
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_secs(600),
        ..Default::default()
    });
    let lane = format!("{FAST_LANE}online_margin_secs = 50\n");
    let mut app = app_with_lane(&fake, &lane).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let started = tokio::time::Instant::now();
    let mut job = batch_job("acme", "hurry", &reply_to);
    job["expires_in_ms"] = json!(60_000);
    job["stream"] = json!(false);
    let id = app.publish(job).await;
    // A job without a deadline of its own gets a day: it stays in the batch.
    let patient = app.publish(batch_job("acme", "patient", &reply_to)).await;
    let got = results(&mut sub, 1, Duration::from_secs(30)).await;
    let (r, _) = &got[&id.to_string()];
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r.get("service_tier").is_none(), "answered online: {r}");
    assert_eq!(fake.request_count(), 1, "one online call");
    assert_eq!(fake.batch_stats().lines, 2, "both were in the batch");
    assert!(
        app.stored_result(patient).await.is_none(),
        "the other job still waits"
    );
    app.teardown().await;
}

#[tokio::test]
async fn failed_lines_go_online_and_a_cancelled_job_is_answered_cancelled() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_secs(3),
        fail_every: 3,
        ..Default::default()
    });
    let mut app = app_with_lane(&fake, FAST_LANE).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(
            app.publish(batch_job("acme", &format!("q{i}"), &reply_to))
                .await,
        );
    }
    // Wait until the batch is created, then cancel the first job.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.batch_stats().created == 0 {
        assert!(tokio::time::Instant::now() < end, "no batch created");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.client
        .publish(
            app.config.nats.cancel_subject("acme", &ids[0]),
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let got = results(&mut sub, 9, Duration::from_secs(30)).await;
    let (cancelled, _) = &got[&ids[0].to_string()];
    assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
    let mut online = 0;
    for id in &ids[1..] {
        let (r, n) = &got[&id.to_string()];
        assert_eq!((*n, &r["status"]), (1, &json!("ok")), "{r}");
        if r.get("service_tier").is_none() {
            online += 1;
        }
    }
    // Lines 3, 6 and 9 fail in the batch; they are answered online.
    assert_eq!(online, 3);
    assert_eq!(fake.request_count(), 3);
    lane_empty(&app, Duration::from_secs(10)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_thousand_batch_jobs_survive_a_worker_killed_twice_with_batches_open() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_secs(4),
        ..Default::default()
    });
    let app = app_with_lane(&fake, "").await;
    let lane = "\n[batch]\nmax_wait_secs = 1\nmax_jobs = 200\npoll_ms = 200\nlease_secs = 2\n";
    let steady = app.spawn_process(lane, &["run"]).await;
    let mut doomed = app.spawn_process(lane, &["run"]).await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut ids = Vec::new();
    for wave in 0..2 {
        let created = fake.batch_stats().created;
        for i in wave * 500..(wave + 1) * 500 {
            let tenant = ["acme", "globex", "initech"][i % 3];
            ids.push(
                app.publish(batch_job(tenant, &format!("q{i}"), &reply_to))
                    .await,
            );
        }
        // Killed while batches are open (created, not yet ended).
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        while fake.batch_stats().created <= created {
            assert!(tokio::time::Instant::now() < end, "no new batch");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        doomed.kill().await;
        doomed = app.spawn_process(lane, &["run"]).await;
    }
    let got = results(&mut sub, 1000, Duration::from_secs(120)).await;
    lane_empty(&app, Duration::from_secs(30)).await;
    // Anything answered twice would have arrived by now: the lane holds nothing.
    app.client.flush().await.unwrap();
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut sub),
    )
    .await;
    assert!(extra.is_err(), "a job was answered again: {extra:?}");
    for id in &ids {
        let (r, n) = &got[&id.to_string()];
        assert_eq!(*n, 1, "{id} answered {n} times");
        assert_eq!(r["status"], "ok", "{r}");
    }
    app.wait_count("SELECT count(*) FROM llm_jobs", 1000).await;
    let batch_rows = app
        .count("SELECT count(*) FROM llm_calls WHERE service_tier = 'batch'")
        .await;
    let online_rows = app
        .count("SELECT count(*) FROM llm_calls WHERE service_tier = 'standard'")
        .await;
    assert_eq!(batch_rows + online_rows, 1000);
    assert_eq!(online_rows as usize, fake.request_count());
    let off = app
        .count(
            "SELECT count(*) FROM llm_calls WHERE service_tier = 'batch' AND abs(cost_usd -
                 (input_tokens * 2.0 + output_tokens * 8.0) / 1e6 * 0.5) > 1e-12",
        )
        .await;
    assert_eq!(off, 0);
    eprintln!(
        "1000 jobs: {:?}, {} online calls",
        fake.batch_stats(),
        fake.request_count()
    );
    drop(steady);
    drop(doomed);
    app.teardown().await;
}

#[tokio::test]
async fn anthropic_message_batches_answer_batch_jobs_and_failed_requests_go_online() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_millis(500),
        fail_every: 4,
        ..Default::default()
    });
    let providers = format!(
        r#"
[providers.claude]
type = "anthropic"
base_url = "{}"
default_model = "claude-test"
max_retries = 1
retry_min_delay_ms = 10
retry_max_delay_ms = 50

[routes]
default = ["claude"]
{FAST_LANE}"#,
        fake.root_url()
    );
    let mut app = TestApp::new(&providers).await;
    app.set_price("claude", "claude-test", 3.0, 15.0).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            app.publish(batch_job("acme", &format!("q{i}"), &reply_to))
                .await,
        );
    }
    let got = results(&mut sub, 8, Duration::from_secs(30)).await;
    let mut batched = 0;
    for (i, id) in ids.iter().enumerate() {
        let (r, n) = &got[&id.to_string()];
        assert_eq!((*n, &r["status"]), (1, &json!("ok")), "{r}");
        if r["service_tier"] == "batch" {
            batched += 1;
            assert_eq!(r["output"], format!("batched: q{i}"));
        }
    }
    // Requests 4 and 8 errored in the batch: answered online.
    assert_eq!((batched, fake.request_count()), (6, 2));
    assert_eq!(fake.batch_stats().lines, 8);
    app.wait_count(
        "SELECT count(*) FROM llm_calls WHERE service_tier = 'batch' AND abs(cost_usd -
             (input_tokens * 3.0 + output_tokens * 15.0) / 1e6 * 0.5) < 1e-12",
        6,
    )
    .await;
    lane_empty(&app, Duration::from_secs(10)).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_flex_job_asks_openai_for_the_flex_tier_and_pays_the_flex_price() {
    let fake = FakeLlmServer::start().await.unwrap();
    let providers = format!(
        "{}service_tiers = true\n{}\n[routes]\ndefault = [\"openai\", \"compat\"]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test"),
        openai_provider("compat", &fake.base_url(), "gpt-test") + "service_tiers = false\n"
    );
    let mut app = TestApp::new(&providers).await;
    app.set_price("openai", "gpt-test", 2.0, 8.0).await;
    app.set_price("compat", "gpt-test", 2.0, 8.0).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": "a", "service_tier": "flex", "reply_to": reply_to}))
        .await;
    let flex = collect_reply(&mut sub).await.result;
    assert_eq!(flex["attempts"][0]["service_tier"], "flex", "{flex}");
    assert_eq!(fake.requests()[0]["service_tier"], "flex");
    // A compatible server without service tiers gets a standard request.
    app.publish(
        json!({"prompt": "b", "service_tier": "flex", "provider": "compat",
        "reply_to": reply_to}),
    )
    .await;
    let standard = collect_reply(&mut sub).await.result;
    assert!(
        standard["attempts"][0].get("service_tier").is_none(),
        "{standard}"
    );
    assert!(fake.requests()[1].get("service_tier").is_none());
    app.wait_count("SELECT count(*) FROM llm_calls", 2).await;
    let (flex_cost, standard_cost): (f64, f64) = sqlx::query_as(
        "SELECT (SELECT cost_usd::float8 FROM llm_calls WHERE service_tier = 'flex'),
                (SELECT cost_usd::float8 FROM llm_calls WHERE service_tier = 'standard')",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    // The fake answers both alike: the flex call costs half.
    assert!(
        (flex_cost * 2.0 - standard_cost).abs() < 1e-12,
        "{flex_cost} vs {standard_cost}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn batch_jobs_for_a_server_without_a_batch_api_are_answered_online_at_once() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        absent: true,
        ..Default::default()
    });
    let mut app = app_with_lane(&fake, FAST_LANE).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    for i in 0..5 {
        app.publish(batch_job("acme", &format!("q{i}"), &reply_to))
            .await;
    }
    let got = results(&mut sub, 5, Duration::from_secs(30)).await;
    // One refused upload, then online (not a batch tried again and again).
    assert_eq!(fake.batch_stats().uploads, 1);
    for (r, n) in got.values() {
        assert_eq!((*n, &r["status"]), (1, &json!("ok")), "{r}");
        assert!(r.get("service_tier").is_none(), "answered online: {r}");
    }
    assert_eq!(fake.request_count(), 5);
    assert_eq!(fake.batch_stats().created, 0);
    lane_empty(&app, Duration::from_secs(10)).await;
    app.teardown().await;
}
