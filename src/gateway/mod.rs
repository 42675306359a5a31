//! `llm-worker gateway`: the HTTP front door. It turns requests into jobs on `LLM_JOBS`
//! (through [`crate::client`]) and answers from the job's events; it never calls a provider.
//! Stateless: run as many as you like behind a load balancer.
//!
//! - `openai`: OpenAI-compatible `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.
//! - `seed`: the seed API (`/v1/generate`, `/v1/embed`: the contract's job JSON in, its
//!   result JSON out; `/v1/status`).
//! - [`keys`]: bearer API keys -> tenants (`llm_api_keys`). The tenant of every job comes
//!   from its key, never from the request body.
//! - [`error`]: OpenAI's error shape and the status of each job error code.
//! - `models`: what a request's `model` names.
//! - `serve`: the HTTP/1 server with header, write and idle timeouts and a connection cap.
//! - `dashboard`: the usage page at `/dashboard` for admin keys (`gateway.dashboard`).
//!
//! Tenants are kept apart: a request is answered only with its own tenant's job (a
//! `job_id` naming another tenant's job is 409, never waited on), a cancel (the client went
//! away, or the deadline passed) reaches only a job this request published, and a provider's
//! error text never reaches the client (only codes, see `error::redact`).
//!
//! Order of a request: refused-key limit per client address (429), key (401), the tenant's
//! share of the request slots and then a slot (429), only then the body: its size (413) and
//! its deadline (408). Every job carries the request's deadline (`expires_in_ms`), so a job
//! still queued when its client got 504 is answered `timeout` without a provider call; the
//! gateway also cancels it.

pub(crate) mod chat_request;
pub(crate) mod dashboard;
pub mod error;
pub(crate) mod images;
pub mod keys;
pub(crate) mod models;
pub(crate) mod openai;
pub(crate) mod seed;
pub(crate) mod serve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{Client, ClientError, Event};
use crate::config::{Config, GatewayConfig};
use crate::contract::JobKind;
use error::ApiError;

/// Events buffered between a job and a slow HTTP client.
const EVENT_BUFFER: usize = 64;

/// What every handler shares.
pub(crate) struct Gateway {
    client: Client,
    keys: keys::Keys,
    bad_keys: keys::BadKeys,
    catalog: models::Catalog,
    slots: Arc<Semaphore>,
    /// Each tenant's share of `slots` (tenants come from keys: a bounded set).
    tenant_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    config: GatewayConfig,
    /// `limits.max_name_bytes`: the longest trace id a request may set.
    max_name_bytes: usize,
    metrics: crate::metrics::Metrics,
    /// The usage database (API keys, the dashboard's figures).
    pool: sqlx::PgPool,
}

/// A running gateway (for tests and the binary).
pub struct Running {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stop accepting requests, finish the open ones, and return.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Wait until the server stops (after the stop token fires).
    pub async fn wait(self) -> anyhow::Result<()> {
        Ok(self.task.await??)
    }
}

/// Connect to NATS and Postgres (applying migrations), bind `listen`, and serve.
pub async fn start(config: Config, listen: &str) -> anyhow::Result<Running> {
    let pool = crate::usage::connect(&config).await?.ok_or_else(|| {
        anyhow::anyhow!("the gateway needs Postgres for its API keys: set DATABASE_URL")
    })?;
    let client = Client::connect(&config.nats).await?;
    let g = &config.gateway;
    let gateway = Arc::new(Gateway {
        keys: keys::Keys::new(pool.clone(), Duration::from_secs(g.key_cache_secs)),
        pool,
        bad_keys: keys::BadKeys::new(g.bad_keys_per_minute),
        catalog: models::Catalog::new(&config),
        slots: Arc::new(Semaphore::new(g.max_concurrent)),
        tenant_slots: Mutex::new(HashMap::new()),
        config: g.clone(),
        max_name_bytes: config.limits.max_name_bytes,
        client,
        metrics: crate::metrics::Metrics::new(false),
    });
    let bounds = serve::Bounds {
        header_timeout: Duration::from_millis(g.header_timeout_ms),
        write_timeout: Duration::from_millis(g.write_timeout_ms),
        max_connections: g.max_connections,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let app = router(gateway);
    let task = tokio::spawn(serve::serve(listener, app, bounds, stop.clone()));
    tracing::info!(%addr, "gateway listening");
    Ok(Running { addr, stop, task })
}

fn router(gateway: Arc<Gateway>) -> Router {
    let routes = if gateway.config.dashboard {
        dashboard::routes()
    } else {
        Router::new()
    };
    routes
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/images/generations", post(images::generations))
        .route("/v1/images/{job_id}/{file}", get(images::picture))
        .route("/v1/image/generate", post(seed::image))
        .route("/v1/generate", post(seed::generate))
        .route("/v1/embed", post(seed::embed))
        .route("/v1/status", get(seed::status))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(gateway.clone(), track))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such endpoint",
            )
        })
        .with_state(gateway)
}

