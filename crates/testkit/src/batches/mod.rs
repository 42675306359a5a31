//! The providers' batch APIs, faked: OpenAI's Files and Batch API (`POST /v1/files` with a
//! JSONL file of requests, `POST /v1/batches`, `GET /v1/batches/{id}`, `GET
//! /v1/files/{id}/content`, `POST /v1/batches/{id}/cancel`) and Anthropic's Message Batches
//! (`POST /v1/messages/batches`, `GET /v1/messages/batches/{id}`, `GET .../results`,
//! `POST .../cancel`), in their real shapes.
//!
//! A batch runs for [`BatchPlan::takes`] after it is created, then ends: every request
//! answered (`batched: <last user message>`, usage from the text's length), except every
//! `fail_every`-th line, which fails (OpenAI: a 500 response in the error file; Anthropic: an
//! `errored` result), or, with `expire`, every line from the middle on, which expires
//! (`batch_expired` / `expired`). A cancelled batch ends at once, its lines cancelled. Lines
//! that are not valid requests make an OpenAI batch `failed` and an Anthropic request 400.
//! Every batch API request is counted ([`BatchStats`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// How the fake's batches behave.
#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    /// From creation to the end of a batch.
    pub takes: Duration,
    /// Every n-th line (1-based, in the file's or request's order) fails; 0: none.
    pub fail_every: usize,
    /// The batch expires at its end: its first half answered, the rest expired.
    pub expire: bool,
    /// No Batch API at all, as most compatible servers: file uploads get 404.
    pub absent: bool,
}

/// Batch API requests received, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Files uploaded (OpenAI), refused ones included.
    pub uploads: usize,
    /// Batches created (both APIs).
    pub created: usize,
    /// Status polls (both APIs).
    pub polls: usize,
    /// Result downloads (both APIs).
    pub downloads: usize,
    /// Cancels (both APIs).
    pub cancels: usize,
    /// Requests (lines) in every batch created.
    pub lines: usize,
}

/// One request of a batch: its id and the request body.
#[derive(Debug, Clone)]
struct Line {
    custom_id: String,
    body: Value,
}

#[derive(Debug)]
struct Batch {
    /// `openai` or `anthropic`.
    api: &'static str,
    lines: Vec<Line>,
    created: SystemTime,
    plan: BatchPlan,
    cancelled_at: Option<SystemTime>,
    input_file_id: Option<String>,
    endpoint: String,
    metadata: Value,
    /// Set when the input is not valid (OpenAI: the batch is `failed`).
    invalid: Option<String>,
}

impl Batch {
    fn ended_at(&self) -> Option<SystemTime> {
        let end = self.created + self.plan.takes;
        match self.cancelled_at {
            Some(c) => Some(c.min(end)),
            None => (SystemTime::now() >= end).then_some(end),
        }
    }

    /// The outcome of line `i` once the batch has ended.
    fn outcome(&self, i: usize) -> Outcome {
        let end = self.created + self.plan.takes;
        if self.cancelled_at.is_some_and(|c| c < end) {
            Outcome::Cancelled
        } else if self.plan.expire && i >= self.lines.len() / 2 {
            Outcome::Expired
        } else if self.plan.fail_every > 0 && (i + 1).is_multiple_of(self.plan.fail_every) {
            Outcome::Failed
        } else {
            Outcome::Answered
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    Failed,
    Expired,
    Cancelled,
}

/// The state of every file and batch.
#[derive(Debug, Default)]
pub(crate) struct Batches {
    plan: BatchPlan,
    files: HashMap<String, Vec<u8>>,
    batches: HashMap<String, Batch>,
    stats: BatchStats,
    next: u64,
}

pub(crate) type SharedBatches = Arc<Mutex<Batches>>;

impl Batches {
    pub(crate) fn set_plan(&mut self, plan: BatchPlan) {
        self.plan = plan;
    }

    pub(crate) fn stats(&self) -> BatchStats {
        self.stats
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{:06}{}", self.next, uuid::Uuid::new_v4().simple())
    }
}

/// The batch routes, on their own state.
pub(crate) fn router(state: SharedBatches) -> Router {
    Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(openai_create))
        .route("/v1/batches/{id}", get(openai_get))
        .route("/v1/batches/{id}/cancel", post(openai_cancel))
        .route("/v1/messages/batches", post(anthropic_create))
        .route("/v1/messages/batches/{id}", get(anthropic_get))
        .route("/v1/messages/batches/{id}/results", get(anthropic_results))
        .route("/v1/messages/batches/{id}/cancel", post(anthropic_cancel))
        // OpenAI takes batch files up to 200 MB, Anthropic batches up to 256 MB.
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(state)
}

type Shared = State<SharedBatches>;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": null}})),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        &format!("No such {what}"),
    )
}

