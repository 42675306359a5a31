//! The orchestrator side of the contract: publish a job (with `Nats-Msg-Id`, after
//! subscribing to its reply subject), follow its events, and get its result, from the live
//! event or, when that was missed, from `LLM_RESULTS`. Used by `llm-worker submit` and the
//! HTTP gateway; it knows nothing about providers.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::NatsConfig;
use crate::event::ResultEvent;
use crate::job::JobKind;

/// How long after the job's own deadline the client still waits for the live result before
/// it reads the stored one.
pub const WAIT_MARGIN: Duration = Duration::from_secs(5);

/// Why a job could not be submitted or answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the job is not a JSON object with a valid job_id: {0}")]
    BadJob(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("JetStream did not accept the job: {0}")]
    NotAccepted(String),
    /// No live result within the deadline and none stored yet.
    #[error("no result within the job's deadline (is a worker running?)")]
    NoResult,
}

/// A chunk event (contract section 3), owned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Chunk {
    #[serde(rename = "type")]
    pub kind: String,
    pub job_id: Uuid,
    pub trace_id: String,
    pub seq: u64,
    pub attempt: u32,
    pub provider: String,
    pub model: String,
    pub delta: String,
}

/// One event of a job, as the client sees it.
#[derive(Debug, Clone)]
pub enum Event {
    Chunk(Chunk),
    /// Always the last event.
    Result(Box<ResultEvent>),
}

/// A connection to a deployment's NATS, able to submit jobs.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
    config: Arc<NatsConfig>,
}

impl Client {
    /// Connect with `config` (credentials, TLS, inbox prefix) and make sure the streams exist.
    pub async fn connect(config: &NatsConfig) -> anyhow::Result<Client> {
        let nats = crate::app::connect_nats(config).await?;
        let js = jetstream::new(nats.clone());
        crate::queue::ensure_streams(&js, config).await?;
        Ok(Client {
            nats,
            js,
            config: Arc::new(config.clone()),
        })
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// Publish `job` (a JSON object) as a job of `kind` and return its handle.
    ///
    /// `job_id` is filled in (a UUID v7) when absent and `reply_to` is always this
    /// connection's own new inbox. With `tenant`, the body's tenant is replaced by it and,
    /// when the deployment takes tenants from subjects, the job goes to
    /// `<job subject>.<tenant>`. `headers` (e.g. `traceparent`) ride on the message.
    pub async fn submit(
        &self,
        kind: JobKind,
        mut job: serde_json::Value,
        tenant: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<JobHandle, ClientError> {
        let obj = job
            .as_object_mut()
            .ok_or_else(|| ClientError::BadJob("not an object".into()))?;
        let job_id = match obj.get("job_id") {
            None | Some(serde_json::Value::Null) => {
                let id = Uuid::now_v7();
                obj.insert("job_id".into(), id.to_string().into());
                id
            }
            Some(v) => v
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| ClientError::BadJob("job_id must be a UUID string".into()))?,
        };
        let reply_to = self.nats.new_inbox();
        obj.insert("reply_to".into(), reply_to.clone().into());
        let mut subject = self.config.job_subject(kind);
        if let Some(tenant) = tenant {
            obj.insert("tenant".into(), tenant.into());
            if self.config.tenant_from_subject {
                subject = format!("{subject}.{tenant}");
            }
        }
        let timeout = obj
            .get("timeout_ms")
            .and_then(|v| v.as_u64())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(120));
        let payload = serde_json::to_vec(&job).map_err(|e| ClientError::BadJob(e.to_string()))?;

        // Subscribe first: no event can be published before we listen.
        let events = self
            .nats
            .subscribe(reply_to)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let mut publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(job_id.to_string());
        for (name, value) in headers {
            publish = publish.header(*name, *value);
        }
        self.js
            .send_publish(subject, publish)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?
            .await
            .map_err(|e| ClientError::NotAccepted(e.to_string()))?;
        Ok(JobHandle {
            client: self.clone(),
            job_id,
            events,
            deadline: tokio::time::Instant::now() + timeout + WAIT_MARGIN,
            done: false,
        })
    }

