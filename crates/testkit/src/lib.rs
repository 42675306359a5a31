//! Test, demo and benchmark scaffolding for llm-worker; the worker itself never links it.
//!
//! [`FakeLlmServer`]: a fake LLM API server. One server speaks all four wire formats, chosen by the route a request hits:
//! OpenAI (`POST /v1/chat/completions`: SSE chunks, usage chunk, `[DONE]`), Anthropic
//! (`POST /v1/messages`: named SSE events), Gemini (`POST /v1beta/models/{model}:
//! {generateContent|streamGenerateContent}`: SSE, no sentinel) and Ollama (`POST /api/chat`:
//! NDJSON). It plays scripted [`Reply`]s in order, then the default reply, including the
//! failures real servers produce: HTTP errors with retry hints, streams cut mid-answer, errors
//! inside a 200 stream, malformed chunks, silence. It records every request body so tests can
//! assert what reached the provider. Image requests (OpenAI's Images API, Gemini asking for
//! `IMAGE`) get real PNG pictures drawn from the prompt ([`fake_png`], `images`). With [`FakeLlmServer::demo_mode`] (the `fake-llm-server`
//! binary) the model name picks the failure instead of a script (`demo`). The providers'
//! batch APIs (OpenAI's Files and Batch API, Anthropic's Message Batches) are faked in
//! `batches`, with batches that end late, expire or fail some lines ([`BatchPlan`]). The wire formats are
//! rendered in `wire`. Also [`ScratchDatabase`] (`scratch`), the throw-away Postgres database
//! each test and benchmark runs against.

mod batches;
mod demo;
mod images;
pub mod nats;
mod scratch;
mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::Response;
use axum::routing::post;
use futures::StreamExt;
use serde_json::json;

pub use batches::{BatchPlan, BatchStats};
pub use images::{FAKE_IMAGE_OUTPUT_TOKENS, FAKE_PICTURE_SIDE, fake_png};
pub use scratch::{ScratchDatabase, with_database};
use wire::{Flavor, render, response};

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
    /// An answer that calls tools: `(name, arguments text)` per call; OpenAI and Anthropic
    /// stream the arguments in three pieces each and finish `tool_calls` / `tool_use`, Gemini
    /// and Ollama send each call whole (as JSON objects) and finish `STOP` / `stop`. The arguments
    /// text is sent as given, so a test can send text that is not JSON. With `cut`, the stream
    /// breaks in the middle of the last call's arguments.
    ToolCalls {
        calls: Vec<(String, String)>,
        usage: (u64, u64),
        cut: bool,
    },
    /// A complete answer billed with token classes, each reported in the request's format
    /// where that format has a field for it (see [`Billing`]).
    Billed {
        deltas: Vec<String>,
        billing: Billing,
    },
}

/// A call's usage with every billed class, in the contract's terms: `input` and `output` are
/// all prompt and completion tokens, the classes are parts of them. Each format reports what
/// it can: OpenAI `cache_read` and `reasoning` (in the usage details); Anthropic
/// `cache_read`, `cache_write` and `cache_write_1h` (its `input_tokens` then excludes them);
/// Gemini `cache_read` (`cachedContentTokenCount`), `reasoning` (`thoughtsTokenCount`, apart
/// from `candidatesTokenCount`) and `image_input` (`promptTokensDetails`); Ollama none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billing {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub reasoning: u64,
    pub image_input: u64,
}

impl Billing {
    /// Input and output, no classes.
    pub fn plain(input: u64, output: u64) -> Self {
        Self {
            input,
            output,
            ..Self::default()
        }
    }
}

impl Reply {
    /// An answer calling one tool with these arguments.
    pub fn tool_call(name: &str, arguments: &str, usage: (u64, u64)) -> Self {
        Reply::ToolCalls {
            calls: vec![(name.to_string(), arguments.to_string())],
            usage,
            cut: false,
        }
    }

    /// A streamed answer of `deltas` with usage `(prompt, completion)` and `[DONE]`.
    pub fn answer(deltas: &[&str], usage: (u64, u64)) -> Self {
        Reply::Answer {
            deltas: deltas.iter().map(|s| s.to_string()).collect(),
            usage: Some(usage),
            done_marker: true,
            chunk_delay: Duration::ZERO,
        }
    }

