//! The batch lane's intake: the stream that holds jobs handed to the lane (`nats.batch_stream`,
//! subject `<prefix>.batch.jobs`), the bucket of open provider batches (`nats.batch_bucket`),
//! and the hand-off itself. The lane that collects and follows batches is `crate::batch`,
//! above the worker; this module is below it, so the worker can hand a job over.
//!
//! A job is handed over by publishing its message, as it was published, to the batch stream
//! with `Nats-Msg-Id` = its job id (a second hand-off of a redelivered job is dropped by the
//! stream's duplicate window), and headers that say what the original delivery said (subject,
//! publication time, `traceparent`) and which provider and model it waits for. Only then is
//! the original acked: at every point the job is in one stream or the other (or both).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::NatsConfig;

/// Header: the subject the job was first published on (its tenant, with
/// `nats.tenant_from_subject`).
pub const SUBJECT: &str = "Llmw-Subject";
/// Header: when JetStream first received the job (RFC 3339; the start of `expires_in_ms`).
pub const PUBLISHED: &str = "Llmw-Published";
/// Headers: the provider and model the job's batch goes to.
pub const PROVIDER: &str = "Llmw-Provider";
pub const MODEL: &str = "Llmw-Model";
/// Header: the job's deadline (RFC 3339).
pub const DEADLINE: &str = "Llmw-Deadline";
/// Header: the job's tenant (as decoded).
pub const TENANT: &str = "Llmw-Tenant";

/// The longest a handed-over job is kept (the longest deadline a job may set is 30 days).
const KEEP: Duration = Duration::from_secs(31 * 24 * 3600);

/// The subject of handed-over jobs.
pub fn subject(nats: &NatsConfig) -> String {
    format!("{}.batch.jobs", nats.subject_prefix)
}

/// Create the batch stream and bucket if they are missing; the stream and the bucket.
pub async fn ensure(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<(stream::Stream, kv::Store), String> {
    let held = stream::Config {
        name: nats.batch_stream.clone(),
        description: Some("llm-worker: jobs waiting in the batch lane".into()),
        subjects: vec![subject(nats)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: KEEP,
        duplicate_window: Duration::from_secs(nats.duplicate_window_secs),
        allow_direct: true,
        ..Default::default()
    };
    let held = crate::nats::ensure_stream(js, held, nats.replicas)
        .await
        .map_err(|e| format!("cannot create the batch stream {}: {e}", nats.batch_stream))?;
    // Created by hand as every bucket here: async-nats' create_key_value cannot talk to NATS
    // 2.9 (see `policy::ledger`).
    let bucket = &nats.batch_bucket;
    let records = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("llm-worker: open provider batches".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: KEEP,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    crate::nats::ensure_stream(js, records, nats.replicas)
        .await
        .map_err(|e| format!("cannot create the batch bucket {bucket}: {e}"))?;
    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("cannot open the batch bucket {bucket}: {e}"))?;
    Ok((held, kv))
}

/// What the worker hands over with a job.
pub struct Handover<'a> {
    pub job_id: Uuid,
    pub tenant: &'a str,
    pub subject: &'a str,
    pub payload: Bytes,
    pub published: Option<DateTime<Utc>>,
    pub traceparent: Option<&'a str>,
    pub provider: &'a str,
    pub model: &'a str,
    pub deadline: Option<DateTime<Utc>>,
}

/// Where jobs are handed over.
#[derive(Clone)]
pub struct Intake {
    js: jetstream::Context,
    subject: String,
}

impl Intake {
    pub fn new(js: jetstream::Context, nats: &NatsConfig) -> Self {
        Self {
            js,
            subject: subject(nats),
        }
    }

    /// Hand `job` over: written (or found written before) when this returns `Ok`.
    pub async fn hand_over(&self, job: Handover<'_>) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.job_id.to_string().as_str());
        headers.insert(SUBJECT, job.subject);
        headers.insert(TENANT, job.tenant);
        headers.insert(PROVIDER, job.provider);
        headers.insert(MODEL, job.model);
        if let Some(at) = job.published {
            headers.insert(PUBLISHED, rfc3339(at).as_str());
        }
        if let Some(at) = job.deadline {
            headers.insert(DEADLINE, rfc3339(at).as_str());
        }
        if let Some(tp) = job.traceparent {
            headers.insert("traceparent", tp);
        }
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, job.payload)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A time written by [`Intake::hand_over`].
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
