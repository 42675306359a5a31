//! The benchmark scenarios: end-to-end figures for one worker process and a small fleet, against
//! the local NATS and Postgres, with the fake provider served over HTTP on loopback (so the
//! worker's HTTP client path is included). Prints a table (Markdown) of:
//!
//! 1. throughput: short non-streamed jobs and 50-chunk streamed jobs, publish -> result
//!    received -> every `llm_jobs` row committed;
//! 2. overhead latency at a fixed 1,000 jobs/s: (result received - job published) minus the
//!    fake provider's own time for that job, where it goes (from the result's timestamps),
//!    the worker's CPU per job at that rate, and the same overhead for the first chunk;
//! 3. the ceiling: a bare pipeline doing only each job's I/O ([`pipeline`]), and the worker's
//!    throughput as a ratio of it;
//! 4. concurrency: thousands of slow streams in one worker: peak RSS, redeliveries;
//! 5. scaling: 1, 2, 3 worker processes against a latency-bound provider, on one server and
//!    on a 3-node cluster ([`crate::scaling`]);
//! 6. the response cache: misses and hits ([`crate::cache`]);
//! 7. the HTTP gateway against publishing to NATS directly ([`crate::gateway`]).
//!
//! The benchmark only speaks the contract to the workers (JetStream jobs, reply events, SQL
//! rows). Workers (the `llm-worker` binary) and the bare pipeline (this binary's hidden
//! `pipeline` command) are child processes; the fake provider
//! and the client run in this process, and everything shares the machine's cores.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use llm_worker_testkit::{FakeLlmServer, Reply};

use crate::harness::{Deployment, Target};
use crate::load::{self, Collector, Pace, Received, percentile};
use crate::pipeline;

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Throughput,
    Latency,
    Ceiling,
    Concurrency,
    Scaling,
    Cache,
    Gateway,
    /// The usage history at scale (only when asked for: it loads 100 million rows).
    History,
    /// The batch lane: 1,000 jobs through the fake's Batch API, then the same jobs online.
    Batch,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Scenarios to run (all when empty).
    pub only: Vec<Scenario>,
    /// Smaller counts and shorter phases, for a quick look (figures are noisier).
    pub quick: bool,
    /// Concurrent slow streams in the concurrency scenario.
    pub streams: usize,
    /// How long each slow stream lasts (one token every 100 ms).
    pub stream_secs: u64,
    /// `worker.max_in_flight` of the single-worker scenarios.
    pub max_in_flight: usize,
    /// Short jobs in the throughput and ceiling runs (default 20,000; 5,000 when quick).
    pub jobs: Option<usize>,
    /// Rows of the history scenario.
    pub history_rows: Option<u64>,
    /// Keep the history scenario's database.
    pub history_keep: bool,
    /// Rows added to the month being written (`--history-month-rows`).
    pub history_month_rows: u64,
    /// Time the history queries on this database instead of loading one.
    pub history_database: Option<String>,
    /// Every tenant under a policy with budgets and rate limits too large to bind.
    pub tenant_policy: bool,
    /// The model the workers' provider is configured with (its tokenizer, if counting is
    /// ever needed, follows from it).
    pub model: String,
}

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub result: String,
    pub target: String,
}

pub(crate) fn row(
    scenario: impl Into<String>,
    result: impl Into<String>,
    target: impl Into<String>,
) -> Row {
    Row {
        scenario: scenario.into(),
        result: result.into(),
        target: target.into(),
    }
}

/// Run the chosen scenarios, printing each row as it is measured; returns the table.
pub async fn run(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let wants = |s: Scenario| {
        options.only.contains(&s) || (options.only.is_empty() && s != Scenario::History)
    };
    println!("{}", machine(target).await);
    let mut rows = Vec::new();
    let mut emit = |r: Vec<Row>| {
        for r in &r {
            println!("  {:<62} {:<44} {}", r.scenario, r.result, r.target);
        }
        rows.extend(r);
    };
    if wants(Scenario::Throughput) || wants(Scenario::Latency) || wants(Scenario::Ceiling) {
        emit(single_worker(target, options, &wants).await?);
    }
    if wants(Scenario::Concurrency) {
        emit(concurrency(target, options).await?);
    }
    if wants(Scenario::Scaling) {
        emit(crate::scaling::scaling(target, options).await?);
    }
    if wants(Scenario::Cache) {
        emit(crate::cache::cache(target, options).await?);
    }
    if wants(Scenario::Gateway) {
        emit(crate::gateway::gateway(target, options).await?);
    }
    if wants(Scenario::Batch) {
        emit(crate::batch::batch(target, options).await?);
    }
    if wants(Scenario::History) {
        let rows = options.history_rows.unwrap_or(if options.quick {
            1_000_000
        } else {
            100_000_000
        });
        emit(match &options.history_database {
            Some(url) => crate::history::existing(url).await?,
            None => {
                crate::history::history(
                    &target.database_url,
                    rows,
                    options.history_month_rows,
                    options.history_keep,
                )
                .await?
            }
        });
    }
    println!();
    println!("{}", table(&rows));
    Ok(rows)
}

