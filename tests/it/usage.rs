//! The usage and cost ledger: rows per job and per call, idempotency, outage tolerance, prices.

use async_nats::jetstream::message::PublishMessage;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;

use crate::helpers::{ALL_ROLES, TestApp, collect_reply, openai_provider};
use crate::servers::Outage;

const PRIMARY_PRICE: (f64, f64) = (3.0, 15.0);
const BACKUP_PRICE: (f64, f64) = (1.0, 2.0);

async fn set_price(app: &TestApp, provider: &str, model: &str, price: (f64, f64), from: &str) {
    sqlx::query(
        "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok, output_usd_per_mtok) \
         VALUES ($1, $2, $3::timestamptz, $4, $5)",
    )
    .bind(provider)
    .bind(model)
    .bind(from)
    .bind(price.0)
    .bind(price.1)
    .execute(&app.db)
    .await
    .unwrap();
}

/// Migrations are applied by the worker; tests that insert prices first apply them here.
async fn migrate(app: &TestApp) {
    llm_worker::usage::migrate(&app.db).await.unwrap();
}

#[tokio::test]
async fn a_job_that_falls_back_records_one_job_row_and_two_call_rows_with_tokens_and_costs() {
    let primary = FakeLlmServer::start().await.unwrap();
    primary.set_default(Reply::status(503, "overloaded"));
    let backup = FakeLlmServer::start().await.unwrap();
    backup.push(Reply::answer(&["from ", "backup"], (11, 5)));
    let providers = format!(
        "{}{}max_retries = 0\n[routes]\ndefault = [\"primary\", \"backup\"]\n",
        openai_provider("backup", &backup.base_url(), "small"),
        openai_provider("primary", &primary.base_url(), "big").replace("max_retries = 1\n", ""),
    );
    let mut app = TestApp::new(&providers).await;
    migrate(&app).await;
    set_price(&app, "primary", "big", PRIMARY_PRICE, "2000-01-01").await;
    set_price(&app, "backup", "small", BACKUP_PRICE, "2000-01-01").await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let job_id = app
        .publish(json!({"prompt": "x", "reply_to": reply_to, "tenant": "acme", "trace_id": "tr-9", "metadata": {"team": "search"}}))
        .await;
    let result = collect_reply(&mut sub).await.result;
    assert_eq!(result["status"], "ok");
    assert_eq!(result["attempt"], 2);
    let expected_cost = (11.0 * BACKUP_PRICE.0 + 5.0 * BACKUP_PRICE.1) / 1e6;
    assert!(
        (result["cost_usd"].as_f64().unwrap() - expected_cost).abs() < 1e-12,
        "{result}"
    );

    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    let job: (String, String, String, Option<String>, i64, i64, f64, i32, String, serde_json::Value) = sqlx::query_as(
        "SELECT status, tenant, trace_id, provider, input_tokens, output_tokens, cost_usd::float8, attempts, kind, metadata \
         FROM llm_jobs WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (
            job.0.as_str(),
            job.1.as_str(),
            job.2.as_str(),
            job.3.as_deref(),
            job.4,
            job.5,
            job.7,
            job.8.as_str()
        ),
        ("ok", "acme", "tr-9", Some("backup"), 11, 5, 2, "generate")
    );
    assert!((job.6 - expected_cost).abs() < 1e-12);
    assert_eq!(job.9, json!({"team": "search"}));

    let calls: Vec<(i32, String, String, String, i64, i64, f64, Option<i32>, Option<String>, bool)> = sqlx::query_as(
        "SELECT attempt, provider, model, status, input_tokens, output_tokens, cost_usd::float8, http_status, error_code, tokens_estimated \
         FROM llm_calls WHERE trace_id = 'tr-9' ORDER BY attempt",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(calls.len(), 2);
    let (a1, a2) = (&calls[0], &calls[1]);
    assert_eq!(
        (a1.0, a1.1.as_str(), a1.2.as_str(), a1.3.as_str()),
        (1, "primary", "big", "error")
    );
    assert_eq!(
        (a1.4, a1.5, a1.6, a1.7, a1.8.as_deref()),
        (0, 0, 0.0, Some(503), Some("overloaded"))
    );
    assert_eq!(
        (a2.0, a2.1.as_str(), a2.2.as_str(), a2.3.as_str()),
        (2, "backup", "small", "ok")
    );
    assert_eq!(
        (a2.4, a2.5, a2.7, a2.8.as_deref(), a2.9),
        (11, 5, Some(200), None, false)
    );
    assert!((a2.6 - expected_cost).abs() < 1e-12);
    app.teardown().await;
}