/// The text a line's request asks about: its last user message's text.
fn prompt_of(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    let last = messages.iter().rev().find(|m| m["role"] == "user");
    match last.map(|m| &m["content"]) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The answer to a line and its usage (input from the prompt's length, output 5).
fn answer_of(body: &Value) -> (String, u64, u64) {
    let prompt = prompt_of(body);
    let input = (prompt.len() as u64).div_ceil(4).max(1);
    (format!("batched: {prompt}"), input, 5)
}

// --- OpenAI -------------------------------------------------------------------------------

async fn upload(State(state): Shared, mut form: Multipart) -> Response {
    let mut purpose = None;
    let mut content = None;
    let mut filename = String::from("upload.jsonl");
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                if let Some(name) = field.file_name() {
                    filename = name.to_string();
                }
                content = field.bytes().await.ok();
            }
            _ => {}
        }
    }
    let (Some(purpose), Some(content)) = (purpose, content) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "'file' and 'purpose' are required",
        );
    };
    let Ok(mut s) = state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    s.stats.uploads += 1;
    if s.plan.absent {
        return not_found("route");
    }
    let id = s.id("file-");
    let bytes = content.len();
    s.files.insert(id.clone(), content.to_vec());
    axum::Json(json!({
        "id": id, "object": "file", "bytes": bytes, "created_at": unix(SystemTime::now()),
        "filename": filename, "purpose": purpose, "status": "processed",
    }))
    .into_response()
}

async fn file_content(State(state): Shared, Path(id): Path<String>) -> Response {
    let Ok(mut s) = state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    s.stats.downloads += 1;
    if let Some(bytes) = s.files.get(&id) {
        return bytes.clone().into_response();
    }
    // Output and error files are made when asked for: `<batch>-output`, `<batch>-errors`.
    let made = id
        .strip_suffix("-output")
        .map(|b| (b, true))
        .or_else(|| id.strip_suffix("-errors").map(|b| (b, false)));
    let Some((batch_id, output)) = made else {
        return not_found("file");
    };
    let Some(batch) = s.batches.get(batch_id).filter(|b| b.ended_at().is_some()) else {
        return not_found("file");
    };
    let mut out = String::new();
    for (i, line) in batch.lines.iter().enumerate() {
        let outcome = batch.outcome(i);
        if (outcome == Outcome::Answered) != output {
            continue;
        }
        let record = match outcome {
            Outcome::Answered => {
                let (text, input, output_tokens) = answer_of(&line.body);
                let model = line.body["model"].as_str().unwrap_or("gpt-test");
                json!({"id": format!("batch_req_{i}"), "custom_id": line.custom_id,
                    "response": {"status_code": 200, "request_id": format!("req_{i}"),
                        "body": {"id": format!("chatcmpl-b{i}"), "object": "chat.completion",
                            "created": unix(SystemTime::now()), "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant",
                                "content": text, "refusal": null}, "logprobs": null,
                                "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": input, "completion_tokens": output_tokens,
                                "total_tokens": input + output_tokens},
                            "service_tier": "default"}},
                    "error": null})
            }
            Outcome::Failed => json!({"id": format!("batch_req_{i}"), "custom_id": line.custom_id,
                "response": {"status_code": 500, "request_id": format!("req_{i}"),
                    "body": {"error": {"message": "The server had an error while processing your request.",
                        "type": "server_error", "param": null, "code": null}}},
                "error": null}),
            Outcome::Expired => json!({"id": format!("batch_req_{i}"), "custom_id": line.custom_id,
                "response": null,
                "error": {"code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}}),
            Outcome::Cancelled => {
                json!({"id": format!("batch_req_{i}"), "custom_id": line.custom_id,
                "response": null,
                "error": {"code": "batch_cancelled",
                    "message": "This request could not be executed before the batch was cancelled."}})
            }
        };
        out.push_str(&record.to_string());
        out.push('\n');
    }
    out.into_response()
}

/// The lines of an OpenAI batch input file, or why it is not valid.
fn parse_jsonl(bytes: &[u8], endpoint: &str) -> Result<Vec<Line>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_string())?;
    let mut lines = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, raw) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(raw).map_err(|e| format!("line {}: not JSON: {e}", n + 1))?;
        let custom_id = v["custom_id"]
            .as_str()
            .ok_or_else(|| format!("line {}: no custom_id", n + 1))?;
        if v["method"] != "POST" || v["url"] != endpoint || !v["body"].is_object() {
            return Err(format!(
                "line {}: method, url ({endpoint}) and body are required",
                n + 1
            ));
        }
        if !seen.insert(custom_id.to_string()) {
            return Err(format!("line {}: custom_id {custom_id} repeated", n + 1));
        }
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body: v["body"].clone(),
        });
    }
    if lines.is_empty() {
        return Err("the file has no requests".into());
    }
    Ok(lines)
}

