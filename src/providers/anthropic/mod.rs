//! Anthropic Messages API: request building, the `event:`-named SSE decoder, error mapping.
//!
//! Wire facts (PROVIDERS.md): `message_start` carries input usage (plus cache creation/read
//! tokens, which count as input); `content_block_delta` with `text_delta` carries text;
//! `message_delta` carries `stop_reason` and the *cumulative* output token count; then
//! `message_stop`. `ping` may come anywhere; an `error` event can arrive inside a 200 stream.
//! A tool call is a `tool_use` content block (`content_block_start` names it, then
//! `input_json_delta`s carry its input text). Anthropic has no embeddings API.
//!
//! `request` builds the request (and the answer tool of a JSON job).

pub(super) mod batch;
mod request;

use request::{AnswerTool, request_body};

use eventsource_stream::Event;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::helpers::clip;
use super::sse::{SseDecoder, Step};
use super::{Call, FinishReason, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::contract::{ErrorCode, TokenClasses};
use crate::contract::{GenerateRequest, ToolCallChunk};
use crate::error::{ProviderError, code_for_status};

const API_VERSION: &str = "2023-06-01";

pub(crate) struct Anthropic {
    http: super::Http,
    url: Url,
    key: Option<SecretString>,
    default_max_tokens: u32,
}

impl Anthropic {
    pub fn new(
        cfg: &ProviderConfig,
        default_max_tokens: u32,
        http: super::Http,
    ) -> Result<Self, ProviderError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or("https://api.anthropic.com");
        Ok(Self {
            http,
            url: super::helpers::endpoint(base, "messages")?,
            key: cfg.api_key.clone(),
            default_max_tokens,
        })
    }

    /// `max_tokens` sent when a job sets none.
    pub fn default_max_tokens(&self) -> u32 {
        self.default_max_tokens
    }

    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let answer = AnswerTool::of(req);
        let body = request_body(model, req, self.default_max_tokens, answer.as_ref());
        let mut builder = self
            .http
            .client
            .post(self.url.clone())
            .header("anthropic-version", API_VERSION)
            .json(&body);
        if let Some(key) = &self.key {
            builder = builder.header("x-api-key", key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify).await?;
        let events = if req.stream {
            self.http.sse(response, StreamDecoder::new(answer))
        } else {
            let text = self.http.read_body(response).await?;
            Box::pin(futures::stream::iter(parse_message(&text, answer.as_ref())))
        };
        Ok(Call {
            http_status: Some(status),
            events,
        })
    }
}

/// Map a stop reason to a finish reason, or to the error it really is.
fn finish(stop_reason: &str) -> Result<FinishReason, ProviderError> {
    match stop_reason {
        "end_turn" | "stop_sequence" => Ok(FinishReason::Stop),
        "max_tokens" | "model_context_window_exceeded" => Ok(FinishReason::Length),
        "tool_use" => Ok(FinishReason::ToolCalls),
        "refusal" => Err(ProviderError::new(
            ErrorCode::ContentFiltered,
            "the model refused to answer (stop_reason: refusal)",
        )),
        other => Ok(FinishReason::other(other)),
    }
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    /// Cache writes by lifetime (`cache_creation_input_tokens` is their sum).
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize, Default)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Every prompt token: Anthropic's `input_tokens` counts only those after the last cache
    /// breakpoint; cache reads and writes come on top.
    fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
    }

    /// The billed input classes (Anthropic reports no reasoning or image counts apart).
    fn classes(&self) -> TokenClasses {
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        let hour = self
            .cache_creation
            .as_ref()
            .and_then(|c| c.ephemeral_1h_input_tokens)
            .unwrap_or(0)
            .min(written);
        TokenClasses {
            cache_read_tokens: self.cache_read_input_tokens.unwrap_or(0),
            cache_write_tokens: written - hour,
            cache_write_1h_tokens: hour,
            ..TokenClasses::default()
        }
    }

    /// Whether this usage carries input counts (a `message_delta` may carry only output).
    fn has_input(&self) -> bool {
        self.total_input() > 0
    }
}

