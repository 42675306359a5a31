//! Test, demo and benchmark scaffolding for llm-worker; the worker itself never links it.
//!
//! [`FakeLlmServer`]: a fake LLM API server. One server speaks all four wire formats, chosen by the route a request hits:
//! OpenAI (`POST /v1/chat/completions`: SSE chunks, usage chunk, `[DONE]`), Anthropic
//! (`POST /v1/messages`: named SSE events), Gemini (`POST /v1beta/models/{model}:
//! {generateContent|streamGenerateContent}`: SSE, no sentinel) and Ollama (`POST /api/chat`:
//! NDJSON). It plays scripted [`Reply`]s in order, then the default reply, including the
//! failures real servers produce: HTTP errors with retry hints, streams cut mid-answer, errors
//! inside a 200 stream, malformed chunks, silence. It records every request body so tests can
//! assert what reached the provider. With [`FakeLlmServer::demo_mode`] (the `fake-llm-server`
//! binary) the model name picks the failure instead of a script. Also [`ScratchDatabase`], the throw-away Postgres database
//! each test and benchmark runs against.

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
    /// A 200 response with exactly this body (any framing: named SSE events, NDJSON, ...).
    Raw { content_type: String, body: String },
    /// Some chunks, then the connection breaks (no finish reason, no terminating chunk).
    Cut { deltas: Vec<String> },
    /// Accept the request and never answer.
    Hang,
    /// Some chunks, then silence with the connection open (a stalled stream).
    Stall { deltas: Vec<String> },
    /// A 200 stream of this delta, again and again, without end (a provider gone mad).
    Endless { delta: String },
    /// A response of `bytes` bytes of `fill` with this status: a huge error page
    /// (`status` >= 400), or with 200 an SSE `data:` line that never ends.
    Huge { status: u16, bytes: usize },
    /// Embeddings of this size (embedding routes; any other success reply gives the request's
    /// `dimensions`, or 8). Vectors are [`fake_vector`]`(input, dims)`.
    Vectors { dims: usize },
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

struct Script {
    queue: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<serde_json::Value>,
    /// Keep request bodies (tests assert on them; benchmarks turn this off).
    record: bool,
    /// Delay before every generation response (the provider's time to first byte).
    latency: Duration,
    /// When on: (last message content, time spent in the handler) per generation request.
    timings: Option<Vec<(String, Duration)>>,
    /// Demo mode: the reply (once the queue is empty) follows the model name.
    demo: Option<Demo>,
    /// Generation response bodies not yet finished or dropped.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// The demo answers: `words` words (seeded by the prompt) at `tokens_per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct Demo {
    pub words: usize,
    pub tokens_per_sec: u64,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            default: None,
            requests: Vec::new(),
            record: true,
            latency: Duration::ZERO,
            timings: None,
            demo: None,
            open: Arc::default(),
        }
    }
}

