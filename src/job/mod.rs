//! The contract's job messages: wire types, decoding and validation into domain types.
//!
//! "Parse, don't validate": a [`Job`] only exists when every field is valid, so everything after
//! [`decode`] works with valid values. A message that fails gets an [`InvalidJob`] that still
//! carries whatever identity could be read (job id, trace id, reply subject), so it can be
//! answered and recorded. This module does no I/O.

mod bounds;
mod decode;
mod wire;

use std::time::Duration;

use chrono::{DateTime, Utc};

use serde::Deserialize;
use uuid::Uuid;

use crate::config::{Config, LimitsConfig};
use crate::trust::ReplyPolicy;

pub(crate) use bounds::clip_reason;
pub use decode::decode;

/// The two job kinds, one JetStream subject and one durable consumer each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Generate,
    Embed,
}

impl JobKind {
    pub(crate) const ALL: [JobKind; 2] = [JobKind::Generate, JobKind::Embed];
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Embed => "embed",
        }
    }
}

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
        }
    }

    /// What the tenant's policy and the task type say about `envelope`'s job's cache use.
    pub(crate) fn cache_said(&self, envelope: &Envelope) -> crate::cache::Said {
        crate::cache::Said {
            tenant: self.policy(&envelope.tenant).and_then(|p| p.cache),
            task: self
                .cache_task_types
                .get(envelope.task_type.as_deref().unwrap_or("default"))
                .copied(),
        }
    }

    /// The policy of `tenant`: its own table, else `default`, else none.
    pub(crate) fn policy(&self, tenant: &str) -> Option<&crate::config::TenantPolicy> {
        self.tenants
            .get(tenant)
            .or_else(|| self.tenants.get("default"))
    }
}

/// Who a job is and where its answers go: known even for many invalid jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub job_id: Uuid,
    pub trace_id: String,
    pub tenant: String,
    pub task_type: Option<String>,
    pub reply_to: Option<String>,
    pub metadata: serde_json::Value,
}

#[cfg(test)]
impl Envelope {
    /// A fresh job's envelope for `tenant`, as unit tests need one.
    pub(crate) fn for_test(tenant: &str) -> Self {
        Self {
            job_id: uuid::Uuid::now_v7(),
            trace_id: "t".into(),
            tenant: tenant.into(),
            task_type: None,
            reply_to: None,
            metadata: serde_json::Value::Null,
        }
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

/// How a job uses the fleet's response cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Answer from the cache when it holds the answer; store a new answer.
    Use,
    /// Do not read the cache; store the new answer.
    Refresh,
    /// Neither read nor store.
    Off,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobBody {
    Generate(GenerateRequest),
    Embed(EmbedRequest),
}

/// A chat conversation ready for any provider.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The job's system prompt (and system messages), without the retrieval context.
    pub system: Option<String>,
    /// Retrieval context, most relevant first; sent as a numbered block after the system
    /// prompt ([`GenerateRequest::system_text`]). Context fitting drops it from the end.
    pub context: Vec<String>,
    /// Non-empty; roles are `user` / `assistant` (system text is in `system`).
    pub messages: Vec<Message>,
    pub options: GenerateOptions,
    /// Publish chunk events as text arrives.
    pub stream: bool,
}

impl GenerateRequest {
    /// The system text providers get: the system prompt, then the context block
    /// (`Context:` and one `[n] chunk` line per chunk).
    pub fn system_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        if self.context.is_empty() {
            return self.system.as_deref().map(Cow::Borrowed);
        }
        let mut text = String::new();
        if let Some(s) = &self.system {
            text.push_str(s);
            text.push_str("\n\n");
        }
        text.push_str(CONTEXT_HEADER);
        for (i, chunk) in self.context.iter().enumerate() {
            text.push_str(&context_line(i, chunk));
        }
        Some(Cow::Owned(text))
    }

    /// The request as providers take it: the context block joined to the system prompt.
    pub fn as_sent(&self) -> std::borrow::Cow<'_, GenerateRequest> {
        use std::borrow::Cow;
        if self.context.is_empty() {
            return Cow::Borrowed(self);
        }
        Cow::Owned(GenerateRequest {
            system: self.system_text().map(Cow::into_owned),
            context: Vec::new(),
            messages: self.messages.clone(),
            options: self.options.clone(),
            stream: self.stream,
        })
    }
}

/// The first line of the context block.
pub(crate) const CONTEXT_HEADER: &str = "Context:\n";

/// The context block's line for chunk `index` (0-based).
pub(crate) fn context_line(index: usize, chunk: &str) -> String {
    format!("[{}] {}\n", index + 1, chunk)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub top_p: Option<f64>,
    /// Asks providers that support it (OpenAI, Gemini, Ollama; not Anthropic) for a
    /// reproducible answer; 0 to 2^31-1.
    pub seed: Option<u32>,
    pub stop: Vec<String>,
    /// Whether context fitting may lower `max_tokens` to what fits (`options.fit`).
    pub fit: FitMode,
}

/// What context fitting may change besides dropping context chunks and old messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FitMode {
    /// Lower `max_tokens` to the room the window leaves (never below 16 tokens).
    #[default]
    Trim,
    /// Keep `max_tokens` as asked: a job that does not fit with it is not sent.
    Strict,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub input: Vec<String>,
    pub dimensions: Option<u32>,
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
