//! Publishing a job's events: `chunk`s on `reply_to` (core NATS, cheap, ordered by `seq`) and
//! the `result`, stored durably in `LLM_RESULTS` at `<prefix>.results.<job_id>` and then sent
//! live. Also reads a stored result back, so a redelivered job is answered without a provider.
//!
//! This module calls no provider and decides nothing about acks.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use tokio::time::Instant;
use uuid::Uuid;

use crate::chain::{AttemptMeta, DeltaSink};
use crate::config::NatsConfig;
use crate::contract::ErrorCode;
use crate::contract::{ChunkEvent, ErrorBody, ResultEvent, Status, ToolCallChunk};

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("storing the result in JetStream failed: {0}")]
    Store(String),
    #[error("reading a stored result failed: {0}")]
    Lookup(String),
    #[error("encoding an event failed: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Room kept in a message for NATS headers.
const HEADER_ROOM: usize = 1024;

/// Text up to this size always fits one chunk event (NATS servers take at least this much).
const SMALL_TEXT: usize = 4096;

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
    /// Deltas within this long of the last chunk event wait for the next one.
    chunk_interval: Duration,
    /// The results stream's handle, made once (each handle holds a clone of the connection).
    results: Arc<tokio::sync::OnceCell<jetstream::stream::Stream<()>>>,
}

impl Replies {
    pub fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        nats: Arc<NatsConfig>,
        chunk_interval: Duration,
    ) -> Self {
        Self {
            client,
            js,
            nats,
            chunk_interval,
            results: Arc::default(),
        }
    }

    /// A sink publishing `chunk` events to `reply_to` (or nowhere, when `None`).
    pub(crate) fn chunks(
        &self,
        job_id: Uuid,
        trace_id: &str,
        reply_to: Option<&str>,
    ) -> ChunkPublisher {
        ChunkPublisher {
            client: self.client.clone(),
            subject: reply_to.map(async_nats::Subject::from),
            job_id,
            trace_id: trace_id.to_string(),
            seq: 0,
            failed: false,
            interval: self.chunk_interval,
            held: String::new(),
            held_by: None,
            last_sent: None,
        }
    }

    /// The largest message the NATS server takes (`usize::MAX` when it does not say).
    pub(crate) fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => usize::MAX,
            max => max,
        }
    }

    /// Store the result durably, unless a result is already stored under its job id: a stored
    /// result is never replaced, whoever asks (a crashed worker's retry, another delivery of
    /// the same job, or another tenant re-using the id). JetStream checks this atomically
    /// (`Nats-Expected-Last-Subject-Sequence: 0`, NATS 2.9+); the result already there is
    /// returned so the caller can decide who it belongs to. Returns once JetStream has
    /// acknowledged the write.
    pub(crate) async fn store(&self, job_id: Uuid, payload: Bytes) -> Result<Stored, ReplyError> {
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
    pub(crate) async fn publish_live(&self, reply_to: &str, payload: Bytes) {
        if let Err(e) = self.client.publish(reply_to.to_string(), payload).await {
            tracing::warn!(error = %e, "publishing a live result failed; it is stored in the results stream");
        }
    }

    /// The stored result of a job, if there is one.
    pub(crate) async fn stored(&self, job_id: Uuid) -> Result<Option<Bytes>, ReplyError> {
        let stream = self
            .results
            .get_or_try_init(|| self.js.get_stream_no_info(&self.nats.results_stream))
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

/// Encode a result for the wire. A result larger than `max_payload` (the server's) is replaced
/// by a `payload_too_large` error result that is guaranteed to fit: nothing is silently
/// truncated, and nothing is echoed without a bound (first the output is dropped, then the
/// metadata and the attempts' messages, then everything but the identity and the error).
/// `max_payload` is asked only for a result over [`SMALL_TEXT`] (asking clones the server's
/// info: a dozen allocations, on every job otherwise).
pub(crate) fn encode_result(
    result: &ResultEvent,
    max_payload: impl FnOnce() -> usize,
) -> Result<Bytes, ReplyError> {
    let payload = serde_json::to_vec(result)?;
    if payload.len() <= SMALL_TEXT {
        return Ok(Bytes::from(payload));
    }
    let max_payload = max_payload();
    let room = max_payload.saturating_sub(HEADER_ROOM);
    if payload.len() <= room {
        return Ok(Bytes::from(payload));
    }
    let size = payload.len();
    let mut small = result.clone();
    small.status = Status::Error;
    small.output = None;
    small.embeddings = None;
    small.error = Some(ErrorBody {
        code: ErrorCode::PayloadTooLarge,
        message: format!(
            "the result is {size} bytes; the NATS server's max_payload is {} bytes",
            max_payload
        ),
        retryable: false,
    });
    let shrink: [fn(&mut ResultEvent); 3] = [
        |_| {},
        |r| {
            r.metadata = serde_json::Value::Null;
            for a in &mut r.attempts {
                if let Some(e) = &mut a.error {
                    e.message = e.message.chars().take(80).collect();
                }
            }
        },
        |r| {
            tracing::error!(
                attempts = r.attempts.len(),
                "even a reduced result is too large: its attempts are not recorded"
            );
            r.attempts.clear();
            r.task_type = None;
        },
    ];
    let mut last = Vec::new();
    for step in shrink {
        step(&mut small);
        last = serde_json::to_vec(&small)?;
        if last.len() <= room {
            break;
        }
    }
    Ok(Bytes::from(last))
}

/// Publishes `chunk` events with contiguous `seq` for one job. Deltas arriving within
/// `interval` of the last event are held and sent together as the next event (at most one
/// event per interval, the first at once), so a provider streaming tiny deltas very fast cannot
/// flood the reply subject. Text of different attempts never shares an event.
pub struct ChunkPublisher {
    client: async_nats::Client,
    /// Cheap to clone (shared bytes): one clone per published chunk.
    subject: Option<async_nats::Subject>,
    job_id: Uuid,
    trace_id: String,
    seq: u64,
    failed: bool,
    interval: Duration,
    /// Text held back, and the attempt (number, provider, model) it belongs to.
    held: String,
    held_by: Option<(u32, String, String)>,
    last_sent: Option<Instant>,
}

impl ChunkPublisher {
    /// Publish `text` as one event, or as several when it is too long for one message.
    async fn publish(&mut self, meta: AttemptMeta<'_>, mut text: &str) {
        // Deltas are small; only a long one is worth asking the server's limit for (the
        // server info is cloned on every call).
        if text.len() <= SMALL_TEXT {
            return self.publish_one(meta, text).await;
        }
        // Worst case JSON escapes a byte as six (`\u0000`): a piece of this size fits.
        let max_payload = match self.client.server_info().max_payload {
            0 => usize::MAX,
            max => max,
        };
        let max_text = (max_payload.saturating_sub(HEADER_ROOM + 1024) / 6).max(4);
        while text.len() > max_text {
            let mut cut = max_text;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let (head, rest) = text.split_at(cut);
            self.publish_one(meta, head).await;
            text = rest;
        }
        self.publish_one(meta, text).await;
    }

    async fn publish_one(&mut self, meta: AttemptMeta<'_>, text: &str) {
        self.publish_event(meta, Some(text), None).await;
    }

    /// One chunk event: text, or a piece of a tool call.
    async fn publish_event(
        &mut self,
        meta: AttemptMeta<'_>,
        delta: Option<&str>,
        tool_call: Option<ToolCallChunk>,
    ) {
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
            delta,
            tool_call,
        };
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "encoding a chunk failed");
                return;
            }
        };
        self.seq += 1;
        self.last_sent = Some(Instant::now());
        if let Err(e) = self.client.publish(subject.clone(), payload).await
            && !self.failed
        {
            self.failed = true;
            tracing::warn!(error = %e, "publishing chunks failed; the result will still be stored");
        }
    }
}

