//! The orchestrator side of the contract: publish a job, follow its events, get its result.
//! Used by `llm-worker submit` and the HTTP gateway; it knows nothing about providers.
//!
//! - The job is published with `Nats-Msg-Id: <job_id>` after its reply subject is
//!   subscribed (no event can be missed for lack of a listener). A publish that fails in a
//!   transient way (a timeout, a reconnect, the stream briefly unavailable) is retried with
//!   the same id within [`PUBLISH_PATIENCE`]: JetStream drops a duplicate inside its window,
//!   so a retry never makes a second job.
//! - Events: chunks as they arrive, then the result. When a provider fails mid-answer and a
//!   later attempt takes over, [`Event::Restart`] says so before that attempt's first chunk
//!   (the text so far is void, [`JobHandle::text`] starts over); chunks of an older attempt
//!   that arrive late are dropped.
//! - A result missed live (a reconnect, a slow subscriber whose messages NATS dropped) is read
//!   from `LLM_RESULTS`: after [`IDLE_POLL`] without an event, and at the deadline.
//! - Job ids are global, results are not: a stored result is delivered only to the tenant and
//!   kind that published the job. A caller-chosen `job_id` whose stored result is another
//!   tenant's, or whose publish JetStream acknowledges as a duplicate of a job that is not the
//!   caller's (the queued message, or its stored result, says whose it is), is
//!   [`ClientError::Conflict`]: nothing is waited on, nothing is cancelled.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use backon::{ExponentialBuilder, Retryable as _};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::NatsConfig;
use crate::contract::JobKind;
use crate::contract::ResultEvent;

/// How long after the job's own deadline the client still waits for the live result before
/// it reads the stored one.
pub const WAIT_MARGIN: Duration = Duration::from_secs(5);
/// Without an event for this long, the client looks for a stored result.
pub const IDLE_POLL: Duration = Duration::from_secs(2);
/// How long a publish is retried (same id) before the submit fails.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

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
    #[error("no result within the job's deadline")]
    NoResult,
    /// [`JobHandle::wait`] gave up.
    #[error("no result within {0:?}")]
    Waited(Duration),
    /// The job id belongs to another job (another tenant's, or another kind's).
    #[error("job_id {0} is already used by another job; publish this job with a new id")]
    Conflict(Uuid),
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
    /// Text of the answer (empty on a chunk carrying a piece of a tool call).
    #[serde(default)]
    pub delta: String,
    /// A piece of a tool call: its id and name first, then fragments of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call: Option<crate::contract::ToolCallChunk>,
}

