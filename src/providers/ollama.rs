//! Ollama's native API: `POST /api/chat` with NDJSON streaming (`stream` defaults to true),
//! usage from `prompt_eval_count` / `eval_count` on the `done: true` line (which may still carry
//! text), and `{"error": "..."}` bodies or lines, the latter also inside a 200 stream.
//!
//! Rich jobs: images go as base64 strings in a message's `images` (Ollama fetches no URLs),
//! tools as OpenAI-style function tools, assistant `tool_calls` with arguments as JSON
//! objects, `tool` messages with `tool_name`; `format` is `"json"` or the job's schema. A
//! tool call arrives whole in a line's `message.tool_calls`. Ollama has no `tool_choice`:
//! `none` sends no tools; `required` and a named tool cannot be enforced (the answer's check
//! still applies to whatever calls come back).

use std::collections::VecDeque;

use futures::StreamExt;
use reqwest::Url;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::helpers::{clip, lenient_count};
use super::{Call, EventStream, FinishReason, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::contract::ErrorCode;
use crate::contract::{
    GenerateRequest, ImageSource, Message, ResponseFormat, Role, ToolCallChunk, ToolChoice,
};
use crate::error::{ProviderError, code_for_status};

pub(crate) struct Ollama {
    http: super::Http,
    url: Url,
    embed_url: Url,
}

impl Ollama {
    pub fn new(cfg: &ProviderConfig, http: super::Http) -> Result<Self, ProviderError> {
        let base = cfg.base_url.as_deref().unwrap_or("http://localhost:11434");
        let mut url = Url::parse(base)
            .map_err(|e| ProviderError::new(ErrorCode::BadRequest, format!("base_url: {e}")))?;
        let root = url.path().trim_end_matches('/').to_string();
        let mut embed_url = url.clone();
        embed_url.set_path(&format!("{root}/api/embed"));
        url.set_path(&format!("{root}/api/chat"));
        Ok(Self {
            http,
            url,
            embed_url,
        })
    }

    /// `POST /api/embed` with all inputs at once (the caller sizes batches).
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<super::Embedded, ProviderError> {
        #[derive(Serialize)]
        struct EmbedRequest<'a> {
            model: &'a str,
            input: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            dimensions: Option<u32>,
        }
        let body = EmbedRequest {
            model,
            input: inputs,
            dimensions,
        };
        let request = self.http.client.post(self.embed_url.clone()).json(&body);
        let (response, status) = self.http.send(request, classify).await?;
        let text = self.http.read_body(response).await?;
        #[derive(serde::Deserialize)]
        struct Body {
            embeddings: Vec<Vec<f32>>,
            prompt_eval_count: Option<u64>,
        }
        let parsed: Body = serde_json::from_str(&text).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable embeddings ({e}): {}", clip(&text)),
            )
        })?;
        Ok(super::Embedded {
            vectors: parsed.embeddings,
            input_tokens: parsed.prompt_eval_count,
            http_status: Some(status),
        })
    }

    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let request = self
            .http
            .client
            .post(self.url.clone())
            .json(&request_body(model, req));
        let (response, status) = self.http.send(request, classify).await?;
        Ok(Call {
            http_status: Some(status),
            // A non-streamed answer is one line holding the whole body.
            events: decode(response, self.http.line_or_body(req.stream)),
        })
    }
}

/// An `/api/chat` request.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<MessageIn<'a>>,
    /// Always explicit: Ollama streams unless told otherwise.
    stream: bool,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolIn<'a>>,
    /// `"json"`, or a JSON Schema the answer must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<std::borrow::Cow<'a, serde_json::Value>>,
}

#[derive(Serialize)]
struct MessageIn<'a> {
    role: &'static str,
    content: &'a str,
    /// Base64 image bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<CallIn<'a>>,
    /// The tool whose result a `tool` message is.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Serialize)]
struct CallIn<'a> {
    function: FunctionIn<'a>,
}

#[derive(Serialize)]
struct FunctionIn<'a> {
    name: &'a str,
    arguments: &'a serde_json::Value,
}

#[derive(Serialize)]
struct ToolIn<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: ToolFunctionIn<'a>,
}

#[derive(Serialize)]
struct ToolFunctionIn<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a serde_json::Value,
}

