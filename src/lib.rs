//! llm-worker: LLM jobs from NATS JetStream through a provider fallback chain, with streamed
//! chunks and durable results, and a usage and cost ledger in Postgres.
//!
//! The path of one job, and the module that owns each step:
//!
//! ```text
//! JetStream LLM_JOBS ──pull (a window per tenant, kept alive)──▶ queue
//!   policy::fair (weighted fair share; tenants at their limits wait) ──▶ Worker::handle
//!   job::decode (parse, don't validate; trust rules, bounds) ──invalid──▶ invalid_job, Term
//!   Outbox::stored (answered before?) ──same job──▶ re-send stored result, Ack
//!                                             ──another tenant's──▶ invalid_job, Term
//!   delivered worker.max_deliver times ──▶ Outbox::dead_letter, dead_lettered, Term
//!   cancelled / expired / tenant budget spent ──▶ cancelled / timeout / budget_exceeded
//!   chain::Chain::generate: route → for each target: context::fit, providers::Provider call,
//!       retry transient errors (backon), fall back, enforce first-token/stall/deadline
//!   Outbox (reply over NATS): chunk events on reply_to as text arrives (coalesced);
//!       result stored in LLM_RESULTS (never replacing one), sent live
//!   Ack (only after the result is stored)
//! LLM_RESULTS ──usage::Recorder (batches, idempotent; bad rows split out to LLM_DEAD)──▶
//!   Postgres llm_jobs / llm_calls
//! ```
//!
//! - [`config`]: TOML + environment, validated once; the only reader of env vars. Provider
//!   tables are typed per protocol (`config::Api`); route entries are parsed once.
//! - [`job`] / [`event`]: the contract's wire types. [`error`]: errors that carry their consequence.
//! - [`queue`]: streams, consumers, the pull loop. `worker`: one message from start to ack,
//!   over two small traits (`JobMessage`, `Outbox`) so its decisions are unit-tested
//!   without JetStream.
//! - [`chain`]: routing, retries, fallback, deadlines; `Chain::admit` / `Chain::settle` are
//!   the steps every attempt loop (generation, [`embedding`] batches) shares.
//!   [`providers`]: one crate-private module per wire protocol, each with typed request,
//!   response and stream-event structs; shared `helpers`; `scripted` (test builds only).
//! - [`dead`]: the dead-letter stream (jobs and results that failed repeatedly).
//! - [`cancel`]: cancel requests, remembered in their stream; running jobs' tokens.
//! - `cache`: the fleet's response cache (KV, with a near copy in memory), embedding vectors
//!   per input text, and degraded mode; used by `worker::generate` and `worker::embed`.
//! - [`tokens`]: token counting (tiktoken encodings, an estimate elsewhere). [`context`]:
//!   fitting a request into its model's context window before each call (`chain` runs it per
//!   route entry).
//! - `policy`: tenant budgets, rate and concurrency limits (shared counters in a KV bucket)
//!   and the weighted fair share of a worker's slots.
//! - `reply`: publishing chunks and results. [`usage`]: migrations, recorder, reports;
//!   [`pricing`]: prices and cost.
//! - [`metrics`]: Prometheus metrics of workers and gateways, and the worker's `/metrics`,
//!   `/healthz`, `/readyz`.
//! - [`health`]: circuit breakers and latency per provider; [`status`]: health over NATS;
//!   [`service`]: the NATS micro-services API (`$SRV.PING`, `INFO`, `STATS`).
//! - [`trust`]: what an untrusted job may make the worker do (reply subjects, stored results
//!   of other jobs, model names in URLs); [`nats_account`]: the least-privilege NATS account.
//! - [`reload`]: configuration reload without a restart (SIGHUP, `<prefix>.control.reload`).
//! - [`app`]: start-up and graceful shutdown. [`client`]: the orchestrator side (publish a
//!   job, follow its events, read a missed result back); [`submit`]: `llm-worker submit`.
//! - [`gateway`]: `llm-worker gateway`, the HTTP front door (OpenAI-compatible and seed API,
//!   API keys -> tenants); it publishes jobs like any orchestrator.
//! - `fuzzing`: the fuzz targets' entry points (hidden).
//!
//! The public API is what the binary, the integration tests, the benchmark and the fuzz
//! targets use; everything else is `pub(crate)`, so unused code is reported. Not in this
//! crate: the fake LLM API server and scratch databases of tests, demos and benchmarks
//! (`crates/testkit`), and the benchmark (`crates/bench`).

pub mod app;
pub mod cache;
pub mod cancel;
pub mod chain;
pub mod client;
pub mod config;
pub mod context;
pub mod dead;
pub mod embedding;
pub mod error;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod health;
pub mod job;
pub mod metrics;
pub mod nats_account;
pub(crate) mod policy;
pub mod pricing;
pub mod providers;
pub mod queue;
pub mod reload;
pub(crate) mod reply;
pub mod service;
pub mod status;
pub mod submit;
pub mod telemetry;
pub mod tokens;
pub mod trust;
pub mod usage;
pub(crate) mod worker;
