//! Decoding the contract's job messages: wire types, decoding and validation into domain
//! types (the types themselves are `crate::contract`'s).
//!
//! "Parse, don't validate": a `Job` only exists when every field is valid, so everything after
//! `decode` works with valid values. A message that fails gets an `InvalidJob` that still
//! carries whatever identity could be read (job id, trace id, reply subject), so it can be
//! answered and recorded. This module does no I/O.

mod bounds;
mod decode;
pub(crate) mod rich;
mod wire;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Config, LimitsConfig};
use crate::contract::{
    CacheMode, EmbedRequest, Envelope, GenerateRequest, ImageRequest, JobKind, ReplyPolicy,
};

pub(crate) use bounds::clip_reason;
pub use decode::decode;
pub(crate) use decode::image_dimensions;

/// Limits that validation needs from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_job_bytes: usize,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// Bounds on the job's fields (`[limits]`).
    pub bounds: LimitsConfig,
    /// Tenant policies (`[tenants]`): who may send jobs, with which task types.
    pub tenants: std::collections::BTreeMap<String, crate::config::TenantPolicy>,
    /// Cache use by task type (`cache.task_types`).
    pub cache_task_types: std::collections::BTreeMap<String, CacheMode>,
    /// Service tier by task type (`batch.task_types`).
    pub tier_task_types: std::collections::BTreeMap<String, crate::contract::ServiceTier>,
    /// The deadline of a batch job that gives none (`batch.default_deadline_secs`).
    pub batch_deadline: Duration,
}

impl Limits {
    pub(crate) fn from_config(config: &Config) -> Self {
        Self {
            max_job_bytes: config.worker.max_job_bytes,
            default_timeout: Duration::from_millis(config.worker.default_timeout_ms),
            max_timeout: Duration::from_millis(config.worker.max_timeout_ms),
            bounds: config.limits.clone(),
            tenants: config.tenants.clone(),
            cache_task_types: config.cache.task_types.clone(),
            tier_task_types: config.batch.task_types.clone(),
            batch_deadline: Duration::from_secs(config.batch.default_deadline_secs),
        }
    }

    /// The policy of `tenant`: its own table, else `default`, else none.
    pub(crate) fn policy(&self, tenant: &str) -> Option<&crate::config::TenantPolicy> {
        self.tenants
            .get(tenant)
            .or_else(|| self.tenants.get("default"))
    }
}

/// A valid job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub envelope: Envelope,
    pub kind: JobKind,
    /// Pinned first provider and model, if the job names them.
    pub provider: Option<String>,
    pub model: Option<String>,
    pub timeout: Duration,
    /// After this the job is not worth an answer: it is answered `timeout` without a call if
    /// it starts later, and the chain never runs past it (`deadline` / `expires_in_ms`).
    pub expires_at: Option<DateTime<Utc>>,
    /// What the job asks of the response cache (`cache`); `None`: the default for its kind
    /// and options (see `crate::cache`).
    pub cache: Option<CacheMode>,
    pub body: JobBody,
}

#[derive(Debug, Clone, PartialEq)]
// One per job, built once and never copied: the embedding variant's slack costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum JobBody {
    Generate(GenerateRequest),
    Embed(EmbedRequest),
    Image(ImageRequest),
}

/// Why a job was refused, with the identity needed to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidJob {
    pub envelope: Envelope,
    pub reason: String,
}

/// What the transport says about a message beyond its body.
#[derive(Debug, Clone, Default)]
pub struct Delivery<'a> {
    /// The `Nats-Msg-Id` header: JetStream's dedup key, and the job id.
    pub msg_id: Option<&'a str>,
    /// The tenant NATS vouches for (the last token of the job's subject), when the deployment
    /// takes tenants from subjects; the body's `tenant` is then ignored.
    pub subject_tenant: Option<&'a str>,
    /// When JetStream received the message (the start of `expires_in_ms`); the decode time
    /// when unknown.
    pub published: Option<DateTime<Utc>>,
    /// The W3C `traceparent` header: its trace id, when valid, is the job's `trace_id`.
    pub traceparent: Option<&'a str>,
}

/// What the deployment's configuration decides about pinning (the chain implements it; this
/// module knows no routes).
pub trait Catalog: Send + Sync {
    /// Whether a job of `task_type` may pin `provider` and/or `model`; the reason (naming the
    /// field) when not: an unknown provider, one outside the job's route, a model outside the
    /// provider's allow-list.
    fn check_pin(
        &self,
        task_type: Option<&str>,
        provider: Option<&str>,
        model: Option<&str>,
    ) -> Result<(), String>;
}

/// Everything a job is checked against.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub limits: &'a Limits,
    pub replies: &'a ReplyPolicy,
    pub catalog: &'a dyn Catalog,
}

#[cfg(test)]
mod tests;
