//! OpenAI Chat Completions, and every OpenAI-compatible server (vLLM, llama.cpp, LM Studio,
//! OpenRouter, ...): request building, the SSE chunk decoder, and error classification.
//!
//! Wire facts (PROVIDERS.md): streamed chunks carry `choices[0].delta.content` and a
//! `finish_reason` on the last choice chunk; with `stream_options.include_usage` one more chunk
//! with `choices: []` carries `usage`; `data: [DONE]` ends the body but may be missing. Errors
//! are `{"error":{message,type,code}}` (old vLLM: top-level `{"object":"error",...}`), also as a
//! `data:` event inside a 200 stream.

use eventsource_stream::Event;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::helpers::{clip, endpoint};
use super::sse::{SseDecoder, Step};
use super::{Call, FinishReason, ProviderEvent, Usage};
use crate::config::{MaxTokensField, ProviderConfig};
use crate::contract::{ErrorCode, ServiceTier, TokenClasses};
use crate::contract::{
    GenerateRequest, ImageSource, Message, ResponseFormat, Role, ToolCallChunk, ToolChoice,
};
use crate::error::{ProviderError, code_for_status};

pub(crate) struct OpenAi {
    http: super::Http,
    chat_url: Url,
    embed_url: Url,
    images_url: Url,
    key: Option<SecretString>,
    max_tokens_field: MaxTokensField,
    /// The server has OpenAI's service tiers (`flex`) and Batch API.
    service_tiers: bool,
    /// Boxed: two more URLs would make every provider's value larger.
    batch: Box<super::openai_batch::BatchApi>,
}

impl OpenAi {
    pub fn new(
        cfg: &ProviderConfig,
        max_tokens_field: MaxTokensField,
        http: super::Http,
    ) -> Result<Self, ProviderError> {
        let base = cfg
            .base_url
            .as_deref()
            .unwrap_or("https://api.openai.com/v1");
        Ok(Self {
            http,
            chat_url: endpoint(base, "chat/completions")?,
            embed_url: endpoint(base, "embeddings")?,
            images_url: endpoint(base, "images/generations")?,
            key: cfg.api_key.clone(),
            max_tokens_field,
            service_tiers: cfg.service_tiers,
            batch: Box::new(super::openai_batch::BatchApi::new(base)?),
        })
    }

    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let mut body = request_body(model, req, self.max_tokens_field);
        if self.service_tiers && req.service_tier == ServiceTier::Flex {
            body.service_tier = Some("flex");
        }
        let mut builder = self.http.client.post(self.chat_url.clone()).json(&body);
        if let Some(key) = &self.key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify_error_body).await?;
        let events = if req.stream {
            self.http.sse(response, StreamDecoder::default())
        } else {
            let text = self.http.read_body(response).await?;
            let events = parse_completion(&text);
            Box::pin(futures::stream::iter(events))
        };
        Ok(Call {
            http_status: Some(status),
            events,
        })
    }

    /// The Batch API's request line for `req` (not streamed), under `custom_id`.
    pub(crate) fn batch_line(
        &self,
        custom_id: &str,
        model: &str,
        req: &GenerateRequest,
    ) -> serde_json::Value {
        let mut body = request_body(model, req, self.max_tokens_field);
        body.stream = false;
        body.stream_options = None;
        serde_json::json!({"custom_id": custom_id, "method": "POST",
            "url": "/v1/chat/completions", "body": body})
    }

    /// The server's Batch API, with what it is called with.
    pub(crate) fn batch_api(
        &self,
    ) -> (
        &super::openai_batch::BatchApi,
        &super::Http,
        Option<&SecretString>,
    ) {
        (&self.batch, &self.http, self.key.as_ref())
    }

    /// `POST {base}/images/generations` (`super::openai_images`).
    pub async fn images(
        &self,
        model: &str,
        req: &crate::contract::ImageRequest,
    ) -> Result<super::pictures::Pictures, ProviderError> {
        super::openai_images::generate(&self.http, &self.images_url, self.key.as_ref(), model, req)
            .await
    }

    /// `POST {base}/embeddings`; vectors are returned in input order (sorted by `index`).
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
            encoding_format: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            dimensions: Option<u32>,
        }
        let body = EmbedRequest {
            model,
            input: inputs,
            encoding_format: "float",
            dimensions,
        };
        let mut builder = self.http.client.post(self.embed_url.clone()).json(&body);
        if let Some(key) = &self.key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        let (response, status) = self.http.send(builder, classify_error_body).await?;
        let text = self.http.read_body(response).await?;
        #[derive(Deserialize)]
        struct Item {
            index: usize,
            embedding: Vec<f32>,
        }
        #[derive(Deserialize)]
        struct Body {
            data: Vec<Item>,
            usage: Option<WireUsage>,
        }
        let mut parsed: Body = serde_json::from_str(&text).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable embeddings ({e}): {}", clip(&text)),
            )
        })?;
        parsed.data.sort_by_key(|d| d.index);
        Ok(super::Embedded {
            vectors: parsed.data.into_iter().map(|d| d.embedding).collect(),
            input_tokens: parsed.usage.map(|u| u.prompt_tokens),
            http_status: Some(status),
        })
    }
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// Text, or parts (text and images); `null` for an assistant message that only calls tools.
    content: Option<WireContent<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireContent<'a> {
    Text(&'a str),
    Parts(Vec<WirePart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WirePart<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: WireImageUrl<'a> },
}

#[derive(Serialize)]
struct WireImageUrl<'a> {
    /// The image's URL, or its bytes as a `data:` URL.
    url: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

#[derive(Serialize)]
struct WireCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

/// A call as OpenAI spells it: `arguments` is JSON *text*.
#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a serde_json::Value,
}

