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

mod env;
mod image_hosts;
mod names;
mod nats;
pub(crate) use names::name_token;
pub use nats::NatsConfig;
mod provider;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

pub use env::EnvLookup;
pub use image_hosts::ImageHost;
pub use provider::{
    Api, Capability, EmbedBatching, MaxTokensField, ProviderConfig, RouteEntry, by_model,
    model_allowed,
};

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
    pub routes: BTreeMap<String, Vec<RouteEntry>>,
    /// Routes for embedding jobs; when absent, `routes` serve them too (if every provider in
    /// them can embed; otherwise embedding jobs are not consumed and a warning says why).
    pub embed_routes: BTreeMap<String, Vec<RouteEntry>>,
    /// Routes for image jobs (entries of providers that generate images: `openai`, `gemini`;
    /// an entry without a model asks for the protocol's image model, `gpt-image-2` or
    /// `gemini-2.5-flash-image`). When absent, image jobs go to the providers of
    /// `routes.default` that generate images, with those models.
    pub image_routes: BTreeMap<String, Vec<RouteEntry>>,
    /// Embedding routes whose fallback entries may return vectors of another dimension.
    pub embed_mixed_dimensions: Vec<String>,
    /// `task_type` -> how its route's entries are ordered (default `ordered`).
    pub strategies: BTreeMap<String, Strategy>,
    /// Routes whose jobs may pin a provider the route does not list. Elsewhere a job may pin
    /// only the route's own providers.
    pub pin_any_provider: Vec<String>,
    pub circuit_breaker: CircuitConfig,
    /// Active health probes of the routes' providers.
    pub health: HealthConfig,
    pub limits: LimitsConfig,
    /// Tenant policies by tenant name; `default` applies to tenants without their own.
    pub tenants: BTreeMap<String, TenantPolicy>,
    pub cache: CacheConfig,
    pub gateway: GatewayConfig,
    /// The batch lane (`crate::batch`, `docs/batch.md`).
    pub batch: BatchConfig,
}

/// Most jobs in one provider batch: the record of an open batch (a KV value) names each.
pub const MAX_BATCH_JOBS: usize = 5_000;

/// The batch lane: jobs with `service_tier: "batch"` collected into provider batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most jobs in one provider batch.
    pub max_jobs: usize,
    /// Longest a job waits for others before its batch is sent.
    pub max_wait_secs: u64,
    /// The deadline of a batch job that gives none, from when it was published.
    pub default_deadline_secs: u64,
    /// A job still in a batch this close to its deadline is sent online instead.
    pub online_margin_secs: u64,
    /// How often open batches are polled.
    pub poll_ms: u64,
    /// How long a worker following a batch holds it before another may take it over.
    pub lease_secs: u64,
    /// The tier of jobs of a task type that do not say (`standard`, `flex`, `batch`).
    pub task_types: BTreeMap<String, crate::contract::ServiceTier>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_jobs: 1000,
            max_wait_secs: 60,
            default_deadline_secs: 24 * 3600,
            online_margin_secs: 600,
            poll_ms: 30_000,
            lease_secs: 60,
            task_types: BTreeMap::new(),
        }
    }
}

/// `llm-worker gateway`: the HTTP front door (`crate::gateway`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway listens on (`--listen` overrides it).
    pub listen: String,
    /// Largest request body accepted, in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Requests answered at once; more get 429 with `Retry-After`.
    pub max_concurrent: usize,
    /// A request's job deadline (`timeout_ms`) when it sets none, and the most it may set.
    pub request_timeout_ms: u64,
    /// How long a looked-up API key is trusted without asking Postgres again: a revoked key
    /// stops working after at most this long. Unknown keys are remembered as long (no
    /// Postgres query for a repeated bad key).
    pub key_cache_secs: u64,
    /// Requests one tenant may have open at once, out of `max_concurrent` (429 beyond).
    /// Default: half of `max_concurrent` (at least 1).
    pub max_concurrent_per_tenant: Option<usize>,
    /// Refused API keys (missing, unknown, revoked) one client address may send per minute;
    /// beyond it the address gets 429 without a key lookup. 0 turns the limit off (behind a
    /// proxy every client shares its address).
    pub bad_keys_per_minute: u32,
    /// Time a connection has to send a request's headers, counted from when it is ready for
    /// a request: opened, or its previous answer sent. So this is also the idle keep-alive
    /// timeout.
    pub header_timeout_ms: u64,
    /// Time a request's body may take to arrive, once its key is accepted (408 beyond).
    pub body_timeout_ms: u64,
    /// A write to a client that makes no progress for this long (a client that stopped
    /// reading) closes the connection and cancels its job.
    pub write_timeout_ms: u64,
    /// Open connections at most; more wait to be accepted.
    pub max_connections: usize,
    /// Serve the usage dashboard at `/dashboard` (admin keys only). Off by default.
    pub dashboard: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            max_concurrent: 1024,
            request_timeout_ms: 120_000,
            key_cache_secs: 10,
            max_concurrent_per_tenant: None,
            bad_keys_per_minute: 60,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            max_connections: 4096,
            dashboard: false,
        }
    }
}