fn openai_batch(id: &str, b: &Batch) -> Value {
    let ended = b.ended_at();
    let total = b.lines.len();
    let (mut completed, mut failed) = (0, 0);
    if ended.is_some() {
        for i in 0..total {
            match b.outcome(i) {
                Outcome::Answered => completed += 1,
                _ => failed += 1,
            }
        }
    }
    let status = match (&b.invalid, ended, b.cancelled_at) {
        (Some(_), _, _) => "failed",
        (None, Some(_), Some(_)) => "cancelled",
        (None, Some(_), None) if b.plan.expire => "expired",
        (None, Some(_), None) => "completed",
        (None, None, _) => "in_progress",
    };
    let at = |cond: bool| {
        if cond {
            json!(ended.map(unix))
        } else {
            Value::Null
        }
    };
    let has_errors = failed > 0;
    json!({
        "id": id, "object": "batch", "endpoint": b.endpoint,
        "errors": b.invalid.as_ref().map(|why| json!({"object": "list",
            "data": [{"code": "invalid_request", "message": why, "param": null, "line": null}]})),
        "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
        "output_file_id": (ended.is_some() && completed > 0).then(|| format!("{id}-output")),
        "error_file_id": (ended.is_some() && has_errors).then(|| format!("{id}-errors")),
        "created_at": unix(b.created),
        "in_progress_at": if b.invalid.is_none() { json!(unix(b.created)) } else { Value::Null },
        "expires_at": unix(b.created) + 86_400,
        "finalizing_at": at(status == "completed" || status == "expired"),
        "completed_at": at(status == "completed"),
        "failed_at": if b.invalid.is_some() { json!(unix(b.created)) } else { Value::Null },
        "expired_at": at(status == "expired"),
        "cancelling_at": b.cancelled_at.map(unix),
        "cancelled_at": at(status == "cancelled"),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": b.metadata,
    })
}

async fn openai_create(State(state): Shared, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    let (Some(file_id), Some(endpoint)) = (
        request["input_file_id"].as_str(),
        request["endpoint"].as_str(),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "input_file_id and endpoint are required",
        );
    };
    if request["completion_window"] != "24h" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "completion_window must be 24h",
        );
    }
    let Ok(mut s) = state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Some(file) = s.files.get(file_id) else {
        return not_found("file");
    };
    let (lines, invalid) = match parse_jsonl(file, endpoint) {
        Ok(lines) => (lines, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    s.stats.created += 1;
    s.stats.lines += lines.len();
    let id = s.id("batch_");
    let batch = Batch {
        api: "openai",
        lines,
        created: SystemTime::now(),
        plan: s.plan.clone(),
        cancelled_at: None,
        input_file_id: Some(file_id.to_string()),
        endpoint: endpoint.to_string(),
        metadata: request["metadata"].clone(),
        invalid,
    };
    let shown = openai_batch(&id, &batch);
    s.batches.insert(id, batch);
    axum::Json(shown).into_response()
}

/// The batch `id` of `api`, shown by `show`, after counting the request with `count`.
fn with_batch(
    state: &SharedBatches,
    id: &str,
    api: &str,
    count: fn(&mut BatchStats),
    show: impl FnOnce(&str, &mut Batch) -> Response,
) -> Response {
    let Ok(mut s) = state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    count(&mut s.stats);
    match s.batches.get_mut(id).filter(|b| b.api == api) {
        Some(b) => show(id, b),
        None => not_found("batch"),
    }
}

async fn openai_get(State(state): Shared, Path(id): Path<String>) -> Response {
    with_batch(
        &state,
        &id,
        "openai",
        |s| s.polls += 1,
        |id, b| axum::Json(openai_batch(id, b)).into_response(),
    )
}

async fn openai_cancel(State(state): Shared, Path(id): Path<String>) -> Response {
    with_batch(
        &state,
        &id,
        "openai",
        |s| s.cancels += 1,
        |id, b| {
            if b.ended_at().is_none() {
                b.cancelled_at = Some(SystemTime::now());
            }
            axum::Json(openai_batch(id, b)).into_response()
        },
    )
}

// --- Anthropic ----------------------------------------------------------------------------

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn anthropic_batch(id: &str, b: &Batch, results_base: &str) -> Value {
    let ended = b.ended_at();
    let mut counts =
        json!({"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    for i in 0..b.lines.len() {
        let key = match (ended, b.outcome(i)) {
            (None, _) => "processing",
            (Some(_), Outcome::Answered) => "succeeded",
            (Some(_), Outcome::Failed) => "errored",
            (Some(_), Outcome::Expired) => "expired",
            (Some(_), Outcome::Cancelled) => "canceled",
        };
        counts[key] = json!(counts[key].as_u64().unwrap_or(0) + 1);
    }
    let status = match (ended, b.cancelled_at) {
        (Some(_), _) => "ended",
        (None, Some(_)) => "canceling",
        (None, None) => "in_progress",
    };
    json!({
        "id": id, "type": "message_batch", "processing_status": status,
        "request_counts": counts,
        "ended_at": ended.map(rfc3339),
        "created_at": rfc3339(b.created),
        "expires_at": rfc3339(b.created + Duration::from_secs(86_400)),
        "archived_at": null,
        "cancel_initiated_at": b.cancelled_at.map(rfc3339),
        "results_url": ended.map(|_| format!("{results_base}/v1/messages/batches/{id}/results")),
    })
}

fn host_of(headers: &axum::http::HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

async fn anthropic_create(
    State(state): Shared,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let invalid = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid("body is not JSON");
    };
    let Some(requests) = request["requests"].as_array().filter(|r| !r.is_empty()) else {
        return invalid("requests: a non-empty list is required");
    };
    let mut lines = Vec::with_capacity(requests.len());
    let mut seen = std::collections::HashSet::new();
    for (n, r) in requests.iter().enumerate() {
        let Some(custom_id) = r["custom_id"].as_str().filter(|c| valid_custom_id(c)) else {
            return invalid(&format!(
                "requests.{n}.custom_id: 1 to 64 of a-z A-Z 0-9 _ -"
            ));
        };
        let params = &r["params"];
        if !params["model"].is_string()
            || !params["max_tokens"].is_u64()
            || !params["messages"].is_array()
        {
            return invalid(&format!(
                "requests.{n}.params: model, max_tokens and messages are required"
            ));
        }
        if !seen.insert(custom_id.to_string()) {
            return invalid(&format!("requests.{n}.custom_id: {custom_id} is repeated"));
        }
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body: params.clone(),
        });
    }
    let Ok(mut s) = state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    s.stats.created += 1;
    s.stats.lines += lines.len();
    let id = s.id("msgbatch_");
    let batch = Batch {
        api: "anthropic",
        lines,
        created: SystemTime::now(),
        plan: s.plan.clone(),
        cancelled_at: None,
        input_file_id: None,
        endpoint: "/v1/messages".into(),
        metadata: Value::Null,
        invalid: None,
    };
    let shown = anthropic_batch(&id, &batch, &host_of(&headers));
    s.batches.insert(id, batch);
    axum::Json(shown).into_response()
}

