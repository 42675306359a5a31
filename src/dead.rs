//! Dead letters: what failed the same way repeatedly, kept with its reason in the `LLM_DEAD`
//! stream, so that no single job or result can stop a worker or the usage recorder
//! (CONTRACT.md section 5, Poison).
//!
//! - A job delivered `worker.max_deliver` times without an answer is copied to
//!   `<prefix>.dead.jobs.<job_id>` (its message as published, with the reason, delivery count
//!   and original subject in headers) and answered `dead_lettered`.
//! - A result the recorder cannot write even alone (bad data, not an outage) is copied to
//!   `<prefix>.dead.usage.<job_id>` with the database's reason, and the recorder moves on.
//!
//! `llm-worker dead list|show` reads them back (`crate::replay` replays them). This module
//! decides nothing about when a message is dead.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use uuid::Uuid;

use crate::config::NatsConfig;

/// Why the message died (a short text; never a prompt).
pub(crate) const REASON: &str = "Llm-Dead-Reason";
/// How many times the job was delivered.
pub(crate) const DELIVERED: &str = "Llm-Delivered";
/// The subject the job was published to (its kind, and its tenant token if any).
pub(crate) const SUBJECT: &str = "Llm-Subject";
/// Set when the message was too large to keep beside its headers (it cannot be replayed).
pub(crate) const DROPPED: &str = "Llm-Payload-Dropped";

/// Longest reason kept in a header.
const MAX_REASON_CHARS: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    #[error("writing a dead letter failed: {0}")]
    Write(String),
    #[error("reading dead letters failed: {0}")]
    Read(String),
    #[error("no dead letter with sequence {0}")]
    NotFound(u64),
    #[error("dead letter {0} cannot be replayed: {1}")]
    Unreplayable(u64, String),
}

/// What a dead letter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Jobs,
    Usage,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Jobs => "jobs",
            Kind::Usage => "usage",
        }
    }
}

/// Writes dead letters for one deployment.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    nats: Arc<NatsConfig>,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, nats: Arc<NatsConfig>) -> Self {
        Self { js, nats }
    }

    /// Keep a job that was delivered `delivered` times without an answer. `msg_id` makes a
    /// second copy of the same delivery (a retry after a failed write) a duplicate.
    pub(crate) async fn job(
        &self,
        job_id: Uuid,
        subject: &str,
        payload: Bytes,
        delivered: i64,
        reason: &str,
    ) -> Result<(), DeadError> {
        let mut headers = HeaderMap::new();
        headers.insert(DELIVERED, delivered.to_string().as_str());
        headers.insert(SUBJECT, subject);
        let msg_id = format!("job-{job_id}-{delivered}");
        self.write(Kind::Jobs, job_id, payload, headers, reason, msg_id)
            .await
    }

    /// Keep a result the recorder cannot write.
    pub(crate) async fn usage(
        &self,
        job_id: Uuid,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), DeadError> {
        let msg_id = format!("usage-{job_id}");
        self.write(
            Kind::Usage,
            job_id,
            payload,
            HeaderMap::new(),
            reason,
            msg_id,
        )
        .await
    }

    async fn write(
        &self,
        kind: Kind,
        job_id: Uuid,
        payload: Bytes,
        mut headers: HeaderMap,
        reason: &str,
        msg_id: String,
    ) -> Result<(), DeadError> {
        let reason: String = reason
            .chars()
            .take(MAX_REASON_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        headers.insert(REASON, reason.as_str());
        let subject = dead_subject(&self.nats, kind, job_id);
        let max = self.js.client().server_info().max_payload;
        // The message plus its headers may not fit where the message alone did: keep the reason.
        let payload = if max > 0 && payload.len() + 2048 > max {
            headers.insert(DROPPED, payload.len().to_string().as_str());
            Bytes::new()
        } else {
            payload
        };
        let publish = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(msg_id);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| DeadError::Write(e.to_string()))?;
        ack.await.map_err(|e| DeadError::Write(e.to_string()))?;
        Ok(())
    }
}