/// One event of a job, as the client sees it.
#[derive(Debug, Clone)]
// A chunk is the common event: boxing it would allocate per event to save the rare others'
// bytes.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// Text of the current attempt.
    Chunk(Chunk),
    /// A later provider call took over: the text of earlier attempts is void.
    Restart { attempt: u32 },
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
        let nats = crate::nats::connect(config).await?;
        let mut config = config.clone();
        crate::nats::keep_earlier_names(&jetstream::new(nats.clone()), &mut config).await;
        let client = Client::with_connection(nats, &config);
        crate::nats::ensure_streams(&client.js, &config).await?;
        Ok(client)
    }

    /// A client over a connection made elsewhere (its own options: capacity, callbacks).
    pub fn with_connection(nats: async_nats::Client, config: &NatsConfig) -> Client {
        Client {
            js: jetstream::new(nats.clone()),
            nats,
            config: Arc::new(config.clone()),
        }
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// The bytes of a picture an image job's result names (CONTRACT.md section 8), read
    /// from its bucket and checked against the result's size and SHA-256.
    pub async fn image_bytes(
        &self,
        image: &crate::contract::ImageObject,
    ) -> Result<Vec<u8>, ClientError> {
        let nats = |e: String| ClientError::Nats(e);
        let store = crate::image_store::ImageStore::existing(&self.js, &image.bucket)
            .await
            .map_err(nats)?;
        let max = usize::try_from(image.bytes).unwrap_or(usize::MAX);
        let bytes = store
            .read(&image.object, max)
            .await
            .map_err(nats)?
            .ok_or_else(|| {
                nats(format!(
                    "{} is not in {} (expired?)",
                    image.object, image.bucket
                ))
            })?;
        if crate::image_store::sha256_hex(&bytes) != image.sha256 {
            return Err(nats(format!(
                "{} does not match the result's sha256",
                image.object
            )));
        }
        Ok(bytes)
    }

    /// A picture an image job's result names, as a reader of its bytes (for serving it
    /// without holding it whole); `None` when it is gone (expired).
    pub async fn image_reader(
        &self,
        image: &crate::contract::ImageObject,
    ) -> Result<Option<async_nats::jetstream::object_store::Object>, ClientError> {
        let store = crate::image_store::ImageStore::existing(&self.js, &image.bucket)
            .await
            .map_err(ClientError::Nats)?;
        store.reader(&image.object).await.map_err(ClientError::Nats)
    }

    /// Publish `job` (a JSON object) as a job of `kind` and return its handle.
    ///
    /// `job_id` is filled in (a UUID v7) when absent and `reply_to` is always this
    /// connection's own new inbox. With `tenant`, the body's tenant is replaced by it and,
    /// when the deployment takes tenants from subjects, the job goes to
    /// `<job subject>.<tenant>`. `headers` (e.g. `traceparent`) ride on the message.
    ///
    /// A `job_id` the caller chose that names another tenant's (or kind's) job is
    /// [`ClientError::Conflict`]; one that names the caller's own earlier job follows it.
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
        let (job_id, chosen) = match obj.get("job_id") {
            None | Some(serde_json::Value::Null) => {
                let id = Uuid::now_v7();
                obj.insert("job_id".into(), id.to_string().into());
                (id, false)
            }
            Some(v) => (
                v.as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or_else(|| ClientError::BadJob("job_id must be a UUID string".into()))?,
                true,
            ),
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
        // Whose job this is, as a worker will see it.
        let owner = obj
            .get("tenant")
            .and_then(|t| t.as_str())
            .unwrap_or("default")
            .to_string();
        let timeout = obj
            .get("timeout_ms")
            .and_then(|v| v.as_u64())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(120));
        let payload = serde_json::to_vec(&job).map_err(|e| ClientError::BadJob(e.to_string()))?;
        let mut handle = JobHandle {
            client: self.clone(),
            kind,
            tenant: owner,
            job_id,
            events: None,
            deadline: tokio::time::Instant::now() + timeout + WAIT_MARGIN,
            done: false,
            fresh: false,
            look_now: false,
            attempt: 0,
            pending: None,
            text: String::new(),
        };

        // A chosen id may name a job answered long ago (past the duplicate window): its
        // stored result says whose it is, before anything is published.
        if chosen && let Some(stored) = self.stored_result(job_id).await? {
            if !handle.owns(&stored) {
                return Err(ClientError::Conflict(job_id));
            }
            handle.look_now = true;
            return Ok(handle);
        }

        // Subscribe first: no event can be published before we listen.
        let events = self
            .nats
            .subscribe(reply_to)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let payload = bytes::Bytes::from(payload);
        let tries = std::sync::atomic::AtomicU32::new(0);
        let publish = || {
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(job_id.to_string());
            for (name, value) in headers {
                message = message.header(*name, *value);
            }
            let subject = subject.clone();
            async move { self.js.send_publish(subject, message).await?.await }
        };
        let ack = publish
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_jitter()
                    .with_total_delay(Some(PUBLISH_PATIENCE))
                    .without_max_times(),
            )
            .when(|e| transient(e.kind()))
            .notify(|e, after| {
                tracing::warn!(%job_id, error = %e, ?after, "publishing the job failed; retrying with the same id");
            })
            .await
            .map_err(|e| ClientError::NotAccepted(e.to_string()))?;
        // A retried publish may have been stored by an earlier try: then the duplicate is
        // this call's own job.
        let retried = tries.load(std::sync::atomic::Ordering::Relaxed) > 1;
        if ack.duplicate {
            if !self.owned(&handle, ack.sequence, retried).await? {
                return Err(ClientError::Conflict(job_id));
            }
            handle.fresh = retried;
        } else {
            handle.fresh = true;
        }
        handle.events = Some(events);
        Ok(handle)
    }

    /// Whether the job JetStream stored at `sequence` (the original of a duplicate publish)
    /// is `handle`'s: the queued message says whose it is; once it is consumed, its stored
    /// result does. When neither can be read (a tenant's NATS user may not read queued
    /// jobs) and nothing is stored yet, only a retried publish is taken as the caller's own.
    async fn owned(
        &self,
        handle: &JobHandle,
        sequence: u64,
        retried: bool,
    ) -> Result<bool, ClientError> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        let jobs = self
            .js
            .get_stream_no_info(&self.config.jobs_stream)
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let unreadable = match jobs.get_raw_message(sequence).await {
            Ok(queued) => return Ok(handle.owns_queued(&queued, &self.config)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the queued job of a duplicate id");
                true
            }
        };
        Ok(match self.stored_result(handle.job_id).await? {
            Some(stored) => handle.owns(&stored),
            None => unreadable && retried,
        })
    }

    /// A handle on a job of `tenant` (`None`: `default`) submitted earlier (by this process
    /// before a restart, or by another): no live events, its result read from `LLM_RESULTS`
    /// once stored, waiting at most `timeout`. A stored result of another tenant or kind is
    /// [`ClientError::Conflict`].
    pub fn attach(
        &self,
        kind: JobKind,
        job_id: Uuid,
        tenant: Option<&str>,
        timeout: Duration,
    ) -> JobHandle {
        JobHandle {
            client: self.clone(),
            kind,
            tenant: tenant.unwrap_or("default").to_string(),
            job_id,
            events: None,
            deadline: tokio::time::Instant::now() + timeout,
            done: false,
            fresh: false,
            look_now: true,
            attempt: 0,
            pending: None,
            text: String::new(),
        }
    }

    /// How many worker processes of this deployment consume jobs of `kind`: those that
    /// answer the NATS service API's `$SRV.INFO.llm-worker` within `wait` with an endpoint on
    /// this deployment's subject. Returns as soon as one does (`1`), so a running fleet costs
    /// one round trip; `0` after `wait` means no worker is running (or NATS lost the answers).
    pub async fn workers(&self, kind: JobKind, wait: Duration) -> Result<usize, ClientError> {
        #[derive(Deserialize)]
        struct Info {
            #[serde(default)]
            endpoints: Vec<Endpoint>,
        }
        #[derive(Deserialize)]
        struct Endpoint {
            subject: String,
        }
        let inbox = self.nats.new_inbox();
        let mut answers = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        self.nats
            .publish_with_reply(
                format!("$SRV.INFO.{}", crate::contract::SERVICE_NAME),
                inbox,
                bytes::Bytes::new(),
            )
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let subject = self.config.job_subject(kind);
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
            let serves = serde_json::from_slice::<Info>(&msg.payload)
                .is_ok_and(|i| i.endpoints.iter().any(|e| e.subject == subject));
            if serves {
                return Ok(1);
            }
        }
        Ok(0)
    }

    /// The stored result of `job_id`, if any, whoever's it is (an operator's view: a
    /// tenant's caller goes through [`JobHandle`], which checks the owner).
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

    /// Ask the fleet to cancel `tenant`'s job `job_id` (stored in the cancel stream); it
    /// takes effect only on a job of that tenant.
    pub async fn cancel(&self, tenant: &str, job_id: Uuid) -> Result<(), ClientError> {
        crate::cancel::request(&self.js, &self.config, tenant, job_id)
            .await
            .map_err(ClientError::Nats)
    }
}