/// The result table as Markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| scenario | result | target |\n|---|---|---|\n");
    for r in rows {
        let _ = writeln!(out, "| {} | {} | {} |", r.scenario, r.result, r.target);
    }
    out
}

/// CPUs, CPU model, server versions: printed above the table.
async fn machine(target: &Target) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nats = match async_nats::connect(target.nats_url.as_str()).await {
        Ok(c) => c.server_info().version,
        Err(_) => "?".into(),
    };
    let pg = match sqlx::PgPool::connect(&target.database_url).await {
        Ok(p) => sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&p)
            .await
            .unwrap_or_else(|_| "?".into()),
        Err(_) => "?".into(),
    };
    format!(
        "llm-worker {} bench: {cpus} CPUs ({model}), nats-server {nats}, PostgreSQL {pg}",
        env!("CARGO_PKG_VERSION")
    )
}

/// A policy for every tenant that each job goes through (budget check and charge, start
/// counted against requests per minute, tokens charged per minute) without ever binding.
const EVERY_TENANT_POLICY: &str = r#"
[tenants.default]
daily_budget_usd = 1000000000.0
monthly_budget_tokens = 1000000000000
requests_per_minute = 1000000000
tokens_per_minute = 1000000000000
"#;

/// Provider and worker settings of a deployment served by `fake` (with a policy for every
/// tenant when `policy`).
pub(crate) fn worker_toml(fake: &FakeLlmServer, max_in_flight: usize, options: &Options) -> String {
    let policy = if options.tenant_policy {
        EVERY_TENANT_POLICY
    } else {
        ""
    };
    format!(
        r#"
[worker]
max_in_flight = {max_in_flight}
[providers.fake]
type = "openai"
base_url = "{}"
default_model = "{}"
{policy}"#,
        fake.base_url(),
        options.model,
    )
}

/// A fake provider giving [`short_answer`]s, and a deployment whose workers call it.
pub(crate) async fn short_answers_deployment(
    target: &Target,
    options: &Options,
) -> anyhow::Result<(FakeLlmServer, Deployment)> {
    let fake = FakeLlmServer::start().await?;
    fake.bench_mode(false);
    fake.set_default(short_answer());
    let dep = Deployment::new(target, &worker_toml(&fake, options.max_in_flight, options)).await?;
    Ok((fake, dep))
}

/// A short answer: 3 deltas, with usage.
pub(crate) fn short_answer() -> Reply {
    Reply::answer(&["Hello", " from", " the bench"], (12, 3))
}

/// An answer of `chunks` deltas, `delay` apart.
fn streamed_answer(chunks: usize, delay: Duration) -> Reply {
    Reply::Answer {
        deltas: (0..chunks).map(|i| format!("t{i} ")).collect(),
        usage: Some((12, chunks as u64)),
        done_marker: true,
        chunk_delay: delay,
    }
}

/// Publish `n` jobs and collect their events; fails unless every job got an `ok` result.
pub(crate) async fn round(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subject: &str,
    n: usize,
    stream: bool,
    pace: Pace,
    keep_payloads: bool,
) -> anyhow::Result<(Vec<Instant>, Received)> {
    let jobs = (n, stream, load::Shape::Plain);
    shaped_round(client, js, subject, jobs, pace, keep_payloads).await
}

