//! Shared test harness: real NATS JetStream and real Postgres (from `NATS_URL` /
//! `DATABASE_URL`, or testcontainers when those are unset), a worker started in-process on
//! unique stream/subject/consumer names with a fresh database, and client-side helpers that
//! speak only the contract (subjects, JSON, SQL).

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use llm_worker::app::{self, Roles, Running};
use llm_worker::config::Config;
use llm_worker_testkit::ScratchDatabase;
use serde_json::{Value, json};
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt, runners::AsyncRunner};
use uuid::Uuid;

/// A worker that answers jobs and records usage (what `llm-worker run` starts).
pub const ALL_ROLES: Roles = Roles {
    jobs: true,
    recorder: true,
};

/// A worker that answers jobs and records nothing (`run --no-recorder`).
pub const JOBS_ONLY: Roles = Roles {
    jobs: true,
    recorder: false,
};

/// Connection strings for the services, and any containers started to provide them.
pub struct Services {
    pub nats_url: String,
    pub database_url: String,
    _nats: Option<ContainerAsync<testcontainers_modules::nats::Nats>>,
    _postgres: Option<ContainerAsync<testcontainers_modules::postgres::Postgres>>,
}

impl Services {
    pub async fn get() -> Services {
        let mut nats = None;
        let mut postgres = None;
        let nats_url = match std::env::var("NATS_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => {
                let cmd = testcontainers_modules::nats::NatsServerCmd::default().with_jetstream();
                let c = testcontainers_modules::nats::Nats::default()
                    .with_cmd(&cmd)
                    .start()
                    .await
                    .expect("NATS_URL is not set and no NATS container could be started: set NATS_URL (e.g. nats://127.0.0.1:4222) or run Docker");
                let port = c.get_host_port_ipv4(4222).await.unwrap();
                nats = Some(c);
                format!("nats://127.0.0.1:{port}")
            }
        };
        let database_url = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => {
                let c = testcontainers_modules::postgres::Postgres::default()
                    .with_tag("16-alpine")
                    .start()
                    .await
                    .expect("DATABASE_URL is not set and no Postgres container could be started: set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres) or run Docker");
                let port = c.get_host_port_ipv4(5432).await.unwrap();
                postgres = Some(c);
                format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres")
            }
        };
        Services {
            nats_url,
            database_url,
            _nats: nats,
            _postgres: postgres,
        }
    }
}

/// One test's isolated world: unique names, a fresh database, a client.
pub struct TestApp {
    pub services: Services,
    pub config: Config,
    /// The text `config` was read from, for worker child processes.
    pub toml: String,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub db: sqlx::PgPool,
    pub database: ScratchDatabase,
    pub workers: Vec<Running>,
}

/// A config for a test: unique names, fast retries, and the given providers/routes TOML.
pub fn test_config(services: &Services, db_url: &str, providers_toml: &str) -> Config {
    Config::from_toml(&test_config_toml(services, db_url, providers_toml)).unwrap()
}

/// The TOML text of [`test_config`] (for worker child processes).
pub fn test_config_toml(services: &Services, db_url: &str, providers_toml: &str) -> String {
    let id = Uuid::new_v4().simple().to_string()[..12].to_string();
    format!(
        r#"
[nats]
url = "{nats}"
subject_prefix = "t{id}"
jobs_stream = "JOBS_{id}"
results_stream = "RESULTS_{id}"
dead_stream = "DEAD_{id}"
cancel_stream = "CANCEL_{id}"
tenant_bucket = "TENANTS_{id}"
cache_bucket = "CACHE_{id}"
images_bucket = "IMAGES_{id}"
batch_stream = "BATCH_{id}"
batch_bucket = "BATCHES_{id}"
consumer_prefix = "w{id}"
ack_wait_secs = 5

[worker]
max_in_flight = 64
shutdown_grace_secs = 10
default_timeout_ms = 20000
pull_expires_ms = 1000

[database]
url = "{db_url}"

{providers_toml}
"#,
        nats = services.nats_url,
    )
}

/// The base URL a provider of `kind` uses to reach the fake server: the OpenAI SDK convention
/// (`.../v1`) for `openai`, the server root for the others.
pub fn provider_base_url(kind: &str, fake: &llm_worker_testkit::FakeLlmServer) -> String {
    if kind == "openai" {
        fake.base_url()
    } else {
        fake.root_url()
    }
}

