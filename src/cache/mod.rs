//! The fleet's response cache: answers of generation jobs in a JetStream KV bucket
//! (`nats.cache_bucket`, `LLM_CACHE`; settings in `[cache]`), so an identical job is answered without a provider call by any
//! worker.
//!
//! - **Key**: SHA-256 of everything that decides the answer: the tenant (unless
//!   `cache.share_across_tenants`), the route and its entries with their models and the job's
//!   pins (`Chain::cache_scope`), the system prompt and messages as sent, and the options.
//! - **When**: a job's own `cache` (`use`, `refresh`, `off`), else its tenant's policy, else
//!   on (`use`) for deterministic jobs (`options.temperature` 0 or an `options.seed`) and
//!   off for the others. A
//!   policy `off` wins over the job.
//! - **What is stored**: answers that ended normally (finish reason `stop`, `length` or
//!   `tool_calls`), with their tool calls and parsed JSON, model, provider, usage and cost, for
//!   `cache.ttl_secs` (the bucket's age limit). A rich job's key also covers its tools, tool
//!   choice and response format; its messages carry its images (bytes by content, a URL by
//!   the URL) and tool calls.
//!
//! Embedding vectors are cached per input text (`vectors`): on by default (`cache.embeddings`).
//! Entries a process read or wrote are also kept in its memory for a while (`near`), so a
//! repeated hit costs no NATS round trip.
//!
//! A cache that cannot be read or written never fails a job: it is logged and the job goes
//! to the providers.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

mod near;
mod vectors;

pub use near::Near;
pub(crate) use vectors::{StoredVector, VectorScope, shares};

use crate::config::CacheConfig;
use crate::contract::{CacheMode, GenerateRequest};
use crate::job::Job;

/// A cached answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub output: String,
    pub finish_reason: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// What the answer cost when it was paid for (`None`: unknown price).
    pub cost_usd: Option<f64>,
    pub stored_at: DateTime<Utc>,
    /// The answer's tool calls (entries stored before rich jobs have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::contract::ToolCall>,
    /// A JSON answer, parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

/// Handle to the cache bucket (cheap to clone).
#[derive(Clone)]
pub(crate) struct Cache {
    kv: kv::Store,
    /// Recently read or written entries of this process (`near`); `None` when off.
    near: Option<std::sync::Arc<near::Near>>,
    share_across_tenants: bool,
    ttl: chrono::TimeDelta,
    max_stale: chrono::TimeDelta,
    /// Embedding vectors are cached too (`cache.embeddings`).
    pub(crate) embeddings: bool,
}

/// How a stored answer may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Age {
    /// Within `ttl_secs`: served to any job that reads the cache.
    Fresh,
    /// Past `ttl_secs` but within `max_stale_secs` more: served only when every provider
    /// failed (degraded mode).
    Stale,
    /// Older: never served.
    Expired,
}

/// What the deployment says about a job's use of the cache: its tenant's policy
/// (`tenants.<name>.cache`) and its task type's (`cache.task_types`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Said {
    pub tenant: Option<CacheMode>,
    pub task: Option<CacheMode>,
}

impl Said {
    /// What the tenant's policy and the task type say about `envelope`'s job's cache use.
    pub(crate) fn of(limits: &crate::job::Limits, envelope: &crate::contract::Envelope) -> Said {
        Said {
            tenant: limits.policy(&envelope.tenant).and_then(|p| p.cache),
            task: limits
                .cache_task_types
                .get(envelope.task_type.as_deref().unwrap_or("default"))
                .copied(),
        }
    }
}

/// `off` from the tenant or the task type wins; else the job's own `cache`; else the task
/// type's; else the tenant's; else `default`.
fn decide(job: &Job, said: Said, default: CacheMode) -> CacheMode {
    if said.tenant == Some(CacheMode::Off) || said.task == Some(CacheMode::Off) {
        return CacheMode::Off;
    }
    job.cache.or(said.task).or(said.tenant).unwrap_or(default)
}