async fn anthropic_get(
    State(state): Shared,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let base = host_of(&headers);
    with_batch(
        &state,
        &id,
        "anthropic",
        |s| s.polls += 1,
        |id, b| axum::Json(anthropic_batch(id, b, &base)).into_response(),
    )
}

async fn anthropic_cancel(
    State(state): Shared,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let base = host_of(&headers);
    with_batch(
        &state,
        &id,
        "anthropic",
        |s| s.cancels += 1,
        |id, b| {
            if b.ended_at().is_none() {
                b.cancelled_at = Some(SystemTime::now());
            }
            axum::Json(anthropic_batch(id, b, &base)).into_response()
        },
    )
}

async fn anthropic_results(State(state): Shared, Path(id): Path<String>) -> Response {
    with_batch(
        &state,
        &id,
        "anthropic",
        |s| s.downloads += 1,
        |_, b| {
            if b.ended_at().is_none() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "the batch has not ended: its results are not available yet",
                );
            }
            let mut out = String::new();
            for (i, line) in b.lines.iter().enumerate() {
                let result = match b.outcome(i) {
                    Outcome::Answered => {
                        let (text, input, output) = answer_of(&line.body);
                        json!({"type": "succeeded", "message": {
                            "id": format!("msg_b{i}"), "type": "message", "role": "assistant",
                            "model": line.body["model"],
                            "content": [{"type": "text", "text": text}],
                            "stop_reason": "end_turn", "stop_sequence": null,
                            "usage": {"input_tokens": input, "output_tokens": output,
                                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
                    }
                    Outcome::Failed => json!({"type": "errored", "error": {"type": "error",
                        "error": {"type": "api_error", "message": "Internal server error"}}}),
                    Outcome::Expired => json!({"type": "expired"}),
                    Outcome::Cancelled => json!({"type": "canceled"}),
                };
                out.push_str(&json!({"custom_id": line.custom_id, "result": result}).to_string());
                out.push('\n');
            }
            (
                [(axum::http::header::CONTENT_TYPE, "application/binary")],
                out,
            )
                .into_response()
        },
    )
}

#[cfg(test)]
mod tests;
