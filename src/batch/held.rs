//! A job the lane holds, read back from the batch stream, as a job message the worker can
//! answer: the original subject, payload and publication time (from the hand-over's
//! headers), delivered once, settled by nobody (the lane deletes it once it is answered).

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::lane;
use crate::worker::JobMessage;

pub(crate) struct HeldJob {
    subject: String,
    payload: Bytes,
    msg_id: Option<String>,
    published: Option<DateTime<Utc>>,
    traceparent: Option<String>,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_string())
}

impl HeldJob {
    /// The job in a batch stream message (its headers and payload).
    pub(crate) fn new(headers: &HeaderMap, payload: Bytes) -> Self {
        Self {
            subject: header(headers, lane::SUBJECT).unwrap_or_default(),
            payload,
            msg_id: header(headers, "Nats-Msg-Id"),
            published: header(headers, lane::PUBLISHED).and_then(|t| lane::parse_time(&t)),
            traceparent: header(headers, "traceparent"),
        }
    }
}

impl JobMessage for HeldJob {
    fn subject(&self) -> &str {
        &self.subject
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    fn msg_id(&self) -> Option<&str> {
        self.msg_id.as_deref()
    }

    fn delivered(&self) -> i64 {
        1
    }

    fn published(&self) -> Option<DateTime<Utc>> {
        self.published
    }

    fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    fn held(&self) -> bool {
        true
    }

    async fn settle(&self, _: AckKind) -> Result<(), String> {
        Ok(())
    }
}
