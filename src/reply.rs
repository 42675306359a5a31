//! Publishing a job's events: `chunk`s on `reply_to` (core NATS, cheap, ordered by `seq`) and
//! the `result`, stored durably in `LLM_RESULTS` at `<prefix>.results.<job_id>` and then sent
//! live. Also reads a stored result back, so a redelivered job is answered without a provider.
//!
//! This module calls no provider and decides nothing about acks.

use std::sync::Arc;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use uuid::Uuid;

use crate::chain::{AttemptMeta, DeltaSink};
use crate::config::NatsConfig;
use crate::error::ErrorCode;
use crate::event::{ChunkEvent, ErrorBody, ResultEvent, Status};

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("storing the result in JetStream failed: {0}")]
    Store(String),
    #[error("reading a stored result failed: {0}")]
    Lookup(String),
    #[error("encoding an event failed: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What [`Replies::store`] found.
#[derive(Debug)]
pub enum Stored {
    /// The result is now the job id's stored result.
    New,
    /// Another result was already stored under the job id; it is kept, and here it is.
    Existing(Bytes),
}

/// Publishes events for every job of one worker.
#[derive(Clone)]
pub struct Replies {
    client: async_nats::Client,
    js: jetstream::Context,
    nats: Arc<NatsConfig>,
}

impl Replies {
    pub fn new(client: async_nats::Client, js: jetstream::Context, nats: Arc<NatsConfig>) -> Self {
        Self { client, js, nats }
    }

    /// A sink publishing `chunk` events to `reply_to` (or nowhere, when `None`).
    pub fn chunks(&self, job_id: Uuid, trace_id: &str, reply_to: Option<&str>) -> ChunkPublisher {
        ChunkPublisher {
            client: self.client.clone(),
            subject: reply_to.map(async_nats::Subject::from),
            job_id,
            trace_id: trace_id.to_string(),
            seq: 0,
            failed: false,
        }
    }

    /// Encode a result for the wire. A result larger than the server's max payload is replaced
    /// by a `payload_too_large` error result: nothing is silently truncated.
    pub fn encode_result(&self, result: &ResultEvent) -> Result<Bytes, ReplyError> {
        let payload = serde_json::to_vec(result)?;
        let max = self.client.server_info().max_payload;
        if max == 0 || payload.len() <= max.saturating_sub(1024) {
            return Ok(Bytes::from(payload));
        }
        let mut small = result.clone();
        small.status = Status::Error;
        small.output = None;
        small.embeddings = None;
        small.error = Some(ErrorBody {
            code: ErrorCode::PayloadTooLarge,
            message: format!(
                "the result is {} bytes; the NATS server's max_payload is {max} bytes",
                payload.len()
            ),
            retryable: false,
        });
        Ok(Bytes::from(serde_json::to_vec(&small)?))
    }

    /// Store the result durably, unless a result is already stored under its job id: a stored
    /// result is never replaced, whoever asks (a crashed worker's retry, another delivery of
    /// the same job, or another tenant re-using the id). JetStream checks this atomically
    /// (`Nats-Expected-Last-Subject-Sequence: 0`, NATS 2.9+); the result already there is
    /// returned so the caller can decide who it belongs to. Returns once JetStream has
    /// acknowledged the write.
    pub async fn store(&self, job_id: Uuid, payload: Bytes) -> Result<Stored, ReplyError> {
        let subject = self.nats.result_subject(&job_id);
        let publish = PublishMessage::build()
            .payload(payload)
            .expected_last_subject_sequence(0);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| ReplyError::Store(e.to_string()))?;
        match ack.await {
            Ok(_) => Ok(Stored::New),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                match self.stored(job_id).await? {
                    Some(existing) => Ok(Stored::Existing(existing)),
                    None => Err(ReplyError::Store(
                        "a result exists under this job id but cannot be read".into(),
                    )),
                }
            }
            Err(e) => Err(ReplyError::Store(e.to_string())),
        }
    }

    /// Send an encoded event to a reply subject. Best effort: live events are core NATS; the
    /// stored result is the durable copy.
    pub async fn publish_live(&self, reply_to: &str, payload: Bytes) {
        if let Err(e) = self.client.publish(reply_to.to_string(), payload).await {
            tracing::warn!(error = %e, "publishing a live result failed; it is stored in the results stream");
        }
    }

    /// The stored result of a job, if there is one.
    pub async fn stored(&self, job_id: Uuid) -> Result<Option<Bytes>, ReplyError> {
        let stream = self
            .js
            .get_stream_no_info(&self.nats.results_stream)
            .await
            .map_err(|e| ReplyError::Lookup(e.to_string()))?;
        let subject = self.nats.result_subject(&job_id);
        match stream.direct_get_last_for_subject(subject.clone()).await {
            Ok(msg) => return Ok(Some(msg.payload)),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None);
            }
            // A results stream created elsewhere without `allow_direct`: use the API instead.
            Err(e) => tracing::debug!(error = %e, "direct get failed; asking the stream leader"),
        }
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => Ok(Some(msg.payload)),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(ReplyError::Lookup(e.to_string())),
        }
    }
}

/// Publishes `chunk` events with contiguous `seq` for one job.
pub struct ChunkPublisher {
    client: async_nats::Client,
    /// Cheap to clone (shared bytes): one clone per published chunk.
    subject: Option<async_nats::Subject>,
    job_id: Uuid,
    trace_id: String,
    seq: u64,
    failed: bool,
}

impl DeltaSink for ChunkPublisher {
    async fn delta(&mut self, meta: AttemptMeta<'_>, text: &str) {
        let Some(subject) = &self.subject else {
            return;
        };
        let event = ChunkEvent {
            kind: "chunk",
            job_id: self.job_id,
            trace_id: &self.trace_id,
            seq: self.seq,
            attempt: meta.attempt,
            provider: meta.provider,
            model: meta.model,
            delta: text,
        };
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "encoding a chunk failed");
                return;
            }
        };
        self.seq += 1;
        if let Err(e) = self.client.publish(subject.clone(), payload).await
            && !self.failed
        {
            self.failed = true;
            tracing::warn!(error = %e, "publishing chunks failed; the result will still be stored");
        }
    }
}
