//! What the worker needs from the outside, as two small traits, so its decisions (ack, nak,
//! term, re-send a stored result, dead-letter) are made in one place and unit-tested without
//! JetStream:
//!
//! - [`JobMessage`]: the job message: its subject, payload, id header and delivery count, and
//!   how it is settled with the queue (ack, nak with a delay, in progress, term);
//! - [`Outbox`]: where a job's events go: chunk events, the stored result (written once, read
//!   back), live results, and dead letters.
//!
//! [`NatsOutbox`] and `jetstream::Message` are the production implementations.

use std::future::Future;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::chain::DeltaSink;
use crate::dead::DeadLetters;
use crate::reply::{ChunkPublisher, Replies, ReplyError, Stored};

/// A delivered job message.
pub trait JobMessage: Send + Sync {
    fn subject(&self) -> &str;
    fn payload(&self) -> &Bytes;
    /// The `Nats-Msg-Id` header.
    fn msg_id(&self) -> Option<&str>;
    /// How many times this message has been delivered (1 the first time).
    fn delivered(&self) -> i64;
    /// When the queue received it from its publisher.
    fn published(&self) -> Option<DateTime<Utc>>;
    /// The W3C `traceparent` header, if any.
    fn traceparent(&self) -> Option<&str> {
        None
    }
    /// A job held by the batch lane (`crate::batch`) that must now be answered online.
    fn held(&self) -> bool {
        false
    }
    /// Settle (or extend) the message with the queue.
    fn settle(&self, kind: AckKind) -> impl Future<Output = Result<(), String>> + Send;
}

impl JobMessage for jetstream::Message {
    fn subject(&self) -> &str {
        self.subject.as_str()
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    fn msg_id(&self) -> Option<&str> {
        self.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str())
    }

    fn traceparent(&self) -> Option<&str> {
        self.headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str())
    }

    fn delivered(&self) -> i64 {
        self.info().map_or(1, |i| i.delivered)
    }

    fn published(&self) -> Option<DateTime<Utc>> {
        let nanos = self.info().ok()?.published.unix_timestamp_nanos();
        Some(DateTime::from_timestamp_nanos(i64::try_from(nanos).ok()?))
    }

    async fn settle(&self, kind: AckKind) -> Result<(), String> {
        self.ack_with(kind).await.map_err(|e| e.to_string())
    }
}

/// Where one worker's job events go.
pub trait Outbox: Clone + Send + Sync + 'static {
    type Chunks: DeltaSink;
    /// A sink for a job's `chunk` events on `reply_to` (or nowhere, when `None`).
    fn chunks(&self, job_id: Uuid, trace_id: &str, reply_to: Option<&str>) -> Self::Chunks;
    /// The largest message the transport takes.
    fn max_payload(&self) -> usize;
    /// Store a result unless one is stored under the job id already (then returned).
    fn store(
        &self,
        job_id: Uuid,
        payload: Bytes,
    ) -> impl Future<Output = Result<Stored, ReplyError>> + Send;
    /// The job id's stored result, if any.
    fn stored(
        &self,
        job_id: Uuid,
    ) -> impl Future<Output = Result<Option<Bytes>, ReplyError>> + Send;
    /// Send an encoded result to a reply subject (best effort).
    fn publish_live(&self, reply_to: &str, payload: Bytes) -> impl Future<Output = ()> + Send;
    /// Keep a job message delivered too often (see [`DeadLetters::job`]).
    fn dead_letter(
        &self,
        job_id: Uuid,
        subject: &str,
        payload: Bytes,
        delivered: i64,
        reason: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// The production outbox: replies over NATS, results and dead letters in JetStream.
#[derive(Clone)]
pub struct NatsOutbox {
    pub replies: Replies,
    pub dead: DeadLetters,
}

impl Outbox for NatsOutbox {
    type Chunks = ChunkPublisher;

    fn chunks(&self, job_id: Uuid, trace_id: &str, reply_to: Option<&str>) -> ChunkPublisher {
        self.replies.chunks(job_id, trace_id, reply_to)
    }

    fn max_payload(&self) -> usize {
        self.replies.max_payload()
    }

    async fn store(&self, job_id: Uuid, payload: Bytes) -> Result<Stored, ReplyError> {
        self.replies.store(job_id, payload).await
    }

    async fn stored(&self, job_id: Uuid) -> Result<Option<Bytes>, ReplyError> {
        self.replies.stored(job_id).await
    }

    async fn publish_live(&self, reply_to: &str, payload: Bytes) {
        self.replies.publish_live(reply_to, payload).await
    }

    async fn dead_letter(
        &self,
        job_id: Uuid,
        subject: &str,
        payload: Bytes,
        delivered: i64,
        reason: &str,
    ) -> Result<(), String> {
        self.dead
            .job(job_id, subject, payload, delivered, reason)
            .await
            .map_err(|e| e.to_string())
    }
}
