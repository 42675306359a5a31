//! A fake OpenAI-compatible HTTP server for tests, demos and benchmarks (never production).
//!
//! It speaks the real wire format (`POST /v1/chat/completions`, SSE chunks, usage chunk,
//! `[DONE]`, JSON errors) and plays scripted [`Reply`]s in order, then the default reply,
//! including the failures real servers produce: HTTP errors with `Retry-After`, streams cut
//! mid-answer, errors inside a 200 stream, malformed chunks, silence. It records every request
//! body so tests can assert what reached the provider.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Response, StatusCode};
use axum::routing::post;
use futures::StreamExt;
use serde_json::json;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete answer: streamed as SSE when the request asks for a stream, else JSON.
    Answer {
        deltas: Vec<String>,
        usage: Option<(u64, u64)>,
        /// Send `data: [DONE]` at the end.
        done_marker: bool,
        /// Pause before each chunk.
        chunk_delay: Duration,
    },
    /// An HTTP error with a JSON body and extra headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// A 200 stream of these raw SSE `data:` payloads, then a clean end of body.
    RawStream(Vec<String>),
    /// Some chunks, then the connection breaks (no finish reason, no terminating chunk).
    Cut { deltas: Vec<String> },
    /// Accept the request and never answer.
    Hang,
}

impl Reply {
    /// A streamed answer of `deltas` with usage `(prompt, completion)` and `[DONE]`.
    pub fn answer(deltas: &[&str], usage: (u64, u64)) -> Self {
        Reply::Answer {
            deltas: deltas.iter().map(|s| s.to_string()).collect(),
            usage: Some(usage),
            done_marker: true,
            chunk_delay: Duration::ZERO,
        }
    }

    /// An HTTP error status with an OpenAI-style error body.
    pub fn status(status: u16, message: &str) -> Self {
        let body = json!({"error": {"message": message, "type": "server_error", "code": null}});
        Reply::Status {
            status,
            body: body.to_string(),
            headers: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<serde_json::Value>,
}

/// A running fake server; stops when dropped.
pub struct FakeOpenAi {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl FakeOpenAi {
    /// Start on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(script.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            script,
            task: Some(task),
        })
    }

    /// The base URL in the SDK convention (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queue replies, played in order before the default.
    pub fn push(&self, reply: Reply) {
        if let Ok(mut s) = self.script.lock() {
            s.queue.push_back(reply);
        }
    }

    /// The reply once the queue is empty (default: a short streamed answer).
    pub fn set_default(&self, reply: Reply) {
        if let Ok(mut s) = self.script.lock() {
            s.default = Some(reply);
        }
    }

    /// Request bodies received so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.script
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.script.lock().map(|s| s.requests.len()).unwrap_or(0)
    }

    /// Serve until the process ends (for `llm-worker fake-openai`).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn default_reply() -> Reply {
    Reply::answer(&["Hello", " from", " fake"], (5, 3))
}

async fn chat(State(script): State<Arc<Mutex<Script>>>, body: Bytes) -> Response<Body> {
    let request: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let stream = request
        .get("stream")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let model = request
        .get("model")
        .and_then(|v| v.as_str())
        .unwrap_or("fake")
        .to_string();
    let reply = match script.lock() {
        Ok(mut s) => {
            s.requests.push(request);
            s.queue
                .pop_front()
                .or_else(|| s.default.clone())
                .unwrap_or_else(default_reply)
        }
        Err(_) => default_reply(),
    };
    render(reply, stream, &model).await
}

fn chunk(model: &str, delta: serde_json::Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
    .to_string()
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn response(status: u16, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

async fn render(reply: Reply, stream: bool, model: &str) -> Response<Body> {
    match reply {
        Reply::Hang => {
            std::future::pending::<()>().await;
            response(500, "text/plain", Body::empty())
        }
        Reply::Status {
            status,
            body,
            headers,
        } => {
            let mut r = response(status, "application/json", Body::from(body));
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    axum::http::HeaderValue::from_str(&v),
                ) {
                    r.headers_mut().insert(k, v);
                }
            }
            r
        }
        Reply::Answer {
            deltas,
            usage,
            done_marker,
            chunk_delay,
        } if stream => {
            let mut frames = vec![sse(&chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            ))];
            frames.extend(
                deltas
                    .iter()
                    .map(|d| sse(&chunk(model, json!({"content": d}), None))),
            );
            frames.push(sse(&chunk(model, json!({}), Some("stop"))));
            if let Some((p, c)) = usage {
                let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                    "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
                frames.push(sse(&u.to_string()));
            }
            if done_marker {
                frames.push(sse("[DONE]"));
            }
            let body = futures::stream::iter(frames).then(move |f| async move {
                if !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
                Ok::<_, std::io::Error>(f)
            });
            response(200, "text/event-stream", Body::from_stream(body))
        }
        Reply::Answer { deltas, usage, .. } => {
            let content: String = deltas.concat();
            let mut v = json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]});
            if let Some((p, c)) = usage {
                v["usage"] =
                    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
            }
            response(200, "application/json", Body::from(v.to_string()))
        }
        Reply::RawStream(datas) => {
            let frames: Vec<Result<Bytes, std::io::Error>> =
                datas.iter().map(|d| Ok(sse(d))).collect();
            response(
                200,
                "text/event-stream",
                Body::from_stream(futures::stream::iter(frames)),
            )
        }
        Reply::Cut { deltas } => {
            let mut frames: Vec<Result<Bytes, std::io::Error>> = vec![Ok(sse(&chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )))];
            frames.extend(
                deltas
                    .iter()
                    .map(|d| Ok(sse(&chunk(model, json!({"content": d}), None)))),
            );
            // Let headers and chunks reach the client before the connection breaks (hyper
            // polls a ready body eagerly and would otherwise fail before sending headers).
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection cut by the fake server"))
            });
            let body = futures::stream::iter(frames).chain(cut);
            response(200, "text/event-stream", Body::from_stream(body))
        }
    }
}
