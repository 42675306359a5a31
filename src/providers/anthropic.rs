//! Anthropic Messages API: request building, the `event:`-named SSE decoder, error mapping.
//!
//! Wire facts (PROVIDERS.md): `message_start` carries input usage (plus cache creation/read
//! tokens, which count as input); `content_block_delta` with `text_delta` carries text;
//! `message_delta` carries `stop_reason` and the *cumulative* output token count; then
//! `message_stop`. `ping` may come anywhere; an `error` event can arrive inside a 200 stream.
//! Anthropic has no embeddings API.

use eventsource_stream::Event;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::helpers::clip;
use super::sse::{SseDecoder, Step};
use super::{Call, FinishReason, ProviderEvent, Usage};
use crate::config::ProviderConfig;
use crate::contract::ErrorCode;
use crate::contract::{GenerateRequest, Role};
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
        let body = request_body(model, req, self.default_max_tokens);
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
            self.http.sse(response, StreamDecoder::default())
        } else {
            let text = self.http.read_body(response).await?;
            Box::pin(futures::stream::iter(parse_message(&text)))
        };
        Ok(Call {
            http_status: Some(status),
            events,
        })
    }
}

/// A Messages API request.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<MessageIn<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
}

#[derive(Serialize)]
struct MessageIn<'a> {
    role: &'static str,
    content: &'a str,
}

fn request_body<'a>(
    model: &'a str,
    req: &'a GenerateRequest,
    default_max_tokens: u32,
) -> WireRequest<'a> {
    let messages = req
        .messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| MessageIn {
            role: if m.role == Role::Assistant {
                "assistant"
            } else {
                "user"
            },
            content: &m.content,
        })
        .collect();
    let o = &req.options;
    WireRequest {
        model,
        max_tokens: o.max_tokens.unwrap_or(default_max_tokens),
        messages,
        stream: req.stream,
        system: req.system.as_deref(),
        // Anthropic's range is 0..=1; the contract's is 0..=2.
        temperature: o.temperature.map(|t| t.min(1.0)),
        top_p: o.top_p,
        stop_sequences: &o.stop,
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
}

impl WireUsage {
    fn total_input(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
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
    ContentBlockDelta {
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

/// A content block's increment: text, or kinds we do not use (thinking, tool input JSON).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
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

/// A content block: text, or kinds we do not use.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
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

#[derive(Default)]
pub(crate) struct StreamDecoder {
    input_tokens: u64,
    finished: bool,
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
                self.input_tokens = message.usage.total_input();
            }
            WireEvent::ContentBlockDelta {
                delta: BlockDelta::TextDelta { text },
            } if !text.is_empty() => out.push(ProviderEvent::Delta(text)),
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    out.push(ProviderEvent::Usage(Usage {
                        input_tokens: self.input_tokens.max(u.total_input()),
                        output_tokens: u.output_tokens,
                    }));
                }
                if let Some(reason) = delta.stop_reason {
                    self.finished = true;
                    out.push(ProviderEvent::Finish(finish(&reason)?));
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
            WireEvent::ContentBlockDelta { .. } | WireEvent::Unknown => {}
        }
        Ok(Step::More(out))
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

fn parse_message(text: &str) -> Vec<Result<ProviderEvent, ProviderError>> {
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
    let reason = match finish(reason) {
        Ok(r) => r,
        Err(e) => return vec![Err(e)],
    };
    let text: String = m
        .content
        .iter()
        .filter_map(|b| match b {
            Block::Text { text } => Some(text.as_str()),
            Block::Unknown => None,
        })
        .collect();
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(Ok(ProviderEvent::Delta(text)));
    }
    out.push(Ok(ProviderEvent::Finish(reason)));
    out.push(Ok(ProviderEvent::Usage(Usage {
        input_tokens: m.usage.total_input(),
        output_tokens: m.usage.output_tokens,
    })));
    out
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
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":5}}}"#,
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
                    input_tokens: 30,
                    output_tokens: 15
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
        let body = serde_json::to_value(request_body("claude", &req, 1024)).unwrap();
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
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
        assert!(out.contains(&ProviderEvent::Usage(Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX
        })));
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
}