impl<'a> WireMessage<'a> {
    fn from_message(m: &'a Message) -> Self {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let content = if !m.images.is_empty() {
            let mut parts = Vec::with_capacity(m.images.len() + 1);
            if !m.content.is_empty() {
                parts.push(WirePart::Text { text: &m.content });
            }
            for image in &m.images {
                let url = match &image.source {
                    ImageSource::Url(url) => std::borrow::Cow::Borrowed(url.as_str()),
                    ImageSource::Data { media_type, data } => {
                        std::borrow::Cow::Owned(format!("data:{media_type};base64,{data}"))
                    }
                };
                parts.push(WirePart::ImageUrl {
                    image_url: WireImageUrl {
                        url,
                        detail: image.detail.as_deref(),
                    },
                });
            }
            Some(WireContent::Parts(parts))
        } else if m.content.is_empty() && !m.tool_calls.is_empty() {
            None
        } else {
            Some(WireContent::Text(&m.content))
        };
        WireMessage {
            role,
            content,
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| WireCall {
                    id: &c.id,
                    kind: "function",
                    function: WireFunctionCall {
                        name: &c.name,
                        arguments: c.arguments.to_string(),
                    },
                })
                .collect(),
            tool_call_id: m.tool_call_id.as_deref(),
        }
    }
}

/// `{"include_usage": true}`: a last chunk with the usage.
#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u32>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    /// Only with tools (OpenAI refuses it without).
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    /// Routes prompts that share a prefix to the same cache (sent only when the job asks for
    /// prompt caching: OpenAI caches long prompts by itself, and compatible servers may not
    /// know the field).
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<&'a str>,
    /// `flex` for a job that asks for it, on a server with service tiers.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'static str>,
}

fn request_body<'a>(
    model: &'a str,
    req: &'a GenerateRequest,
    field: MaxTokensField,
) -> ChatRequest<'a> {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        messages.push(WireMessage {
            role: "system",
            content: Some(WireContent::Text(system)),
            tool_calls: Vec::new(),
            tool_call_id: None,
        });
    }
    messages.extend(req.messages.iter().map(WireMessage::from_message));
    let tools = req
        .tools
        .iter()
        .map(|t| WireTool {
            kind: "function",
            function: WireFunction {
                name: &t.name,
                description: t.description.as_deref(),
                parameters: &t.parameters,
            },
        })
        .collect();
    let tool_choice = req.tool_choice.as_ref().map(|c| match c {
        ToolChoice::Auto => serde_json::json!("auto"),
        ToolChoice::None => serde_json::json!("none"),
        ToolChoice::Required => serde_json::json!("required"),
        ToolChoice::Named(name) => {
            serde_json::json!({"type": "function", "function": {"name": name}})
        }
    });
    let response_format = req.response_format.as_ref().and_then(|f| match f {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(serde_json::json!({"type": "json_object"})),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => Some(serde_json::json!({"type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict}})),
    });
    let o = &req.options;
    ChatRequest {
        model,
        messages,
        stream: req.stream,
        stream_options: req.stream.then_some(StreamOptions {
            include_usage: true,
        }),
        temperature: o.temperature,
        top_p: o.top_p,
        seed: o.seed,
        stop: &o.stop,
        max_tokens: o.max_tokens.filter(|_| field == MaxTokensField::MaxTokens),
        max_completion_tokens: o
            .max_tokens
            .filter(|_| field == MaxTokensField::MaxCompletionTokens),
        parallel_tool_calls: req.parallel_tool_calls.filter(|_| !req.tools.is_empty()),
        tools,
        tool_choice,
        response_format,
        prompt_cache_key: req.prompt_cache_key.as_deref(),
        service_tier: None,
    }
}

/// `usage`: the classes are parts of the totals (`cached_tokens` of `prompt_tokens`,
/// `reasoning_tokens` of `completion_tokens`). Compatible servers send the details as `null`,
/// or not at all.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    /// Not sent by OpenAI's chat API today; servers that count image tokens apart do.
    #[serde(default)]
    image_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let prompt = u.prompt_tokens_details.as_ref();
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            classes: TokenClasses {
                cache_read_tokens: prompt.and_then(|d| d.cached_tokens).unwrap_or(0),
                image_input_tokens: prompt.and_then(|d| d.image_tokens).unwrap_or(0),
                reasoning_tokens: u
                    .completion_tokens_details
                    .and_then(|d| d.reasoning_tokens)
                    .unwrap_or(0),
                ..TokenClasses::default()
            },
        }
    }
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
    error: Option<serde::de::IgnoredAny>,
    // Old vLLM puts errors at the top level: `{"object":"error","message",...}`.
    object: Option<String>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: u32,
    delta: Option<WireDelta>,
    message: Option<WireDelta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireCallDelta>,
}