impl GatewayConfig {
    /// Requests one tenant may have open at once.
    pub fn tenant_share(&self) -> usize {
        self.max_concurrent_per_tenant
            .unwrap_or(self.max_concurrent / 2)
            .clamp(1, self.max_concurrent.max(1))
    }
}

/// The fleet's response cache (`crate::cache`), a JetStream KV bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off: no job reads or writes the cache, whatever it asks. The bucket is
    /// `nats.cache_bucket`.
    pub enabled: bool,
    /// How long an answer is served after it was stored.
    pub ttl_secs: u64,
    /// Size of the bucket; the oldest answers go first when it is full.
    pub max_bytes: i64,
    /// Share answers between tenants (the key then leaves the tenant out). Off: a tenant only
    /// ever gets answers its own jobs paid for.
    pub share_across_tenants: bool,
    /// Degraded mode: when every provider of a job's route failed with provider faults, a
    /// cached answer up to this much older than `ttl_secs` is served (`stale: true`).
    /// 0: never.
    pub max_stale_secs: u64,
    /// Cache embedding vectors per input text (on: an embedding is deterministic). Jobs and
    /// tenant policies can still say `off`.
    pub embeddings: bool,
    /// The near cache: entries a process read or wrote stay in its memory this long (a
    /// `refresh` on another worker reaches this one after at most this). 0: off.
    pub local_ttl_secs: u64,
    /// Memory the near cache may use per process.
    pub local_max_bytes: usize,
    /// Cache use by task type (`use`, `refresh`, `off`), for jobs that do not say; `off`
    /// forbids it.
    pub task_types: BTreeMap<String, crate::contract::CacheMode>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 24 * 3600,
            max_bytes: 1 << 30,
            share_across_tenants: false,
            max_stale_secs: 0,
            embeddings: true,
            local_ttl_secs: 60,
            local_max_bytes: 64 << 20,
            task_types: BTreeMap::new(),
        }
    }
}

/// What one tenant's jobs may do (`[tenants.<name>]`; `[tenants.default]` is the policy of
/// every tenant without a table of its own). A refused job is `invalid_job`, naming why.
///
/// Budgets and limits are per tenant (each tenant under `default` has its own), counted
/// across the fleet (`crate::policy`). A job started when a budget (UTC day or month) is spent
/// is answered `budget_exceeded` without a provider call; a job over a rate or concurrency
/// limit waits, parked, within its timeout.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantPolicy {
    /// Refuse every job of this tenant; on `default`, of every tenant without a table.
    pub refuse: bool,
    /// Task types its jobs may name (a job naming none counts as `default`); any when absent.
    pub task_types: Option<Vec<String>>,
    /// Spend per UTC day / month in USD (what the price table says the calls cost).
    pub daily_budget_usd: Option<f64>,
    pub monthly_budget_usd: Option<f64>,
    /// Input plus output tokens per UTC day / month, of every call.
    pub daily_budget_tokens: Option<u64>,
    pub monthly_budget_tokens: Option<u64>,
    /// With a budget: `max_tokens` sent for a job that sets none, so that every call's worst
    /// case is known and reserved before it is made (budgets are never overshot).
    pub budget_max_tokens: u32,
    /// Percentages of a budget at which a warning is published (once per period) on
    /// `<prefix>.events.budget.<tenant>` and logged.
    pub budget_warnings: Vec<u8>,
    /// Jobs started per minute (UTC minutes), fleet-wide. A job over it waits, parked, for
    /// the next minute; one that waits past its timeout is answered `timeout`.
    pub requests_per_minute: Option<u32>,
    /// Tokens (input plus output, counted when jobs end) per minute, fleet-wide: once used
    /// up, jobs wait for the next minute.
    pub tokens_per_minute: Option<u64>,
    /// Jobs running at once across the fleet; more wait, parked, while other tenants' jobs
    /// go ahead.
    pub max_in_flight: Option<u32>,
    /// The response cache for this tenant's jobs: `off` (never, whatever a job asks), `use`
    /// (every job that does not say otherwise), `refresh`; absent: each job's own choice,
    /// else on for deterministic jobs only.
    pub cache: Option<crate::contract::CacheMode>,
    /// Share of job slots while tenants compete (1 to 1000; a tenant of weight 3 gets three
    /// jobs started for every one of a tenant of weight 1).
    pub weight: u32,
}