/// `<prefix>.dead.<jobs|usage>.<job_id>`.
pub(crate) fn dead_subject(nats: &NatsConfig, kind: Kind, job_id: Uuid) -> String {
    format!("{}.dead.{}.{job_id}", nats.subject_prefix, kind.as_str())
}

/// One dead letter as read back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Letter {
    pub sequence: u64,
    pub time: String,
    pub kind: Kind,
    pub job_id: String,
    pub reason: String,
    pub delivered: Option<i64>,
    pub subject: Option<String>,
    pub payload_bytes: usize,
    /// The kept message (a job, or a result), when it fitted.
    #[serde(skip)]
    pub payload: Bytes,
}

impl Letter {
    fn from_message(nats: &NatsConfig, msg: jetstream::message::StreamMessage) -> Option<Self> {
        let tail = msg
            .subject
            .strip_prefix(&format!("{}.dead.", nats.subject_prefix))?
            .to_string();
        let (kind, job_id) = tail.split_once('.')?;
        let kind = match kind {
            "jobs" => Kind::Jobs,
            "usage" => Kind::Usage,
            _ => return None,
        };
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_string());
        Some(Self {
            sequence: msg.sequence,
            time: chrono::DateTime::from_timestamp(msg.time.unix_timestamp(), 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            kind,
            job_id: job_id.to_string(),
            reason: header(REASON).unwrap_or_default(),
            delivered: header(DELIVERED).and_then(|d| d.parse().ok()),
            subject: header(SUBJECT),
            payload_bytes: msg.payload.len(),
            payload: msg.payload,
        })
    }
}

/// The newest `limit` dead letters (of `kind`, when given), oldest first.
pub async fn list(
    js: &jetstream::Context,
    nats: &NatsConfig,
    kind: Option<Kind>,
    limit: usize,
) -> Result<Vec<Letter>, DeadError> {
    let read = |e: &dyn std::fmt::Display| DeadError::Read(e.to_string());
    let mut stream = js
        .get_stream(&nats.dead_stream)
        .await
        .map_err(|e| read(&e))?;
    let state = stream.info().await.map_err(|e| read(&e))?.state.clone();
    let filter = match kind {
        None => format!("{}.dead.>", nats.subject_prefix),
        Some(k) => format!("{}.dead.{}.>", nats.subject_prefix, k.as_str()),
    };
    let mut letters = std::collections::VecDeque::new();
    let mut next = state.first_sequence.max(1);
    while next <= state.last_sequence {
        let msg = match stream.get_first_raw_message_by_subject(&filter, next).await {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(read(&e)),
        };
        next = msg.sequence + 1;
        if let Some(letter) = Letter::from_message(nats, msg) {
            letters.push_back(letter);
            if letters.len() > limit {
                letters.pop_front();
            }
        }
    }
    Ok(letters.into())
}

/// Dead letters as a table, one per line.
pub fn render(letters: &[Letter]) -> String {
    let mut out = format!(
        "{:>8}  {:<30}  {:<5}  {:<36}  {:>9}  reason\n",
        "seq", "time", "kind", "job_id", "delivered"
    );
    for l in letters {
        let delivered = l.delivered.map_or("-".to_string(), |d| d.to_string());
        out.push_str(&format!(
            "{:>8}  {:<30}  {:<5}  {:<36}  {:>9}  {}\n",
            l.sequence,
            l.time,
            l.kind.as_str(),
            l.job_id,
            delivered,
            l.reason
        ));
    }
    if letters.is_empty() {
        out.push_str("(no dead letters)\n");
    }
    out
}

/// One dead letter by its stream sequence.
pub async fn show(
    js: &jetstream::Context,
    nats: &NatsConfig,
    sequence: u64,
) -> Result<Letter, DeadError> {
    let stream = js
        .get_stream_no_info(&nats.dead_stream)
        .await
        .map_err(|e| DeadError::Read(e.to_string()))?;
    let msg = stream
        .get_raw_message(sequence)
        .await
        .map_err(|_| DeadError::NotFound(sequence))?;
    Letter::from_message(nats, msg).ok_or(DeadError::NotFound(sequence))
}