/// A tool call in a chunk (`index`, then `id` and `function.name` once, then pieces of
/// `function.arguments`), or whole in a completion.
#[derive(Deserialize)]
struct WireCallDelta {
    #[serde(default)]
    index: u32,
    id: Option<String>,
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

impl WireCallDelta {
    /// As a tool-call chunk; `at` is the call's index when the provider gives none (a
    /// completion's `message.tool_calls` is an ordered list).
    fn chunk(self, at: Option<u32>) -> ToolCallChunk {
        let (name, arguments) = match self.function {
            Some(f) => (f.name, f.arguments.unwrap_or_default()),
            None => (None, String::new()),
        };
        ToolCallChunk {
            index: at.unwrap_or(self.index),
            id: self.id,
            name,
            arguments,
        }
    }
}

/// Decoder state of one streamed answer.
#[derive(Default)]
pub(crate) struct StreamDecoder {
    finished: bool,
    usage_seen: bool,
}

impl SseDecoder for StreamDecoder {
    fn event(&mut self, event: &Event) -> Result<Step, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return if self.finished {
                Ok(Step::End(Vec::new()))
            } else {
                Err(ProviderError::new(
                    ErrorCode::Truncated,
                    "stream sent [DONE] before a finish reason",
                ))
            };
        }
        if data.is_empty() {
            return Ok(Step::More(Vec::new()));
        }
        if event.event == "error" {
            return Err(classify_error_body(200, data));
        }
        let chunk: WireChunk = serde_json::from_str(data).map_err(|e| {
            ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable stream chunk ({e}): {}", clip(data)),
            )
        })?;
        if chunk.error.is_some() || chunk.object.as_deref() == Some("error") {
            return Err(classify_error_body(200, data));
        }
        let mut out = Vec::new();
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(ProviderEvent::Delta(text));
                }
                for call in delta.tool_calls {
                    out.push(ProviderEvent::ToolCall(call.chunk(None)));
                }
            }
            if let Some(reason) = choice.finish_reason {
                let reason = finish(&reason)?;
                self.finished = true;
                out.push(ProviderEvent::Finish(reason));
            }
        }
        if let Some(usage) = chunk.usage {
            self.usage_seen = true;
            out.push(ProviderEvent::Usage(usage.into()));
        }
        // Finish and usage both in hand: nothing more to wait for (some servers omit [DONE]).
        Ok(if self.finished && self.usage_seen {
            Step::End(out)
        } else {
            Step::More(out)
        })
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

/// Map a `finish_reason` to a finish reason, or to the error it really is.
fn finish(reason: &str) -> Result<FinishReason, ProviderError> {
    match reason {
        "stop" => Ok(FinishReason::Stop),
        "length" => Ok(FinishReason::Length),
        "tool_calls" | "function_call" => Ok(FinishReason::ToolCalls),
        "content_filter" => Err(ProviderError::new(
            ErrorCode::ContentFiltered,
            "the provider's content filter stopped the answer (finish_reason: content_filter)",
        )),
        other => Ok(FinishReason::other(other)),
    }
}