/// [`round`] with `n` jobs of `shape`.
pub(crate) async fn shaped_round(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subject: &str,
    (n, stream, shape): (usize, bool, load::Shape),
    pace: Pace,
    keep_payloads: bool,
) -> anyhow::Result<(Vec<Instant>, Received)> {
    let reply_prefix = format!("_INBOX.bench{}", uuid::Uuid::new_v4().simple());
    let mut collector = Collector::subscribe(client, &reply_prefix, n).await?;
    if keep_payloads {
        collector = collector.keep_payloads();
    }
    let collecting = tokio::spawn(collector.collect(Duration::from_secs(60)));
    let sent = load::publish_shaped(js, subject, &reply_prefix, n, (stream, shape), pace).await?;
    let received = collecting.await?;
    anyhow::ensure!(
        received.results() == n && received.failed() == 0,
        "{} of {n} results arrived, {} not ok {:?}",
        received.results(),
        received.failed(),
        received.failures
    );
    Ok((sent, received))
}

/// Jobs per second from the first publish to `end`.
pub(crate) fn rate(n: usize, sent: &[Instant], end: Instant) -> f64 {
    let start = sent.first().copied().unwrap_or(end);
    n as f64 / end.duration_since(start).as_secs_f64().max(1e-9)
}

/// CPU time used between two readings (`None` when either could not be read).
pub(crate) fn cpu_used(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    Some(after?.saturating_sub(before?))
}

/// CPU time per job, in µs.
pub(crate) fn per_job(cpu: Duration, jobs: usize) -> String {
    format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / jobs as f64)
}

