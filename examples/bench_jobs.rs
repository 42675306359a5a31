//! End-to-end job throughput, one worker process (in this process), against the fake provider
//! served over HTTP on loopback (so the HTTP client path is included):
//!
//!   scripts/services && cargo run --release --example bench_jobs
//!
//! Publishes N jobs to JetStream, waits for every `result` on the reply subject, then for every
//! `llm_jobs` row; prints jobs/s for short non-streamed jobs, streamed jobs (50 chunks), and
//! embedding jobs with 1 and 64 inputs of 768 dimensions (jobs/s and vectors/s).
//! Uses NATS_URL / DATABASE_URL (defaults: local), unique stream names and a throw-away database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use llm_worker::app::{self, Roles};
use llm_worker::config::Config;
use llm_worker::testkit::{FakeProvider, Reply};
use uuid::Uuid;

/// `chunks` > 0: streamed generation; `embed_inputs` > 0: embedding jobs (768 dimensions).
async fn scenario(
    name: &str,
    jobs: usize,
    chunks: usize,
    embed_inputs: usize,
    nats_url: &str,
    db_url: &str,
) -> anyhow::Result<()> {
    let fake = FakeProvider::start().await?;
    let deltas: Vec<String> = (0..chunks).map(|i| format!("t{i} ")).collect();
    fake.set_default(Reply::Answer {
        deltas,
        usage: Some((12, chunks as u64)),
        done_marker: true,
        chunk_delay: Duration::ZERO,
    });

    let id = Uuid::new_v4().simple().to_string()[..10].to_string();
    let admin = sqlx::PgPool::connect(db_url).await?;
    let db_name = format!("llmw_bench_{id}");
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&admin)
        .await?;
    let bench_db = format!(
        "{}/{db_name}",
        db_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(db_url)
    );
    let toml = format!(
        r#"
[nats]
url = "{nats_url}"
subject_prefix = "b{id}"
jobs_stream = "BJOBS_{id}"
results_stream = "BRESULTS_{id}"
consumer_prefix = "b{id}"
[worker]
max_in_flight = 512
[database]
url = "{bench_db}"
[providers.fake]
type = "openai"
base_url = "{}"
default_model = "m"
"#,
        fake.base_url()
    );
    let config = Config::from_toml(&toml)?;
    let running = app::start(
        config.clone(),
        Roles {
            jobs: true,
            recorder: true,
        },
    )
    .await?;
    let client = async_nats::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let reply_to = format!("b{id}.replies");
    let mut replies = client.subscribe(reply_to.clone()).await?;

    let stream = chunks > 0;
    let started = Instant::now();
    let publisher = {
        let js = js.clone();
        let kind = if embed_inputs > 0 {
            llm_worker::job::JobKind::Embed
        } else {
            llm_worker::job::JobKind::Generate
        };
        let subject = config.nats.job_subject(kind);
        let inputs: Vec<String> = (0..embed_inputs)
            .map(|i| format!("passage {i} of a retrieval corpus"))
            .collect();
        tokio::spawn(async move {
            let mut acks = Vec::with_capacity(1000);
            for _ in 0..jobs {
                let job_id = Uuid::now_v7();
                let job = if embed_inputs > 0 {
                    serde_json::json!({"job_id": job_id, "input": inputs, "options": {"dimensions": 768}, "reply_to": reply_to})
                } else {
                    serde_json::json!({"job_id": job_id, "prompt": "Say something short.", "reply_to": reply_to, "stream": stream})
                };
                let publish = PublishMessage::build()
                    .payload(serde_json::to_vec(&job).unwrap().into())
                    .message_id(job_id.to_string());
                acks.push(js.send_publish(subject.clone(), publish).await.unwrap());
                if acks.len() == 1000 {
                    for a in acks.drain(..) {
                        a.await.unwrap();
                    }
                }
            }
            for a in acks {
                a.await.unwrap();
            }
        })
    };
    let mut results = 0;
    let mut chunk_events = 0usize;
    while results < jobs {
        let msg = tokio::time::timeout(Duration::from_secs(60), replies.next())
            .await?
            .unwrap();
        if msg.payload.starts_with(br#"{"type":"result""#) {
            results += 1;
        } else {
            chunk_events += 1;
        }
    }
    let answered = started.elapsed().as_secs_f64();
    publisher.await?;
    let pool = sqlx::PgPool::connect(&bench_db).await?;
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs")
            .fetch_one(&pool)
            .await?;
        if n as usize >= jobs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recorded = started.elapsed().as_secs_f64();
    if embed_inputs > 0 {
        println!(
            "{name}: {jobs} jobs: {:.0} jobs/s, {:.0} vectors/s answered; {:.0} jobs/s with usage rows committed",
            jobs as f64 / answered,
            (jobs * embed_inputs) as f64 / answered,
            jobs as f64 / recorded
        );
    } else {
        println!(
            "{name}: {jobs} jobs, {chunk_events} chunk events: {:.0} jobs/s answered, {:.0} jobs/s with usage rows committed",
            jobs as f64 / answered,
            jobs as f64 / recorded
        );
    }
    running.shutdown().await;
    pool.close().await;
    let _ = js.delete_stream(&config.nats.jobs_stream).await;
    let _ = js.delete_stream(&config.nats.results_stream).await;
    sqlx::query(&format!("DROP DATABASE {db_name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    scenario("short non-streamed jobs", 20_000, 0, 0, &nats_url, &db_url).await?;
    scenario(
        "streamed jobs, 50 chunks each",
        2_000,
        50,
        0,
        &nats_url,
        &db_url,
    )
    .await?;
    scenario(
        "embedding jobs, 1 input x 768 dims",
        5_000,
        0,
        1,
        &nats_url,
        &db_url,
    )
    .await?;
    scenario(
        "embedding jobs, 64 inputs x 768 dims",
        300,
        0,
        64,
        &nats_url,
        &db_url,
    )
    .await?;
    Ok(())
}