impl Default for TenantPolicy {
    fn default() -> Self {
        Self {
            refuse: false,
            task_types: None,
            daily_budget_usd: None,
            monthly_budget_usd: None,
            daily_budget_tokens: None,
            monthly_budget_tokens: None,
            budget_max_tokens: 4096,
            budget_warnings: vec![80, 100],
            requests_per_minute: None,
            tokens_per_minute: None,
            max_in_flight: None,
            cache: None,
            weight: 1,
        }
    }
}

impl TenantPolicy {
    /// Whether any budget applies (only then is the tenant's spend counted).
    pub fn has_budget(&self) -> bool {
        self.daily_budget_usd.is_some()
            || self.monthly_budget_usd.is_some()
            || self.daily_budget_tokens.is_some()
            || self.monthly_budget_tokens.is_some()
    }
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
    /// Images in one job, and the bytes of one (decoded from base64).
    pub max_images: usize,
    pub max_image_bytes: usize,
    /// Image jobs: pictures one job may ask for (`options.n`), and the bytes of one picture
    /// a provider may answer (decoded); a larger one fails the attempt.
    pub max_generated_images: usize,
    pub max_generated_image_bytes: usize,
    /// Hosts (HTTPS) or origins whose image URLs the worker may fetch itself, to send a
    /// provider that fetches no URLs the bytes. Empty: it never fetches a job's URL.
    pub image_url_hosts: Vec<String>,
    /// Tools one job may offer.
    pub max_tools: usize,
    /// A JSON Schema (a tool's parameters, a response format): its size as JSON, and how
    /// deeply it nests.
    pub max_schema_bytes: usize,
    pub max_schema_depth: usize,
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
            max_images: 8,
            max_image_bytes: 5 * 1024 * 1024,
            max_generated_images: 4,
            max_generated_image_bytes: 16 * 1024 * 1024,
            image_url_hosts: Vec::new(),
            max_tools: 64,
            max_schema_bytes: 64 * 1024,
            max_schema_depth: 32,
            max_response_bytes: 16 * 1024 * 1024,
            max_error_body_bytes: 64 * 1024,
            max_line_bytes: 1024 * 1024,
            chunk_interval_ms: 20,
        }
    }
}

/// How a route's entries are ordered for a job (a pinned provider always goes first).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// As listed.
    #[default]
    Ordered,
    /// Lowest listed price first (from `llm_prices`; unpriced entries last).
    Cheapest,
    /// Lowest recent time to first token first (an EWMA per provider and model; untried first).
    Fastest,
    /// Highest quality rank first (`providers.<name>.quality`, else the built-in table;
    /// unranked entries last).
    BestQuality,
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