impl<'a> MessageIn<'a> {
    fn of(m: &'a Message, all: &'a [Message]) -> Self {
        MessageIn {
            role: match m.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            },
            content: &m.content,
            // URL images never get here: the entry is skipped (`providers::capabilities`).
            images: m
                .images
                .iter()
                .filter_map(|i| match &i.source {
                    ImageSource::Data { data, .. } => Some(data.as_str()),
                    ImageSource::Url(_) => None,
                })
                .collect(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| CallIn {
                    function: FunctionIn {
                        name: &c.name,
                        arguments: &c.arguments,
                    },
                })
                .collect(),
            tool_name: m
                .tool_call_id
                .as_deref()
                .and_then(|id| super::helpers::tool_name_of(all, id)),
        }
    }
}

#[derive(Serialize)]
struct Options<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

impl Options<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.num_predict.is_none()
            && self.seed.is_none()
            && self.stop.is_empty()
    }
}

fn request_body<'a>(model: &'a str, req: &'a GenerateRequest) -> WireRequest<'a> {
    let system = req.system.as_deref().map(|content| MessageIn {
        role: "system",
        content,
        images: Vec::new(),
        tool_calls: Vec::new(),
        tool_name: None,
    });
    let messages = system
        .into_iter()
        .chain(req.messages.iter().map(|m| MessageIn::of(m, &req.messages)))
        .collect();
    let tools = if req.tool_choice == Some(ToolChoice::None) {
        Vec::new()
    } else {
        req.tools
            .iter()
            .map(|t| ToolIn {
                kind: "function",
                function: ToolFunctionIn {
                    name: &t.name,
                    description: t.description.as_deref(),
                    parameters: &t.parameters,
                },
            })
            .collect()
    };
    let format = req.response_format.as_ref().and_then(|f| match f {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(std::borrow::Cow::Owned(serde_json::json!("json"))),
        ResponseFormat::JsonSchema { schema, .. } => Some(std::borrow::Cow::Borrowed(schema)),
    });
    let o = &req.options;
    WireRequest {
        model,
        messages,
        stream: req.stream,
        options: Options {
            temperature: o.temperature,
            top_p: o.top_p,
            num_predict: o.max_tokens,
            seed: o.seed,
            stop: &o.stop,
        },
        tools,
        format,
    }
}

/// One NDJSON line of `/api/chat` (or the whole non-streamed answer).
#[derive(Deserialize)]
struct WireLine {
    /// Present when the server reports an error instead of an answer.
    error: Option<IgnoredAny>,
    message: Option<MessageOut>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    #[serde(default, deserialize_with = "lenient_count")]
    prompt_eval_count: u64,
    #[serde(default, deserialize_with = "lenient_count")]
    eval_count: u64,
}

#[derive(Deserialize)]
struct MessageOut {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<CallOut>,
}

/// A whole tool call (Ollama does not stream a call's arguments in pieces).
#[derive(Deserialize)]
struct CallOut {
    #[serde(default)]
    id: Option<String>,
    function: FunctionOut,
}

#[derive(Deserialize)]
struct FunctionOut {
    name: String,
    #[serde(default)]
    arguments: Option<serde_json::Value>,
}

/// Map a `done_reason` (absent on older servers: a plain stop).
fn finish(reason: Option<&str>) -> FinishReason {
    match reason {
        None | Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some(other) => FinishReason::other(other),
    }
}

/// Decoder state for one answer (a streamed NDJSON body or one JSON object).
#[derive(Default)]
struct Decoder {
    finished: bool,
    /// Tool calls so far (they are numbered across lines).
    calls: u32,
}

impl Decoder {
    fn line(&mut self, line: &[u8]) -> Result<Vec<ProviderEvent>, ProviderError> {
        let v: WireLine = serde_json::from_slice(line).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!(
                    "undecodable line ({e}): {}",
                    clip(&String::from_utf8_lossy(line))
                ),
            )
        })?;
        if v.error.is_some() {
            return Err(classify(200, &String::from_utf8_lossy(line)));
        }
        let mut out = Vec::new();
        if let Some(message) = v.message {
            if !message.content.is_empty() {
                out.push(ProviderEvent::Delta(message.content));
            }
            for call in message.tool_calls {
                let index = self.calls;
                self.calls += 1;
                out.push(ProviderEvent::ToolCall(ToolCallChunk {
                    index,
                    id: Some(call.id.unwrap_or_else(|| format!("call_{index}"))),
                    name: Some(call.function.name),
                    arguments: call
                        .function
                        .arguments
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                }));
            }
        }
        if v.done {
            out.push(ProviderEvent::Usage(Usage::plain(
                v.prompt_eval_count,
                v.eval_count,
            )));
            // Ollama says `stop` when the model called tools.
            let reason = match finish(v.done_reason.as_deref()) {
                FinishReason::Stop if self.calls > 0 => FinishReason::ToolCalls,
                other => other,
            };
            out.push(ProviderEvent::Finish(reason));
            self.finished = true;
        }
        Ok(out)
    }
}

