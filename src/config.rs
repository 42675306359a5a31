//! Configuration: one TOML file plus environment overrides, validated once at start.
//!
//! This is the only module that reads environment variables. Layers, later wins:
//! 1. built-in defaults;
//! 2. the TOML file named by `--config` / `LLM_WORKER_CONFIG` (optional);
//! 3. `LLM_WORKER__SECTION__KEY=value` for any key (`__` separates path segments,
//!    the value is read as a TOML scalar when it parses as one, else as a string);
//! 4. the conventional variables `NATS_URL`, `DATABASE_URL`, and, when the file declares no
//!    providers, `OPENAI_API_KEY` / `OPENAI_BASE_URL` / `OPENAI_MODEL`, which declare one
//!    OpenAI-compatible provider named `openai`.
//!
//! Errors name the offending key (`worker.max_in_flight: invalid type ...`). API keys are read
//! from the environment variable each provider names and kept as [`SecretString`]; they are never
//! part of a `Debug` or `Display` output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// Environment variable prefix for generic overrides.
const ENV_PREFIX: &str = "LLM_WORKER__";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub worker: WorkerConfig,
    pub database: DatabaseConfig,
    pub recorder: RecorderConfig,
    pub telemetry: TelemetryConfig,
    /// Providers by name. The name is what jobs pin and routes reference.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// `task_type` -> ordered chain of `provider` or `provider:model` entries; `default` is used
    /// for jobs without a task type or with one that has no route of its own.
    pub routes: BTreeMap<String, Vec<String>>,
    /// Routes for embedding jobs; when absent, `routes` serve them too (if every provider in
    /// them can embed; otherwise embedding jobs are not consumed and a warning says why).
    pub embed_routes: BTreeMap<String, Vec<String>>,
    /// Embedding routes whose fallback entries may return vectors of another dimension.
    pub embed_mixed_dimensions: Vec<String>,
    /// `task_type` -> how its route's entries are ordered (default `ordered`).
    pub strategies: BTreeMap<String, Strategy>,
    /// Routes whose jobs may pin a provider the route does not list. Elsewhere a job may pin
    /// only the route's own providers.
    pub pin_any_provider: Vec<String>,
    pub circuit_breaker: CircuitConfig,
    pub limits: LimitsConfig,
}

/// Bounds on what a job may carry and what a provider may answer, so that no single job or
/// answer can stop a worker or the usage recorder (CONTRACT.md section 5, Bounds). A job over a
/// job bound is `invalid_job` naming the field and the bound; a provider over an answer bound
/// fails the attempt (`response_too_large`) and the chain moves on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// All prompt text together: `system_prompt`, `prompt`, `messages`, `context`.
    pub max_prompt_bytes: usize,
    pub max_messages: usize,
    pub max_context_items: usize,
    /// `metadata` as it is echoed into results and rows (re-serialized JSON).
    pub max_metadata_bytes: usize,
    pub max_metadata_depth: usize,
    /// `tenant`, `task_type`, `trace_id` (and a subject's tenant token).
    pub max_name_bytes: usize,
    /// A model name a job pins.
    pub max_model_bytes: usize,
    /// Ceiling of `options.max_tokens`.
    pub max_output_tokens: u32,
    /// Embedding jobs: number of inputs and their total size.
    pub max_embed_inputs: usize,
    pub max_embed_input_bytes: usize,
    /// Text of one attempt's answer, streamed or not.
    pub max_output_bytes: usize,
    /// A non-streamed response body (answers and embeddings).
    pub max_response_bytes: usize,
    /// An error response body: only this much is read (and classified).
    pub max_error_body_bytes: usize,
    /// One SSE event or NDJSON line of a streamed answer.
    pub max_line_bytes: usize,
    /// Text arriving within this long of the last chunk event is sent with the next one (one
    /// chunk event per interval at most); 0 sends every delta as its own event.
    pub chunk_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 1024 * 1024,
            max_messages: 1000,
            max_context_items: 1000,
            max_metadata_bytes: 16 * 1024,
            max_metadata_depth: 16,
            max_name_bytes: 128,
            max_model_bytes: 128,
            max_output_tokens: 131_072,
            max_embed_inputs: 2048,
            max_embed_input_bytes: 1024 * 1024,
            max_output_bytes: 512 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            max_error_body_bytes: 64 * 1024,
            max_line_bytes: 1024 * 1024,
            chunk_interval_ms: 20,
        }
    }
}