/// Count every request by route and status, and time it to its response headers.
async fn track(
    State(gw): State<Arc<Gateway>>,
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let timer = gw.metrics.http_started();
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    timer.done(&route, response.status().as_u16());
    response
}

/// `GET /metrics` (no key needed: it holds no tenant's data).
async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        gw.metrics.encode(),
    )
        .into_response()
}

/// Ready while the NATS connection is up.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.client.nats().connection_state() {
        async_nats::connection::State::Connected => "ready".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "NATS is not connected").into_response(),
    }
}

/// A request let in: its tenant, and its slots (given back when it is answered).
pub(crate) struct Admitted {
    pub tenant: String,
    /// An operator's key.
    pub admin: bool,
    _slots: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A job submitted for a request.
pub(crate) struct Submitted {
    pub job_id: Uuid,
    pub trace_id: String,
    /// Its events; dropping this (the client went away) cancels the job.
    pub events: mpsc::Receiver<Result<Event, ClientError>>,
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
}

impl Gateway {
    /// A valid key (else 401; 429 for an address sending too many refused keys), then a slot
    /// of the key's tenant's share and one of the gateway's (else 429). Nothing of the body
    /// has been read yet.
    pub(crate) async fn admit(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<Admitted, ApiError> {
        let owner = self.owner(bearer(headers), peer).await?;
        let share = {
            let mut shares = self
                .tenant_slots
                .lock()
                .map_err(|_| ApiError::unavailable("the gateway is stopping"))?;
            shares
                .entry(owner.tenant.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.tenant_share())))
                .clone()
        };
        let tenant_slot = share
            .try_acquire_owned()
            .map_err(|_| ApiError::tenant_busy())?;
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::busy())?;
        Ok(Admitted {
            tenant: owner.tenant,
            admin: owner.admin,
            _slots: (tenant_slot, slot),
        })
    }

    /// Whose `key` is (else 401, or 503 when Postgres cannot say; 429 for an address that
    /// sent too many refused keys, without a lookup).
    pub(crate) async fn owner(
        &self,
        key: Option<&str>,
        peer: SocketAddr,
    ) -> Result<keys::Owner, ApiError> {
        let address = peer.ip();
        if let Some(secs) = self.bad_keys.blocked(address) {
            return Err(ApiError::too_many_bad_keys(secs));
        }
        let owner = match key {
            Some(key) => self.keys.owner_of(key).await.map_err(|e| {
                tracing::warn!(error = %e, "API key lookup failed");
                ApiError::unavailable("API keys cannot be checked right now (Postgres)")
            })?,
            None => None,
        };
        owner.ok_or_else(|| {
            self.bad_keys.refused(address);
            ApiError::unauthorized()
        })
    }

    /// The request body, read only now (after the key): 413 over the size bound (at once
    /// when `Content-Length` says so), 408 when it does not arrive within
    /// `gateway.body_timeout_ms`.
    pub(crate) async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        let declared = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let read = http_body_util::Limited::new(body, limit).collect();
        match tokio::time::timeout(Duration::from_millis(self.config.body_timeout_ms), read).await {
            Err(_) => Err(ApiError::body_timeout(self.config.body_timeout_ms)),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ApiError::too_large(limit))
            }
            Ok(Err(e)) => Err(ApiError::invalid(format!(
                "the request body could not be read: {e}"
            ))),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    /// The request body as `T` (400 when it is not), read as [`Self::read_body`] does.
    pub(crate) async fn body<T: serde::de::DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<T, ApiError> {
        let bytes = self.read_body(headers, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::invalid(format!(
                "the request body is not valid: {}",
                crate::job::clip_reason(&e.to_string())
            ))
        })
    }

    /// The job's deadline: what the request asks for, at most `gateway.request_timeout_ms`.
    pub(crate) fn timeout_ms(&self, asked: Option<u64>) -> u64 {
        asked.map_or(self.config.request_timeout_ms, |t| {
            t.min(self.config.request_timeout_ms)
        })
    }

    /// Publish `job` for `tenant` and follow its events in a task of its own. The job's
    /// trace id is the W3C trace id of a valid `traceparent` header (which also rides on the
    /// job message), else the body's `trace_id`, else the job id. The job expires with the
    /// request (`expires_in_ms` = its `timeout_ms`, or less if the body asks for less).
    pub(crate) async fn submit(
        &self,
        kind: JobKind,
        mut job: serde_json::Value,
        tenant: &str,
        headers: &HeaderMap,
    ) -> Result<Submitted, ApiError> {
        // A valid traceparent: its trace id names the job's trace, and it rides along.
        let traceparent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Some((v, crate::contract::w3c_trace_id(v)?)));
        let mut extra = Vec::new();
        if let Some((header, trace)) = traceparent {
            job["trace_id"] = trace.into();
            extra.push(("traceparent", header));
        }
        let body_trace = match job.get("trace_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) if t.len() <= self.max_name_bytes => Some(t.clone()),
            Some(serde_json::Value::String(t)) => {
                return Err(ApiError::invalid(format!(
                    "trace_id: {} bytes, more than the limit of {} (limits.max_name_bytes)",
                    t.len(),
                    self.max_name_bytes
                )));
            }
            Some(_) => return Err(ApiError::invalid("trace_id: must be a string")),
        };
        let timeout = job
            .get("timeout_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(self.config.request_timeout_ms);
        let expires = job
            .get("expires_in_ms")
            .and_then(serde_json::Value::as_u64)
            .map_or(timeout, |asked| asked.min(timeout));
        job["expires_in_ms"] = expires.into();
        let mut handle = self
            .client
            .submit(kind, job, Some(tenant), &extra)
            .await
            .map_err(|e| match e {
                ClientError::BadJob(why) => ApiError::invalid(why),
                ClientError::Conflict(id) => ApiError::conflict(id),
                other => {
                    tracing::warn!(error = %other, "publishing a job failed");
                    ApiError::unavailable("the job could not be published (NATS)")
                }
            })?;
        let job_id = handle.job_id();
        let trace_id = body_trace.unwrap_or_else(|| job_id.to_string());
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = handle.next() => {
                        let Some(event) = event else { return };
                        let last = matches!(event, Ok(Event::Result(_)) | Err(_));
                        // Gave up waiting (no result by the deadline): nobody will read it.
                        let gave_up = matches!(event, Err(ClientError::NoResult));
                        let event = event.map(|e| match e {
                            Event::Result(r) => Event::Result(Box::new(error::redact(*r))),
                            other => other,
                        });
                        if tx.send(event).await.is_err() || last {
                            if !last || gave_up {
                                cancel(&handle).await;
                            }
                            return;
                        }
                    }
                    () = tx.closed() => {
                        cancel(&handle).await;
                        return;
                    }
                }
            }
        });
        Ok(Submitted {
            job_id,
            trace_id,
            events: rx,
        })
    }
}

