//! The `llm-worker` binary: argument parsing over the library. No logic lives here that tests
//! cannot reach.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use llm_worker::app::{self, Roles};
use llm_worker::config::Config;
use llm_worker::contract::JobKind;
use llm_worker::contract::Status;
use llm_worker::{status, submit, telemetry, usage};

#[derive(Parser)]
#[command(
    name = "llm-worker",
    version,
    about = "LLM jobs from NATS JetStream, with fallback, streaming and a usage ledger"
)]
struct Cli {
    /// Config file (TOML). Also `LLM_WORKER_CONFIG`. Optional: environment variables suffice
    /// for the common case.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size of the largest variant (`submit`) costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run a worker: consume jobs and record usage until SIGTERM/SIGINT.
    Run {
        /// Only answer jobs; leave usage recording to other processes.
        #[arg(long, conflicts_with = "recorder_only")]
        no_recorder: bool,
        /// Only record usage (LLM_RESULTS -> Postgres); answer no jobs.
        #[arg(long)]
        recorder_only: bool,
    },
    /// Publish one generation job and stream its answer to stdout.
    Submit {
        /// The prompt; read from stdin when absent.
        prompt: Option<String>,
        /// The model to ask (pins it on the route's first provider, or on --provider).
        #[arg(long)]
        model: Option<String>,
        /// A provider name from the configuration to try first (the route's others follow).
        #[arg(long)]
        provider: Option<String>,
        /// The job's task type: selects the route `routes.<task_type>` (default route otherwise).
        #[arg(long)]
        task_type: Option<String>,
        /// The tenant the job is billed to (default `default`; with nats.tenant_from_subject
        /// it also picks the subject).
        #[arg(long)]
        tenant: Option<String>,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        /// The most output tokens to ask for.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// The job's deadline, all fallbacks included (default worker.default_timeout_ms).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Ask for the answer in one piece (no chunk events).
        #[arg(long)]
        no_stream: bool,
        /// Show the model an image file (.png, .jpg, .gif, .webp) with the prompt; repeatable.
        #[arg(long = "image", conflicts_with = "embed")]
        images: Vec<PathBuf>,
        /// Ask for a JSON answer matching this JSON Schema file (the result's `json`).
        #[arg(long, conflicts_with = "embed")]
        json_schema: Option<PathBuf>,
        /// Submit this raw job JSON (a file path, or - for stdin) instead of building one.
        #[arg(long, conflicts_with = "prompt")]
        job: Option<String>,
        /// Print the whole result event as JSON instead of the summary line.
        #[arg(long)]
        json: bool,
        /// Submit an embedding job: the prompt argument is the one input, or stdin gives one
        /// input per non-empty line. Prints each vector's size and first values.
        #[arg(long)]
        embed: bool,
        /// Vector size to ask for (embedding jobs).
        #[arg(long, requires = "embed")]
        dimensions: Option<u32>,
        /// Submit an image job with this prompt; the pictures are written to --output.
        #[arg(long, value_name = "PROMPT", conflicts_with_all = ["embed", "prompt", "job"], requires = "output")]
        image_gen: Option<String>,
        /// Where an image job's picture goes (`fox.png`); with several pictures, `fox-2.png`
        /// and so on for the second and later ones.
        #[arg(short, long, requires = "image_gen")]
        output: Option<PathBuf>,
        /// The picture size to ask for (`1024x1024`, `1536x1024`, `auto`).
        #[arg(long, requires = "image_gen")]
        size: Option<String>,
    },
    /// Cancel a job: a running one stops at once (its provider call is closed and its usage
    /// recorded), a queued one is answered `cancelled` when a worker picks it up.
    Cancel {
        /// The job's id.
        job_id: uuid::Uuid,
        /// The tenant the job belongs to: a cancel takes effect only on that tenant's job.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Show the per-provider health of every running worker.
    Status {
        /// How long to wait for answers, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a least-privilege nats-server `accounts` block for this configuration's subjects:
    /// a worker user, an orchestrator (or one per --tenant), and an admin.
    NatsAccount {
        /// One orchestrator user per tenant, limited to its own job and reply subjects.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// The account's name.
        #[arg(long, default_value = "LLM")]
        account: String,
    },
    /// Serve the HTTP gateway (OpenAI-compatible API and the seed API) until SIGTERM/SIGINT.
    /// It publishes jobs for the workers; it never calls a provider.
    Gateway {
        /// Address to listen on (default `gateway.listen`, 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Manage the gateway's API keys (stored hashed in Postgres `llm_api_keys`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Look at dead letters (jobs delivered too often, results the recorder cannot write) and
    /// replay them after a fix.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
    /// Load published prices into `llm_prices`, or re-apply prices to recorded calls.
    Prices {
        #[command(subcommand)]
        action: PricesAction,
    },
    /// Print usage per day, tenant, provider and model; or list or prune the history's
    /// monthly partitions.
    Usage {
        #[command(subcommand)]
        action: Option<UsageAction>,
        /// How many days back, today included.
        #[arg(long, default_value_t = 7, conflicts_with = "since")]
        days: u32,
        /// From this day (YYYY-MM-DD, UTC) to today, instead of --days.
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
        /// Only this tenant's usage.
        #[arg(long)]
        tenant: Option<String>,
        /// Rows shown (the newest); 0 shows all. The total line counts every row.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum UsageAction {
    /// Drop the months of `llm_calls` and `llm_jobs` that ended before the given age (whole
    /// partitions; the daily rollups and their views keep those months).
    Prune {
        /// How old a month must be, counted from now: 13months, 400days, 8weeks, 2years.
        #[arg(long)]
        older_than: usage::history::Age,
        /// Print what would be dropped, drop nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The monthly partitions of the history, with their estimated rows and size.
    Partitions,
}

#[derive(Subcommand)]
enum DeadAction {
    /// The newest dead letters, oldest first.
    List {
        /// Only jobs or only usage (results).
        #[arg(long, value_enum)]
        kind: Option<DeadKind>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: its headers and the message it keeps.
    Show { sequence: u64 },
    /// Publish a dead job again as a new job (printing its id), or write a dead result to
    /// Postgres.
    Replay { sequence: u64 },
}

#[derive(Subcommand)]
enum PricesAction {
    /// Add the prices of a price file (such as `prices/list-prices.toml`) to `llm_prices`,
    /// for every configured provider of each entry's type; prices already in force are
    /// left alone. Recorded costs do not change (see `reprice`).
    Load { file: PathBuf },
    /// Recompute the cost of recorded calls with the prices in force when each started (after
    /// a corrected or back-dated price), and their jobs' totals; says how many rows and how
    /// much money changed.
    Reprice {
        /// Calls started at or after this time (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long, value_parser = parse_time)]
        since: chrono::DateTime<chrono::Utc>,
        /// And before this time.
        #[arg(long, value_parser = parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Only this provider's calls (a provider name from the configuration).
        #[arg(long)]
        provider: Option<String>,
        /// Only this model's calls.
        #[arg(long)]
        model: Option<String>,
        /// Say what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// An RFC 3339 time, or a day (midnight UTC).
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a YYYY-MM-DD day"))
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key for a tenant; prints the key alone on stdout (it is shown only once).
    Create {
        #[arg(long)]
        tenant: String,
        /// A label for lists (who or what uses the key).
        #[arg(long)]
        name: Option<String>,
        /// An operator's key: `GET /v1/status` shows it the whole fleet (every worker's
        /// provider health); a tenant's key sees only the configured models' state.
        #[arg(long)]
        admin: bool,
    },
    /// Every key: id, first characters, tenant, name, admin, created, revoked.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (or the first characters `list` shows, without the dots).
    Revoke { key: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeadKind {
    Jobs,
    Usage,
}

/// mimalloc: about a sixth less worker CPU per job than glibc's malloc (`llm_worker::memory`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(llm_worker::memory::on_park)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let level = if matches!(cli.command, Command::Run { .. } | Command::Gateway { .. }) {
        "info"
    } else {
        "warn"
    };
    let service = if matches!(cli.command, Command::Gateway { .. }) {
        "llm-worker-gateway"
    } else {
        "llm-worker"
    };
    // The OTLP exporter uses a blocking HTTP client: build and flush it off the async threads.
    let telemetry =
        tokio::task::block_in_place(|| telemetry::init(&config.telemetry, level, service));
    let outcome = command(cli, config).await;
    tokio::task::block_in_place(|| telemetry.shutdown());
    outcome
}

async fn command(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            no_recorder,
            recorder_only,
        } => {
            let roles = Roles {
                jobs: !recorder_only,
                recorder: !no_recorder,
            };
            // Reloads read the same file (and environment) again.
            let path = cli.config.clone();
            let source: llm_worker::reload::ConfigSource =
                std::sync::Arc::new(move || Config::load(path.as_deref()));
            let running = app::start_with(config, roles, Some(source)).await?;
            // This process is the worker: its allocator's freed memory goes back after bursts.
            running.release_memory_after_bursts();
            let stop = running.stop_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            if let Some(reloader) = running.reloader() {
                tokio::spawn(reload_on_sighup(reloader));
            }
            running.wait().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            prompt,
            model,
            provider,
            task_type,
            tenant,
            system,
            max_tokens,
            timeout_ms,
            no_stream,
            images,
            json_schema,
            job,
            json,
            embed,
            dimensions,
            image_gen,
            output,
            size,
        } => {
            let kind = if embed {
                JobKind::Embed
            } else if image_gen.is_some() {
                JobKind::Image
            } else {
                JobKind::Generate
            };
            let fields = submit::Fields {
                model,
                provider,
                task_type,
                tenant,
                timeout_ms,
                system,
                max_tokens,
                stream: !no_stream,
                images: images
                    .iter()
                    .map(|p| submit::image_part(p))
                    .collect::<anyhow::Result<_>>()?,
                json_schema: match json_schema {
                    Some(path) => Some(
                        serde_json::from_str(&read_source(&path.to_string_lossy())?)
                            .context("the JSON Schema file is not valid JSON")?,
                    ),
                    None => None,
                },
                dimensions,
                image_size: size,
            };
            let job = match job {
                Some(source) => serde_json::from_str(&read_source(&source)?)
                    .context("the job file is not valid JSON")?,
                // One input: the argument; else one per non-empty line of stdin.
                None if image_gen.is_some() => {
                    submit::build_job(kind, image_gen.into_iter().collect(), &fields)
                }
                None if embed => {
                    let inputs = match prompt {
                        Some(p) => vec![p],
                        None => read_source("-")?
                            .lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                    };
                    submit::build_job(kind, inputs, &fields)
                }
                None => {
                    let prompt = match prompt {
                        Some(p) => p,
                        None => read_source("-")?,
                    };
                    submit::build_job(kind, vec![prompt], &fields)
                }
            };
            let mut stdout = std::io::stdout();
            let result = submit::submit(&config.nats, kind, job, &mut stdout).await?;
            if let Some(vectors) = result.embeddings.as_ref().filter(|_| !json) {
                print!("{}", submit::describe_vectors(vectors));
            }
            if let (Some(images), Some(path)) = (&result.images, &output) {
                for written in submit::save_images(&config.nats, images, path).await? {
                    eprintln!("wrote {}", written.display());
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                eprintln!("{}", submit::summary(&result));
            }
            Ok(if result.status == Status::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Gateway { listen } => {
            let listen = listen.unwrap_or_else(|| config.gateway.listen.clone());
            let running = llm_worker::gateway::start(config, &listen).await?;
            let stop = running.stop_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            running.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { action } => {
            use llm_worker::gateway::keys;
            let pool = llm_worker::usage::connect(&config)
                .await?
                .context("DATABASE_URL (or database.url) is not set")?;
            match action {
                KeysAction::Create {
                    tenant,
                    name,
                    admin,
                } => {
                    let (key, secret) =
                        keys::create(&pool, &tenant, name.as_deref(), admin).await?;
                    println!("{secret}");
                    eprintln!("key {} for tenant {} created", key.id, key.tenant);
                }
                KeysAction::List { json } => {
                    let all = keys::list(&pool).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else {
                        print!("{}", keys::render(&all));
                    }
                }
                KeysAction::Revoke { key } => {
                    let n = keys::revoke(&pool, key.trim_end_matches('.')).await?;
                    if n == 0 {
                        anyhow::bail!("no unrevoked key has the id or prefix {key:?}");
                    }
                    eprintln!("{n} key(s) revoked");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::NatsAccount { tenants, account } => {
            let users = llm_worker::nats_account::default_users(&tenants);
            print!(
                "{}",
                llm_worker::nats_account::render(&config.nats, &account, &users)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dead { action } => {
            use llm_worker::dead;
            let client = llm_worker::nats::connect(&config.nats).await?;
            let js = async_nats::jetstream::new(client);
            match action {
                DeadAction::List { kind, limit, json } => {
                    let kind = kind.map(|k| match k {
                        DeadKind::Jobs => dead::Kind::Jobs,
                        DeadKind::Usage => dead::Kind::Usage,
                    });
                    let letters = dead::list(&js, &config.nats, kind, limit).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&letters)?);
                    } else {
                        print!("{}", dead::render(&letters));
                    }
                }
                DeadAction::Show { sequence } => {
                    let letter = dead::show(&js, &config.nats, sequence).await?;
                    println!("{}", serde_json::to_string_pretty(&letter)?);
                    println!("{}", String::from_utf8_lossy(&letter.payload));
                }
                DeadAction::Replay { sequence } => {
                    let pool = llm_worker::usage::connect(&config).await?;
                    match llm_worker::replay::replay(&js, &config.nats, pool.as_ref(), sequence)
                        .await?
                    {
                        llm_worker::replay::Replayed::Job(id) => println!("{id}"),
                        llm_worker::replay::Replayed::Usage => {
                            eprintln!("result written to Postgres")
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            llm_worker::usage::connect(&config)
                .await?
                .context("DATABASE_URL (or database.url) is not set")?;
            eprintln!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Usage {
            action,
            days,
            since,
            tenant,
            limit,
        } => {
            let pool = llm_worker::usage::connect(&config)
                .await?
                .context("DATABASE_URL (or database.url) is not set")?;
            match action {
                Some(UsageAction::Partitions) => {
                    let all = usage::history::partitions(&pool).await?;
                    print!("{}", usage::history::render(&all, "partition"));
                    return Ok(ExitCode::SUCCESS);
                }
                Some(UsageAction::Prune {
                    older_than,
                    dry_run,
                }) => {
                    let cutoff = older_than.before(chrono::Utc::now());
                    let all = usage::history::partitions(&pool).await?;
                    let doomed = usage::history::expired(&all, cutoff);
                    eprintln!(
                        "months ended before {} (now - {older_than}):",
                        cutoff.format("%Y-%m-%d %H:%M UTC")
                    );
                    if dry_run {
                        print!("{}", usage::history::render(&doomed, "would drop"));
                    } else {
                        usage::history::drop_partitions(&pool, &doomed).await?;
                        print!("{}", usage::history::render(&doomed, "dropped"));
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                None => {}
            }
            let today = chrono::Utc::now().date_naive();
            let from =
                since.unwrap_or_else(|| today - chrono::Days::new(u64::from(days.max(1)) - 1));
            let to = today + chrono::Days::new(1);
            let rows = usage::report::daily(&pool, from, to, tenant.as_deref()).await?;
            let limit = (limit > 0).then_some(limit);
            print!("{}", usage::report::render_last(&rows, limit));
            Ok(ExitCode::SUCCESS)
        }
        Command::Prices { action } => {
            let pool = llm_worker::usage::connect(&config)
                .await?
                .context("DATABASE_URL (or database.url) is not set")?;
            match action {
                PricesAction::Load { file } => {
                    let prices = usage::prices::PriceFile::read(&file)?;
                    let loaded = usage::prices::load(&pool, &config, &prices).await?;
                    for (api, names) in &loaded.providers {
                        println!("{api} prices -> provider(s) {}", names.join(", "));
                    }
                    println!(
                        "{} price rows added, {} already in force (prices checked {})",
                        loaded.added, loaded.unchanged, prices.checked
                    );
                    for c in &loaded.conflicting {
                        println!(
                            "not replaced: {c} has other prices from the same time (give the file a later effective_from)"
                        );
                    }
                }
                PricesAction::Reprice {
                    since,
                    until,
                    provider,
                    model,
                    dry_run,
                } => {
                    let scope = usage::prices::Scope {
                        since,
                        until,
                        provider,
                        model,
                        dry_run,
                    };
                    let r = usage::prices::reprice(&pool, &scope).await?;
                    let verb = if dry_run { "would reprice" } else { "repriced" };
                    println!("{verb}: {r}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { job_id, tenant } => {
            let client = llm_worker::nats::connect(&config.nats).await?;
            let js = async_nats::jetstream::new(client);
            llm_worker::cancel::request(&js, &config.nats, &tenant, job_id)
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "cancel request for {job_id} stored: a worker running the job stops it now; one picking it up later answers it cancelled"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { wait_ms, json } => {
            let client = llm_worker::nats::connect(&config.nats).await?;
            let workers = status::collect(
                &client,
                &config.nats,
                std::time::Duration::from_millis(wait_ms),
            )
            .await
            .map_err(|e| anyhow::anyhow!("status request failed: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else if workers.is_empty() {
                println!("no worker answered on {}", status::subject(&config.nats));
            } else {
                print!("{}", status::render(&workers));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_source(source: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if source == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(source).with_context(|| format!("reading {source}"))?;
    }
    Ok(text)
}

/// Reload the configuration on every SIGHUP.
async fn reload_on_sighup(reloader: llm_worker::reload::Reloader) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = reloader.reload_logged();
        }
    }
    #[cfg(not(unix))]
    drop(reloader);
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