/// Active health probes (`[health]`): every worker calls each (provider, model) of its
/// generation routes with a tiny request every `probe_interval_secs`, so circuits close
/// when a provider recovers even with no job traffic, and `llm-worker status`, `/readyz` and
/// Prometheus show each provider's state with the last probe's latency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between probes of each entry; 0 (the default) turns probes off.
    pub probe_interval_secs: u64,
    /// The probe's prompt (one user message).
    pub probe_prompt: String,
    /// The probe's `max_tokens`: what one probe may cost in output.
    pub probe_max_tokens: u32,
    /// How long one probe may take before it counts as a timeout.
    pub probe_timeout_ms: u64,
    /// Tenant of the probes' rows in the ledger (`task_type = "health_probe"`).
    pub probe_tenant: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe_interval_secs: 0,
            probe_prompt: "ping".into(),
            probe_max_tokens: 1,
            probe_timeout_ms: 10_000,
            probe_tenant: "llm-worker".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Identifies this process in usage rows; default `<hostname>-<pid>`.
    pub id: Option<String>,
    /// Jobs processed concurrently by this process.
    pub max_in_flight: usize,
    /// Jobs pulled ahead and parked, so free slots go to tenants by weighted fair share
    /// instead of first in, first out. A tenant's job waits behind other tenants' backlogs
    /// only for what does not fit in the fleet's windows. At most `max_in_flight`: no
    /// parking (pull only for free slots, first in, first out).
    pub fair_window: usize,
    /// Bytes of parked jobs (payload and bookkeeping) at most.
    pub fair_window_bytes: usize,
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
            fair_window: 25_000,
            fair_window_bytes: 64 * 1024 * 1024,
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
    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` of a worker on this address
    /// (e.g. `0.0.0.0:9464`); off when absent. The gateway serves them on its own port.
    pub metrics_listen: Option<String>,
    /// Label token and cost counters with the tenant (one series per tenant: mind the
    /// cardinality with many tenants).
    pub metrics_tenant_label: bool,
    /// OTLP collector (HTTP, JSON encoding), e.g. `http://127.0.0.1:4318`: spans go to
    /// `<endpoint>/v1/traces`. Off when absent.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_prompts: false,
            metrics_listen: None,
            metrics_tenant_label: false,
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Every (provider, model) the routes (generation and embedding) name, sorted.
    pub fn route_entries(&self) -> Vec<(String, String)> {
        let mut entries: Vec<(String, String)> = self
            .routes
            .values()
            .chain(self.embed_routes.values())
            .flatten()
            .filter_map(|e| {
                let model = e.model.clone().or_else(|| {
                    self.providers
                        .get(&e.provider)
                        .and_then(|p| p.default_model.clone())
                })?;
                Some((e.provider.clone(), model))
            })
            .collect();
        entries.sort();
        entries.dedup();
        entries
    }

    /// A process that answers jobs needs at least one provider.
    pub(crate) fn require_providers(&self) -> Result<(), ConfigError> {
        if self.providers.is_empty() {
            return Err(invalid(
                "providers",
                "no provider configured: set OPENAI_API_KEY and/or OPENAI_BASE_URL, or declare \
                 [providers.<name>] in a config file (see examples/demo.toml for a demo setup)",
            ));
        }
        Ok(())
    }

    /// The routes embedding jobs use, or why there are none.
    pub fn embedding_routes(&self) -> Result<&BTreeMap<String, Vec<RouteEntry>>, String> {
        if !self.embed_routes.is_empty() {
            // Checked at load: every entry names a provider with an embeddings API.
            return Ok(&self.embed_routes);
        }
        for (task, entries) in &self.routes {
            if let Err(e) = self.check_embedders(entries) {
                return Err(format!(
                    "routes.{task}: {e}, and no [embed_routes] are configured"
                ));
            }
        }
        Ok(&self.routes)
    }

    /// The routes image jobs use, every entry with its model; why there are none when empty.
    pub fn generation_image_routes(&self) -> Result<BTreeMap<String, Vec<RouteEntry>>, String> {
        let with_model = |e: &RouteEntry| {
            let api = &self.providers.get(&e.provider)?.api;
            Some(RouteEntry {
                provider: e.provider.clone(),
                model: Some(e.model.clone().or(api.image_model().map(String::from))?),
            })
        };
        if !self.image_routes.is_empty() {
            // Checked at load: every entry names a provider that generates images.
            return Ok(self
                .image_routes
                .iter()
                .map(|(task, entries)| {
                    (
                        task.clone(),
                        entries.iter().filter_map(with_model).collect(),
                    )
                })
                .collect());
        }
        let default: Vec<RouteEntry> = self
            .routes
            .get("default")
            .into_iter()
            .flatten()
            .filter_map(|e| {
                with_model(&RouteEntry {
                    provider: e.provider.clone(),
                    model: None,
                })
            })
            .collect();
        if default.is_empty() {
            return Err(
                "no [image_routes] are configured and no provider of routes.default generates images (openai, gemini)"
                    .into(),
            );
        }
        Ok(BTreeMap::from([("default".to_string(), default)]))
    }

    /// Every entry names a configured provider whose protocol generates images.
    pub(super) fn check_image_makers(&self, entries: &[RouteEntry]) -> Result<(), String> {
        self.check_protocols(
            entries,
            |api| api.image_model().is_some(),
            "does not generate images",
        )
    }

    /// Every entry names a configured provider whose protocol has an embeddings API.
    pub(super) fn check_embedders(&self, entries: &[RouteEntry]) -> Result<(), String> {
        self.check_protocols(
            entries,
            |api| api.embedding().is_some(),
            "has no embeddings API",
        )
    }

    /// Every entry names a configured provider whose protocol `can` do the route's kind of
    /// job; the first that does not, with the protocol that `lacks` it.
    fn check_protocols(
        &self,
        entries: &[RouteEntry],
        can: fn(&Api) -> bool,
        lacks: &str,
    ) -> Result<(), String> {
        for entry in entries {
            match self.providers.get(&entry.provider) {
                None => return Err(format!("unknown provider '{}'", entry.provider)),
                Some(p) if !can(&p.api) => {
                    return Err(format!(
                        "provider '{}' is {}, which {lacks}",
                        entry.provider,
                        p.api.name()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub(crate) fn worker_id(&self) -> String {
        self.worker.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests;