/// How a route's entries are ordered for a job (a pinned provider always goes first).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// As listed.
    #[default]
    Ordered,
    /// Lowest listed price first (from `llm_prices`; unpriced entries last).
    Cheapest,
    /// Lowest recent time to first token first (an EWMA per provider and model; untried first).
    Fastest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failures (provider faults, not bad requests) that open a circuit.
    pub failure_threshold: u32,
    /// How long an open circuit is skipped before one probe call may test it.
    pub cooldown_secs: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. May carry `user:password@`; never printed.
    pub url: String,
    /// Path to a `.creds` file (NGS / decentralised auth).
    pub credentials_file: Option<PathBuf>,
    /// User name and password (set the password with `LLM_WORKER__NATS__PASSWORD`).
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// Path to a file holding an NKey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs the server's certificate; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub require_tls: bool,
    /// Subject prefixes a job's `reply_to` (and a status request's reply) must start with.
    /// Default `["<subject_prefix>.replies.", "_INBOX."]`. A `{tenant}` token is replaced by
    /// the job's tenant (`llm.replies.{tenant}.`), binding reply subjects to tenants.
    pub reply_prefixes: Option<Vec<String>>,
    /// Take the tenant from the job's subject (`<prefix>.jobs.generate.<tenant>`) instead of
    /// its body: with one NATS user per tenant, NATS itself vouches for it.
    pub tenant_from_subject: bool,
    /// Inbox prefix of the worker's own NATS connection (JetStream API answers). Never a valid
    /// reply subject for a job, so no job can inject a message into the worker's requests.
    pub inbox_prefix: String,
    /// Inbox prefix of client connections (`submit`, `status`): `_INBOX.<tenant>` for a
    /// tenant's NATS user, whose permissions cover only its own inboxes.
    pub client_inbox_prefix: String,
    /// Subject prefix: jobs on `<prefix>.jobs.*`, results on `<prefix>.results.<job_id>`.
    pub subject_prefix: String,
    pub jobs_stream: String,
    pub results_stream: String,
    /// Dead letters: jobs delivered `worker.max_deliver` times, results the recorder cannot
    /// write (`<prefix>.dead.>`).
    pub dead_stream: String,
    /// How long dead letters are kept.
    pub dead_max_age_secs: u64,
    /// Durable consumer names are `<consumer_prefix>-generate` and `<consumer_prefix>-embed`.
    pub consumer_prefix: String,
    /// How long stored results are kept.
    pub results_max_age_secs: u64,
    /// JetStream dedup window of both streams (the contract asks for at least 2 minutes).
    pub duplicate_window_secs: u64,
    /// Consumer ack wait; in-flight jobs send progress acks at a third of it.
    pub ack_wait_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            user: None,
            password: None,
            nkey_seed_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            reply_prefixes: None,
            tenant_from_subject: false,
            inbox_prefix: "_LLMW_INBOX".into(),
            client_inbox_prefix: "_INBOX".into(),
            subject_prefix: "llm".into(),
            jobs_stream: "LLM_JOBS".into(),
            results_stream: "LLM_RESULTS".into(),
            dead_stream: "LLM_DEAD".into(),
            dead_max_age_secs: 30 * 24 * 3600,
            consumer_prefix: "llm-worker".into(),
            results_max_age_secs: 24 * 3600,
            duplicate_window_secs: 120,
            ack_wait_secs: 30,
        }
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
    pub fn result_subject(&self, job_id: &uuid::Uuid) -> String {
        format!("{}.results.{job_id}", self.subject_prefix)
    }
    /// Where orchestrators publish jobs of `kind` (without the tenant token).
    pub fn job_subject(&self, kind: crate::job::JobKind) -> String {
        format!("{}.jobs.{}", self.subject_prefix, kind.as_str())
    }
    /// What the consumer of `kind` takes: the job subject, or with `tenant_from_subject` every
    /// `<job subject>.<tenant>` (one token).
    pub fn job_filter(&self, kind: crate::job::JobKind) -> String {
        if self.tenant_from_subject {
            format!("{}.*", self.job_subject(kind))
        } else {
            self.job_subject(kind)
        }
    }
    /// The reply prefixes in force (the configured ones, or the defaults).
    pub fn reply_prefixes(&self) -> Vec<String> {
        self.reply_prefixes.clone().unwrap_or_else(|| {
            vec![
                format!("{}.replies.", self.subject_prefix),
                "_INBOX.".to_string(),
            ]
        })
    }

    /// The usage recorder's durable consumer on the results stream.
    pub fn recorder_consumer_name(&self) -> String {
        format!("{}-recorder", self.consumer_prefix)
    }
    /// The durable consumer of one job kind, shared by every worker process of a deployment.
    pub fn consumer_name(&self, kind: crate::job::JobKind) -> String {
        format!("{}-{}", self.consumer_prefix, kind.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Identifies this process in usage rows; default `<hostname>-<pid>`.
    pub id: Option<String>,
    /// Jobs processed concurrently by this process; messages are pulled only for free permits.
    pub max_in_flight: usize,
    /// On SIGTERM, how long in-flight jobs may still run before they are handed back.
    pub shutdown_grace_secs: u64,
    /// Deadline of a job that sets no `timeout_ms`.
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` a job may ask for.
    pub max_timeout_ms: u64,
    /// Largest job message accepted, in bytes.
    pub max_job_bytes: usize,
    /// How long one pull request waits for messages before it is renewed.
    pub pull_expires_ms: u64,
    /// A job delivered this many times without an answer (its workers crashed, or its result
    /// could not be stored) is answered `dead_lettered` and copied to the dead-letter stream.
    pub max_deliver: i64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            max_in_flight: 256,
            shutdown_grace_secs: 30,
            default_timeout_ms: 120_000,
            max_timeout_ms: 3_600_000,
            max_job_bytes: 1024 * 1024,
            pull_expires_ms: 5_000,
            max_deliver: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Postgres URL (may hold a password, hence secret). `DATABASE_URL` overrides it.
    pub url: Option<SecretString>,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Run the usage recorder (LLM_RESULTS -> Postgres) inside this process.
    pub enabled: bool,
    /// Results written per database round trip at most.
    pub batch_size: usize,
    /// After a result arrives, how long to wait for more to share its transaction: rows
    /// appear up to this much later, and a moderate rate costs one commit per interval
    /// instead of one per job. 0 writes whatever is already there at once.
    pub batch_wait_ms: u64,
    /// Ack wait of the recorder's consumer: a batch whose recorder dies is written again this
    /// soon by another (progress acks keep a slow write alive).
    pub ack_wait_secs: u64,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 1000,
            batch_wait_ms: 20,
            ack_wait_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Log prompts and outputs at debug level. Off by default: prompts can hold personal data.
    pub log_prompts: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_prompts: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// OpenAI Chat Completions, and every compatible server (vLLM, llama.cpp, LM Studio, ...).
    Openai,
    /// Anthropic Messages API (no embeddings).
    Anthropic,
    /// Google Gemini (v1beta generateContent).
    Gemini,
    /// Ollama's native API (`/api/chat`); base URL defaults to `OLLAMA_HOST` or localhost.
    Ollama,
    /// In-process fake for tests, demos and benchmarks: deterministic text, no network.
    Fake,
}

/// Which request field carries the output-token limit for OpenAI-style providers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    MaxCompletionTokens,
    MaxTokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(rename = "type")]
    pub kind: ProviderType,
    /// Base URL. For `openai`, the SDK convention (`https://api.openai.com/v1`); a URL with no
    /// path gets `/v1` appended, so `http://127.0.0.1:8000` works too.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Resolved from `api_key_env` at load time.
    #[serde(skip)]
    pub api_key: Option<SecretString>,
    /// Model used when neither the job nor the route names one.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Models a job may pin on this provider (exact names, or `prefix*`); any when absent.
    /// Models named by routes are always allowed.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default = "default_max_tokens_field")]
    pub max_tokens_field: MaxTokensField,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the first text token of an attempt.
    #[serde(default = "default_first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two pieces of text once the answer has started.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// Retries of a transient error on this provider before falling back.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Backoff before the first retry; doubles with jitter up to `retry_max_delay_ms`.
    #[serde(default = "default_retry_min_delay_ms")]
    pub retry_min_delay_ms: u64,
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// `anthropic`: `max_tokens` sent when the job sets none (the API requires one).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// At most this many requests in flight to this provider from one process (queued beyond).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// At most this many requests per minute from one process (spaced evenly; queued beyond).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most inputs per embedding request (default by type: openai 2048, gemini 100, ollama 512).
    #[serde(default)]
    pub embed_batch_size: Option<usize>,
    /// Most estimated input tokens per embedding request (OpenAI allows 300k).
    #[serde(default = "default_embed_batch_tokens")]
    pub embed_batch_tokens: u64,
    /// `fake` only: vector size when the job asks for none.
    #[serde(default = "default_fake_dimensions")]
    pub embedding_dimensions: u32,
    /// `fake` only: delay before the first token.
    #[serde(default)]
    pub latency_ms: u64,
    /// `fake` only: output speed (0 = as fast as possible).
    #[serde(default)]
    pub tokens_per_sec: u64,
    /// `fake` only: answer length in words (tokens) unless the job's `max_tokens` is lower.
    #[serde(default = "default_fake_output_tokens")]
    pub output_tokens: u64,
}

fn default_max_tokens_field() -> MaxTokensField {
    MaxTokensField::MaxTokens
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_first_token_timeout_ms() -> u64 {
    60_000
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_max_retries() -> usize {
    2
}
fn default_retry_min_delay_ms() -> u64 {
    500
}
fn default_retry_max_delay_ms() -> u64 {
    20_000
}
fn default_embed_batch_tokens() -> u64 {
    250_000
}
fn default_fake_dimensions() -> u32 {
    768
}
fn default_max_tokens() -> u32 {
    4096
}
fn default_fake_output_tokens() -> u64 {
    16
}

impl ProviderConfig {
    fn new(kind: ProviderType) -> Self {
        Self {
            kind,
            base_url: None,
            api_key_env: None,
            api_key: None,
            default_model: None,
            models: None,
            max_tokens_field: default_max_tokens_field(),
            connect_timeout_ms: default_connect_timeout_ms(),
            first_token_timeout_ms: default_first_token_timeout_ms(),
            stall_timeout_ms: default_stall_timeout_ms(),
            max_retries: default_max_retries(),
            retry_min_delay_ms: default_retry_min_delay_ms(),
            retry_max_delay_ms: default_retry_max_delay_ms(),
            default_max_tokens: default_max_tokens(),
            embed_batch_size: None,
            embed_batch_tokens: default_embed_batch_tokens(),
            embedding_dimensions: default_fake_dimensions(),
            max_concurrent: None,
            requests_per_minute: None,
            latency_ms: 0,
            tokens_per_sec: 0,
            output_tokens: default_fake_output_tokens(),
        }
    }
}

/// Where the process environment comes from; a trait object so tests can pass a map.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Load from the process environment and an optional file (`--config` wins over
    /// `LLM_WORKER_CONFIG`).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env_path = std::env::var_os("LLM_WORKER_CONFIG")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let lookup = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::load_with(path.as_deref(), &vars, &lookup)
    }

    /// Load with an explicit environment (for tests).
    pub fn load_with(
        path: Option<&Path>,
        vars: &[(String, String)],
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let mut tree = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env_overrides(&mut tree, vars)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        config.apply_conventional_env(env);
        config.resolve_secrets(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parse a TOML string as if it were the file (for tests and examples).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let tree: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: PathBuf::from("<string>"),
                message: e.to_string(),
            })?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn apply_conventional_env(&mut self, env: EnvLookup<'_>) {
        if let Some(url) = env("NATS_URL") {
            self.nats.url = url;
        }
        if let Some(url) = env("DATABASE_URL") {
            self.database.url = Some(SecretString::from(url));
        }
        if let Some(host) = env("OLLAMA_HOST") {
            let url = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            for p in self.providers.values_mut() {
                if p.kind == ProviderType::Ollama && p.base_url.is_none() {
                    p.base_url = Some(url.clone());
                }
            }
        }
        let base = env("OPENAI_BASE_URL");
        let has_key = env("OPENAI_API_KEY").is_some();
        if self.providers.is_empty() && (base.is_some() || has_key) {
            let mut p = ProviderConfig::new(ProviderType::Openai);
            p.base_url = Some(base.unwrap_or_else(|| "https://api.openai.com/v1".into()));
            p.api_key_env = has_key.then(|| "OPENAI_API_KEY".to_string());
            p.default_model = Some(env("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()));
            p.max_tokens_field = MaxTokensField::MaxCompletionTokens;
            self.providers.insert("openai".into(), p);
        }
    }

    fn resolve_secrets(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        for (name, p) in &mut self.providers {
            if let Some(var) = &p.api_key_env {
                let key = env(var).ok_or_else(|| {
                    invalid(
                        format!("providers.{name}.api_key_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?;
                p.api_key = Some(SecretString::from(key));
            }
        }
        Ok(())
    }

    /// Checks that need the whole picture; fills the implicit default route.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.worker.max_in_flight == 0 {
            return Err(invalid("worker.max_in_flight", "must be at least 1"));
        }
        if self.nats.duplicate_window_secs < 120 {
            return Err(invalid(
                "nats.duplicate_window_secs",
                "must be at least 120 (the contract's dedup window)",
            ));
        }
        if self.nats.ack_wait_secs < 3 {
            return Err(invalid("nats.ack_wait_secs", "must be at least 3"));
        }
        if self.nats.results_max_age_secs == 0 {
            return Err(invalid("nats.results_max_age_secs", "must be positive"));
        }
        if self.nats.dead_max_age_secs == 0 {
            return Err(invalid("nats.dead_max_age_secs", "must be positive"));
        }
        if self.worker.max_deliver < 2 {
            return Err(invalid("worker.max_deliver", "must be at least 2"));
        }
        if self.recorder.ack_wait_secs < 2 {
            return Err(invalid("recorder.ack_wait_secs", "must be at least 2"));
        }
        for (key, value) in [
            ("nats.subject_prefix", &self.nats.subject_prefix),
            ("nats.jobs_stream", &self.nats.jobs_stream),
            ("nats.results_stream", &self.nats.results_stream),
            ("nats.dead_stream", &self.nats.dead_stream),
            ("nats.consumer_prefix", &self.nats.consumer_prefix),
        ] {
            if value.is_empty() || value.contains([' ', '*', '>', '\t']) {
                return Err(invalid(key, "must be a non-empty NATS token"));
            }
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_prompt_bytes", l.max_prompt_bytes),
            ("limits.max_messages", l.max_messages),
            ("limits.max_context_items", l.max_context_items),
            ("limits.max_metadata_bytes", l.max_metadata_bytes),
            ("limits.max_metadata_depth", l.max_metadata_depth),
            ("limits.max_name_bytes", l.max_name_bytes),
            ("limits.max_model_bytes", l.max_model_bytes),
            ("limits.max_output_tokens", l.max_output_tokens as usize),
            ("limits.max_embed_inputs", l.max_embed_inputs),
            ("limits.max_embed_input_bytes", l.max_embed_input_bytes),
            ("limits.max_output_bytes", l.max_output_bytes),
            ("limits.max_response_bytes", l.max_response_bytes),
            ("limits.max_error_body_bytes", l.max_error_body_bytes),
            ("limits.max_line_bytes", l.max_line_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.nats.inbox_prefix.is_empty()
            || self.nats.inbox_prefix.starts_with('$')
            || !crate::trust::is_literal_subject(&self.nats.inbox_prefix)
        {
            return Err(invalid(
                "nats.inbox_prefix",
                "must be a literal subject not under $",
            ));
        }
        crate::trust::ReplyPolicy::new(&self.nats)
            .map_err(|e| invalid("nats.reply_prefixes", e))?;
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return Err(invalid(
                "nats.tls_cert",
                "nats.tls_cert and nats.tls_key must be set together",
            ));
        }
        if self.nats.password.is_some() && self.nats.user.is_none() {
            return Err(invalid("nats.password", "needs nats.user"));
        }
        if self.worker.default_timeout_ms == 0
            || self.worker.default_timeout_ms > self.worker.max_timeout_ms
        {
            return Err(invalid(
                "worker.default_timeout_ms",
                "must be positive and at most worker.max_timeout_ms",
            ));
        }
        for (name, p) in &self.providers {
            if name.is_empty() || name.contains(':') {
                return Err(invalid(
                    format!("providers.{name}"),
                    "a provider name must be non-empty and contain no ':'",
                ));
            }
            if p.kind == ProviderType::Openai {
                let base = p.base_url.as_deref().ok_or_else(|| {
                    invalid(
                        format!("providers.{name}.base_url"),
                        "required for type openai",
                    )
                })?;
                reqwest::Url::parse(base).map_err(|e| {
                    invalid(
                        format!("providers.{name}.base_url"),
                        format!("not a URL: {e}"),
                    )
                })?;
            }
        }
        if self.providers.is_empty() {
            // Clients (`submit`, `usage`, `migrate`) need no providers; `run` checks with
            // [`Config::require_providers`].
            return Ok(());
        }
        if !self.routes.contains_key("default") {
            if self.providers.len() == 1 {
                let only = self.providers.keys().cloned().collect();
                self.routes.insert("default".into(), only);
            } else {
                return Err(invalid(
                    "routes.default",
                    "required when more than one provider is configured",
                ));
            }
        }
        for task in &self.pin_any_provider {
            if !self.routes.contains_key(task) && !self.embed_routes.contains_key(task) {
                return Err(invalid(
                    "pin_any_provider",
                    format!("names route '{task}', which does not exist"),
                ));
            }
        }
        for task in self.strategies.keys() {
            if !self.routes.contains_key(task) {
                return Err(invalid(
                    format!("strategies.{task}"),
                    "names a route that does not exist",
                ));
            }
        }
        for (task, entries) in &self.embed_routes {
            for entry in entries {
                let (provider, _) = split_route_entry(entry);
                match self.providers.get(provider) {
                    None => {
                        return Err(invalid(
                            format!("embed_routes.{task}"),
                            format!("unknown provider '{provider}'"),
                        ));
                    }
                    Some(p) if p.kind == ProviderType::Anthropic => {
                        return Err(invalid(
                            format!("embed_routes.{task}"),
                            format!(
                                "provider '{provider}' is Anthropic, which has no embeddings API"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if entries.is_empty() {
                return Err(invalid(
                    format!("embed_routes.{task}"),
                    "must list at least one provider",
                ));
            }
        }
        for (task, entries) in &self.routes {
            if entries.is_empty() {
                return Err(invalid(
                    format!("routes.{task}"),
                    "must list at least one provider",
                ));
            }
            for entry in entries {
                let (provider, model) = split_route_entry(entry);
                let Some(p) = self.providers.get(provider) else {
                    return Err(invalid(
                        format!("routes.{task}"),
                        format!("unknown provider '{provider}'"),
                    ));
                };
                if model.is_none() && p.default_model.is_none() && p.kind != ProviderType::Fake {
                    return Err(invalid(
                        format!("routes.{task}"),
                        format!(
                            "'{entry}' names no model and provider '{provider}' has no default_model"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A process that answers jobs needs at least one provider.
    pub fn require_providers(&self) -> Result<(), ConfigError> {
        if self.providers.is_empty() {
            return Err(invalid(
                "providers",
                "no provider configured: set OPENAI_API_KEY and/or OPENAI_BASE_URL, or declare \
                 [providers.<name>] in a config file (see examples/fake.toml for a demo setup)",
            ));
        }
        Ok(())
    }

    /// The routes embedding jobs use, or why there are none.
    pub fn embedding_routes(&self) -> Result<&BTreeMap<String, Vec<String>>, String> {
        if !self.embed_routes.is_empty() {
            return Ok(&self.embed_routes);
        }
        for (task, entries) in &self.routes {
            for entry in entries {
                let (provider, _) = split_route_entry(entry);
                if self.providers.get(provider).map(|p| p.kind) == Some(ProviderType::Anthropic) {
                    return Err(format!(
                        "routes.{task} includes '{provider}' (Anthropic, no embeddings API) and no [embed_routes] are configured"
                    ));
                }
            }
        }
        Ok(&self.routes)
    }

    pub fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// `"openai:gpt-4o"` -> `("openai", Some("gpt-4o"))`; `"openai"` -> `("openai", None)`.
pub fn split_route_entry(entry: &str) -> (&str, Option<&str>) {
    match entry.split_once(':') {
        Some((p, m)) if !m.is_empty() => (p, Some(m)),
        Some((p, _)) => (p, None),
        None => (entry, None),
    }
}

/// Applies `LLM_WORKER__A__B=value` as `a.b = value` onto the parsed file.
fn apply_env_overrides(
    tree: &mut toml::Table,
    vars: &[(String, String)],
) -> Result<(), ConfigError> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if segments.iter().any(String::is_empty) {
            return Err(invalid(name.clone(), "empty path segment"));
        }
        let value = parse_env_value(raw);
        let mut table = &mut *tree;
        for (i, seg) in segments.iter().enumerate() {
            if i + 1 == segments.len() {
                table.insert(seg.clone(), value.clone());
            } else {
                let entry = table
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| {
                    invalid(
                        segments[..=i].join("."),
                        format!("{name} overrides a non-table value"),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// `"42"` -> integer, `"true"` -> bool, `"[\"a\"]"` -> array, anything else -> string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("llmw-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("c.toml");
        std::fs::write(&path, file).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        Config::load_with(Some(&path), &vars, &lookup)
    }

    #[test]
    fn the_shipped_example_configs_load() {
        for (name, text) in [
            (
                "config.example.toml",
                include_str!("../examples/config.example.toml"),
            ),
            ("fake.toml", include_str!("../examples/fake.toml")),
        ] {
            let keys = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"].map(|k| (k, "x"));
            let config = load(text, &keys);
            assert!(config.is_ok(), "{name}: {:?}", config.err());
        }
    }

    #[test]
    fn openai_env_vars_alone_make_a_working_config() {
        let c = load(
            "",
            &[
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
                ("OPENAI_API_KEY", "sk-x"),
            ],
        )
        .unwrap();
        assert_eq!(c.routes["default"], vec!["openai".to_string()]);
        assert!(c.providers["openai"].api_key.is_some());
    }

    #[test]
    fn errors_name_the_bad_key() {
        let e = load(
            "[worker]\nmax_in_flight = \"many\"\n[providers.f]\ntype = \"fake\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("worker.max_in_flight"), "{e}");
        let e = load("[worker]\nmax_in_flite = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_in_flite"), "{e}");
    }

    #[test]
    fn env_overrides_reach_nested_keys_with_typed_values() {
        let c = load(
            "[providers.f]\ntype = \"fake\"\n",
            &[
                ("LLM_WORKER__WORKER__MAX_IN_FLIGHT", "7"),
                ("LLM_WORKER__NATS__SUBJECT_PREFIX", "t1"),
            ],
        )
        .unwrap();
        assert_eq!(c.worker.max_in_flight, 7);
        assert_eq!(c.nats.subject_prefix, "t1");
    }

    #[test]
    fn a_route_to_an_unknown_provider_is_rejected() {
        let e = load(
            "[providers.f]\ntype = \"fake\"\n[routes]\ndefault = [\"nope:m\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("routes.default") && e.contains("nope"), "{e}");
    }

    #[test]
    fn a_missing_api_key_variable_is_reported_without_a_value() {
        let e = load(
            "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\napi_key_env = \"MY_KEY\"\ndefault_model = \"m\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("MY_KEY is not set"), "{e}");
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let c = load(
            "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\napi_key_env = \"K\"\ndefault_model = \"m\"\n",
            &[("K", "sk-supersecret"), ("DATABASE_URL", "postgres://u:pw-secret@h/db")],
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("sk-supersecret") && !dbg.contains("pw-secret"),
            "{dbg}"
        );
    }

    #[test]
    fn trust_settings_are_checked_at_load() {
        let base = "[providers.f]\ntype = \"fake\"\n";
        let e = load(
            &format!("[nats]\nreply_prefixes = [\"llm.jobs.\"]\n{base}"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("nats.reply_prefixes") && e.contains("own subjects"),
            "{e}"
        );
        let e = load(&format!("pin_any_provider = [\"nope\"]\n{base}"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pin_any_provider"), "{e}");
        let e = load(&format!("[nats]\ntls_cert = \"c.pem\"\n{base}"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("nats.tls_cert"), "{e}");
        let c = load(
            &format!("[nats]\nuser = \"w\"\n{base}"),
            &[("LLM_WORKER__NATS__PASSWORD", "pw-secret")],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("pw-secret"));
    }
}