/// One streamed event, by its `type`. `ping`, `content_block_start/stop` and event types
/// added later are `Unknown`, and ignored.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireMessage,
    },
    ContentBlockStart {
        #[serde(default)]
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u32,
        delta: BlockDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        usage: Option<WireUsage>,
    },
    MessageStop,
    Error {
        error: Option<WireError>,
    },
    #[serde(other)]
    Unknown,
}

/// A content block's increment: text, a tool call's input text, or kinds we do not use
/// (thinking, signatures).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize, Default)]
struct MessageDelta {
    stop_reason: Option<String>,
}

/// A whole message (non-streamed answers, and `message_start`).
#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    usage: WireUsage,
    #[serde(default)]
    content: Vec<Block>,
    stop_reason: Option<String>,
}

/// A content block: text, a tool call, or kinds we do not use. (In `content_block_start`
/// a tool call's `input` is `{}`; its text follows in deltas.)
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Option<serde_json::Value>,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// An error response: `{"type":"error","error":{"type","message"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: WireError,
}

/// What a `tool_use` block of the answer is.
#[derive(Clone, Copy)]
enum ToolBlock {
    /// The answer tool's: its input is the answer text.
    Answer,
    /// The job's tool call number `n` (0-based, in order of the answer).
    Call(u32),
}

/// Tool-use blocks seen so far, and whether the answer came through the answer tool.
#[derive(Default)]
struct ToolBlocks {
    answer_tool: Option<AnswerTool>,
    blocks: Vec<(u32, ToolBlock)>,
    calls: u32,
}

impl ToolBlocks {
    /// A new `tool_use` block at `index`: the answer tool's, or the next call.
    fn start(&mut self, index: u32, id: String, name: String) -> Option<ProviderEvent> {
        if self.answer_tool.as_ref().is_some_and(|a| a.0 == name) {
            self.blocks.push((index, ToolBlock::Answer));
            return None;
        }
        let n = self.calls;
        self.calls += 1;
        self.blocks.push((index, ToolBlock::Call(n)));
        Some(ProviderEvent::ToolCall(ToolCallChunk {
            index: n,
            id: Some(id),
            name: Some(name),
            arguments: String::new(),
        }))
    }

    /// Input text of the block at `index`, as an answer delta or a call's arguments.
    fn input(&self, index: u32, text: String) -> Option<ProviderEvent> {
        let (_, block) = self.blocks.iter().rev().find(|(i, _)| *i == index)?;
        (!text.is_empty()).then_some(match *block {
            ToolBlock::Answer => ProviderEvent::Delta(text),
            ToolBlock::Call(n) => ProviderEvent::ToolCall(ToolCallChunk {
                index: n,
                id: None,
                name: None,
                arguments: text,
            }),
        })
    }

    /// The finish reason: `tool_use` when only the answer tool was called is a plain stop.
    fn finish(&self, reason: &str) -> Result<FinishReason, ProviderError> {
        let answered = self
            .blocks
            .iter()
            .any(|(_, b)| matches!(b, ToolBlock::Answer));
        if reason == "tool_use" && answered && self.calls == 0 {
            return Ok(FinishReason::Stop);
        }
        finish(reason)
    }
}

#[derive(Default)]
pub(crate) struct StreamDecoder {
    /// Input counts and classes from `message_start`.
    input: Usage,
    finished: bool,
    tools: ToolBlocks,
}

impl StreamDecoder {
    fn new(answer_tool: Option<AnswerTool>) -> Self {
        StreamDecoder {
            tools: ToolBlocks {
                answer_tool,
                ..ToolBlocks::default()
            },
            ..StreamDecoder::default()
        }
    }
}

