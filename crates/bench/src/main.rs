//! `llm-worker-bench`: end-to-end figures for `llm-worker` against the local NATS and
//! Postgres, with a fake LLM API on loopback (see the README's Benchmarks section). A crate
//! of its own so the worker binary links no benchmark code.
//!
//! - [`scenarios`]: what is measured and the table it prints.
//! - [`harness`]: a throw-away deployment (streams, database, worker processes).
//! - [`load`]: publishing at a pace and collecting reply events.
//! - [`pipeline`]: the bare pipeline, the ceiling a worker is compared with.

mod batch;
mod cache;
mod gateway;
mod harness;
mod history;
mod load;
mod pipeline;
mod scaling;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Benchmark llm-worker end to end and print a table")]
struct Cli {
    #[command(subcommand)]
    pipeline: Option<Hidden>,
    /// Smaller counts and shorter phases (noisier figures).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<scenarios::Scenario>,
    /// Concurrent slow streams in the concurrency scenario.
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// Length of each slow stream in seconds (a token every 100 ms).
    #[arg(long, default_value_t = 20)]
    stream_secs: u64,
    /// `worker.max_in_flight` of the single-worker scenarios (and the bare pipeline).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Short jobs in the throughput and ceiling runs (default 20,000; 5,000 with --quick).
    #[arg(long)]
    jobs: Option<usize>,
    /// Synthetic `llm_calls` rows the history scenario loads (`--only history`; default
    /// 100,000,000, or 1,000,000 with --quick).
    #[arg(long)]
    history_rows: Option<u64>,
    /// The history scenario keeps its database (and prints its URL) instead of dropping it.
    #[arg(long)]
    history_keep: bool,
    /// Rows the history scenario adds to the month being written, after the others: the end
    /// of a month at this history's size (100 M calls a year: 8.3 M in a month). Default 0.
    #[arg(long, default_value_t = 0)]
    history_month_rows: u64,
    /// The history scenario loads nothing: it times the queries and the recorder on this
    /// database (one it kept before; the recorder's 20,000 results are written to it).
    #[arg(long)]
    history_database: Option<String>,
    /// Give every tenant a policy that every job goes through (budgets, requests and tokens
    /// per minute, all too large to bind): the cost of the policy checks.
    #[arg(long)]
    tenant_policy: bool,
    /// The model the workers' fake provider is configured with: `gpt-4o-mini` (what a
    /// configuration from the environment alone names) measures that model's tokenizer too,
    /// were it ever loaded.
    #[arg(long, default_value = "bench-model")]
    model: String,
    /// Write only the configuration keys every worker version knows, to benchmark an older
    /// binary (`--worker-exe`) with this load generator.
    #[arg(long)]
    legacy_config: bool,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The server each scenario creates its own database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// The worker binary (default: `llm-worker` next to this binary, as cargo builds it).
    #[arg(long)]
    worker_exe: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Hidden {
    /// The bare pipeline process (started by the benchmark itself).
    #[command(hide = true)]
    Pipeline(pipeline::ProcessArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Hidden::Pipeline(args)) = cli.pipeline {
        return pipeline::serve(args).await;
    }
    // reqwest is built without a default TLS crypto provider (see llm_worker::providers).
    llm_worker::tls::install_crypto_provider();
    let bench_exe = std::env::current_exe().context("locating this binary")?;
    let worker_exe = match cli.worker_exe {
        Some(exe) => exe,
        None => bench_exe.with_file_name("llm-worker"),
    };
    anyhow::ensure!(
        worker_exe.is_file(),
        "no worker binary at {} (build it: cargo build --release --workspace, or pass --worker-exe)",
        worker_exe.display()
    );
    let target = harness::Target {
        nats_url: cli.nats_url,
        replicas: 1,
        database_url: cli.database_url,
        worker_exe,
        bench_exe,
        legacy_config: cli.legacy_config,
    };
    let options = scenarios::Options {
        only: cli.only,
        quick: cli.quick,
        streams: cli.streams,
        stream_secs: cli.stream_secs,
        max_in_flight: cli.max_in_flight,
        tenant_policy: cli.tenant_policy,
        jobs: cli.jobs,
        history_rows: cli.history_rows,
        history_keep: cli.history_keep,
        history_month_rows: cli.history_month_rows,
        history_database: cli.history_database,
        model: cli.model,
    };
    scenarios::run(&target, &options).await?;
    Ok(())
}