#[tokio::test]
async fn results_delivered_twice_to_the_recorder_produce_no_duplicate_rows() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let job_id = app
        .publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let result = collect_reply(&mut sub).await.result;
    app.wait_count("SELECT count(*) FROM llm_calls", 1).await;

    // The same result again through the stream (as after a redelivery)...
    let subject = format!("{}.results.{job_id}", app.config.nats.subject_prefix);
    let again = PublishMessage::build().payload(serde_json::to_vec(&result).unwrap().into());
    app.js
        .send_publish(subject, again)
        .await
        .unwrap()
        .await
        .unwrap();
    // ...and directly, twice in one batch and once more.
    let event: llm_worker::contract::ResultEvent = serde_json::from_value(result).unwrap();
    llm_worker::usage::write_batch(&app.db, &[event.clone(), event.clone()])
        .await
        .unwrap();
    llm_worker::usage::write_batch(&app.db, &[event])
        .await
        .unwrap();
    // A sentinel job recorded after the duplicate proves the recorder got past it.
    let sentinel = app
        .publish(json!({"prompt": "y", "reply_to": reply_to}))
        .await;
    collect_reply(&mut sub).await;
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{sentinel}'"),
        1,
    )
    .await;

    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    app.wait_count(
        &format!("SELECT count(*) FROM llm_calls WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    app.wait_count("SELECT count(*) FROM llm_jobs", 2).await;
    app.teardown().await;
}

#[tokio::test]
async fn results_arriving_within_the_batch_wait_share_one_transaction() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (3, 1)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    // Long enough that a slow machine still lands the three results in one window.
    app.start_worker_with(ALL_ROLES, |c| c.recorder.batch_wait_ms = 2_000)
        .await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    for i in 0..3 {
        app.publish(json!({"prompt": format!("p{i}"), "reply_to": reply_to}))
            .await;
    }
    for _ in 0..3 {
        collect_reply(&mut sub).await;
    }
    app.wait_count("SELECT count(*) FROM llm_jobs", 3).await;
    // Rows written by one transaction carry the same xmin.
    let transactions = app
        .count("SELECT count(DISTINCT xmin::text) FROM llm_jobs")
        .await;
    assert_eq!(
        transactions, 1,
        "one commit for results inside one batch wait"
    );
    app.teardown().await;
}