impl DeltaSink for ChunkPublisher {
    /// Tool-call pieces are not coalesced: each is an event, after any held text (so events
    /// keep the answer's order). Arguments are small; the pieces are bounded by the answer's.
    async fn tool_call(&mut self, meta: AttemptMeta<'_>, chunk: &ToolCallChunk) {
        if self.subject.is_none() {
            return;
        }
        self.flush().await;
        self.publish_event(meta, None, Some(chunk.clone())).await;
    }

    async fn delta(&mut self, meta: AttemptMeta<'_>, text: &str) {
        if self.subject.is_none() {
            return;
        }
        let due = self
            .last_sent
            .is_none_or(|at| at.elapsed() >= self.interval);
        if self.held.is_empty() && due {
            return self.publish(meta, text).await;
        }
        if self
            .held_by
            .as_ref()
            .is_some_and(|(attempt, _, _)| *attempt != meta.attempt)
        {
            self.flush().await;
        }
        if self.held_by.is_none() {
            self.held_by = Some((meta.attempt, meta.provider.into(), meta.model.into()));
        }
        self.held.push_str(text);
        if due {
            self.flush().await;
        }
    }

    fn flush_at(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        Some(
            self.last_sent
                .map_or_else(Instant::now, |at| at + self.interval),
        )
    }

    async fn flush(&mut self) {
        let Some((attempt, provider, model)) = self.held_by.take() else {
            return;
        };
        let text = std::mem::take(&mut self.held);
        let meta = AttemptMeta {
            attempt,
            provider: &provider,
            model: &model,
        };
        self.publish(meta, &text).await;
    }
}