pub(crate) fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Throughput, overhead latency and the ceiling: one worker process, one fake provider.
async fn single_worker(
    target: &Target,
    options: &Options,
    wants: &dyn Fn(Scenario) -> bool,
) -> anyhow::Result<Vec<Row>> {
    let (fake, mut dep) = short_answers_deployment(target, options).await?;
    let pool = dep.pool.clone();
    let price = || {
        sqlx::query(
            "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok, output_usd_per_mtok)
             VALUES ('fake', $1, '2020-01-01', 2.5, 10)",
        )
        .bind(&options.model)
        .execute(&pool)
    };
    // An older worker makes its tables itself, at start (see `Target::legacy_config`).
    if !target.legacy_config {
        price().await?;
    }
    let outcome = async {
        dep.spawn_worker().await?;
        if target.legacy_config {
            price().await?;
        }
        let mut rows = Vec::new();
        let subject = dep.job_subject();
        let mut recorded = 0;
        let short_n = options
            .jobs
            .unwrap_or(if options.quick { 5_000 } else { 20_000 });
        let mut worker_short = None;
        let start_pipeline = || {
            pipeline::Pipeline::start(
                &dep.js,
                &target.nats_url,
                &target.bench_exe,
                format!("{}/chat/completions", fake.base_url()),
                options.max_in_flight,
            )
        };
        if wants(Scenario::Throughput) || wants(Scenario::Ceiling) {
            let cpu_before = dep.cpu_time(0);
            let (sent, received) = round(
                &dep.client,
                &dep.js,
                &subject,
                short_n,
                false,
                Pace::Burst,
                false,
            )
            .await?;
            recorded += short_n;
            let answered = rate(
                short_n,
                &sent,
                received.last_result().unwrap_or_else(Instant::now),
            );
            dep.require_rows(recorded).await?;
            let with_rows = rate(short_n, &sent, Instant::now());
            let cpu = cpu_used(cpu_before, dep.cpu_time(0));
            worker_short = Some(with_rows);
            rows.push(row(
                format!(
                    "throughput: {} short jobs, publish → result",
                    thousands(short_n as f64)
                ),
                format!("{} jobs/s", thousands(answered)),
                "",
            ));
            rows.push(row(
                "throughput: the same, until every usage row is committed",
                format!("{} jobs/s", thousands(with_rows)),
                "≥ 10,000 jobs/s",
            ));
            if let Some(cpu) = cpu {
                rows.push(row(
                    "worker process CPU per short job (recorder included)",
                    per_job(cpu, short_n),
                    "",
                ));
            }
            if let Some(rss) = dep.rss(0) {
                rows.push(row(
                    format!(
                        "worker resident memory after {} short jobs (model {})",
                        thousands(short_n as f64),
                        options.model
                    ),
                    format!("{:.0} MB", rss as f64 / 1e6),
                    "",
                ));
            }
            // What the worker keeps: it gives a burst's freed memory back within half a
            // second of its last job (src/memory.rs).
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(rss) = dep.rss(0) {
                rows.push(row(
                    "worker resident memory 1 s later",
                    format!("{:.0} MB", rss as f64 / 1e6),
                    "≤ 50 MB",
                ));
            }
        }
        if wants(Scenario::Throughput) {
            // The same short answers, streamed: three deltas, each a chunk event or coalesced.
            let n = short_n / 2;
            let cpu_before = dep.cpu_time(0);
            let (sent, received) =
                round(&dep.client, &dep.js, &subject, n, true, Pace::Burst, false).await?;
            recorded += n;
            let answered = rate(
                n,
                &sent,
                received.last_result().unwrap_or_else(Instant::now),
            );
            dep.require_rows(recorded).await?;
            let cpu = cpu_used(cpu_before, dep.cpu_time(0));
            rows.push(row(
                format!(
                    "throughput: {} short streamed jobs (3 deltas), publish → result",
                    thousands(n as f64)
                ),
                format!(
                    "{} jobs/s ({} chunk events/s){}",
                    thousands(answered),
                    thousands(received.chunks as f64 * answered / n as f64),
                    cpu.map_or(String::new(), |c| format!(
                        ", {} worker CPU per job",
                        per_job(c, n)
                    ))
                ),
                "",
            ));
        }
        if wants(Scenario::Throughput) {
            let n = if options.quick { 500 } else { 2_000 };
            fake.set_default(streamed_answer(50, Duration::ZERO));
            let (sent, received) =
                round(&dep.client, &dep.js, &subject, n, true, Pace::Burst, false).await?;
            recorded += n;
            let answered = rate(
                n,
                &sent,
                received.last_result().unwrap_or_else(Instant::now),
            );
            dep.require_rows(recorded).await?;
            let with_rows = rate(n, &sent, Instant::now());
            rows.push(row(
                format!(
                    "throughput: {} streamed jobs × 50 chunks, with usage rows",
                    thousands(n as f64)
                ),
                format!(
                    "{} jobs/s ({} chunk events/s; {} answered)",
                    thousands(with_rows),
                    thousands(received.chunks as f64 * with_rows / n as f64),
                    thousands(answered)
                ),
                "",
            ));
            fake.set_default(short_answer());
        }
        if wants(Scenario::Latency) {
            let secs = if options.quick { 2 } else { 5 };
            let n = 1_000 * secs;
            fake.set_latency(Duration::from_millis(10));
            let label = |what: &str| format!("latency at 1,000 jobs/s for {secs} s: {what}");
            let cpu_before = dep.cpu_time(0);
            let worker = overhead(&dep.client, &dep.js, &subject, &fake, n, false).await?;
            recorded += n;
            dep.require_rows(recorded).await?;
            let cpu = cpu_used(cpu_before, dep.cpu_time(0));
            rows.push(row(
                label("overhead, publish → result (non-streamed)"),
                spread(&worker.ms),
                "p99 < 5 ms",
            ));
            if let Some(stages) = worker.stages {
                rows.push(row(
                    label("where it goes, p50/p99 ms (non-streamed)"),
                    stages,
                    "",
                ));
            }
            if let Some(cpu) = cpu {
                rows.push(row(
                    label("worker process CPU per job (recorder included)"),
                    per_job(cpu, n),
                    "",
                ));
            }
            fake.set_default(streamed_answer(10, Duration::ZERO));
            let first = overhead(&dep.client, &dep.js, &subject, &fake, n, true).await?;
            recorded += n;
            rows.push(row(
                label("overhead to the first chunk (streamed)"),
                spread(&first.ms),
                "",
            ));
            fake.set_default(short_answer());
            // The same measurement through the bare pipeline: the floor this machine sets.
            let pipe = start_pipeline().await?;
            let bare = overhead(&dep.client, &dep.js, &pipe.job_subject, &fake, n, false).await;
            pipe.stop().await;
            let bare = bare?;
            rows.push(row(
                label("the same through the bare pipeline (reference)"),
                spread(&bare.ms),
                "",
            ));
            if let Some(stages) = bare.stages {
                rows.push(row(
                    label("where it goes in the bare pipeline, p50/p99 ms"),
                    stages,
                    "",
                ));
            }
            dep.require_rows(recorded).await?;
            fake.set_latency(Duration::ZERO);
            fake.bench_mode(false);
        }
        if wants(Scenario::Ceiling) {
            let pipe = start_pipeline().await?;
            let cpu_before = pipe.cpu_time();
            let result = round(
                &dep.client,
                &dep.js,
                &pipe.job_subject,
                short_n,
                false,
                Pace::Burst,
                false,
            )
            .await;
            let cpu = cpu_used(cpu_before, pipe.cpu_time());
            pipe.stop().await;
            let (sent, received) = result?;
            let ceiling = rate(
                short_n,
                &sent,
                received.last_result().unwrap_or_else(Instant::now),
            );
            rows.push(row(
                "ceiling: bare pipeline (pull → HTTP → store result → reply → ack)",
                format!("{} jobs/s", thousands(ceiling)),
                "",
            ));
            if let Some(cpu) = cpu {
                rows.push(row(
                    "bare pipeline process CPU per job",
                    per_job(cpu, short_n),
                    "",
                ));
            }
            if let Some(worker) = worker_short {
                rows.push(row(
                    "worker (with usage rows) / ceiling",
                    format!("{:.0} %", 100.0 * worker / ceiling),
                    "≥ 50 %",
                ));
            }
        }
        Ok(rows)
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}

/// What [`overhead`] measured.
struct Overhead {
    /// Sorted per-job overhead in ms.
    ms: Vec<f64>,
    /// Where the time went, from the timestamps in the results.
    stages: Option<String>,
}

/// Publish `n` jobs at 1,000/s to `subject` and return, sorted, each job's time in ms from
/// its publish to its result (or, when `stream`, to its first chunk) minus the time the fake
/// provider spent on that job's request.
async fn overhead(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subject: &str,
    fake: &FakeLlmServer,
    n: usize,
    stream: bool,
) -> anyhow::Result<Overhead> {
    fake.bench_mode(true);
    // The worker stamps its results with the wall clock; this maps the bench's instants to it.
    let anchor = (Instant::now(), chrono::Utc::now());
    let (sent, received) = round(client, js, subject, n, stream, Pace::Rate(1_000), true).await?;
    let took: std::collections::HashMap<String, Duration> =
        fake.take_timings().into_iter().collect();
    let fake_ms = |i: usize| {
        took.get(&format!("bench {i}"))
            .map(|d| d.as_secs_f64() * 1e3)
    };
    let at = if stream {
        &received.first_chunk_at
    } else {
        &received.result_at
    };
    let mut ms: Vec<f64> = (0..n)
        .filter_map(|i| Some(at[i]?.duration_since(sent[i]).as_secs_f64() * 1e3 - fake_ms(i)?))
        .collect();
    anyhow::ensure!(ms.len() == n, "timings missing for {} jobs", n - ms.len());
    ms.sort_by(f64::total_cmp);
    let wall = |at: Instant| anchor.1 + (at - anchor.0);
    Ok(Overhead {
        ms,
        stages: stages(&sent, &received, &wall, &fake_ms),
    })
}

/// The timestamps of a result (the worker's, or the bare pipeline's equivalents).
#[derive(serde::Deserialize)]
struct Stamps {
    received_at: chrono::DateTime<chrono::Utc>,
    attempts: Vec<CallStamps>,
}

#[derive(serde::Deserialize)]
struct CallStamps {
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: chrono::DateTime<chrono::Utc>,
}

/// Where a job's overhead went, from the timestamps in its result (the worker's, or the bare
/// pipeline's; both read the bench's clock): p50/p99 of publish → received by the worker; received
/// → provider call started (decode, stored-result check, routing); the call minus the fake
/// provider's own time (HTTP client, parsing, chunk events); call ended → result stored and
/// received by the client.
fn stages(
    sent: &[Instant],
    received: &Received,
    wall: &dyn Fn(Instant) -> chrono::DateTime<chrono::Utc>,
    fake_ms: &dyn Fn(usize) -> Option<f64>,
) -> Option<String> {
    let mut cols: [Vec<f64>; 4] = Default::default();
    let ms = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (b - a).num_microseconds().unwrap_or(0) as f64 / 1e3
    };
    for (i, payload) in received.payloads.iter().enumerate() {
        let (Some(p), Some(at), Some(fake)) = (payload, received.result_at[i], fake_ms(i)) else {
            continue;
        };
        let Ok(r) = serde_json::from_slice::<Stamps>(p) else {
            continue;
        };
        let Some(a) = r.attempts.first() else {
            continue;
        };
        cols[0].push(ms(wall(sent[i]), r.received_at));
        cols[1].push(ms(r.received_at, a.started_at));
        cols[2].push(ms(a.started_at, a.finished_at) - fake);
        cols[3].push(ms(a.finished_at, wall(at)));
    }
    if cols[0].is_empty() {
        return None;
    }
    let names = ["queue", "before the call", "HTTP call", "store + deliver"];
    let parts: Vec<String> = names
        .iter()
        .zip(cols.iter_mut())
        .map(|(name, c)| {
            c.sort_by(f64::total_cmp);
            format!(
                "{name} {:.2}/{:.2}",
                percentile(c, 50.0),
                percentile(c, 99.0)
            )
        })
        .collect();
    Some(parts.join(", "))
}

