//! llm-worker: LLM jobs from NATS JetStream through a provider fallback chain, with streamed
//! chunks and durable results, and a usage and cost ledger in Postgres.
//!
//! # The library a user links
//!
//! - [`contract`]: the public contract's types: jobs, messages and roles, events and results,
//!   error codes, the reply-subject rule.
//! - [`config`]: the configuration (TOML file + environment), validated once.
//! - [`client`]: the orchestrator side: publish a job, follow its events, read a missed result
//!   back, cancel it.
//! - [`app`]: start a worker process in your own program ([`app::start`]), and stop it.
//! - [`gateway`]: start the HTTP front door ([`gateway::start`]); its API keys.
//! - [`nats`] (connecting with the configured credentials; the deployment's streams) and
//!   [`usage`] (the Postgres ledger: migrations, recorder, reports).
//!
//! Every other module is public only for the `llm-worker` binary, this crate's integration
//! tests, the benchmark and the fuzz targets: hidden from the docs, not a stable API.
//! `fuzzing` exists only with the `fuzzing` feature (the fuzz crate and the tests enable it).
//!
//! # The path of one job
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
//! # Layers
//!
//! Every top-level module sits on one layer and uses only modules of its own layer or below;
//! no two modules use each other, directly or through others. The integration test
//! `layering` reads this table and every `crate::` path in `src/` and fails on a module
//! missing here, on an import that reaches up, and on any cycle.
//!
//! | layer | modules | what they are |
//! |---|---|---|
//! | 0 | `contract`, `tls`, `pricing`, `memory` | the contract's types; TLS set-up; prices and cost; freed memory back to the system after a burst |
//! | 1 | `config` | configuration, validated once; the only reader of env vars |
//! | 2 | `trust`, `error`, `job`, `tokens` | trust rules; errors with their consequence; job decoding and bounds; token counting |
//! | 3 | `context`, `providers`, `health`, `telemetry`, `nats`, `dead`, `cancel`, `service`, `status`, `image_store`, `startup`, `lane` | context fitting; one module per wire protocol; circuit breakers; logs and traces; NATS connections and streams; dead letters; cancel requests; the NATS service API; health over NATS; image jobs' pictures in the object store; start-up steps that wait for JetStream, bounded; the batch lane's intake stream |
//! | 4 | `chain`, `embedding`, `image_gen`, `cache`, `policy` | routing, retries, fallback; embedding batches; image jobs' chain; the response cache; tenant budgets, limits and fair share |
//! | 5 | `reply`, `metrics`, `usage`, `worker`, `queue`, `replay` | events out; Prometheus; the ledger; one job from start to ack; consumers and the pull loop; replaying dead letters |
//! | 6 | `app`, `reload`, `nats_account`, `batch` | start-up and shutdown; configuration reload; the least-privilege NATS account; the batch lane (collecting and following provider batches) |
//! | 7 | `client`, `submit`, `gateway`, `fuzzing` | the orchestrator side; `llm-worker submit`; the HTTP gateway; fuzz entry points |
//!
//! Not in this crate: the fake LLM API server and scratch databases of tests, demos and
//! benchmarks (`crates/testkit`), and the benchmark (`crates/bench`).

pub mod app;
pub(crate) mod batch;
pub mod client;
pub mod config;
pub mod contract;
pub mod gateway;
pub mod nats;
pub mod usage;

#[doc(hidden)]
pub mod cache;
#[doc(hidden)]
pub mod cancel;
#[doc(hidden)]
pub mod chain;
#[doc(hidden)]
pub mod context;
#[doc(hidden)]
pub mod dead;
#[doc(hidden)]
pub mod embedding;
#[doc(hidden)]
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod health;
#[doc(hidden)]
pub mod image_gen;
#[doc(hidden)]
pub mod image_store;
#[doc(hidden)]
pub mod job;
pub(crate) mod lane;
#[doc(hidden)]
pub mod memory;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod nats_account;
pub(crate) mod policy;
#[doc(hidden)]
pub mod pricing;
#[doc(hidden)]
pub mod providers;
#[doc(hidden)]
pub mod queue;
#[doc(hidden)]
pub mod reload;
#[doc(hidden)]
pub mod replay;
pub(crate) mod reply;
#[doc(hidden)]
pub mod service;
pub(crate) mod startup;
#[doc(hidden)]
pub mod status;
#[doc(hidden)]
pub mod submit;
#[doc(hidden)]
pub mod telemetry;
#[doc(hidden)]
pub mod tls;
#[doc(hidden)]
pub mod tokens;
#[doc(hidden)]
pub mod trust;
pub(crate) mod worker;
