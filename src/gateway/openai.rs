//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` (SSE with `data: [DONE]`,
//! or one JSON answer), `POST /v1/embeddings` (float or base64 vectors), `GET /v1/models`.
//!
//! A chat request becomes a generation job (`super::chat_request`); its answer comes back in
//! OpenAI's shape, tool calls included (`message.tool_calls`, streamed as
//! `delta.tool_calls`).
//!
//! Streaming: text is forwarded as the job's chunks arrive. When the provider fails
//! mid-answer and another attempt takes over, OpenAI's stream format cannot take back text
//! already sent: the gateway stops forwarding and, at the result, sends the rest of the
//! final answer if it continues what was sent (a retry that said the same), else an error
//! event (`stream_restarted`) ends the stream.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::SocketAddr;

use super::chat_request::{ChatRequest, StreamMode};
use super::error::ApiError;
use super::{Gateway, Submitted};
use crate::client::Event;
use crate::contract::JobKind;
use crate::contract::{ResultEvent, Status};

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat_inner(gw, peer, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    gw: Arc<Gateway>,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admitted = gw.admit(&headers, peer).await?;
    let request: ChatRequest = gw.body(&headers, body).await?;
    let (job, mode) = request.job(&gw)?;
    let mut job = gw
        .submit(JobKind::Generate, job, &admitted.tenant, &headers)
        .await?;
    if mode == StreamMode::Off {
        let result = match job.result().await {
            Ok(r) => r,
            Err(e) => return Ok(job.tag(e.into_response())),
        };
        let response = match result.status {
            Status::Ok => axum::Json(completion(&result)).into_response(),
            Status::Error => ApiError::of_result(&result, chrono::Utc::now()).into_response(),
        };
        return Ok(job.tag(response));
    }
    // Wait for the first event: a job that fails before any text gets a real HTTP status.
    let first = match job.events.recv().await {
        Some(Ok(Event::Result(r))) if r.status == Status::Error => {
            let response = ApiError::of_result(&r, chrono::Utc::now()).into_response();
            return Ok(job.tag(response));
        }
        Some(Ok(event)) => event,
        Some(Err(e)) => return Ok(job.tag(super::client_error(e).into_response())),
        None => return Ok(job.tag(ApiError::no_result().into_response())),
    };
    let stream = ChatStream::new(&job, mode == StreamMode::WithUsage);
    let tagged = job.tag(().into_response());
    let Submitted { events, .. } = job;
    let events = futures::stream::unfold(
        (Some(first), events, stream, admitted),
        |(mut first, mut events, mut stream, admitted)| async move {
            if stream.ended {
                return None;
            }
            let next = match first.take() {
                Some(e) => Some(Ok(e)),
                None => events.recv().await,
            };
            let out = stream.on(next);
            Some((
                futures::stream::iter(out.into_iter().map(Ok::<_, Infallible>)),
                (first, events, stream, admitted),
            ))
        },
    )
    .flatten();
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().extend(tagged.headers().clone());
    Ok(response)
}

/// Turns a job's events into chat completion chunks.
struct ChatStream {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    /// The attempt whose text is being forwarded, once one is.
    attempt: Option<u32>,
    next_seq: u64,
    /// Forwarding stopped (another attempt took over, or a chunk was lost): the rest comes
    /// from the result.
    live: bool,
    sent: String,
    /// Pieces of tool calls forwarded (they cannot be taken back either).
    tools_sent: bool,
    role_sent: bool,
    ended: bool,
}

impl ChatStream {
    fn new(job: &Submitted, include_usage: bool) -> ChatStream {
        ChatStream {
            id: format!("chatcmpl-{}", job.job_id.simple()),
            created: chrono::Utc::now().timestamp(),
            model: String::new(),
            include_usage,
            attempt: None,
            next_seq: 0,
            live: true,
            sent: String::new(),
            tools_sent: false,
            role_sent: false,
            ended: false,
        }
    }

    fn chunk(&mut self, delta: Value, finish: Option<&str>) -> SseEvent {
        let mut delta = delta;
        if !self.role_sent {
            delta["role"] = "assistant".into();
            self.role_sent = true;
        }
        let body = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        SseEvent::default().data(body.to_string())
    }

    fn error(&mut self, e: &ApiError) -> Vec<SseEvent> {
        self.ended = true;
        vec![SseEvent::default().data(e.body().to_string())]
    }

    /// The SSE events for the job's next event (`None`: its events ended without a result).
    fn on(&mut self, event: Option<Result<Event, crate::client::ClientError>>) -> Vec<SseEvent> {
        match event {
            Some(Ok(Event::Chunk(c))) => {
                let own = self.attempt.is_none_or(|a| a == c.attempt);
                if !self.live || !own || c.seq != self.next_seq {
                    self.live = false;
                    return Vec::new();
                }
                self.attempt = Some(c.attempt);
                self.next_seq = c.seq + 1;
                self.model = c.model;
                if let Some(t) = c.tool_call {
                    self.tools_sent = true;
                    let mut call =
                        json!({"index": t.index, "function": {"arguments": t.arguments}});
                    if let Some(id) = t.id {
                        call["id"] = id.into();
                        call["type"] = "function".into();
                    }
                    if let Some(name) = t.name {
                        call["function"]["name"] = name.into();
                    }
                    return vec![self.chunk(json!({"tool_calls": [call]}), None)];
                }
                self.sent.push_str(&c.delta);
                vec![self.chunk(json!({"content": c.delta}), None)]
            }
            // Text already sent cannot be taken back: the rest comes from the result.
            Some(Ok(Event::Restart { .. })) => {
                self.live = false;
                Vec::new()
            }
            Some(Ok(Event::Result(r))) => self.on_result(&r),
            Some(Err(e)) => self.error(&super::client_error(e)),
            None => self.error(&ApiError::no_result()),
        }
    }