/// Whether an embedding job reads the vector cache (`Use`, the default: an embedding is
/// deterministic), only writes it (`Refresh`), or neither.
pub(crate) fn embed_mode(job: &Job, said: Said) -> CacheMode {
    decide(job, said, CacheMode::Use)
}

/// Whether a generation job reads the cache (`Use`), only writes it (`Refresh`), or neither;
/// by default `Use` for a deterministic job (temperature 0 or a seed), else `Off`.
pub(crate) fn mode(job: &Job, req: &GenerateRequest, said: Said) -> CacheMode {
    let deterministic = req.options.temperature == Some(0.0) || req.options.seed.is_some();
    let default = if deterministic {
        CacheMode::Use
    } else {
        CacheMode::Off
    };
    decide(job, said, default)
}

#[derive(Serialize)]
struct KeyMaterial<'a> {
    v: u32,
    tenant: Option<&'a str>,
    scope: &'a str,
    system: Option<&'a str>,
    messages: &'a [crate::contract::Message],
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    top_p: Option<f64>,
    seed: Option<u32>,
    stop: &'a [String],
    fit: crate::contract::FitMode,
    // Left out when empty, so that a plain job's key is what it was before rich jobs.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'a [crate::contract::Tool],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a crate::contract::ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a crate::contract::ResponseFormat>,
}

/// `g.` and the hex SHA-256 of what decides `job`'s answer.
fn key(job: &Job, req: &GenerateRequest, scope: &str, share_across_tenants: bool) -> String {
    let system = req.system_text();
    let material = KeyMaterial {
        v: 1,
        tenant: (!share_across_tenants).then_some(job.envelope.tenant.as_str()),
        scope,
        system: system.as_deref(),
        messages: &req.messages,
        temperature: req.options.temperature,
        max_tokens: req.options.max_tokens,
        top_p: req.options.top_p,
        seed: req.options.seed,
        stop: &req.options.stop,
        fit: req.options.fit,
        tools: &req.tools,
        tool_choice: req.tool_choice.as_ref(),
        parallel_tool_calls: req.parallel_tool_calls,
        response_format: req.response_format.as_ref(),
    };
    let bytes = serde_json::to_vec(&material).unwrap_or_default();
    hex_key(
        "g.",
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
    )
}

/// `prefix` and `digest` in hex: a key of the bucket.
fn hex_key(prefix: &str, digest: &[u8]) -> String {
    use std::fmt::Write;
    let mut key = String::with_capacity(prefix.len() + 2 * digest.len());
    key.push_str(prefix);
    for b in digest {
        let _ = write!(key, "{b:02x}");
    }
    key
}

fn age(
    stored_at: DateTime<Utc>,
    now: DateTime<Utc>,
    ttl: chrono::TimeDelta,
    max_stale: chrono::TimeDelta,
) -> Age {
    let old = now - stored_at;
    if old <= ttl {
        Age::Fresh
    } else if old <= ttl + max_stale {
        Age::Stale
    } else {
        Age::Expired
    }
}

/// Whether a failed job may be answered from a stale cached answer: every provider failed
/// with a provider fault, not because of the request (bad request, content filter).
pub(crate) fn degraded(result: &crate::contract::ResultEvent) -> bool {
    use crate::contract::ErrorCode;
    let failed_for_providers = result
        .error
        .as_ref()
        .is_some_and(|e| e.code == ErrorCode::AllProvidersFailed);
    let request_refused = result.attempts.iter().any(|a| {
        a.error.as_ref().is_some_and(|e| {
            matches!(
                e.code,
                ErrorCode::BadRequest | ErrorCode::ContentFiltered | ErrorCode::ContextTooLong
            )
        })
    });
    failed_for_providers && !request_refused && !result.attempts.is_empty()
}