/// NDJSON body -> events. A body that ends before a `done: true` line is truncated; a line
/// longer than `max_line` bytes fails the answer (`response_too_large`).
fn decode(response: reqwest::Response, max_line: usize) -> EventStream {
    decode_body(super::body_stream(response), max_line)
}

/// [`decode`] over any body (the fuzz targets feed it arbitrary bytes).
pub(crate) fn decode_body(body: super::sse::ByteStream, max_line: usize) -> EventStream {
    struct State {
        body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        buf: Vec<u8>,
        /// How much of `buf` is known to hold no newline.
        scanned: usize,
        queue: VecDeque<Result<ProviderEvent, ProviderError>>,
        decoder: Decoder,
        done: bool,
    }
    let state = State {
        body,
        buf: Vec::new(),
        scanned: 0,
        queue: VecDeque::new(),
        decoder: Decoder::default(),
        done: false,
    };
    futures::stream::unfold(state, move |mut s| async move {
        loop {
            // 1. Hand out decoded events; an error ends the stream.
            if let Some(item) = s.queue.pop_front() {
                if item.is_err() {
                    s.done = true;
                    s.queue.clear();
                }
                return Some((item, s));
            }
            // 2. Answer complete (or failed): stop reading the body.
            if s.done {
                return None;
            }
            // 3. Decode a complete buffered line.
            if let Some(pos) = s.buf[s.scanned..].iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = s.buf.drain(..=s.scanned + pos).collect();
                s.scanned = 0;
                let line = line.trim_ascii();
                if !line.is_empty() {
                    match s.decoder.line(line) {
                        Ok(evs) => s.queue.extend(evs.into_iter().map(Ok)),
                        Err(e) => s.queue.push_back(Err(e)),
                    }
                    s.done = s.decoder.finished;
                }
                continue;
            }
            s.scanned = s.buf.len();
            if s.buf.len() > max_line {
                let err = ProviderError::new(
                    ErrorCode::ResponseTooLarge,
                    format!(
                        "an NDJSON line is longer than {max_line} bytes (limits.max_line_bytes)"
                    ),
                );
                s.queue.push_back(Err(err));
                continue;
            }
            // 4. Read more.
            match s.body.next().await {
                Some(Ok(bytes)) => s.buf.extend_from_slice(&bytes),
                Some(Err(e)) => s.queue.push_back(Err(ProviderError::new(
                    ErrorCode::Truncated,
                    format!("stream broken before the answer finished: {e}"),
                ))),
                None => {
                    // A last line without its newline, then the end of the body.
                    let rest = std::mem::take(&mut s.buf);
                    let rest = rest.trim_ascii();
                    if !rest.is_empty() {
                        match s.decoder.line(rest) {
                            Ok(evs) => s.queue.extend(evs.into_iter().map(Ok)),
                            Err(e) => s.queue.push_back(Err(e)),
                        }
                    }
                    if !s.decoder.finished {
                        s.queue.push_back(Err(ProviderError::new(
                            ErrorCode::Truncated,
                            "stream ended before a done line",
                        )));
                    }
                    s.done = true;
                }
            }
        }
    })
    .boxed()
}