    fn on_result(&mut self, r: &ResultEvent) -> Vec<SseEvent> {
        if r.status == Status::Error {
            return self.error(&ApiError::of_result(r, chrono::Utc::now()));
        }
        if let Some(m) = &r.model_used {
            self.model = m.clone();
        }
        let restarted = || {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "api_error",
                "stream_restarted",
                "the provider failed mid-answer and another attempt answered differently; \
                 a streamed answer cannot be taken back: retry the request",
            )
        };
        let output = r.output.as_deref().unwrap_or("");
        let Some(rest) = output.strip_prefix(self.sent.as_str()) else {
            return self.error(&restarted());
        };
        let mut out = Vec::new();
        if !rest.is_empty() {
            out.push(self.chunk(json!({"content": rest}), None));
        }
        // Tool calls not forwarded live (another attempt took over before any was sent)
        // come whole from the result; pieces of a superseded attempt cannot be taken back.
        let calls = r.tool_calls.as_deref().unwrap_or_default();
        let final_attempt_live = self.live && self.attempt == r.attempt;
        if self.tools_sent && !final_attempt_live {
            return self.error(&restarted());
        }
        if !calls.is_empty() && !self.tools_sent {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({"index": i, "id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments.to_string()}})
                })
                .collect();
            out.push(self.chunk(json!({"tool_calls": calls}), None));
        }
        out.push(self.chunk(json!({}), Some(finish_reason(r))));
        if self.include_usage {
            let body = json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage(r),
            });
            out.push(SseEvent::default().data(body.to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        self.ended = true;
        out
    }
}

/// OpenAI's finish reason for a result.
fn finish_reason(r: &ResultEvent) -> &'static str {
    match r.finish_reason.as_deref() {
        Some("length") => "length",
        Some("tool_calls") => "tool_calls",
        Some("content_filter") => "content_filter",
        _ => "stop",
    }
}

/// OpenAI's `usage`, with cached and reasoning tokens in its details objects.
fn usage(r: &ResultEvent) -> Value {
    let c = &r.tokens_used.classes;
    json!({
        "prompt_tokens": r.tokens_used.input,
        "completion_tokens": r.tokens_used.output,
        "total_tokens": r.tokens_used.total,
        "prompt_tokens_details": {"cached_tokens": c.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": c.reasoning_tokens},
    })
}

/// A non-streamed chat completion; tool calls carry their arguments as JSON text, as
/// OpenAI's do, and a message that only calls tools has `content: null`.
fn completion(r: &ResultEvent) -> Value {
    let output = r.output.as_deref().unwrap_or("");
    let calls = r.tool_calls.as_deref().unwrap_or_default();
    let mut message = json!({"role": "assistant",
        "content": if output.is_empty() && !calls.is_empty() { Value::Null } else { output.into() }});
    if !calls.is_empty() {
        message["tool_calls"] = calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments.to_string()}})
            })
            .collect::<Vec<_>>()
            .into();
    }
    json!({
        "id": format!("chatcmpl-{}", r.job_id.simple()),
        "object": "chat.completion",
        "created": r.finished_at.timestamp(),
        "model": r.model_used,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(r),
        }],
        "usage": usage(r),
    })
}

#[derive(Deserialize)]
pub(crate) struct EmbeddingsRequest {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
    dimensions: Option<u32>,
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Tokens(Value),
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match embeddings_inner(gw, peer, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embeddings_inner(
    gw: Arc<Gateway>,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admitted = gw.admit(&headers, peer).await?;
    let request: EmbeddingsRequest = gw.body(&headers, body).await?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "encoding_format: {other:?} (float or base64)"
            )));
        }
    };
    let input = match request.input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
        Input::Tokens(v) => {
            let what = if v.is_array() {
                "token arrays"
            } else {
                "this type"
            };
            return Err(ApiError::invalid(format!(
                "input: {what} not supported; send a string or an array of strings"
            )));
        }
    };
    let target = gw
        .catalog
        .resolve(JobKind::Embed, &request.model)
        .ok_or_else(|| ApiError::unknown_model(&request.model))?;
    let mut job = json!({"input": input, "timeout_ms": gw.timeout_ms(None)});
    target.apply(&mut job);
    if let Some(d) = request.dimensions {
        job["options"] = json!({"dimensions": d});
    }
    if let Some(user) = request.user {
        job["metadata"] = json!({"user": user});
    }
    let mut job = gw
        .submit(JobKind::Embed, job, &admitted.tenant, &headers)
        .await?;
    let result = match job.result().await {
        Ok(r) => r,
        Err(e) => return Ok(job.tag(e.into_response())),
    };
    let response = match result.status {
        Status::Ok => axum::Json(embedding_list(&result, base64)).into_response(),
        Status::Error => ApiError::of_result(&result, chrono::Utc::now()).into_response(),
    };
    Ok(job.tag(response))
}

/// The embeddings answer; base64 is the vector's little-endian f32 bytes.
fn embedding_list(r: &ResultEvent, base64: bool) -> Value {
    let data: Vec<Value> = r
        .embeddings
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": r.model_used,
        "usage": {"prompt_tokens": r.tokens_used.input, "total_tokens": r.tokens_used.total},
    })
}

/// `GET /v1/models`: every route, route entry and model name a request may use.
pub(crate) async fn models(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = gw.admit(&headers, peer).await {
        return e.into_response();
    }
    let data: Vec<Value> = gw
        .catalog
        .ids()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-worker"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
