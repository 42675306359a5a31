//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` (SSE with `data: [DONE]`,
//! or one JSON answer), `POST /v1/embeddings` (float or base64 vectors), `GET /v1/models`.
//!
//! A chat request becomes a generation job: `messages` (text content only; `developer`
//! counts as `system`), `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`,
//! `stop`; `user` goes to the job's metadata. Fields a job cannot honour (`n` > 1, tools,
//! image or audio content) are refused with 400; other fields are ignored.
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

use super::error::ApiError;
use super::{Gateway, Submitted};
use crate::client::Event;
use crate::contract::JobKind;
use crate::contract::{ResultEvent, Status};

#[derive(Deserialize)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    n: Option<u32>,
    tools: Option<Value>,
    functions: Option<Value>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatRequest {
    /// The generation job this request asks for (without tenant, reply subject or id).
    fn job(self, gw: &Gateway) -> Result<(Value, StreamMode), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n: only one choice per request is supported",
            ));
        }
        if self.tools.is_some() || self.functions.is_some() {
            return Err(ApiError::invalid("tools and functions are not supported"));
        }
        let target = gw
            .catalog
            .resolve(JobKind::Generate, &self.model)
            .ok_or_else(|| ApiError::unknown_model(&self.model))?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}].role: {other:?} is not supported (system, developer, user, assistant)"
                    )));
                }
            };
            let content = match m.content {
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(ApiError::invalid(format!(
                                    "messages[{i}].content: {kind:?} parts are not supported (text only)"
                                )));
                            }
                        }
                    }
                    text
                }
                None => {
                    return Err(ApiError::invalid(format!(
                        "messages[{i}].content: is required"
                    )));
                }
            };
            messages.push(json!({"role": role, "content": content}));
        }
        let mut options = serde_json::Map::new();
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        for (k, v) in [
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            ("max_tokens", max_tokens.map(Value::from)),
            (
                "stop",
                self.stop.map(|s| match s {
                    OneOrMany::One(s) => json!([s]),
                    OneOrMany::Many(v) => json!(v),
                }),
            ),
        ] {
            if let Some(v) = v {
                options.insert(k.into(), v);
            }
        }
        let mut job = json!({
            "messages": messages,
            "options": options,
            "stream": self.stream,
            "timeout_ms": gw.timeout_ms(None),
        });
        target.apply(&mut job);
        if let Some(user) = self.user {
            job["metadata"] = json!({"user": user});
        }
        let mode = match (self.stream, self.stream_options) {
            (false, _) => StreamMode::Off,
            (true, Some(o)) if o.include_usage => StreamMode::WithUsage,
            (true, _) => StreamMode::On,
        };
        Ok((job, mode))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum StreamMode {
    Off,
    On,
    WithUsage,
}

impl super::models::Target {
    /// Set the job fields this model name stands for.
    fn apply(&self, job: &mut Value) {
        for (k, v) in [
            ("task_type", &self.task_type),
            ("provider", &self.provider),
            ("model", &self.model),
        ] {
            if let Some(v) = v {
                job[k] = v.clone().into();
            }
        }
    }
}

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
        let output = r.output.as_deref().unwrap_or("");
        let Some(rest) = output.strip_prefix(self.sent.as_str()) else {
            return self.error(&ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "api_error",
                "stream_restarted",
                "the provider failed mid-answer and another attempt answered differently; \
                 a streamed answer cannot be taken back: retry the request",
            ));
        };
        let mut out = Vec::new();
        if !rest.is_empty() {
            out.push(self.chunk(json!({"content": rest}), None));
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

fn usage(r: &ResultEvent) -> Value {
    json!({
        "prompt_tokens": r.tokens_used.input,
        "completion_tokens": r.tokens_used.output,
        "total_tokens": r.tokens_used.total,
    })
}

/// A non-streamed chat completion.
fn completion(r: &ResultEvent) -> Value {
    json!({
        "id": format!("chatcmpl-{}", r.job_id.simple()),
        "object": "chat.completion",
        "created": r.finished_at.timestamp(),
        "model": r.model_used,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.output.as_deref().unwrap_or("")},
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
