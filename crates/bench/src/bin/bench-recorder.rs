//! Recorder benchmark: how fast stored results become Postgres rows.
//!
//!   scripts/services && cargo run --release -p llm-worker-bench --bin bench-recorder
//!
//! Uses NATS_URL / DATABASE_URL (defaults: local), a throw-away database and unique stream
//! names. Prints two figures:
//! 1. throughput: N results (2 calls each) pre-stored in the results stream, then drained by
//!    one recorder: rows/s (llm_jobs + llm_calls rows) and results/s;
//! 2. lag at a fixed rate: results published at 1,000/s for 5 s while the recorder runs; lag
//!    per job = row `recorded_at` (its transaction's start) - result `finished_at`, p50/p99/max.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use chrono::Utc;
use llm_worker::config::{Config, RecorderConfig};
use llm_worker::contract::ErrorCode;
use llm_worker::contract::JobKind;
use llm_worker::contract::{
    AttemptRecord, ErrorBody, ResultEvent, Status, TokenClasses, TokensUsed,
};
use llm_worker::usage::Recorder;
use llm_worker_testkit::ScratchDatabase;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const THROUGHPUT_RESULTS: usize = 50_000;
const RATE: u64 = 1_000;
const RATE_SECONDS: u64 = 5;

fn result(job_id: Uuid) -> ResultEvent {
    let now = Utc::now();
    let attempt = |n: u32, error: Option<ErrorBody>| AttemptRecord {
        attempt: n,
        provider: if n == 1 { "primary" } else { "backup" }.into(),
        model: "m".into(),
        error,
        input_tokens: 120,
        output_tokens: 80,
        // Cached prompts and reasoning, as most calls now report.
        classes: TokenClasses {
            cache_read_tokens: 64,
            reasoning_tokens: 20,
            ..TokenClasses::default()
        },
        tokens_estimated: false,
        images: None,
        cost_usd: None,
        cache_saved_usd: None,
        http_status: Some(200),
        service_tier: llm_worker::contract::ServiceTier::Standard,
        latency_ms: 300,
        ttft_ms: Some(90),
        started_at: now,
        finished_at: now,
    };
    ResultEvent {
        kind: "result".into(),
        job_id,
        trace_id: job_id.to_string(),
        status: Status::Ok,
        output: Some("a short answer".into()),
        embeddings: None,
        images: None,
        tool_calls: None,
        json: None,
        finish_reason: Some("stop".into()),
        tokens_used: TokensUsed::new(120, 80),
        model_used: Some("m".into()),
        provider: Some("backup".into()),
        attempt: Some(2),
        attempts: vec![
            attempt(
                1,
                Some(ErrorBody {
                    code: ErrorCode::Overloaded,
                    message: "503".into(),
                    retryable: true,
                }),
            ),
            attempt(2, None),
        ],
        cost_usd: None,
        cache_hit: false,
        cache: None,
        stale: false,
        context_trimmed: None,
        processing_time_ms: 600,
        error: None,
        service_tier: llm_worker::contract::ServiceTier::Standard,
        job_kind: JobKind::Generate,
        tenant: "bench".into(),
        task_type: None,
        metadata: serde_json::json!({"bench": true}),
        worker_id: "bench".into(),
        received_at: now,
        finished_at: now,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let id = Uuid::new_v4().simple().to_string()[..10].to_string();
    let database = ScratchDatabase::create(&db_url, "llmw_bench").await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database.url)
        .await?;
    llm_worker::usage::migrate(&pool).await?;

    let mut config = Config::default();
    config.nats.url = nats_url;
    config.nats.subject_prefix = format!("b{id}");
    config.nats.results_stream = format!("BENCH_RESULTS_{id}");
    config.nats.jobs_stream = format!("BENCH_JOBS_{id}");
    config.nats.consumer_prefix = format!("b{id}");
    config.nats.dead_stream = format!("BENCH_DEAD_{id}");
    let client = llm_worker::nats::connect(&config.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    llm_worker::nats::ensure_streams(&js, &config.nats).await?;

    // 1. Throughput: pre-store results, then drain them.
    eprintln!("storing {THROUGHPUT_RESULTS} results...");
    let mut acks = Vec::with_capacity(1024);
    for _ in 0..THROUGHPUT_RESULTS {
        let job_id = Uuid::now_v7();
        let payload = serde_json::to_vec(&result(job_id))?;
        let publish = PublishMessage::build().payload(payload.into());
        acks.push(
            js.send_publish(config.nats.result_subject(&job_id), publish)
                .await?,
        );
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }
    let stop = CancellationToken::new();
    let rec_cfg = RecorderConfig::default();
    let dead =
        llm_worker::dead::DeadLetters::new(js.clone(), std::sync::Arc::new(config.nats.clone()));
    let recorder = Recorder::start(&js, &config.nats, pool.clone(), dead, &rec_cfg).await?;
    let started = Instant::now();
    let task = tokio::spawn(recorder.run(stop.clone()));
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs")
            .fetch_one(&pool)
            .await?;
        if n as usize >= THROUGHPUT_RESULTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let rows = THROUGHPUT_RESULTS * 3;
    println!(
        "recorder throughput: {THROUGHPUT_RESULTS} results ({rows} rows: 1 job + 2 calls each) in {secs:.2} s = {:.0} rows/s ({:.0} results/s)",
        rows as f64 / secs,
        THROUGHPUT_RESULTS as f64 / secs
    );

    // 2. Lag at a fixed rate.
    sqlx::query("TRUNCATE llm_jobs, llm_calls")
        .execute(&pool)
        .await?;
    let total = RATE * RATE_SECONDS;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for _ in 0..total {
        tick.tick().await;
        let job_id = Uuid::now_v7();
        let payload = serde_json::to_vec(&result(job_id))?;
        let publish = PublishMessage::build().payload(payload.into());
        // Fire and forget: waiting for each ack would cap the rate below the target.
        let _ack = js
            .send_publish(config.nats.result_subject(&job_id), publish)
            .await?;
    }
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs")
            .fetch_one(&pool)
            .await?;
        if n as u64 >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag) \
         FROM (SELECT (extract(epoch FROM recorded_at - finished_at) * 1000)::float8 AS lag FROM llm_jobs) l",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "recorder lag at {RATE} results/s for {RATE_SECONDS} s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (result stored -> row's transaction)"
    );

    stop.cancel();
    let _ = task.await;
    pool.close().await;
    let _ = js.delete_stream(&config.nats.results_stream).await;
    let _ = js.delete_stream(&config.nats.jobs_stream).await;
    let _ = js.delete_stream(&config.nats.dead_stream).await;
    database.drop().await;
    Ok(())
}