/// A running fake LLM API server (OpenAI, Anthropic, Gemini and Ollama routes); stops when
/// dropped.
pub struct FakeLlmServer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    /// TCP connections accepted so far.
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeLlmServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl FakeLlmServer {
    /// Start on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> std::io::Result<Self> {
        // A deep accept queue, like a real provider's front end: a benchmark opens thousands
        // of connections at once (tokio's default backlog of 1,024 drops SYNs beyond it, and
        // the retransmits then take seconds).
        let addr = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("no address: {addr}"),
            )
        })?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(8192)?;
        let addr = listener.local_addr()?;
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/v1beta/models/{*target}", post(gemini))
            .route("/api/chat", post(ollama))
            .route("/v1/embeddings", post(openai_embed))
            .route("/api/embed", post(ollama_embed))
            .with_state(script.clone());
        // Like real provider front ends: no Nagle delay between a stream's small writes.
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            script,
            connections,
            task: Some(task),
        })
    }

    /// TCP connections accepted since the start (clients that reuse connections keep it low).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The OpenAI base URL in the SDK convention (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The server root (`http://127.0.0.1:PORT`): the base URL for the other flavors.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
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

    /// Wait this long before answering any generation request (models the provider's latency
    /// to the response headers; `chunk_delay` paces a stream after that).
    pub fn set_latency(&self, latency: Duration) {
        if let Ok(mut s) = self.script.lock() {
            s.latency = latency;
        }
    }

    /// Benchmarks: keep no request bodies, and instead (when `timings`) the handler time of
    /// each generation request keyed by its last message's content, so a benchmark can
    /// subtract the fake's own latency per job.
    pub fn bench_mode(&self, timings: bool) {
        if let Ok(mut s) = self.script.lock() {
            s.record = false;
            s.requests = Vec::new();
            s.timings = timings.then(Vec::new);
        }
    }

    /// The handler times recorded since [`FakeLlmServer::bench_mode`] (drained).
    pub fn take_timings(&self) -> Vec<(String, Duration)> {
        self.script
            .lock()
            .ok()
            .and_then(|mut s| s.timings.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    /// Generation responses still being sent: a client that drops a stream (a cancelled job)
    /// closes its connection, and the count goes down. Not counted in bench mode.
    pub fn open_responses(&self) -> usize {
        self.script
            .lock()
            .map(|s| s.open.load(std::sync::atomic::Ordering::SeqCst))
            .unwrap_or(0)
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

    /// Demos: once the queue is empty, the model name picks the reply: `error` in it, HTTP
    /// 500; `filter`, a content-filter refusal; `cut`, half the answer then a broken
    /// connection; `silent`, no answer at all; anything else, `demo.words` words.
    pub fn demo_mode(&self, demo: Demo) {
        if let Ok(mut s) = self.script.lock() {
            s.record = false;
            s.requests = Vec::new();
            s.demo = Some(demo);
        }
    }

    /// Serve until the process ends (for the `fake-llm-server` binary).
    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn default_reply() -> Reply {
    Reply::answer(&["Hello", " from", " fake"], (5, 3))
}

/// A throw-away Postgres database for one test or benchmark run.
pub struct ScratchDatabase {
    admin_url: String,
    pub name: String,
    /// `admin_url` with this database instead of its own (query parameters kept).
    pub url: String,
}

impl ScratchDatabase {
    /// Create `<prefix>_<random>` through the server `admin_url` points at.
    pub async fn create(admin_url: &str, prefix: &str) -> Result<Self, sqlx::Error> {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(admin_url).await?;
        let created = sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await;
        admin.close().await;
        created?;
        Ok(Self {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_string(),
            name,
        })
    }

    /// Drop it, forcing out connections still open (best effort).
    pub async fn drop(self) {
        if let Ok(admin) = sqlx::PgPool::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// A Postgres URL pointing at database `db` instead (query parameters kept).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The wire format of a request, from the route it hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
    Ollama,
}

type Shared = State<Arc<Mutex<Script>>>;

async fn openai(State(script): Shared, body: Bytes) -> Response<Body> {
    serve(script, Flavor::OpenAi, None, &body).await
}

async fn anthropic(State(script): Shared, body: Bytes) -> Response<Body> {
    serve(script, Flavor::Anthropic, None, &body).await
}

async fn ollama(State(script): Shared, body: Bytes) -> Response<Body> {
    serve(script, Flavor::Ollama, None, &body).await
}

async fn gemini(
    State(script): Shared,
    axum::extract::Path(target): axum::extract::Path<String>,
    body: Bytes,
) -> Response<Body> {
    // `{model}:{method}`
    let (model, method) = target.split_once(':').unwrap_or((target.as_str(), ""));
    if method == "batchEmbedContents" {
        return embed(script, Flavor::Gemini, &body).await;
    }
    let stream = method == "streamGenerateContent";
    serve(
        script,
        Flavor::Gemini,
        Some((model.to_string(), stream)),
        &body,
    )
    .await
}

async fn openai_embed(State(script): Shared, body: Bytes) -> Response<Body> {
    embed(script, Flavor::OpenAi, &body).await
}

async fn ollama_embed(State(script): Shared, body: Bytes) -> Response<Body> {
    embed(script, Flavor::Ollama, &body).await
}

/// Answer an embedding request in the flavor's format.
async fn embed(script: Arc<Mutex<Script>>, flavor: Flavor, body: &[u8]) -> Response<Body> {
    let request: serde_json::Value =
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let (inputs, asked): (Vec<String>, Option<u64>) = match flavor {
        Flavor::Gemini => {
            let reqs = request["requests"].as_array().cloned().unwrap_or_default();
            let texts = reqs
                .iter()
                .map(|r| {
                    r["content"]["parts"][0]["text"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            (
                texts,
                reqs.first()
                    .and_then(|r| r["outputDimensionality"].as_u64()),
            )
        }
        _ => {
            let texts = request["input"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| t.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            (texts, request["dimensions"].as_u64())
        }
    };
    let reply = match script.lock() {
        Ok(mut s) => {
            if s.record {
                s.requests.push(request);
            }
            s.queue.pop_front().or_else(|| s.default.clone())
        }
        Err(_) => None,
    };
    let dims = match reply {
        Some(Reply::Vectors { dims }) => dims,
        Some(other @ (Reply::Status { .. } | Reply::Hang | Reply::Raw { .. })) => {
            return render(flavor, other, false, "m").await;
        }
        _ => asked.unwrap_or(8) as usize,
    };
    let vectors: Vec<Vec<f32>> = inputs.iter().map(|t| fake_vector(t, dims)).collect();
    // The worker's own estimate (a token per 4 characters), so usage matches it in tests.
    let tokens: u64 = inputs
        .iter()
        .map(|t| (t.chars().count() as u64).div_ceil(4))
        .sum();
    let v = match flavor {
        Flavor::Gemini => {
            json!({"embeddings": vectors.iter().map(|v| json!({"values": v})).collect::<Vec<_>>()})
        }
        Flavor::Ollama => json!({"model": "m", "embeddings": vectors, "prompt_eval_count": tokens}),
        _ => {
            // Out of order on purpose: clients must sort by `index`.
            let data: Vec<serde_json::Value> = vectors
                .iter()
                .enumerate()
                .rev()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect();
            json!({"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        }
    };
    response(200, "application/json", Body::from(v.to_string()))
}

async fn serve(
    script: Arc<Mutex<Script>>,
    flavor: Flavor,
    gemini: Option<(String, bool)>,
    body: &[u8],
) -> Response<Body> {
    let started = std::time::Instant::now();
    let request: serde_json::Value =
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let (model, stream) = match gemini {
        Some(target) => target,
        None => {
            let model = request["model"].as_str().unwrap_or("fake").to_string();
            // Ollama streams unless told otherwise; the others only when asked.
            let stream = request["stream"]
                .as_bool()
                .unwrap_or(flavor == Flavor::Ollama);
            (model, stream)
        }
    };
    let (reply, latency, timing_key) = match script.lock() {
        Ok(mut s) => {
            // Benchmarks key each request's handler time by its last message (the job's prompt).
            let timing_key = s
                .timings
                .is_some()
                .then(|| last_prompt(&request).to_string());
            let demo = s.demo.map(|d| demo_reply(d, &model, last_prompt(&request)));
            if s.record {
                s.requests.push(request);
            }
            let reply = s
                .queue
                .pop_front()
                .or(demo)
                .or_else(|| s.default.clone())
                .unwrap_or_else(default_reply);
            (reply, s.latency, timing_key)
        }
        Err(_) => (default_reply(), Duration::ZERO, None),
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Tests count open responses; benchmarks (no recording) skip the wrapping.
    let open = script
        .lock()
        .ok()
        .and_then(|s| s.record.then(|| s.open.clone()));
    let response = render(flavor, reply, stream, &model).await;
    let response = match open {
        Some(open) => counted(response, open),
        None => response,
    };
    if let Some(key) = timing_key
        && let Ok(mut s) = script.lock()
        && let Some(timings) = s.timings.as_mut()
    {
        timings.push((key, started.elapsed()));
    }
    response
}

/// Counts a response as open until its body ends or is dropped.
fn counted(response: Response<Body>, open: Arc<std::sync::atomic::AtomicUsize>) -> Response<Body> {
    struct Open(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let guard = Open(open);
    response.map(|body| {
        let stream = body.into_data_stream();
        Body::from_stream(futures::stream::unfold(
            (stream, guard),
            |(mut stream, guard)| async move {
                let next = stream.next().await?;
                Some((next, (stream, guard)))
            },
        ))
    })
}

/// The last message's text (OpenAI, Anthropic and Ollama requests; Gemini's last part).
fn last_prompt(request: &serde_json::Value) -> &str {
    let last = |k: &str| request[k].as_array().and_then(|m| m.last());
    last("messages")
        .and_then(|m| m["content"].as_str())
        .or_else(|| last("contents").and_then(|c| c["parts"][0]["text"].as_str()))
        .unwrap_or_default()
}

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

/// The demo reply for `model` (see [`FakeLlmServer::demo_mode`]).
fn demo_reply(demo: Demo, model: &str, prompt: &str) -> Reply {
    if model.contains("error") {
        return Reply::status(500, "fake-llm-server: injected error");
    }
    if model.contains("filter") {
        let body = json!({"error": {"message": "fake-llm-server: injected refusal",
            "type": "invalid_request_error", "code": "content_filter"}});
        return Reply::Status {
            status: 400,
            body: body.to_string(),
            headers: Vec::new(),
        };
    }
    if model.contains("silent") {
        return Reply::Hang;
    }
    let seed = prompt.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let deltas: Vec<String> = (0..demo.words.max(1))
        .map(|i| {
            let w = WORDS[(seed + i) % WORDS.len()];
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    if model.contains("cut") {
        return Reply::Cut {
            deltas: deltas[..deltas.len() / 2].to_vec(),
        };
    }
    let usage = (
        (prompt.chars().count() as u64).div_ceil(4),
        deltas.len() as u64,
    );
    Reply::Answer {
        deltas,
        usage: Some(usage),
        done_marker: true,
        chunk_delay: Duration::from_secs(1)
            .checked_div(u32::try_from(demo.tokens_per_sec).unwrap_or(u32::MAX))
            .unwrap_or_default(),
    }
}

/// A deterministic vector in [-1, 1) seeded by the text.
pub fn fake_vector(text: &str, dims: usize) -> Vec<f32> {
    let mut h = text.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..dims)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            (h % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

fn named(event: &str, data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn line(v: serde_json::Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

fn response(status: u16, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

fn openai_chunk(model: &str, delta: serde_json::Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
    .to_string()
}

fn gemini_chunk(text: &str, finish: bool, usage: Option<(u64, u64)>) -> serde_json::Value {
    let mut c = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    if finish {
        c["finishReason"] = json!("STOP");
    }
    let mut v = json!({"candidates": [c], "modelVersion": "fake"});
    if let Some((p, o)) = usage {
        v["usageMetadata"] =
            json!({"promptTokenCount": p, "candidatesTokenCount": o, "totalTokenCount": p + o});
    }
    v
}

/// The streamed body of an answer: the deltas, then (if `complete`) the finish signal, usage
/// and (if `done_marker`) the transport sentinel.
fn stream_frames(
    flavor: Flavor,
    model: &str,
    deltas: &[String],
    usage: Option<(u64, u64)>,
    complete: bool,
    done_marker: bool,
) -> Vec<Bytes> {
    let (input, output) = usage.unwrap_or((0, 0));
    let mut frames = Vec::new();
    match flavor {
        Flavor::OpenAi => {
            frames.push(sse(&openai_chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )));
            frames.extend(
                deltas
                    .iter()
                    .map(|d| sse(&openai_chunk(model, json!({"content": d}), None))),
            );
            if complete {
                frames.push(sse(&openai_chunk(model, json!({}), Some("stop"))));
                if usage.is_some() {
                    let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                        "choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}});
                    frames.push(sse(&u.to_string()));
                }
                if done_marker {
                    frames.push(sse("[DONE]"));
                }
            }
        }
        Flavor::Anthropic => {
            frames.push(named(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                "role": "assistant", "content": [], "model": model, "stop_reason": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
            ));
            frames.push(named("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
            frames.push(named("ping", json!({"type": "ping"})));
            frames.extend(deltas.iter().map(|d| {
                named("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}))
            }));
            if complete {
                frames.push(named(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ));
                frames.push(named("message_delta", json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": output}})));
                if done_marker {
                    frames.push(named("message_stop", json!({"type": "message_stop"})));
                }
            }
        }
        Flavor::Gemini => {
            let n = deltas.len();
            for (i, d) in deltas.iter().enumerate() {
                let last = complete && i + 1 == n;
                // Gemini reports running (cumulative) counts on every chunk.
                let u = if last {
                    usage
                } else {
                    usage.map(|_| (input, (i as u64 + 1).min(output)))
                };
                frames.push(sse(&gemini_chunk(d, last, u).to_string()));
            }
            if complete && n == 0 {
                frames.push(sse(&gemini_chunk("", true, usage).to_string()));
            }
        }
        Flavor::Ollama => {
            for d in deltas {
                frames.push(line(
                    json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": d}, "done": false}),
                ));
            }
            if complete {
                frames.push(line(json!({"model": model, "created_at": "2025-01-01T00:00:01Z",
                    "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": "stop",
                    "prompt_eval_count": input, "eval_count": output})));
            }
        }
    }
    frames
}

/// A non-streamed answer.
fn whole(flavor: Flavor, model: &str, text: &str, usage: Option<(u64, u64)>) -> serde_json::Value {
    let (input, output) = usage.unwrap_or((0, 0));
    match flavor {
        Flavor::OpenAi => {
            let mut v = json!({"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]});
            if usage.is_some() {
                v["usage"] = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
            }
            v
        }
        Flavor::Anthropic => {
            json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output}})
        }
        Flavor::Gemini => gemini_chunk(text, true, usage),
        Flavor::Ollama => json!({"model": model, "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text}, "done": true, "done_reason": "stop",
            "prompt_eval_count": input, "eval_count": output}),
    }
}

fn stream_content_type(flavor: Flavor) -> &'static str {
    if flavor == Flavor::Ollama {
        "application/x-ndjson"
    } else {
        "text/event-stream"
    }
}

async fn render(flavor: Flavor, reply: Reply, stream: bool, model: &str) -> Response<Body> {
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
            let frames = stream_frames(flavor, model, &deltas, usage, true, done_marker);
            let body = futures::stream::iter(frames).then(move |f| async move {
                if !chunk_delay.is_zero() {
                    tokio::time::sleep(chunk_delay).await;
                }
                Ok::<_, std::io::Error>(f)
            });
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Answer { deltas, usage, .. } => {
            let v = whole(flavor, model, &deltas.concat(), usage);
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
        Reply::Raw { content_type, body } => response(200, &content_type, Body::from(body)),
        Reply::Endless { delta } => {
            let frame = stream_frames(flavor, model, &[delta], None, false, false)
                .pop()
                .unwrap_or_default();
            let body = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(frame.clone()));
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Huge { status, bytes } => {
            const PIECE: usize = 64 * 1024;
            let head = if status == 200 { "data: " } else { "" };
            let pieces = std::iter::once(Bytes::from(head))
                .chain((0..bytes / PIECE).map(|_| Bytes::from(vec![b'x'; PIECE])));
            let body = futures::stream::iter(pieces.map(Ok::<_, std::io::Error>));
            let content_type = if status == 200 {
                stream_content_type(flavor)
            } else {
                "text/html"
            };
            response(status, content_type, Body::from_stream(body))
        }
        // Vectors on a generation route: the test scripted the wrong endpoint.
        Reply::Vectors { .. } => response(
            400,
            "application/json",
            Body::from(r#"{"error":{"message":"not an embedding route"}}"#),
        ),
        Reply::Stall { deltas } => {
            let frames = stream_frames(flavor, model, &deltas, None, false, false);
            let body = futures::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>))
                .chain(futures::stream::pending());
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
        Reply::Cut { deltas } => {
            let frames = stream_frames(flavor, model, &deltas, None, false, false);
            // Let headers and chunks reach the client before the connection breaks (hyper
            // polls a ready body eagerly and would otherwise fail before sending headers).
            let cut = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("connection cut by the fake server"))
            });
            let body = futures::stream::iter(frames.into_iter().map(Ok)).chain(cut);
            response(200, stream_content_type(flavor), Body::from_stream(body))
        }
    }
}