/// Whether a failed publish may succeed if tried again with the same id.
fn transient(kind: async_nats::jetstream::context::PublishErrorKind) -> bool {
    use async_nats::jetstream::context::PublishErrorKind as K;
    !matches!(
        kind,
        K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence
    )
}

/// A submitted job: its events as they arrive, then its result.
pub struct JobHandle {
    client: Client,
    kind: JobKind,
    /// The tenant the job belongs to: only its results are delivered.
    tenant: String,
    job_id: Uuid,
    /// Live events (none for an attached job).
    events: Option<async_nats::Subscriber>,
    deadline: tokio::time::Instant,
    done: bool,
    /// This call's publish stored the job (not an earlier one under the same id).
    fresh: bool,
    /// Look for a stored result before waiting (attached jobs).
    look_now: bool,
    /// The newest attempt seen in chunks.
    attempt: u32,
    /// A chunk to yield after the restart event announcing it.
    pending: Option<Chunk>,
    /// Text of the current attempt so far.
    text: String,
}

impl JobHandle {
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    /// Whether this handle's own publish stored the job (not an earlier publish under the
    /// same id, such as a retry of a request that is still running): only then is it this
    /// caller's to cancel when it stops waiting.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Whether `result` is this job's: same tenant, same kind.
    fn owns(&self, result: &ResultEvent) -> bool {
        result.job_id == self.job_id && result.tenant == self.tenant && result.job_kind == self.kind
    }

