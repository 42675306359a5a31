//! `llm-worker gateway`: the HTTP front door. It turns requests into jobs on `LLM_JOBS`
//! (through [`crate::client`]) and answers from the job's events; it never calls a provider.
//! Stateless: run as many as you like behind a load balancer.
//!
//! - [`openai`]: OpenAI-compatible `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.
//! - [`seed`]: the seed API (`/v1/generate`, `/v1/embed`: the contract's job JSON in, its
//!   result JSON out; `/v1/status`).
//! - [`keys`]: bearer API keys -> tenants (`llm_api_keys`). The tenant of every job comes
//!   from its key, never from the request body.
//! - [`error`]: OpenAI's error shape and the status of each job error code.
//! - [`models`]: what a request's `model` names.
//!
//! Bounds: body size (`gateway.max_body_bytes`, 413), requests at once
//! (`gateway.max_concurrent`, 429 with `Retry-After`), and a deadline per request
//! (`gateway.request_timeout_ms`, the job's `timeout_ms`). A client that disconnects before
//! its answer cancels its job.

pub mod error;
pub mod keys;
pub(crate) mod models;
pub(crate) mod openai;
pub(crate) mod seed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{Client, ClientError, Event};
use crate::config::{Config, GatewayConfig};
use crate::job::JobKind;
use error::ApiError;

/// Events buffered between a job and a slow HTTP client.
const EVENT_BUFFER: usize = 64;

/// What every handler shares.
pub(crate) struct Gateway {
    client: Client,
    keys: keys::Keys,
    catalog: models::Catalog,
    slots: Arc<Semaphore>,
    config: GatewayConfig,
    metrics: crate::metrics::Metrics,
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
    let pool = crate::app::connect_db(&config).await?.ok_or_else(|| {
        anyhow::anyhow!("the gateway needs Postgres for its API keys: set DATABASE_URL")
    })?;
    let client = Client::connect(&config.nats).await?;
    let gateway = Arc::new(Gateway {
        keys: keys::Keys::new(pool, Duration::from_secs(config.gateway.key_cache_secs)),
        catalog: models::Catalog::new(&config),
        slots: Arc::new(Semaphore::new(config.gateway.max_concurrent)),
        config: config.gateway.clone(),
        client,
        metrics: crate::metrics::Metrics::new(false),
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let app = router(gateway);
    let shutdown = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    tracing::info!(%addr, "gateway listening");
    Ok(Running { addr, stop, task })
}

fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
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
        // The extractor's own limit; bodies over it become our 413 (see `Gateway::body`).
        .layer(DefaultBodyLimit::max(limit))
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

/// A request let in: its slot and its tenant.
pub(crate) struct Admitted {
    pub tenant: String,
    _slot: OwnedSemaphorePermit,
}

/// A job submitted for a request.
pub(crate) struct Submitted {
    pub job_id: Uuid,
    pub trace_id: String,
    /// Its events; dropping this (the client went away) cancels the job.
    pub events: mpsc::Receiver<Result<Event, ClientError>>,
}

impl Gateway {
    /// A free slot (else 429) and a valid key (else 401).
    pub(crate) async fn admit(&self, headers: &HeaderMap) -> Result<Admitted, ApiError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::busy())?;
        let key = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or_else(ApiError::unauthorized)?;
        let tenant = self.keys.tenant_of(key).await.map_err(|e| {
            tracing::warn!(error = %e, "API key lookup failed");
            ApiError::unavailable("API keys cannot be checked right now (Postgres)")
        })?;
        Ok(Admitted {
            tenant: tenant.ok_or_else(ApiError::unauthorized)?,
            _slot: slot,
        })
    }

    /// The request body as `T`: 413 over the size bound, 400 when it is not `T`.
    pub(crate) fn body<T: serde::de::DeserializeOwned>(
        &self,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        let bytes = body.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(self.config.max_body_bytes)
            } else {
                ApiError::invalid(format!("the request body could not be read: {r}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}")))
    }

    /// The job's deadline: what the request asks for, at most `gateway.request_timeout_ms`.
    pub(crate) fn timeout_ms(&self, asked: Option<u64>) -> u64 {
        asked.map_or(self.config.request_timeout_ms, |t| {
            t.min(self.config.request_timeout_ms)
        })
    }

    /// Publish `job` for `tenant` and follow its events in a task of its own. The job's
    /// trace id is the W3C trace id of a valid `traceparent` header (which also rides on the
    /// job message), else the body's `trace_id`, else the job id.
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
            .and_then(|v| Some((v, crate::telemetry::w3c_trace_id(v)?)));
        let mut extra = Vec::new();
        if let Some((header, trace)) = traceparent {
            job["trace_id"] = trace.into();
            extra.push(("traceparent", header));
        }
        let body_trace = job
            .get("trace_id")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let mut handle = self
            .client
            .submit(kind, job, Some(tenant), &extra)
            .await
            .map_err(|e| match e {
                ClientError::BadJob(why) => ApiError::invalid(why),
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
                        if tx.send(event).await.is_err() || last {
                            if !last {
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

async fn cancel(handle: &crate::client::JobHandle) {
    tracing::info!(job_id = %handle.job_id(), "the client went away: cancelling its job");
    if let Err(e) = handle.cancel().await {
        tracing::warn!(job_id = %handle.job_id(), error = %e, "cancelling failed");
    }
}

impl Submitted {
    /// The job's result, skipping its chunks.
    pub(crate) async fn result(&mut self) -> Result<crate::event::ResultEvent, ApiError> {
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