/// An OpenAI-type provider section pointing at a fake server, with fast retries.
pub fn openai_provider(name: &str, base_url: &str, model: &str) -> String {
    format!(
        r#"
[providers.{name}]
type = "openai"
base_url = "{base_url}"
default_model = "{model}"
max_retries = 1
retry_min_delay_ms = 10
retry_max_delay_ms = 50
first_token_timeout_ms = 3000
stall_timeout_ms = 3000
"#
    )
}

impl TestApp {
    /// Fresh database and names; no worker started yet.
    pub async fn new(providers_toml: &str) -> TestApp {
        let services = Services::get().await;
        let database = ScratchDatabase::create(&services.database_url, "llmw")
            .await
            .unwrap();
        let toml = test_config_toml(&services, &database.url, providers_toml);
        let config = Config::from_toml(&toml).unwrap();
        let client = async_nats::connect(&services.nats_url).await.unwrap();
        let js = jetstream::new(client.clone());
        let db = sqlx::PgPool::connect(&database.url).await.unwrap();
        TestApp {
            services,
            config,
            toml,
            client,
            js,
            db,
            database,
            workers: Vec::new(),
        }
    }

    /// A worker with the app's config (plus `tweak`), started and ready.
    pub async fn start_worker_with(&mut self, roles: Roles, tweak: impl FnOnce(&mut Config)) {
        let mut config = self.config.clone();
        config.worker.id = Some(format!("worker-{}", self.workers.len() + 1));
        tweak(&mut config);
        let running = app::start(config, roles).await.unwrap();
        self.workers.push(running);
    }

    /// `llm-worker <args>` as a child process with the app's config (and `extra` TOML
    /// appended), returned once it logs that it is ready. Killed when dropped.
    pub async fn spawn_process(&self, extra: &str, args: &[&str]) -> WorkerProcess {
        self.spawn_process_with(extra, args, &[]).await
    }