    /// Whether a queued job message is this job's: its id, its kind's subject, its tenant
    /// (the subject's token with tenants bound to subjects, else the body's).
    fn owns_queued(
        &self,
        queued: &async_nats::jetstream::message::StreamMessage,
        nats: &NatsConfig,
    ) -> bool {
        let id = queued
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_string());
        if id.as_deref() != Some(self.job_id.to_string().as_str()) {
            return false;
        }
        let subject = queued.subject.as_str();
        let Some(rest) = subject.strip_prefix(nats.job_subject(self.kind).as_str()) else {
            return false;
        };
        let tenant = if nats.tenant_from_subject {
            rest.strip_prefix('.').map(str::to_string)
        } else if rest.is_empty() {
            #[derive(Deserialize)]
            struct Peek {
                tenant: Option<String>,
            }
            serde_json::from_slice::<Peek>(&queued.payload)
                .ok()
                .map(|p| p.tenant.unwrap_or_else(|| "default".into()))
        } else {
            None
        };
        tenant.as_deref() == Some(self.tenant.as_str())
    }

    /// The stored result, if there is one and it is this job's; another's is a conflict.
    async fn stored(&self) -> Result<Option<ResultEvent>, ClientError> {
        match self.client.stored_result(self.job_id).await? {
            Some(r) if self.owns(&r) => Ok(Some(r)),
            Some(_) => Err(ClientError::Conflict(self.job_id)),
            None => Ok(None),
        }
    }

    /// The text of the current attempt received so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The next event: chunks of the current attempt ([`Event::Restart`] when a later one
    /// takes over), then the result, then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        if self.done {
            return None;
        }
        if let Some(chunk) = self.pending.take() {
            return Some(Ok(self.accept(chunk)));
        }
        loop {
            let wait = if std::mem::take(&mut self.look_now) {
                tokio::time::Instant::now()
            } else {
                (tokio::time::Instant::now() + IDLE_POLL).min(self.deadline)
            };
            let next = match self.events.as_mut() {
                Some(events) => tokio::time::timeout_at(wait, events.next()).await,
                None => tokio::time::timeout_at(wait, std::future::pending()).await,
            };
            let msg = match next {
                Ok(Some(msg)) => msg,
                // The subscription ended (the connection closed): only the store can tell.
                Ok(None) => break,
                Err(_) if tokio::time::Instant::now() >= self.deadline => break,
                // Quiet for a while: the live result may have been lost.
                Err(_) => match self.stored().await {
                    Ok(Some(r)) => return Some(Ok(self.finish(r))),
                    Ok(None) => continue,
                    Err(ClientError::Conflict(id)) => {
                        self.done = true;
                        return Some(Err(ClientError::Conflict(id)));
                    }
                    Err(_) => continue,
                },
            };
            match event_of(&msg.payload) {
                Some(Event::Result(r)) if self.owns(&r) => {
                    return Some(Ok(self.finish(*r)));
                }
                Some(Event::Chunk(c)) if c.job_id == self.job_id => {
                    if c.attempt < self.attempt {
                        continue;
                    }
                    if c.attempt > self.attempt && self.attempt != 0 {
                        let attempt = c.attempt;
                        self.pending = Some(c);
                        self.text.clear();
                        return Some(Ok(Event::Restart { attempt }));
                    }
                    return Some(Ok(self.accept(c)));
                }
                _ => continue,
            }
        }
        self.done = true;
        Some(match self.stored().await {
            Ok(Some(r)) => Ok(self.finish(r)),
            Ok(None) => Err(ClientError::NoResult),
            Err(e) => Err(e),
        })
    }

    fn accept(&mut self, chunk: Chunk) -> Event {
        self.attempt = chunk.attempt;
        self.text.push_str(&chunk.delta);
        Event::Chunk(chunk)
    }

    fn finish(&mut self, result: ResultEvent) -> Event {
        self.done = true;
        self.events = None;
        Event::Result(Box::new(result))
    }

    /// [`Self::result`], giving up after `timeout`.
    pub async fn wait(self, timeout: Duration) -> Result<ResultEvent, ClientError> {
        tokio::time::timeout(timeout, self.result())
            .await
            .unwrap_or(Err(ClientError::Waited(timeout)))
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

    /// Ask the fleet to cancel this job (as its tenant: it cannot touch another's).
    pub async fn cancel(&self) -> Result<(), ClientError> {
        self.client.cancel(&self.tenant, self.job_id).await
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