/// Classify `{"error": "..."}`.
pub(crate) fn classify(status: u16, body: &str) -> ProviderError {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let parsed = serde_json::from_str::<ErrorBody>(body).ok();
    let message = parsed.map(|b| b.error).unwrap_or_else(|| {
        if body.is_empty() {
            format!("HTTP {status}")
        } else {
            clip(body)
        }
    });
    let lower = message.to_ascii_lowercase();
    let code =
        if lower.contains("context") && (lower.contains("exceed") || lower.contains("too long")) {
            ErrorCode::ContextTooLong
        } else if lower.contains("not found") && status != 200 {
            ErrorCode::NotFound
        } else if status == 200 {
            ErrorCode::ServerError
        } else {
            code_for_status(status)
        };
    ProviderError::new(code, clip(&message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_reference_lines_including_text_on_the_done_line() {
        let mut d = Decoder::default();
        let a = d.line(br#"{"model":"llama3.2","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}"#).unwrap();
        let b = d.line(br#"{"model":"llama3.2","created_at":"2025-01-01T00:00:01Z","message":{"role":"assistant","content":"lo"},"done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":2}"#).unwrap();
        assert_eq!(a, vec![ProviderEvent::Delta("Hel".into())]);
        assert_eq!(
            b,
            vec![
                ProviderEvent::Delta("lo".into()),
                ProviderEvent::Usage(Usage::plain(26, 2)),
                ProviderEvent::Finish(FinishReason::Stop),
            ]
        );
        assert!(d.finished);
    }

    #[test]
    fn error_lines_and_bodies_are_classified() {
        let mut d = Decoder::default();
        assert_eq!(
            d.line(br#"{"error":"an unknown error was encountered"}"#)
                .err()
                .unwrap()
                .code,
            ErrorCode::ServerError
        );
        assert_eq!(
            classify(404, r#"{"error":"model 'x' not found"}"#).code,
            ErrorCode::NotFound
        );
        assert_eq!(classify(502, "").code, ErrorCode::ServerError);
    }

    #[test]
    fn requests_are_explicit_about_streaming_and_map_options() {
        let req = GenerateRequest {
            system: Some("s".into()),
            messages: vec![crate::contract::Message::text(Role::User, "u")],
            options: crate::contract::GenerateOptions {
                max_tokens: Some(7),
                seed: Some(3),
                ..Default::default()
            },
            stream: false,
            ..Default::default()
        };
        let body = serde_json::to_value(request_body("llama3.2", &req)).unwrap();
        assert_eq!(body["stream"], false);
        assert_eq!(body["options"]["num_predict"], 7);
        assert_eq!(body["options"]["seed"], 3);
        assert_eq!(body["messages"][0]["role"], "system");
    }

    #[test]
    fn absurd_numbers_are_read_as_zero_or_saturate_never_a_panic() {
        let mut d = Decoder::default();
        let out = d
            .line(br#"{"message":{"content":""},"done":true,"done_reason":"stop","prompt_eval_count":-1,"eval_count":18446744073709551615}"#)
            .unwrap();
        assert!(out.contains(&ProviderEvent::Usage(Usage::plain(0, u64::MAX))));
        let mut d = Decoder::default();
        let e = d
            .line(br#"{"done":true,"eval_count":1e400}"#)
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::MalformedResponse);
    }

    #[test]
    fn done_reasons_map_to_finish_reasons() {
        for (line, reason) in [
            (r#"{"done":true}"#, FinishReason::Stop),
            (
                r#"{"done":true,"done_reason":"length"}"#,
                FinishReason::Length,
            ),
            (
                r#"{"done":true,"done_reason":"Unload"}"#,
                FinishReason::Other("unload".into()),
            ),
        ] {
            let out = Decoder::default().line(line.as_bytes()).unwrap();
            assert_eq!(out.last(), Some(&ProviderEvent::Finish(reason)), "{line}");
        }
    }

    #[test]
    fn a_rich_request_has_base64_images_tool_calls_as_objects_and_the_tool_name() {
        use crate::providers::fixtures::{tool_turn, weather_schema};
        use serde_json::json;
        let schema = weather_schema();
        let mut req = tool_turn("{\"temp_c\": 21}");
        req.response_format = Some(ResponseFormat::JsonObject);
        let body = serde_json::to_value(request_body("llama3.2-vision", &req)).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "Weather where this is?", "images": ["iVBORw0KGgo="]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "{\"temp_c\": 21}", "tool_name": "get_weather"}
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "function": {"name": "get_weather",
                "description": "Current weather", "parameters": schema}}])
        );
        assert_eq!(body["format"], "json");
        req.response_format = Some(ResponseFormat::JsonSchema {
            name: "weather".into(),
            schema: schema.clone(),
            strict: false,
        });
        req.tool_choice = Some(ToolChoice::None);
        let body = serde_json::to_value(request_body("m", &req)).unwrap();
        assert_eq!(body["format"], schema);
        assert!(
            body.get("tools").is_none(),
            "tool_choice none sends no tools"
        );
    }

    #[test]
    fn tool_calls_arrive_whole_numbered_across_lines_and_finish_tool_calls() {
        let mut d = Decoder::default();
        let a = d
            .line(br#"{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Paris"}}}]},"done":false}"#)
            .unwrap();
        let b = d
            .line(br#"{"message":{"role":"assistant","content":"","tool_calls":[{"id":"x1","function":{"name":"get_time","arguments":{}}}]},"done":true,"done_reason":"stop","eval_count":9}"#)
            .unwrap();
        assert_eq!(
            a,
            vec![crate::providers::fixtures::whole_call(
                0,
                "call_0",
                "get_weather",
                r#"{"city":"Paris"}"#
            )]
        );
        assert_eq!(
            b[0],
            crate::providers::fixtures::whole_call(1, "x1", "get_time", "{}")
        );
        assert_eq!(
            b.last(),
            Some(&ProviderEvent::Finish(FinishReason::ToolCalls))
        );
    }
}