#[tokio::test]
async fn with_postgres_unreachable_from_the_start_jobs_flow_and_every_row_appears_once_it_is_back()
{
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    let (outage, proxied) = Outage::for_database(&app).await;
    migrate(&app).await; // so the test can count rows directly during the outage
    // Unreachable from before the worker starts: it must start and serve jobs anyway.
    outage.set_up(false);
    app.start_worker_with(ALL_ROLES, |c| {
        c.database.url = Some(proxied.into());
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    for i in 0..5 {
        app.publish(json!({"prompt": format!("job {i}"), "reply_to": reply_to}))
            .await;
        assert_eq!(
            collect_reply(&mut sub).await.result["status"],
            "ok",
            "jobs flow without Postgres"
        );
    }
    let during = app.count("SELECT count(*) FROM llm_jobs").await;
    assert_eq!(
        during, 0,
        "nothing could be written while Postgres was unreachable"
    );

    outage.set_up(true);
    app.wait_count("SELECT count(*) FROM llm_jobs", 5).await;
    app.wait_count("SELECT count(*) FROM llm_calls", 5).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_price_change_applies_to_later_calls_only_and_an_unknown_price_gives_null_cost() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (1000, 500)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "priced")).await;
    migrate(&app).await;
    set_price(&app, "openai", "priced", (1.0, 1.0), "2000-01-01").await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let before = app
        .publish(json!({"prompt": "a", "reply_to": reply_to}))
        .await;
    collect_reply(&mut sub).await;
    set_price(&app, "openai", "priced", (10.0, 10.0), "now").await;
    let after = app
        .publish(json!({"prompt": "b", "reply_to": reply_to}))
        .await;
    collect_reply(&mut sub).await;
    let unpriced = app
        .publish(json!({"prompt": "c", "reply_to": reply_to, "model": "unpriced"}))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert!(
        r["cost_usd"].is_null(),
        "an unknown price is null, never zero: {r}"
    );

    app.wait_count("SELECT count(*) FROM llm_jobs", 3).await;
    let cost = |id: uuid::Uuid| {
        let db = app.db.clone();
        async move {
            let c: (Option<f64>, Option<f64>) = sqlx::query_as(
                "SELECT j.cost_usd::float8, c.cost_usd::float8 FROM llm_jobs j JOIN llm_calls c USING (job_id) WHERE job_id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
            c
        }
    };
    assert_eq!(cost(before).await, (Some(0.0015), Some(0.0015)));
    assert_eq!(cost(after).await, (Some(0.015), Some(0.015)));
    assert_eq!(cost(unpriced).await, (None, None));
    let unpriced_calls = app
        .count("SELECT sum(unpriced_calls)::bigint FROM llm_usage_daily")
        .await;
    assert_eq!(unpriced_calls, 1);
    app.teardown().await;
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_chunk_records_estimated_tokens_for_the_partial_output() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::Cut {
        deltas: vec!["abcdefgh".into(), "ijklmnop".into()],
    });
    let providers = openai_provider("openai", &fake.base_url(), "m")
        .replace("max_retries = 1", "max_retries = 0");
    let mut app = TestApp::new(&providers).await;
    migrate(&app).await;
    set_price(&app, "openai", "m", (1.0, 1.0), "2000-01-01").await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let job_id = app
        .publish(json!({"prompt": "0123456789ab", "reply_to": reply_to}))
        .await;
    assert_eq!(collect_reply(&mut sub).await.result["status"], "error");

    app.wait_count(
        &format!("SELECT count(*) FROM llm_calls WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    let row: (String, Option<String>, bool, i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT status, error_code, tokens_estimated, input_tokens, output_tokens, cost_usd::float8 FROM llm_calls WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (row.0.as_str(), row.1.as_deref(), row.2),
        ("error", Some("truncated"), true)
    );
    assert_eq!(
        row.4, 2,
        "two text events of an OpenAI-compatible stream: about a token each"
    );
    assert!(row.3 > 0, "the prompt is estimated too");
    assert!(row.5.unwrap() > 0.0, "a partial answer is billed");
    app.teardown().await;
}

#[tokio::test]
async fn the_usage_report_sums_the_daily_view() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (10, 20)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    for tenant in ["a", "a", "b"] {
        app.publish(json!({"prompt": "x", "reply_to": reply_to, "tenant": tenant}))
            .await;
        collect_reply(&mut sub).await;
    }
    app.wait_count("SELECT count(*) FROM llm_jobs", 3).await;

    let today = chrono::Utc::now().date_naive();
    let rows = llm_worker::usage::report::daily(&app.db, today, today + chrono::Days::new(1), None)
        .await
        .unwrap();
    let per_tenant: Vec<(&str, i64, i64)> = rows
        .iter()
        .map(|r| (r.tenant.as_str(), r.jobs, r.input_tokens))
        .collect();
    assert_eq!(per_tenant, vec![("a", 2, 20), ("b", 1, 10)]);
    let table = llm_worker::usage::report::render(&rows);
    let total = table.lines().find(|l| l.starts_with("total")).unwrap();
    let numbers: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(
        &numbers[1..5],
        ["3", "0", "30", "60"],
        "calls, failed, input, output: {table}"
    );
    assert!(
        table.contains("no price"),
        "unpriced calls are flagged: {table}"
    );
    // A short view: the newest row, a note of the one left out, the total over both.
    let short = llm_worker::usage::report::render_last(&rows, Some(1));
    assert!(short.starts_with("(1 earlier row(s) not shown"), "{short}");
    assert!(!short.contains(" a ") && short.contains(" b "), "{short}");
    assert_eq!(
        short.lines().find(|l| l.starts_with("total")),
        Some(total),
        "{short}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_job_with_one_unpriced_billed_call_among_priced_ones_has_no_cost() {
    // The primary (no price) streams some text and breaks: a billed call, estimated.
    let primary = FakeLlmServer::start().await.unwrap();
    primary.set_default(Reply::Cut {
        deltas: vec!["half an ".into(), "answer".into()],
    });
    let backup = FakeLlmServer::start().await.unwrap();
    backup.push(Reply::answer(&["whole"], (11, 5)));
    let providers = format!(
        "{}{}max_retries = 0\n[routes]\ndefault = [\"primary\", \"backup\"]\n",
        openai_provider("backup", &backup.base_url(), "small"),
        openai_provider("primary", &primary.base_url(), "big").replace("max_retries = 1\n", ""),
    );
    let mut app = TestApp::new(&providers).await;
    migrate(&app).await;
    set_price(&app, "backup", "small", BACKUP_PRICE, "2000-01-01").await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let job_id = app
        .publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let result = collect_reply(&mut sub).await.result;
    assert_eq!(result["status"], "ok");
    assert!(result["attempts"][0]["output_tokens"].as_u64().unwrap() > 0);
    assert!(result["cost_usd"].is_null(), "{result}");

    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    let (cost, priced_calls): (Option<f64>, i64) = sqlx::query_as(&format!(
        "SELECT j.cost_usd::float8, (SELECT count(*) FROM llm_calls c WHERE c.job_id = j.job_id AND c.cost_usd IS NOT NULL) \
         FROM llm_jobs j WHERE j.job_id = '{job_id}'"
    ))
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        cost, None,
        "a job's cost is unknown when one billed call has no price"
    );
    assert_eq!(priced_calls, 1, "the backup's call itself is priced");
    app.teardown().await;
}