/// A non-streamed completion as the same event sequence a stream would give.
pub(crate) fn parse_completion(text: &str) -> Vec<Result<ProviderEvent, ProviderError>> {
    let chunk: WireChunk = match serde_json::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            return vec![Err(ProviderError::new(
                ErrorCode::MalformedResponse,
                format!("undecodable completion ({e}): {}", clip(text)),
            ))];
        }
    };
    if chunk.error.is_some() || chunk.object.as_deref() == Some("error") {
        return vec![Err(classify_error_body(200, text))];
    }
    let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) else {
        return vec![Err(ProviderError::new(
            ErrorCode::MalformedResponse,
            "completion has no choices",
        ))];
    };
    let Some(reason) = choice.finish_reason else {
        return vec![Err(ProviderError::new(
            ErrorCode::Truncated,
            "completion has no finish_reason",
        ))];
    };
    let reason = match finish(&reason) {
        Ok(reason) => reason,
        Err(e) => return vec![Err(e)],
    };
    let mut out = Vec::new();
    if let Some(message) = choice.message {
        if let Some(content) = message.content.filter(|c| !c.is_empty()) {
            out.push(Ok(ProviderEvent::Delta(content)));
        }
        for (i, call) in message.tool_calls.into_iter().enumerate() {
            let at = u32::try_from(i).unwrap_or(u32::MAX);
            out.push(Ok(ProviderEvent::ToolCall(call.chunk(Some(at)))));
        }
    }
    out.push(Ok(ProviderEvent::Finish(reason)));
    if let Some(usage) = chunk.usage {
        out.push(Ok(ProviderEvent::Usage(usage.into())));
    }
    out
}