/// Percentiles of sorted milliseconds.
fn spread(ms: &[f64]) -> String {
    format!(
        "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        percentile(ms, 50.0),
        percentile(ms, 95.0),
        percentile(ms, 99.0),
        percentile(ms, 100.0)
    )
}

/// Thousands of slow streams at once in one worker process.
async fn concurrency(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (n, secs) = if options.quick {
        (options.streams.min(1_000), options.stream_secs.min(5))
    } else {
        (options.streams, options.stream_secs)
    };
    let fake = FakeLlmServer::start().await?;
    fake.bench_mode(false);
    fake.set_default(streamed_answer(
        (secs * 10) as usize,
        Duration::from_millis(100),
    ));
    let mut dep = Deployment::new(target, &worker_toml(&fake, n, options)).await?;
    let outcome = async {
        dep.spawn_worker().await?;
        let reply_prefix = format!("_INBOX.bench{}", uuid::Uuid::new_v4().simple());
        let collector = Collector::subscribe(&dep.client, &reply_prefix, n).await?;
        let progress = collector.progress.clone();
        let collecting = tokio::spawn(collector.collect(Duration::from_secs(60)));
        let sampling = {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                loop {
                    peak = peak.max(progress.open_streams());
                    if progress.results.load(std::sync::atomic::Ordering::Relaxed) >= n {
                        return peak;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let started = Instant::now();
        load::publish(
            &dep.js,
            &dep.job_subject(),
            &reply_prefix,
            n,
            true,
            Pace::Burst,
        )
        .await?;
        let received = collecting.await?;
        let wall = started.elapsed();
        // The sampler ends by itself once every result is counted.
        let peak_open = sampling.await.unwrap_or(0);
        let rss = dep.peak_rss(0).context("reading the worker's peak RSS")?;
        let delivered = dep.deliveries().await?;
        anyhow::ensure!(
            received.results() == n,
            "{} of {n} streams finished",
            received.results()
        );
        let rows_ok = dep.wait_rows(n, Duration::from_secs(60)).await?;
        Ok(vec![
            row(
                format!(
                    "concurrency: {} streams × {secs} s (a token per 100 ms), one worker",
                    thousands(n as f64)
                ),
                format!(
                    "peak {} open at once; {} ok, {} failed {:?}; wall {:.1} s",
                    thousands(peak_open as f64),
                    thousands((n - received.failed()) as f64),
                    received.failed(),
                    received.failures,
                    wall.as_secs_f64()
                ),
                "",
            ),
            row(
                "concurrency: worker peak RSS",
                format!("{:.0} MB", rss as f64 / 1e6),
                "< 300 MB",
            ),
            row(
                "concurrency: redeliveries (ack timeouts), duplicate results, usage rows",
                format!(
                    "{} redelivered, {} duplicates, rows {}",
                    delivered.saturating_sub(n as u64),
                    received.duplicates,
                    if rows_ok { "all committed" } else { "MISSING" }
                ),
                "0, 0, all",
            ),
        ])
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}

/// 1, 2, 3 worker processes against a provider that takes 100 ms per request; each worker
/// allows 32 jobs in flight, so the provider's latency (not CPU) bounds a worker.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn table_is_markdown() {
        let t = table(&[row("a", "1 jobs/s", "≥ 2")]);
        assert_eq!(
            t,
            "| scenario | result | target |\n|---|---|---|\n| a | 1 jobs/s | ≥ 2 |\n"
        );
    }
}
