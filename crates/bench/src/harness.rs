//! A throw-away deployment for one benchmark scenario: unique stream, subject and consumer
//! names, a fresh database, and worker *processes* (the `llm-worker` binary's `run`, so a figure is one
//! real worker process and its peak RSS can be read from `/proc`). Everything is removed
//! again by [`Deployment::teardown`]; worker logs are kept when a scenario fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use sqlx::PgPool;
use uuid::Uuid;

use llm_worker::config::{Config, NatsConfig};
use llm_worker::contract::JobKind;
use llm_worker_testkit::ScratchDatabase;

/// Where the benchmark runs: the servers and the worker executable.
#[derive(Debug, Clone)]
pub struct Target {
    /// One URL, or several comma separated (a cluster).
    pub nats_url: String,
    /// Copies of every stream the deployment creates (3 on a 3-node cluster).
    pub replicas: usize,
    pub database_url: String,
    /// The `llm-worker` binary started as worker processes.
    pub worker_exe: PathBuf,
    /// This binary, started as the bare pipeline process.
    pub bench_exe: PathBuf,
    /// Write only the `[nats]` keys every version of the worker knows (for comparing an
    /// older binary: unknown keys are configuration errors).
    pub legacy_config: bool,
}

pub struct Deployment {
    pub nats: NatsConfig,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The deployment's own database (usage rows land here).
    pub pool: PgPool,
    database: ScratchDatabase,
    dir: PathBuf,
    config_path: PathBuf,
    worker_exe: PathBuf,
    workers: Vec<tokio::process::Child>,
    /// Gateway processes (not counted among the workers).
    gateways: Vec<tokio::process::Child>,
}