impl Cache {
    /// Open (or create) the bucket.
    pub(crate) async fn open(
        js: &jetstream::Context,
        bucket: &str,
        config: &CacheConfig,
        replicas: usize,
    ) -> Result<Self, String> {
        // Created as KV buckets are, by hand: async-nats' create_key_value cannot talk to
        // NATS 2.9 (see `policy::ledger`).
        let stream = jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("llm-worker: response cache".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            // Kept past the TTL for degraded mode; freshness is decided on reading.
            max_age: Duration::from_secs(config.ttl_secs.saturating_add(config.max_stale_secs)),
            max_bytes: config.max_bytes,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            // Full: the oldest answers make room (a KV bucket would refuse new ones).
            discard: jetstream::stream::DiscardPolicy::Old,
            ..Default::default()
        };
        crate::nats::ensure_stream(js, stream, replicas)
            .await
            .map_err(|e| format!("cannot create the cache bucket {bucket}: {e}"))?;
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| format!("cannot open the cache bucket {bucket}: {e}"))?;
        let secs = |s: u64| chrono::TimeDelta::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
        Ok(Self {
            kv,
            share_across_tenants: config.share_across_tenants,
            ttl: secs(config.ttl_secs),
            max_stale: secs(config.max_stale_secs),
            embeddings: config.embeddings,
            near: near::Near::new(
                Duration::from_secs(config.local_ttl_secs),
                config.local_max_bytes,
            )
            .map(std::sync::Arc::new),
        })
    }

    /// The key of `job`'s answer under `scope` (`Chain::cache_scope`).
    pub(crate) fn key(&self, job: &Job, req: &GenerateRequest, scope: &str) -> String {
        key(job, req, scope, self.share_across_tenants)
    }

    /// How `entry` may be used now.
    pub(crate) fn age(&self, entry: &Entry) -> Age {
        age(entry.stored_at, Utc::now(), self.ttl, self.max_stale)
    }

    /// The value under `key`: from the near cache, else from the bucket (then kept near).
    async fn get_raw(&self, key: &str) -> Result<Option<bytes::Bytes>, kv::EntryError> {
        if let Some(value) = self.near.as_ref().and_then(|n| n.get(key)) {
            return Ok(Some(value));
        }
        let value = self.kv.get(key).await?;
        if let (Some(near), Some(value)) = (&self.near, &value) {
            near.put(key, value.clone());
        }
        Ok(value)
    }

    /// Store `value` under `key` in the bucket, and near.
    async fn put_raw(&self, key: &str, value: bytes::Bytes) -> Result<(), kv::PutError> {
        self.kv.put(key, value.clone()).await?;
        if let Some(near) = &self.near {
            near.put(key, value);
        }
        Ok(())
    }

    /// The answer stored under `key`, if any (a read error is a miss, logged).
    pub(crate) async fn get(&self, key: &str) -> Option<Entry> {
        match self.get_raw(key).await {
            Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable cache entry; treated as a miss");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the response cache; calling providers");
                None
            }
        }
    }

    /// Store `entry` under `key` (a failure is logged; the job is answered anyway).
    pub(crate) async fn put(&self, key: &str, entry: &Entry) {
        let Ok(bytes) = serde_json::to_vec(entry) else {
            return;
        };
        if let Err(e) = self.put_raw(key, bytes.into()).await {
            tracing::warn!(error = %e, "cannot store the answer in the response cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Envelope, GenerateOptions, JobKind, Message, Role};
    use crate::job::JobBody;

    fn job(temperature: Option<f64>, cache: Option<CacheMode>) -> (Job, GenerateRequest) {
        let req = GenerateRequest {
            system: None,
            messages: vec![Message::text(Role::User, "hi")],
            options: GenerateOptions {
                temperature,
                ..Default::default()
            },
            stream: true,
            ..Default::default()
        };
        let job = Job {
            envelope: Envelope::for_test("acme"),
            kind: JobKind::Generate,
            provider: None,
            model: None,
            timeout: Duration::from_secs(1),
            expires_at: None,
            cache,
            body: JobBody::Generate(req.clone()),
        };
        (job, req)
    }

    #[test]
    fn the_key_changes_with_everything_that_decides_the_answer_and_nothing_else() {
        let (j, r) = job(Some(0.0), None);
        let k = key(&j, &r, "route=default;a:m,", false);
        assert_eq!(k.len(), 66);
        assert!(k.starts_with("g.") && k[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        // Another job id, trace or reply subject: the same answer.
        let (j2, r2) = job(Some(0.0), Some(CacheMode::Use));
        assert_eq!(key(&j2, &r2, "route=default;a:m,", false), k);
        assert_ne!(key(&j, &r, "route=default;b:m,", false), k, "route");
        let (mut other, _) = job(Some(0.0), None);
        other.envelope.tenant = "globex".into();
        assert_ne!(key(&other, &r, "route=default;a:m,", false), k, "tenant");
        assert_eq!(
            key(&other, &r, "route=default;a:m,", true),
            key(&j, &r, "route=default;a:m,", true),
            "shared across tenants"
        );
        let mut longer = r.clone();
        longer.options.max_tokens = Some(10);
        assert_ne!(key(&j, &longer, "route=default;a:m,", false), k, "options");
        let mut said = r.clone();
        said.messages[0].content = "hi!".into();
        assert_ne!(key(&j, &said, "route=default;a:m,", false), k, "messages");
    }

    #[test]
    fn answers_are_fresh_then_stale_then_expired() {
        let t0: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().unwrap();
        let (ttl, stale) = (
            chrono::TimeDelta::seconds(60),
            chrono::TimeDelta::seconds(600),
        );
        let at = |s| t0 + chrono::TimeDelta::seconds(s);
        assert_eq!(age(t0, at(60), ttl, stale), Age::Fresh);
        assert_eq!(age(t0, at(61), ttl, stale), Age::Stale);
        assert_eq!(age(t0, at(660), ttl, stale), Age::Stale);
        assert_eq!(age(t0, at(661), ttl, stale), Age::Expired);
        assert_eq!(
            age(t0, at(61), ttl, chrono::TimeDelta::zero()),
            Age::Expired
        );
    }

    #[test]
    fn deterministic_jobs_use_the_cache_unless_told_otherwise() {
        let none = Said::default();
        let (j, r) = job(Some(0.0), None);
        assert_eq!(mode(&j, &r, none), CacheMode::Use);
        let (j, r) = job(Some(0.7), None);
        assert_eq!(mode(&j, &r, none), CacheMode::Off);
        let (j, r) = job(None, None);
        assert_eq!(mode(&j, &r, none), CacheMode::Off);
        let (j, mut r) = job(Some(0.9), None);
        r.options.seed = Some(7);
        assert_eq!(
            mode(&j, &r, none),
            CacheMode::Use,
            "a seed asks for a reproducible answer"
        );
        let (j, r) = job(Some(0.7), Some(CacheMode::Use));
        assert_eq!(mode(&j, &r, none), CacheMode::Use);
        let (j, r) = job(Some(0.0), Some(CacheMode::Refresh));
        assert_eq!(mode(&j, &r, none), CacheMode::Refresh);
        // A tenant's policy and a task type's: their default for jobs that do not say (the
        // task type's first), and `off` from either wins.
        let said = |tenant, task| Said { tenant, task };
        let (j, r) = job(Some(0.7), None);
        assert_eq!(
            mode(&j, &r, said(Some(CacheMode::Use), None)),
            CacheMode::Use
        );
        assert_eq!(
            mode(&j, &r, said(None, Some(CacheMode::Use))),
            CacheMode::Use
        );
        assert_eq!(
            mode(&j, &r, said(Some(CacheMode::Use), Some(CacheMode::Refresh))),
            CacheMode::Refresh
        );
        let (j, r) = job(Some(0.0), Some(CacheMode::Use));
        assert_eq!(
            mode(&j, &r, said(Some(CacheMode::Off), None)),
            CacheMode::Off
        );
        assert_eq!(
            mode(&j, &r, said(None, Some(CacheMode::Off))),
            CacheMode::Off
        );
        // Embeddings: on unless something says otherwise.
        let (j, _) = job(Some(0.7), None);
        assert_eq!(embed_mode(&j, none), CacheMode::Use);
        assert_eq!(
            embed_mode(&j, said(None, Some(CacheMode::Off))),
            CacheMode::Off
        );
    }
}