    /// The stored result of `job_id`, if any.
    pub async fn stored_result(&self, job_id: Uuid) -> Result<Option<ResultEvent>, ClientError> {
        let stream = self
            .js
            .get_stream_no_info(&self.config.results_stream)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        match stream
            .direct_get_last_for_subject(self.config.result_subject(&job_id))
            .await
        {
            Ok(msg) => serde_json::from_slice(&msg.payload)
                .map(Some)
                .map_err(|e| ClientError::Nats(format!("a stored result is not JSON: {e}"))),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(ClientError::Nats(e.to_string())),
        }
    }

    /// Ask the fleet to cancel `job_id` (stored in the cancel stream).
    pub async fn cancel(&self, job_id: Uuid) -> Result<(), ClientError> {
        crate::cancel::request(&self.js, &self.config, job_id)
            .await
            .map_err(ClientError::Nats)
    }
}

/// A submitted job: its events as they arrive, then its result.
pub struct JobHandle {
    client: Client,
    job_id: Uuid,
    events: async_nats::Subscriber,
    deadline: tokio::time::Instant,
    done: bool,
}

impl JobHandle {
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    /// The next event: chunks (of every attempt; a chunk's `attempt` says which), then the
    /// result, then `None`. A result missed live (the subscription ended, or the deadline
    /// passed) is read from the results stream.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        if self.done {
            return None;
        }
        loop {
            let msg = match tokio::time::timeout_at(self.deadline, self.events.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) | Err(_) => break,
            };
            match event_of(&msg.payload) {
                Some(Event::Result(r)) if r.job_id == self.job_id => {
                    self.done = true;
                    return Some(Ok(Event::Result(r)));
                }
                Some(Event::Chunk(c)) if c.job_id == self.job_id => {
                    return Some(Ok(Event::Chunk(c)));
                }
                _ => continue,
            }
        }
        self.done = true;
        Some(match self.client.stored_result(self.job_id).await {
            Ok(Some(r)) => Ok(Event::Result(Box::new(r))),
            Ok(None) => Err(ClientError::NoResult),
            Err(e) => Err(e),
        })
    }

    /// Skip the chunks and return the result.
    pub async fn result(mut self) -> Result<ResultEvent, ClientError> {
        while let Some(event) = self.next().await {
            if let Event::Result(r) = event? {
                return Ok(*r);
            }
        }
        Err(ClientError::NoResult)
    }

    /// Ask the fleet to cancel this job.
    pub async fn cancel(&self) -> Result<(), ClientError> {
        self.client.cancel(self.job_id).await
    }
}

/// A chunk or result event; anything else (or garbage) is `None`.
fn event_of(payload: &[u8]) -> Option<Event> {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    match serde_json::from_slice::<Kind>(payload).ok()?.kind {
        "chunk" => serde_json::from_slice(payload).ok().map(Event::Chunk),
        "result" => serde_json::from_slice(payload)
            .ok()
            .map(|r| Event::Result(Box::new(r))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_told_apart_by_their_type_and_garbage_is_skipped() {
        let chunk = br#"{"type":"chunk","job_id":"0192f0c4-0000-7000-8000-000000000000","trace_id":"t","seq":0,"attempt":1,"provider":"p","model":"m","delta":"Hi"}"#;
        match event_of(chunk) {
            Some(Event::Chunk(c)) => assert_eq!((c.delta.as_str(), c.attempt), ("Hi", 1)),
            other => panic!("not a chunk: {other:?}"),
        }
        assert!(event_of(b"not json").is_none());
        assert!(event_of(br#"{"type":"other"}"#).is_none());
        assert!(event_of(br#"{"type":"result"}"#).is_none());
    }
}