    /// [`Self::spawn_process`] with environment variables (`LLM_WORKER__A__B` overrides).
    pub async fn spawn_process_with(
        &self,
        extra: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let dir = std::env::temp_dir().join(format!("llmw-proc-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.toml");
        std::fs::write(&path, format!("{}\n{extra}", self.toml)).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-worker"))
            .arg("--config")
            .arg(&path)
            .args(args)
            // The config file says where everything is; the test's own environment (the
            // shared servers' URLs) must not override it.
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env_remove("LLM_WORKER_CONFIG")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // Keep reading its log (so it never blocks on a full pipe); say when it is ready.
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("worker ready")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[child] {line}");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("the worker process did not get ready within 30 s")
            .expect("the worker process exited before it was ready");
        WorkerProcess { child, _dir: dir }
    }

    pub async fn start_worker(&mut self) {
        self.start_worker_with(ALL_ROLES, |_| {}).await;
    }

    /// A unique reply subject, subscribed before the job is published.
    pub async fn reply_inbox(&self) -> (String, async_nats::Subscriber) {
        let subject = format!(
            "{}.replies.{}",
            self.config.nats.subject_prefix,
            Uuid::new_v4()
        );
        let sub = self.client.subscribe(subject.clone()).await.unwrap();
        (subject, sub)
    }

    /// Publish raw bytes as a generation job, with `Nats-Msg-Id` when given.
    pub async fn publish_raw(&self, payload: Vec<u8>, msg_id: Option<&str>) {
        self.publish_raw_to("generate", payload, msg_id).await;
    }

    /// Publish raw bytes to `<prefix>.jobs.<kind>`.
    pub async fn publish_raw_to(&self, kind: &str, payload: Vec<u8>, msg_id: Option<&str>) {
        let mut publish = PublishMessage::build().payload(payload.into());
        if let Some(id) = msg_id {
            publish = publish.message_id(id);
        }
        let subject = format!("{}.jobs.{kind}", self.config.nats.subject_prefix);
        self.js
            .send_publish(subject, publish)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publish a generation job (a JSON object) the way an orchestrator does; returns its id.
    pub async fn publish(&self, job: Value) -> Uuid {
        self.publish_to("generate", job).await
    }

    /// Publish a job of `kind` (`generate` or `embed`); returns its job id.
    pub async fn publish_to(&self, kind: &str, mut job: Value) -> Uuid {
        let id = match job.get("job_id").and_then(|v| v.as_str()) {
            Some(id) => Uuid::parse_str(id).unwrap(),
            None => {
                let id = Uuid::now_v7();
                job["job_id"] = json!(id.to_string());
                id
            }
        };
        self.publish_raw_to(
            kind,
            serde_json::to_vec(&job).unwrap(),
            Some(&id.to_string()),
        )
        .await;
        id
    }

    /// The result stored in the results stream for a job, if any.
    pub async fn stored_result(&self, job_id: Uuid) -> Option<Value> {
        let stream = self
            .js
            .get_stream(&self.config.nats.results_stream)
            .await
            .unwrap();
        let subject = format!("{}.results.{job_id}", self.config.nats.subject_prefix);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Some(serde_json::from_slice(&m.payload).unwrap()),
            Err(_) => None,
        }
    }

    /// Wait (bounded) for the stored result of a job.
    pub async fn wait_stored_result(&self, job_id: Uuid) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.stored_result(job_id).await {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no stored result for {job_id}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Info of the durable consumer of generation jobs.
    pub async fn generate_consumer_info(&self) -> async_nats::jetstream::consumer::Info {
        let stream = self
            .js
            .get_stream(&self.config.nats.jobs_stream)
            .await
            .unwrap();
        let name = format!("{}-generate", self.config.nats.consumer_prefix);
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&name).await.unwrap();
        consumer.info().await.unwrap().clone()
    }

    /// Messages still in the job stream (a WorkQueue: acked/terminated ones are removed).
    pub async fn jobs_in_stream(&self) -> u64 {
        let mut stream = self
            .js
            .get_stream(&self.config.nats.jobs_stream)
            .await
            .unwrap();
        stream.info().await.unwrap().state.messages
    }

    /// Wait (bounded) until `sql` (returning one bigint) returns `expected`.
    /// The `bigint` a one-value query returns.
    /// A price row for (provider, model) from 2000 on, in USD per million tokens.
    pub async fn set_price(&self, provider: &str, model: &str, input: f64, output: f64) {
        llm_worker::usage::migrate(&self.db).await.unwrap();
        sqlx::query(
            "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok, output_usd_per_mtok)
             VALUES ($1, $2, '2000-01-01', $3, $4)",
        )
        .bind(provider)
        .bind(model)
        .bind(input)
        .bind(output)
        .execute(&self.db)
        .await
        .unwrap();
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    pub async fn wait_count(&self, sql: &str, expected: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.count(sql).await;
            if n == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{sql}` returned {n}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop workers, delete the test's streams and database.
    pub async fn teardown(mut self) {
        for w in self.workers.drain(..) {
            w.shutdown().await;
        }
        let _ = self.js.delete_stream(&self.config.nats.jobs_stream).await;
        let _ = self
            .js
            .delete_stream(&self.config.nats.results_stream)
            .await;
        let _ = self.js.delete_stream(&self.config.nats.dead_stream).await;
        let _ = self.js.delete_stream(&self.config.nats.cancel_stream).await;
        let _ = self.js.delete_stream(&self.config.nats.batch_stream).await;
        for bucket in [
            &self.config.nats.tenant_bucket,
            &self.config.nats.cache_bucket,
            &self.config.nats.batch_bucket,
        ] {
            let _ = self.js.delete_stream(format!("KV_{bucket}")).await;
        }
        let images = format!("OBJ_{}", self.config.nats.images_bucket);
        let _ = self.js.delete_stream(images).await;
        self.db.close().await;
        self.database.drop().await;
    }
}

/// Decode a job the way the worker does, with `catalog` (a chain) deciding what it may pin;
/// for tests that drive the chain directly. Panics on an invalid job.
pub fn decode_job(
    kind: llm_worker::contract::JobKind,
    job: &Value,
    catalog: &dyn llm_worker::job::Catalog,
) -> llm_worker::job::Job {
    use llm_worker::job::{self, Delivery, Limits, Rules};
    let limits = Limits {
        max_job_bytes: 1 << 20,
        default_timeout: Duration::from_secs(20),
        max_timeout: Duration::from_secs(60),
        bounds: Default::default(),
        tenants: Default::default(),
        cache_task_types: Default::default(),
        tier_task_types: Default::default(),
        batch_deadline: Duration::from_secs(86_400),
    };
    let replies = llm_worker::config::NatsConfig::default()
        .reply_policy()
        .unwrap();
    let rules = Rules {
        limits: &limits,
        replies: &replies,
        catalog,
    };
    job::decode(
        kind,
        job.to_string().as_bytes(),
        &Delivery::default(),
        &rules,
    )
    .unwrap_or_else(|invalid| panic!("invalid job {job}: {}", invalid.reason))
}

/// A worker child process (`TestApp::spawn_process`).
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    _dir: std::path::PathBuf,
}

impl WorkerProcess {
    /// SIGKILL, and wait until it is gone.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// The configuration file it was started with (rewrite it, then reload).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.join("worker.toml")
    }

    /// Send it SIGHUP.
    pub fn hangup(&self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Its peak resident memory (`VmHWM`), in kB.
    pub fn peak_rss_kb(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

/// The next event on a reply subject (within 10 s), decoded.
pub async fn next_event(sub: &mut async_nats::Subscriber) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("no event within 10 s")
        .expect("subscription closed");
    serde_json::from_slice(&msg.payload).unwrap()
}

/// The results of `n` jobs answered on one reply subject, by job id (chunks skipped).
pub async fn collect_results(
    sub: &mut async_nats::Subscriber,
    n: usize,
) -> std::collections::HashMap<String, Value> {
    collect_results_within(sub, n, Duration::from_secs(30)).await
}

/// [`collect_results`] waiting up to `wait` for each event, for tests that load the
/// machine on purpose.
pub async fn collect_results_within(
    sub: &mut async_nats::Subscriber,
    n: usize,
    wait: Duration,
) -> std::collections::HashMap<String, Value> {
    let mut results = std::collections::HashMap::new();
    while results.len() < n {
        let r = collect_reply_within(sub, wait).await.result;
        results.insert(r["job_id"].as_str().unwrap().to_string(), r);
    }
    results
}

/// Events received on a reply subject until (and including) the result.
pub struct Reply {
    pub chunks: Vec<Value>,
    pub result: Value,
}

impl Reply {
    /// Text of the chunks of the attempt the result names.
    pub fn final_text(&self) -> String {
        let attempt = self.result["attempt"].as_u64();
        self.chunks
            .iter()
            .filter(|c| c["attempt"].as_u64() == attempt)
            .filter_map(|c| c["delta"].as_str())
            .collect()
    }

    /// The tool-call pieces of the final attempt's chunks, by call index: (id, name,
    /// arguments text put together).
    pub fn final_tool_calls(&self) -> Vec<(String, String, String)> {
        let attempt = self.result["attempt"].as_u64();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for c in self
            .chunks
            .iter()
            .filter(|c| c["attempt"].as_u64() == attempt)
        {
            let t = &c["tool_call"];
            if t.is_null() {
                continue;
            }
            let i = t["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = t["id"].as_str() {
                calls[i].0 = id.to_string();
            }
            if let Some(name) = t["name"].as_str() {
                calls[i].1 = name.to_string();
            }
            calls[i].2.push_str(t["arguments"].as_str().unwrap_or(""));
        }
        calls
    }
}

/// Collect chunk events until the result arrives (bounded).
pub async fn collect_reply(sub: &mut async_nats::Subscriber) -> Reply {
    collect_reply_within(sub, Duration::from_secs(30)).await
}

/// [`collect_reply`] waiting up to `wait` for each event.
pub async fn collect_reply_within(sub: &mut async_nats::Subscriber, wait: Duration) -> Reply {
    let mut chunks = Vec::new();
    loop {
        let msg = tokio::time::timeout(wait, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no event within {wait:?}"))
            .expect("subscription closed");
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        match event["type"].as_str() {
            Some("chunk") => chunks.push(event),
            Some("result") => {
                return Reply {
                    chunks,
                    result: event,
                };
            }
            other => panic!("unexpected event type {other:?}: {event}"),
        }
    }
}

/// Most of the spans (start, end) open at once; back to back is not overlapping.
pub fn peak_overlap<T: Ord>(spans: impl IntoIterator<Item = (T, T)>) -> usize {
    let mut edges: Vec<(T, i32)> = Vec::new();
    for (start, end) in spans {
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // Ends sort before starts at the same instant.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}