impl SseDecoder for StreamDecoder {
    fn event(&mut self, event: &Event) -> Result<Step, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(Step::More(Vec::new()));
        }
        let ev: WireEvent = serde_json::from_str(&event.data).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable stream event ({e}): {}", clip(&event.data)),
            )
        })?;
        let mut out = Vec::new();
        match ev {
            WireEvent::MessageStart { message } => {
                self.input = Usage {
                    input_tokens: message.usage.total_input(),
                    output_tokens: 0,
                    classes: message.usage.classes(),
                };
            }
            WireEvent::ContentBlockStart {
                index,
                content_block: Block::ToolUse { id, name, .. },
            } => out.extend(self.tools.start(index, id, name)),
            WireEvent::ContentBlockDelta {
                delta: BlockDelta::TextDelta { text },
                ..
            } if !text.is_empty() => out.push(ProviderEvent::Delta(text)),
            WireEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta { partial_json },
            } => out.extend(self.tools.input(index, partial_json)),
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    // Newer API versions repeat the input counts here (cumulative).
                    let input = if u.has_input() && u.total_input() >= self.input.input_tokens {
                        Usage {
                            input_tokens: u.total_input(),
                            output_tokens: 0,
                            classes: u.classes(),
                        }
                    } else {
                        self.input
                    };
                    out.push(ProviderEvent::Usage(Usage {
                        output_tokens: u.output_tokens,
                        ..input
                    }));
                }
                if let Some(reason) = delta.stop_reason {
                    self.finished = true;
                    out.push(ProviderEvent::Finish(self.tools.finish(&reason)?));
                }
            }
            WireEvent::MessageStop => {
                return if self.finished {
                    Ok(Step::End(out))
                } else {
                    Err(ProviderError::new(
                        ErrorCode::Truncated,
                        "message_stop before a stop_reason",
                    ))
                };
            }
            WireEvent::Error { error } => {
                let e = error.unwrap_or(WireError {
                    kind: String::new(),
                    message: event.data.clone(),
                });
                return Err(classify_error_type(&e.kind, &e.message, 200));
            }
            WireEvent::ContentBlockStart { .. }
            | WireEvent::ContentBlockDelta { .. }
            | WireEvent::Unknown => {}
        }
        Ok(Step::More(out))
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

fn parse_message(
    text: &str,
    answer_tool: Option<&AnswerTool>,
) -> Vec<Result<ProviderEvent, ProviderError>> {
    let m: WireMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            return vec![Err(ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable message ({e}): {}", clip(text)),
            ))];
        }
    };
    let Some(reason) = m.stop_reason.as_deref() else {
        return vec![Err(ProviderError::new(
            ErrorCode::Truncated,
            "message has no stop_reason",
        ))];
    };
    let mut tools = ToolBlocks {
        answer_tool: answer_tool.cloned(),
        ..ToolBlocks::default()
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (index, block) in (0u32..).zip(m.content) {
        match block {
            Block::Text { text: t } => text.push_str(&t),
            Block::ToolUse { id, name, input } => {
                calls.extend(tools.start(index, id, name));
                let input = input.map(|v| v.to_string()).unwrap_or_default();
                match tools.input(index, input) {
                    Some(ProviderEvent::Delta(answer)) => text.push_str(&answer),
                    other => calls.extend(other),
                }
            }
            Block::Unknown => {}
        }
    }
    let reason = match tools.finish(reason) {
        Ok(r) => r,
        Err(e) => return vec![Err(e)],
    };
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(Ok(ProviderEvent::Delta(text)));
    }
    out.extend(calls.into_iter().map(Ok));
    out.push(Ok(ProviderEvent::Finish(reason)));
    out.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: m.usage.total_input(),
        output_tokens: m.usage.output_tokens,
        classes: m.usage.classes(),
    })));
    out
}

/// A batch line's message (`batch`) as the events of a call for `req`.
pub(crate) fn parse_batch_answer(
    text: &str,
    req: &GenerateRequest,
) -> Vec<Result<ProviderEvent, ProviderError>> {
    parse_message(text, AnswerTool::of(req).as_ref())
}

