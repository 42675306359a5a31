//! The seed API, kept for the system this worker replaced: `POST /v1/generate`,
//! `POST /v1/embed` and `POST /v1/image/generate` take the contract's job JSON and answer with its result JSON (HTTP 200
//! when `status` is `ok`, else the status its error code maps to, see [`super::error`]);
//! `POST /v1/generate` with `"stream": true` answers with server-sent events, each `data:`
//! one event of the contract (chunks, then the result). `GET /v1/status`: the fleet's health
//! from the workers' status replies.
//!
//! The gateway sets `tenant` (from the key) and `reply_to` (its own inbox); a body
//! `timeout_ms` is capped at `gateway.request_timeout_ms`. A `job_id` in the body is kept
//! (it is the dedup key).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::net::SocketAddr;

use super::error::ApiError;
use super::{Gateway, Submitted};
use crate::client::Event;
use crate::contract::JobKind;
use crate::contract::{ResultEvent, Status};

/// How long `/v1/status` waits for workers to answer.
const STATUS_WAIT: Duration = Duration::from_millis(500);

pub(crate) async fn generate(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(gw, JobKind::Generate, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn embed(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(gw, JobKind::Embed, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn image(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(gw, JobKind::Image, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run(
    gw: Arc<Gateway>,
    kind: JobKind,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admitted = gw.admit(&headers, peer).await?;
    let mut job: Value = gw.body(&headers, body).await?;
    let Some(obj) = job.as_object_mut() else {
        return Err(ApiError::invalid("a job must be a JSON object"));
    };
    let asked = obj.get("timeout_ms").and_then(Value::as_u64);
    obj.insert("timeout_ms".into(), gw.timeout_ms(asked).into());
    // Over HTTP a job streams only when it says so.
    let stream = kind == JobKind::Generate && obj.get("stream") == Some(&Value::Bool(true));
    if kind == JobKind::Generate {
        obj.insert("stream".into(), stream.into());
    }
    let mut job = gw.submit(kind, job, &admitted.tenant, &headers).await?;
    if !stream {
        let result = match job.result().await {
            Ok(r) => r,
            Err(e) => return Ok(job.tag(e.into_response())),
        };
        return Ok(job.tag(answer(&result)));
    }
    let tagged = job.tag(().into_response());
    let Submitted { events, .. } = job;
    let events = futures::stream::unfold(
        (events, false, admitted),
        |(mut events, ended, admitted)| async move {
            if ended {
                return None;
            }
            // Chunks carry their attempt: a seed client sees restarts in them.
            let (data, last) = loop {
                break match events.recv().await {
                    Some(Ok(Event::Chunk(c))) => (serde_json::to_string(&c).ok()?, false),
                    Some(Ok(Event::Restart { .. })) => continue,
                    Some(Ok(Event::Result(r))) => (serde_json::to_string(&r).ok()?, true),
                    Some(Err(e)) => (super::client_error(e).body().to_string(), true),
                    None => (ApiError::no_result().body().to_string(), true),
                };
            };
            Some((
                Ok::<_, Infallible>(SseEvent::default().data(data)),
                (events, last, admitted),
            ))
        },
    );
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().extend(tagged.headers().clone());
    Ok(response)
}

/// The result JSON, with the HTTP status of its error code.
fn answer(result: &ResultEvent) -> Response {
    let status = match result.status {
        Status::Ok => StatusCode::OK,
        Status::Error => ApiError::of_result(result, chrono::Utc::now()).status,
    };
    (status, axum::Json(result)).into_response()
}

/// `GET /v1/status`: the workers that answer within half a second (503 when none does).
/// An admin key sees each worker's whole provider health; a tenant's key sees, per
/// configured route entry, the worst state any worker reports, and never a model name a job
/// chose.
pub(crate) async fn status(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let admitted = match gw.admit(&headers, peer).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let workers =
        match crate::status::collect(gw.client.nats(), gw.client.config(), STATUS_WAIT).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "status request failed");
                return ApiError::unavailable("the status request failed (NATS)").into_response();
            }
        };
    let code = if workers.is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = if admitted.admin {
        json!({"workers": workers.len(), "healthy": !workers.is_empty(), "status": workers})
    } else {
        json!({
            "workers": workers.len(),
            "healthy": !workers.is_empty(),
            "providers": gw.catalog.entry_states(&workers),
        })
    };
    (code, axum::Json(body)).into_response()
}