    /// A streamed (or whole) answer of `deltas` billed with these classes.
    pub fn billed(deltas: &[&str], billing: Billing) -> Self {
        Reply::Billed {
            deltas: deltas.iter().map(|s| s.to_string()).collect(),
            billing,
        }
    }

    /// OpenAI's refusal of a prompt its safety system blocks (Images API: HTTP 400,
    /// `content_policy_violation`).
    pub fn content_policy() -> Self {
        let body = json!({"error": {"code": "content_policy_violation",
            "message": "Your request was rejected as a result of our safety system. Your prompt may contain text that is not allowed by our safety system.",
            "param": null, "type": "invalid_request_error"}});
        Reply::Status {
            status: 400,
            body: body.to_string(),
            headers: Vec::new(),
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
    /// The batch APIs' files and batches (`batches`).
    batches: batches::SharedBatches,
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
            .route("/v1/images/generations", post(openai_images))
            .route("/api/embed", post(ollama_embed))
            .route("/files/{name}", axum::routing::get(file))
            .with_state(script.clone());
        let batches = batches::SharedBatches::default();
        let app = app.merge(batches::router(batches.clone()));
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
            batches,
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

    /// A URL of a file the server serves (`GET /files/NAME`): `image.png` ([`FAKE_PNG`],
    /// `image/png`), `big.png` (1 MiB, `image/png`), `page.html` (`text/html`); others 404.
    pub fn file_url(&self, name: &str) -> String {
        format!("http://{}/files/{name}", self.addr)
    }

    /// The server root (`http://127.0.0.1:PORT`): the base URL for the other flavors.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How batches created from now on behave (OpenAI's Batch API and Anthropic's Message
    /// Batches, `batches`): how long they take, which lines fail, whether they expire.
    pub fn set_batch_plan(&self, plan: BatchPlan) {
        if let Ok(mut b) = self.batches.lock() {
            b.set_plan(plan);
        }
    }

    /// The batch API requests received so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.batches.lock().map(|b| b.stats()).unwrap_or_default()
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
    let request: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let modalities = &request["generationConfig"]["responseModalities"];
    if modalities
        .as_array()
        .is_some_and(|m| m.iter().any(|v| v == "IMAGE"))
    {
        let reply = take(&script, request.clone());
        return images::answer(reply, Flavor::Gemini, &request).await;
    }
    serve(
        script,
        Flavor::Gemini,
        Some((model.to_string(), stream)),
        &body,
    )
    .await
}

async fn openai_images(State(script): Shared, body: Bytes) -> Response<Body> {
    let request: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let reply = take(&script, request.clone());
    images::answer(reply, Flavor::OpenAi, &request).await
}

/// Record a request and take the reply it gets (the queue's next, else the default).
fn take(script: &Arc<Mutex<Script>>, request: serde_json::Value) -> Option<Reply> {
    let mut s = script.lock().ok()?;
    if s.record {
        s.requests.push(request);
    }
    s.queue.pop_front().or_else(|| s.default.clone())
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
            return render(flavor, other, false, "m", None).await;
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
    let forced = wire::forced_tool(flavor, &request);
    let (reply, latency, timing_key) = match script.lock() {
        Ok(mut s) => {
            // Benchmarks key each request's handler time by its last message (the job's prompt).
            let timing_key = s
                .timings
                .is_some()
                .then(|| last_prompt(&request).to_string());
            let demo = s
                .demo
                .map(|d| demo::demo_reply(d, &model, last_prompt(&request)));
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
    let response = render(flavor, reply, stream, &model, forced).await;
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

/// The bytes `GET /files/image.png` serves: a PNG signature and a few bytes.
pub const FAKE_PNG: &[u8] = b"\x89PNG\r\n\x1a\nfake image bytes";

async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response<Body> {
    match name.as_str() {
        "image.png" => wire::response(200, "image/png", Body::from(FAKE_PNG)),
        "big.png" => wire::response(200, "image/png", Body::from(vec![0u8; 1024 * 1024])),
        "page.html" => wire::response(200, "text/html", Body::from("<html></html>")),
        _ => wire::response(404, "text/plain", Body::from("no such file")),
    }
}