/// Classify an HTTP error body `{"type":"error","error":{"type","message"}}`.
pub(crate) fn classify(status: u16, body: &str) -> ProviderError {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) if !error.message.is_empty() => {
            classify_error_type(&error.kind, &error.message, status)
        }
        parsed => {
            let kind = parsed.map(|b| b.error.kind).unwrap_or_default();
            let message = if body.is_empty() {
                format!("HTTP {status}")
            } else {
                clip(body)
            };
            classify_error_type(&kind, &message, status)
        }
    }
}

fn classify_error_type(kind: &str, message: &str, status: u16) -> ProviderError {
    let lower = message.to_ascii_lowercase();
    let code = if lower.contains("prompt is too long") || lower.contains("context window") {
        ErrorCode::ContextTooLong
    } else if kind.contains("spend_limit") || lower.contains("credit balance") {
        ErrorCode::QuotaExhausted
    } else {
        match kind {
            "overloaded_error" => ErrorCode::Overloaded,
            "rate_limit_error" => ErrorCode::RateLimited,
            "api_error" => ErrorCode::ServerError,
            "invalid_request_error" => ErrorCode::BadRequest,
            "authentication_error" | "permission_error" => ErrorCode::Unauthorized,
            "not_found_error" => ErrorCode::NotFound,
            "request_too_large" => ErrorCode::PayloadTooLarge,
            _ if status == 200 => ErrorCode::ServerError,
            _ => code_for_status(status),
        }
    };
    ProviderError::new(code, clip(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Role;
    use serde_json::json;

    fn ev(name: &str, data: &str) -> Event {
        Event {
            event: name.into(),
            data: data.into(),
            id: String::new(),
            retry: None,
        }
    }

    #[test]
    fn decodes_the_reference_transcript_with_cumulative_usage() {
        let mut d = StreamDecoder::default();
        let mut all = Vec::new();
        let transcript = [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":5,"cache_creation_input_tokens":10,"cache_creation":{"ephemeral_5m_input_tokens":4,"ephemeral_1h_input_tokens":6}}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            ("ping", r#"{"type":"ping"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}"#,
            ),
            (
                "content_block_stop",
                r#"{"type":"content_block_stop","index":0}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            ),
        ];
        for (name, data) in transcript {
            match d.event(&ev(name, data)).unwrap() {
                Step::More(v) | Step::End(v) => all.extend(v),
            }
        }
        assert!(matches!(
            d.event(&ev("message_stop", r#"{"type":"message_stop"}"#))
                .unwrap(),
            Step::End(_)
        ));
        assert_eq!(
            all,
            vec![
                ProviderEvent::Delta("Hello".into()),
                ProviderEvent::Usage(Usage {
                    input_tokens: 40,
                    output_tokens: 15,
                    classes: TokenClasses {
                        cache_read_tokens: 5,
                        cache_write_tokens: 4,
                        cache_write_1h_tokens: 6,
                        ..TokenClasses::default()
                    },
                }),
                ProviderEvent::Finish(FinishReason::Stop),
            ]
        );
    }

    #[test]
    fn errors_in_stream_and_over_http_are_classified_by_type() {
        let mut d = StreamDecoder::default();
        let e = d
            .event(&ev(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ))
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::Overloaded);
        let c = |s, b: &str| classify(s, b).code;
        assert_eq!(
            c(
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            ErrorCode::Overloaded
        );
        assert_eq!(
            c(
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 250000 tokens > 200000 maximum"}}"#
            ),
            ErrorCode::ContextTooLong
        );
        assert_eq!(
            c(
                429,
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#
            ),
            ErrorCode::RateLimited
        );
        assert_eq!(c(401, ""), ErrorCode::Unauthorized);
    }

    #[test]
    fn a_refusal_is_a_content_filter_error() {
        let mut d = StreamDecoder::default();
        let e = d
            .event(&ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"refusal"},"usage":{"output_tokens":0}}"#))
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::ContentFiltered);
    }

    #[test]
    fn requests_put_the_system_prompt_at_the_top_level_and_always_set_max_tokens() {
        let req = GenerateRequest {
            system: Some("be brief".into()),
            messages: vec![crate::contract::Message::text(Role::User, "hi")],
            options: Default::default(),
            stream: true,
            ..Default::default()
        };
        let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    }

    #[test]
    fn cache_breakpoints_become_cache_control_on_the_marked_blocks() {
        use crate::contract::{CacheTtl, Message, Tool};
        let mut req = GenerateRequest {
            system: Some("be brief".into()),
            context: vec!["chunk".into()],
            system_cache: Some(CacheTtl::OneHour),
            messages: vec![
                Message {
                    cache: Some(CacheTtl::FiveMinutes),
                    ..Message::text(Role::User, "a long document")
                },
                Message::text(Role::Assistant, "read it"),
                Message::text(Role::User, "summarise"),
            ],
            tools: vec![Tool {
                name: "lookup".into(),
                description: None,
                parameters: json!({"type": "object"}),
                cache: Some(CacheTtl::FiveMinutes),
            }],
            ..Default::default()
        };
        let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
        assert_eq!(
            body["system"],
            json!([
                {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                {"type": "text", "text": "Context:\n[1] chunk\n"}
            ])
        );
        assert_eq!(
            body["messages"][0]["content"],
            json!([{"type": "text", "text": "a long document", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(body["messages"][2]["content"], "summarise");
        assert_eq!(
            body["tools"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
        // Unmarked: one system text with the context joined, no cache_control anywhere.
        req.system_cache = None;
        req.messages[0].cache = None;
        req.tools[0].cache = None;
        let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
        assert_eq!(body["system"], "be brief\n\nContext:\n[1] chunk\n");
        assert!(!body.to_string().contains("cache_control"), "{body}");
    }

    #[test]
    fn cache_reads_and_writes_by_lifetime_are_read_from_whole_answers() {
        let body = r#"{"id":"m","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"hi"}],
            "stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":3,"cache_read_input_tokens":100,
            "cache_creation_input_tokens":30,"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":20}}}"#;
        let m: WireMessage = serde_json::from_str(body).unwrap();
        assert_eq!(m.usage.total_input(), 140);
        assert_eq!(
            m.usage.classes(),
            TokenClasses {
                cache_read_tokens: 100,
                cache_write_tokens: 10,
                cache_write_1h_tokens: 20,
                ..TokenClasses::default()
            }
        );
        // Without the breakdown every write is a 5-minute write.
        let m: WireUsage =
            serde_json::from_str(r#"{"input_tokens":1,"cache_creation_input_tokens":7}"#).unwrap();
        assert_eq!(m.classes().cache_write_tokens, 7);
    }

    #[test]
    fn absurd_numbers_saturate_never_a_panic() {
        let mut d = StreamDecoder::default();
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":18446744073709551615,"output_tokens":1,"cache_creation_input_tokens":18446744073709551615,"cache_read_input_tokens":18446744073709551615}}}"#;
        assert!(d.event(&ev("message_start", start)).is_ok());
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":18446744073709551615}}"#;
        let out = match d.event(&ev("message_delta", delta)).unwrap() {
            Step::More(v) | Step::End(v) => v,
        };
        assert!(out.iter().any(|e| matches!(e, ProviderEvent::Usage(u)
            if u.input_tokens == u64::MAX && u.output_tokens == u64::MAX)));
        let bad = r#"{"type":"message_delta","usage":{"output_tokens":-1}}"#;
        assert!(d.event(&ev("message_delta", bad)).is_err());
    }

    #[test]
    fn events_and_values_it_does_not_know_are_ignored_or_passed_through_by_name() {
        let mut d = StreamDecoder::default();
        for (name, data) in [
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
            ),
            (
                "brand_new_event",
                r#"{"type":"brand_new_event","anything":[1,2]}"#,
            ),
        ] {
            let Step::More(out) = d.event(&ev(name, data)).unwrap() else {
                panic!("{name} ended the stream")
            };
            assert!(out.is_empty(), "{name}: {out:?}");
        }
        let Step::More(out) = d
            .event(&ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"pause_turn"},"usage":{"output_tokens":3}}"#))
            .unwrap()
        else {
            panic!("ended before message_stop")
        };
        assert_eq!(
            out.last(),
            Some(&ProviderEvent::Finish(FinishReason::Other(
                "pause_turn".into()
            )))
        );
    }

    fn rich_request() -> GenerateRequest {
        use crate::contract::{Image, Message, Tool, ToolCall};
        let mut user = Message::text(Role::User, "What is this, and the weather there?");
        user.images = vec![
            Image {
                source: crate::contract::ImageSource::Data {
                    media_type: "image/png".into(),
                    data: "iVBORw0KGgo=".into(),
                },
                detail: None,
            },
            Image {
                source: crate::contract::ImageSource::Url("https://example.com/cat.png".into()),
                detail: Some("low".into()),
            },
        ];
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.tool_calls = vec![
            ToolCall {
                id: "toolu_1".into(),
                name: "get_weather".into(),
                arguments: json!({"city": "Paris"}),
            },
            ToolCall {
                id: "toolu_2".into(),
                name: "get_weather".into(),
                arguments: json!({"city": "Lyon"}),
            },
        ];
        let result = |id: &str, text: &str| {
            let mut m = Message::text(Role::Tool, text);
            m.tool_call_id = Some(id.into());
            m
        };
        GenerateRequest {
            system: Some("be brief".into()),
            messages: vec![
                user,
                assistant,
                result("toolu_1", r#"{"temp_c": 21}"#),
                result("toolu_2", r#"{"temp_c": 18}"#),
                Message::text(Role::User, "And tomorrow?"),
            ],
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("Current weather".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
                cache: None,
            }],
            stream: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_rich_request_has_image_tool_use_and_merged_tool_result_blocks() {
        let req = rich_request();
        let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                    {"type": "text", "text": "What is this, and the weather there?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "{\"temp_c\": 21}"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "{\"temp_c\": 18}"},
                    {"type": "text", "text": "And tomorrow?"}]}
            ])
        );
        assert_eq!(
            body["tools"],
            json!([{"name": "get_weather", "description": "Current weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
        );
        assert!(body.get("tool_choice").is_none());
        let mut req = req;
        for (choice, wire) in [
            (crate::contract::ToolChoice::Auto, json!({"type": "auto"})),
            (crate::contract::ToolChoice::None, json!({"type": "none"})),
            (
                crate::contract::ToolChoice::Required,
                json!({"type": "any"}),
            ),
            (
                crate::contract::ToolChoice::Named("get_weather".into()),
                json!({"type": "tool", "name": "get_weather"}),
            ),
        ] {
            req.tool_choice = Some(choice);
            let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
            assert_eq!(body["tool_choice"], wire);
        }
        // One call at a time is said inside tool_choice.
        req.tool_choice = None;
        req.parallel_tool_calls = Some(false);
        let body = serde_json::to_value(request_body("claude", &req, 1024, None)).unwrap();
        assert_eq!(
            body["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn a_json_job_gets_an_answer_tool_it_must_call_named_apart_from_its_tools() {
        use crate::contract::{ResponseFormat, Tool};
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}});
        let mut req = GenerateRequest {
            messages: vec![crate::contract::Message::text(Role::User, "Who?")],
            response_format: Some(ResponseFormat::JsonSchema {
                name: "person".into(),
                schema: schema.clone(),
                strict: true,
            }),
            ..Default::default()
        };
        let answer = AnswerTool::of(&req).unwrap();
        assert_eq!(answer.0, "person");
        let body = serde_json::to_value(request_body("claude", &req, 1024, Some(&answer))).unwrap();
        assert_eq!(body["tools"][0]["name"], "person");
        assert_eq!(body["tools"][0]["input_schema"], schema);
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "person"})
        );
        // With tools of its own the model may call one of them or answer.
        req.tools = vec![Tool {
            name: "person".into(),
            description: None,
            parameters: json!({"type": "object"}),
            cache: None,
        }];
        let answer = AnswerTool::of(&req).unwrap();
        assert_eq!(answer.0, "json_answer");
        let body = serde_json::to_value(request_body("claude", &req, 1024, Some(&answer))).unwrap();
        assert_eq!(body["tools"][1]["name"], "json_answer");
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        req.response_format = Some(ResponseFormat::JsonObject);
        req.tools.clear();
        let answer = AnswerTool::of(&req).unwrap();
        let body = serde_json::to_value(request_body("claude", &req, 1024, Some(&answer))).unwrap();
        assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
        req.response_format = Some(ResponseFormat::Text);
        assert_eq!(AnswerTool::of(&req), None);
    }

    fn run(d: &mut StreamDecoder, frames: &[(&str, &str)]) -> Vec<ProviderEvent> {
        let mut all = Vec::new();
        for (name, data) in frames {
            match d.event(&ev(name, data)).unwrap() {
                Step::More(v) | Step::End(v) => all.extend(v),
            }
        }
        all
    }

    #[test]
    fn streamed_tool_use_blocks_are_tool_call_chunks_numbered_from_zero() {
        let mut d = StreamDecoder::default();
        let all = run(
            &mut d,
            &[
                (
                    "content_block_start",
                    r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Checking."}}"#,
                ),
                (
                    "content_block_start",
                    r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_a","name":"get_weather","input":{}}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Pa"}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ris\"}"}}"#,
                ),
                (
                    "content_block_stop",
                    r#"{"type":"content_block_stop","index":1}"#,
                ),
                (
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":30}}"#,
                ),
            ],
        );
        let chunk = |id: Option<&str>, name: Option<&str>, args: &str| {
            ProviderEvent::ToolCall(ToolCallChunk {
                index: 0,
                id: id.map(Into::into),
                name: name.map(Into::into),
                arguments: args.into(),
            })
        };
        assert_eq!(
            all,
            vec![
                ProviderEvent::Delta("Checking.".into()),
                chunk(Some("toolu_a"), Some("get_weather"), ""),
                chunk(None, None, "{\"city\": \"Pa"),
                chunk(None, None, "ris\"}"),
                ProviderEvent::Usage(Usage::plain(0, 30)),
                ProviderEvent::Finish(FinishReason::ToolCalls),
            ]
        );
    }

    #[test]
    fn the_answer_tools_input_is_the_answer_text_streamed_or_whole() {
        let answer = AnswerTool("person".into());
        let mut d = StreamDecoder::new(Some(answer.clone()));
        let all = run(
            &mut d,
            &[
                (
                    "content_block_start",
                    r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_a","name":"person","input":{}}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"name\": "}}"#,
                ),
                (
                    "content_block_delta",
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"\"Ada\"}"}}"#,
                ),
                (
                    "message_delta",
                    r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
                ),
            ],
        );
        assert_eq!(all[0], ProviderEvent::Delta("{\"name\": ".into()));
        assert_eq!(all[1], ProviderEvent::Delta("\"Ada\"}".into()));
        assert_eq!(all.last(), Some(&ProviderEvent::Finish(FinishReason::Stop)));
        let whole = r#"{"content":[{"type":"tool_use","id":"toolu_a","name":"person","input":{"name":"Ada"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":9}}"#;
        let out: Vec<ProviderEvent> = parse_message(whole, Some(&answer))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(out[0], ProviderEvent::Delta(r#"{"name":"Ada"}"#.into()));
        assert_eq!(out[1], ProviderEvent::Finish(FinishReason::Stop));
        // Without the answer tool the same block is a tool call.
        let out: Vec<ProviderEvent> = parse_message(whole, None)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            out[0],
            ProviderEvent::ToolCall(ToolCallChunk {
                index: 0,
                id: Some("toolu_a".into()),
                name: Some("person".into()),
                arguments: String::new()
            })
        );
        assert_eq!(
            out[1],
            ProviderEvent::ToolCall(ToolCallChunk {
                index: 0,
                id: None,
                name: None,
                arguments: r#"{"name":"Ada"}"#.into()
            })
        );
        assert_eq!(out[2], ProviderEvent::Finish(FinishReason::ToolCalls));
    }
}