/// Classify an error body (HTTP error or an error inside a 200 stream).
pub(crate) fn classify_error_body(status: u16, body: &str) -> ProviderError {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    // `{"error": {...}}`, `{"error": "text"}`, or old vLLM's top-level object.
    let err = match value.get("error") {
        Some(e) if e.is_object() => e.clone(),
        Some(serde_json::Value::String(s)) => serde_json::json!({"message": s}),
        _ => value.clone(),
    };
    let field = |k: &str| {
        err.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut message = field("message");
    if message.is_empty() {
        message = if body.trim().is_empty() {
            format!("HTTP {status} with an empty body")
        } else {
            clip(body)
        };
    }
    let code = field("code");
    let kind = field("type");
    let lower = message.to_ascii_lowercase();
    let is_context = code == "context_length_exceeded"
        || lower.contains("maximum context length")
        || lower.contains("context length")
        || lower.contains("context window")
        || lower.contains("exceeds the available context size")
        || lower.contains("too many tokens");
    let code = if is_context {
        ErrorCode::ContextTooLong
    } else if code == "insufficient_quota" || kind == "insufficient_quota" {
        ErrorCode::QuotaExhausted
    } else if code == "content_filter"
        || code == "content_policy_violation"
        || code == "moderation_blocked"
    {
        ErrorCode::ContentFiltered
    } else if status == 200 {
        // An error inside a 200 stream: the server failed mid-answer.
        match kind.as_str() {
            "invalid_request_error" => ErrorCode::BadRequest,
            "rate_limit_error" | "rate_limit_exceeded" => ErrorCode::RateLimited,
            _ => ErrorCode::ServerError,
        }
    } else {
        code_for_status(status)
    };
    ProviderError::new(code, clip(&message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> Event {
        Event {
            event: "message".into(),
            data: data.into(),
            id: String::new(),
            retry: None,
        }
    }

    fn events(step: Step) -> Vec<ProviderEvent> {
        match step {
            Step::More(v) | Step::End(v) => v,
        }
    }

    #[test]
    fn decodes_the_reference_transcript() {
        let mut d = StreamDecoder::default();
        let mut all = Vec::new();
        for data in [
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null,"obfuscation":"x"}"#,
            r#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        ] {
            all.extend(events(d.event(&ev(data)).unwrap()));
        }
        let last = d
            .event(&ev(r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":1,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#))
            .unwrap();
        assert!(matches!(last, Step::End(_)));
        all.extend(events(last));
        assert_eq!(
            all,
            vec![
                ProviderEvent::Delta("Hi".into()),
                ProviderEvent::Finish(FinishReason::Stop),
                ProviderEvent::Usage(Usage {
                    input_tokens: 9,
                    output_tokens: 1,
                    classes: TokenClasses {
                        cache_read_tokens: 4,
                        reasoning_tokens: 1,
                        ..TokenClasses::default()
                    },
                }),
            ]
        );
    }

    #[test]
    fn usage_details_may_be_null_or_missing() {
        for details in [
            r#""prompt_tokens_details":null,"completion_tokens_details":null"#,
            r#""prompt_tokens_details":{"cached_tokens":null}"#,
            r#""x":1"#,
        ] {
            let data = format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":2,{details}}}}}"#
            );
            let mut d = StreamDecoder::default();
            let got = events(d.event(&ev(&data)).unwrap());
            assert_eq!(
                got,
                vec![ProviderEvent::Usage(Usage::plain(5, 2))],
                "{details}"
            );
        }
    }

    #[test]
    fn done_before_a_finish_reason_is_truncation() {
        let mut d = StreamDecoder::default();
        let e = d.event(&ev("[DONE]")).err().unwrap();
        assert_eq!(e.code, ErrorCode::Truncated);
    }

    #[test]
    fn in_stream_errors_and_garbage_are_errors() {
        let mut d = StreamDecoder::default();
        let e = d
            .event(&ev(r#"{"error":{"message":"boom","type":"server_error"}}"#))
            .err()
            .unwrap();
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::ServerError, "boom")
        );
        let e = d.event(&ev("{not json")).err().unwrap();
        assert_eq!(e.code, ErrorCode::MalformedResponse);
        let e = d.event(&ev(r#"{"object":"error","message":"This model's maximum context length is 4096 tokens","type":"BadRequestError","code":400}"#)).err().unwrap();
        assert_eq!(e.code, ErrorCode::ContextTooLong);
    }

    #[test]
    fn http_errors_are_classified_by_body_then_status() {
        let c = |s, b| classify_error_body(s, b).code;
        assert_eq!(
            c(
                400,
                r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#
            ),
            ErrorCode::ContextTooLong
        );
        assert_eq!(
            c(
                429,
                r#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#
            ),
            ErrorCode::QuotaExhausted
        );
        assert_eq!(
            c(
                429,
                r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#
            ),
            ErrorCode::RateLimited
        );
        assert_eq!(c(502, "<html>bad gateway</html>"), ErrorCode::ServerError);
        assert_eq!(c(401, ""), ErrorCode::Unauthorized);
    }

    #[test]
    fn the_token_limit_goes_in_the_configured_field() {
        let req = GenerateRequest {
            system: Some("s".into()),
            messages: vec![crate::contract::Message::text(Role::User, "u")],
            options: crate::contract::GenerateOptions {
                max_tokens: Some(5),
                seed: Some(42),
                ..Default::default()
            },
            stream: true,
            ..Default::default()
        };
        let v = serde_json::to_value(request_body("m", &req, MaxTokensField::MaxCompletionTokens))
            .unwrap();
        assert_eq!(v["max_completion_tokens"], 5);
        assert_eq!(v["seed"], 42);
        assert!(v.get("max_tokens").is_none());
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["role"], "system");
    }

    #[test]
    fn a_prompt_cache_key_is_sent_when_the_job_has_one() {
        let mut req = crate::providers::fixtures::tool_turn("21");
        let v = serde_json::to_value(request_body("m", &req, MaxTokensField::MaxTokens)).unwrap();
        assert!(v.get("prompt_cache_key").is_none());
        req.prompt_cache_key = Some("llmw-0123456789abcdef".into());
        let v = serde_json::to_value(request_body("m", &req, MaxTokensField::MaxTokens)).unwrap();
        assert_eq!(v["prompt_cache_key"], "llmw-0123456789abcdef");
    }

    #[test]
    fn parallel_tool_calls_is_sent_only_with_tools() {
        let mut req = crate::providers::fixtures::tool_turn("21");
        req.parallel_tool_calls = Some(false);
        let v = serde_json::to_value(request_body("m", &req, MaxTokensField::MaxTokens)).unwrap();
        assert_eq!(v["parallel_tool_calls"], false);
        req.tools.clear();
        let v = serde_json::to_value(request_body("m", &req, MaxTokensField::MaxTokens)).unwrap();
        assert!(v.get("parallel_tool_calls").is_none());
    }

    #[test]
    fn absurd_numbers_are_errors_or_saturate_never_a_panic() {
        let mut d = StreamDecoder::default();
        let max = r#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}}"#;
        assert!(d.event(&ev(max)).is_ok());
        for bad in [
            r#"{"choices":[],"usage":{"prompt_tokens":-3,"completion_tokens":1}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1e300,"completion_tokens":1}}"#,
            r#"{"choices":[{"index":4294967296,"delta":{"content":"x"}}]}"#,
        ] {
            let e = d.event(&ev(bad)).err().unwrap();
            assert_eq!(e.code, ErrorCode::MalformedResponse, "{bad}");
        }
        for bad in ["", "null", "[]", "{\"error\":7}", "\u{0}"] {
            let _ = classify_error_body(500, bad);
            let _ = parse_completion(bad);
        }
    }
}