/// Cancel a job nobody waits for any more, if this request published it (a job_id that
/// names the tenant's own earlier job is not this request's to cancel).
async fn cancel(handle: &crate::client::JobHandle) {
    if !handle.is_fresh() {
        return;
    }
    tracing::info!(job_id = %handle.job_id(), "nobody waits for the job any more: cancelling it");
    if let Err(e) = handle.cancel().await {
        tracing::warn!(job_id = %handle.job_id(), error = %e, "cancelling failed");
    }
}

impl Submitted {
    /// The job's result, skipping its chunks.
    pub(crate) async fn result(&mut self) -> Result<crate::contract::ResultEvent, ApiError> {
        while let Some(event) = self.events.recv().await {
            match event {
                Ok(Event::Result(r)) => return Ok(*r),
                Ok(Event::Chunk(_) | Event::Restart { .. }) => {}
                Err(e) => return Err(client_error(e)),
            }
        }
        Err(ApiError::no_result())
    }

    /// `x-job-id` and `x-trace-id` on `response`.
    pub(crate) fn tag(&self, mut response: Response) -> Response {
        let h = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.job_id.to_string()) {
            h.insert("x-job-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.trace_id) {
            h.insert("x-trace-id", v);
        }
        response
    }
}

pub(crate) fn client_error(e: ClientError) -> ApiError {
    match e {
        ClientError::NoResult => ApiError::no_result(),
        other => {
            tracing::warn!(error = %other, "following a job failed");
            ApiError::unavailable("the job's answer could not be read (NATS)")
        }
    }
}