impl Deployment {
    /// Create the database and write a worker config whose providers and `[worker]` settings
    /// come from `extra_toml`.
    pub async fn new(target: &Target, extra_toml: &str) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..10].to_string();
        let database = ScratchDatabase::create(&target.database_url, "llmw_bench")
            .await
            .context("creating the benchmark database (DATABASE_URL)")?;
        let later_keys = if target.legacy_config {
            String::new()
        } else {
            format!(
                "replicas = {}\ndead_stream = \"BENCH_DEAD_{id}\"\ncancel_stream = \"BENCH_CANCEL_{id}\"\n\
                 tenant_bucket = \"BENCH_TENANTS_{id}\"\ncache_bucket = \"BENCH_CACHE_{id}\"\nimages_bucket = \"BENCH_IMAGES_{id}\"\n",
                target.replicas
            )
        };
        let toml = format!(
            r#"
[nats]
url = "{nats}"
subject_prefix = "bench{id}"
jobs_stream = "BENCH_JOBS_{id}"
results_stream = "BENCH_RESULTS_{id}"
consumer_prefix = "bench{id}"
{later_keys}
[database]
url = "{db_url}"
{extra_toml}
"#,
            nats = target.nats_url,
            db_url = database.url,
        );
        let mut config = Config::from_toml(&toml).context("benchmark worker config")?;
        if target.legacy_config {
            // Older workers know no names derived from the prefix: theirs are the llm ones.
            config.nats.use_llm_names();
        }
        let dir = std::env::temp_dir().join(format!("llm-worker-bench-{id}"));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("worker.toml");
        std::fs::write(&config_path, &toml)?;
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(target.nats_url.split(',').collect::<Vec<_>>())
            .await
            .with_context(|| {
                format!(
                    "connecting to NATS at {}",
                    llm_worker::trust::redact_url(&target.nats_url)
                )
            })?;
        let js = jetstream::new(client.clone());
        // A cluster that just started elects its JetStream leader first: retry for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = llm_worker::nats::ensure_streams(&js, &config.nats).await {
            if tokio::time::Instant::now() > deadline {
                return Err(e.into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let pool = PgPool::connect(&database.url).await?;
        // An older worker (`legacy_config`) migrates the database itself: ours would hold
        // migrations it does not know, which it refuses.
        if !target.legacy_config {
            llm_worker::usage::migrate(&pool).await?;
        }
        Ok(Self {
            nats: config.nats,
            client,
            js,
            pool,
            database,
            dir,
            config_path,
            worker_exe: target.worker_exe.clone(),
            workers: Vec::new(),
            gateways: Vec::new(),
        })
    }

    /// Start one more worker process and wait until it answers status requests and the job
    /// consumer exists.
    pub async fn spawn_worker(&mut self) -> anyhow::Result<()> {
        let n = self.workers.len() + 1;
        let id = format!("bench-worker-{n}");
        let child = self.spawn(&id, &["run"], &[("LLM_WORKER__WORKER__ID", &id)])?;
        self.workers.push(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answers =
                llm_worker::status::collect(&self.client, &self.nats, Duration::from_millis(200))
                    .await
                    .map_err(|e| anyhow::anyhow!("status request: {e}"))?;
            let ready =
                answers.iter().any(|w| w.worker_id == id) && self.generate_consumer().await.is_ok();
            if ready {
                return Ok(());
            }
            if let Some(w) = self.workers.last_mut()
                && let Ok(Some(status)) = w.try_wait()
            {
                anyhow::bail!("{id} exited with {status}; see {}", self.dir.display());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{id} not ready within 30 s; see {}", self.dir.display());
            }
        }
    }

    /// `llm-worker --config <the deployment's> <args>`, logging to `<log>.log`.
    fn spawn(
        &self,
        log: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        tokio::process::Command::new(&self.worker_exe)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .envs(env.iter().copied())
            // The config file names the servers: environment overrides must not redirect it.
            .env_remove("NATS_URL")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {}", self.worker_exe.display(), args.join(" ")))
    }

    /// Start an `llm-worker gateway` process on a free loopback port and wait until it is
    /// ready; returns its address and process id.
    pub async fn spawn_gateway(&mut self) -> anyhow::Result<(std::net::SocketAddr, u32)> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = self.spawn("gateway", &["gateway", "--listen", &addr.to_string()], &[])?;
        let pid = child.id().context("the gateway has no pid")?;
        self.gateways.push(child);
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status().is_success()
            {
                return Ok((addr, pid));
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the gateway was not ready within 30 s; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of worker `i` (0-based) now, in bytes (Linux `VmRSS`).
    pub fn rss(&self, i: usize) -> Option<u64> {
        let pid = self.workers.get(i)?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Peak resident memory of worker `i` (0-based) so far, in bytes (Linux `VmHWM`).
    pub fn peak_rss(&self, i: usize) -> Option<u64> {
        let pid = self.workers.get(i)?.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// CPU time (user + system) worker `i` has used so far.
    pub fn cpu_time(&self, i: usize) -> Option<Duration> {
        process_cpu(&self.workers.get(i)?.id()?.to_string())
    }

    pub fn job_subject(&self) -> String {
        self.nats.job_subject(JobKind::Generate)
    }

    /// Wait until `llm_jobs` holds `n` rows; returns false after `timeout`.
    pub async fn wait_rows(&self, n: usize, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs")
                .fetch_one(&self.pool)
                .await?;
            if rows as usize >= n {
                return Ok(true);
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Wait (up to 2 minutes) until `llm_jobs` holds `n` rows; an error if it does not.
    pub async fn require_rows(&self, n: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.wait_rows(n, Duration::from_secs(120)).await?,
            "usage rows missing: fewer than {n} in llm_jobs after 2 minutes"
        );
        Ok(())
    }

    /// Deliveries by the generation consumer so far, redeliveries included.
    pub async fn deliveries(&self) -> anyhow::Result<u64> {
        Ok(self.generate_consumer().await?.delivered.consumer_sequence)
    }

    async fn generate_consumer(&self) -> anyhow::Result<jetstream::consumer::Info> {
        let name = self.nats.consumer_name(JobKind::Generate);
        Ok(self
            .js
            .get_stream_no_info(&self.nats.jobs_stream)
            .await?
            .consumer_info(&name)
            .await?)
    }

    /// Stop the workers and remove the streams, the database and (on success) the logs.
    pub async fn teardown(mut self, keep_logs: bool) {
        for w in self.workers.iter_mut().chain(&mut self.gateways) {
            let _ = w.start_kill();
            let _ = w.wait().await;
        }
        let _ = self.js.delete_stream(&self.nats.jobs_stream).await;
        let _ = self.js.delete_stream(&self.nats.results_stream).await;
        let _ = self.js.delete_stream(&self.nats.dead_stream).await;
        let _ = self.js.delete_stream(&self.nats.cancel_stream).await;
        let _ = self.js.delete_stream(&self.nats.batch_stream).await;
        let _ = self
            .js
            .delete_stream(format!("OBJ_{}", self.nats.images_bucket))
            .await;
        for bucket in [
            &self.nats.tenant_bucket,
            &self.nats.cache_bucket,
            &self.nats.batch_bucket,
        ] {
            let _ = self.js.delete_stream(format!("KV_{bucket}")).await;
        }
        self.pool.close().await;
        self.database.drop().await;
        if keep_logs {
            eprintln!("worker logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// CPU time (user + system, all threads) of process `pid` (or `self`) so far, from `/proc`.
pub fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux on every architecture we run on.
    Some(Duration::from_millis(ticks * 10))
}