#[tokio::test]
async fn when_postgres_goes_away_mid_run_jobs_flow_and_the_rows_appear_once_it_is_back() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    let (outage, proxied) = Outage::for_database(&app).await;
    app.start_worker_with(ALL_ROLES, |c| {
        c.database.url = Some(proxied.into());
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut run = async |n: usize| {
        for i in 0..n {
            app.publish(json!({"prompt": format!("job {i}"), "reply_to": reply_to}))
                .await;
            assert_eq!(collect_reply(&mut sub).await.result["status"], "ok");
        }
    };

    run(3).await;
    app.wait_count("SELECT count(*) FROM llm_jobs", 3).await;
    // The database goes away (connections cut, new ones refused) while jobs keep coming.
    outage.set_up(false);
    run(4).await;
    assert_eq!(app.count("SELECT count(*) FROM llm_jobs").await, 3);
    outage.set_up(true);
    app.wait_count("SELECT count(*) FROM llm_jobs", 7).await;
    app.wait_count("SELECT count(*) FROM llm_calls", 7).await;
    // Nothing went to the dead letters: an outage is not bad data.
    let dead = llm_worker::dead::list(&app.js, &app.config.nats, None, 10)
        .await
        .unwrap();
    assert!(dead.is_empty(), "{dead:?}");
    app.teardown().await;
}
