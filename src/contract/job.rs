//! The job side of the contract (CONTRACT.md sections 2 and 6): job kinds, who a job is
//! ([`Envelope`]), and the validated requests every provider takes: messages and roles,
//! options and modes. `crate::job` decodes the wire JSON into these.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The job kinds, one JetStream subject and one durable consumer each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Generate,
    Embed,
    /// Image generation (CONTRACT.md section 8).
    Image,
}

impl JobKind {
    pub(crate) const ALL: [JobKind; 3] = [JobKind::Generate, JobKind::Embed, JobKind::Image];
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Embed => "embed",
            JobKind::Image => "image",
        }
    }
}

/// Who a job is and where its answers go: known even for many invalid jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub job_id: Uuid,
    pub trace_id: String,
    pub tenant: String,
    pub task_type: Option<String>,
    pub reply_to: Option<String>,
    pub metadata: serde_json::Value,
}

#[cfg(test)]
impl Envelope {
    /// A fresh job's envelope for `tenant`, as unit tests need one.
    pub(crate) fn for_test(tenant: &str) -> Self {
        Self {
            job_id: uuid::Uuid::now_v7(),
            trace_id: "t".into(),
            tenant: tenant.into(),
            task_type: None,
            reply_to: None,
            metadata: serde_json::Value::Null,
        }
    }
}

/// How a job uses the fleet's response cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Answer from the cache when it holds the answer; store a new answer.
    Use,
    /// Do not read the cache; store the new answer.
    Refresh,
    /// Neither read nor store.
    Off,
}

/// A chat conversation ready for any provider.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The job's system prompt (and system messages), without the retrieval context.
    pub system: Option<String>,
    /// Retrieval context, most relevant first; sent as a numbered block after the system
    /// prompt ([`GenerateRequest::system_text`]). Context fitting drops it from the end.
    pub context: Vec<String>,
    /// Non-empty; roles are `user`, `assistant` and `tool` (system text is in `system`).
    pub messages: Vec<Message>,
    pub options: GenerateOptions,
    /// Tools the model may call (at most `limits.max_tools`).
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// Whether the model may call several tools in one answer (`None`: the provider's
    /// default, which is yes).
    pub parallel_tool_calls: Option<bool>,
    /// JSON output, and the schema it must match.
    pub response_format: Option<ResponseFormat>,
    /// Publish chunk events as text arrives.
    pub stream: bool,
    /// A prompt-cache breakpoint at the end of the system prompt (a system message marked
    /// `cache`), before the retrieval context.
    pub system_cache: Option<CacheTtl>,
    /// OpenAI's `prompt_cache_key`: the job's own, or derived from its tenant and route when
    /// the job marks a cache breakpoint.
    pub prompt_cache_key: Option<String>,
    /// How soon the answer is needed, and so what it may cost (`service_tier`).
    pub service_tier: ServiceTier,
}

/// How soon a job's answer is needed (`service_tier`): `standard` at once, `flex` when a
/// slower, cheaper online call will do (OpenAI's flex tier), `batch` within the job's
/// deadline through a provider's batch API at the batch price (`docs/batch.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceTier {
    #[default]
    Standard,
    Flex,
    Batch,
}

impl ServiceTier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Flex => "flex",
            Self::Batch => "batch",
        }
    }

    /// Whether this is the default tier (left out of results and attempts).
    pub fn is_standard(&self) -> bool {
        *self == Self::Standard
    }
}

/// How long a provider should keep a prompt prefix in its cache (CONTRACT.md section 7): a
/// breakpoint marked `"cache": "5m"` or `"1h"` on a message, a system message or a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CacheTtl {
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "1h")]
    OneHour,
}

impl GenerateRequest {
    /// How many prompt-cache breakpoints the job marks.
    pub fn cache_breakpoints(&self) -> usize {
        usize::from(self.system_cache.is_some())
            + self.messages.iter().filter(|m| m.cache.is_some()).count()
            + self.tools.iter().filter(|t| t.cache.is_some()).count()
    }

    /// What the job needs of a model beyond text (`crate::providers` capabilities).
    pub fn needs(&self) -> Needs {
        Needs {
            tools: !self.tools.is_empty()
                || self
                    .messages
                    .iter()
                    .any(|m| !m.tool_calls.is_empty() || m.role == Role::Tool),
            images: self.messages.iter().any(|m| !m.images.is_empty()),
            image_urls: self.messages.iter().any(|m| {
                m.images
                    .iter()
                    .any(|i| matches!(i.source, ImageSource::Url(_)))
            }),
            json_schema: matches!(
                self.response_format,
                Some(ResponseFormat::JsonSchema { .. })
            ),
            json: self
                .response_format
                .as_ref()
                .is_some_and(ResponseFormat::is_json),
        }
    }

    /// The system text providers get: the system prompt, then the context block
    /// (`Context:` and one `[n] chunk` line per chunk).
    pub fn system_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        let Some(block) = self.context_block() else {
            return self.system.as_deref().map(Cow::Borrowed);
        };
        let mut text = String::new();
        if let Some(s) = &self.system {
            text.push_str(s);
            text.push_str("\n\n");
        }
        text.push_str(&block);
        Some(Cow::Owned(text))
    }

    /// The context block alone (`Context:` and one `[n] chunk` line per chunk), if any.
    pub fn context_block(&self) -> Option<String> {
        if self.context.is_empty() {
            return None;
        }
        let mut text = String::from(CONTEXT_HEADER);
        for (i, chunk) in self.context.iter().enumerate() {
            text.push_str(&context_line(i, chunk));
        }
        Some(text)
    }

    /// The request as providers take it: the context block joined to the system prompt.
    pub fn as_sent(&self) -> std::borrow::Cow<'_, GenerateRequest> {
        use std::borrow::Cow;
        if self.context.is_empty() {
            return Cow::Borrowed(self);
        }
        Cow::Owned(GenerateRequest {
            system: self.system_text().map(Cow::into_owned),
            context: Vec::new(),
            messages: self.messages.clone(),
            options: self.options.clone(),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            parallel_tool_calls: self.parallel_tool_calls,
            response_format: self.response_format.clone(),
            stream: self.stream,
            system_cache: self.system_cache,
            prompt_cache_key: self.prompt_cache_key.clone(),
            service_tier: self.service_tier,
        })
    }
}

/// What a job needs of a model beyond text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub tools: bool,
    pub images: bool,
    /// Images given by URL (the provider must fetch them itself).
    pub image_urls: bool,
    pub json_schema: bool,
    pub json: bool,
}

impl Needs {
    /// Whether the job is plain text in, text out.
    pub fn is_plain(&self) -> bool {
        *self == Needs::default()
    }
}

/// The first line of the context block.
pub(crate) const CONTEXT_HEADER: &str = "Context:\n";

/// The context block's line for chunk `index` (0-based).
pub(crate) fn context_line(index: usize, chunk: &str) -> String {
    format!("[{}] {}\n", index + 1, chunk)
}

/// One message of a conversation. Text parts are joined into `content` in order; a user
/// message's images follow its text. An assistant message may carry the tool calls it made,
/// a tool message the id of the call it answers (CONTRACT section 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A prompt-cache breakpoint after this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheTtl>,
}

impl Message {
    /// A message of text alone.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            cache: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The answer to a tool call (`tool_call_id` names it).
    Tool,
}

/// An image a user message shows the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub source: ImageSource,
    /// `low`, `high` or `auto`: how closely the model looks (providers that have it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// A URL the provider fetches itself.
    Url(String),
    /// The bytes, base64 (standard alphabet), with their media type (`image/png`, ...).
    Data { media_type: String, data: String },
}

/// A tool call a model made: its arguments are a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

/// A tool the model may call; `parameters` is the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub parameters: serde_json::Value,
    /// A prompt-cache breakpoint after the tool definitions up to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheTtl>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    /// This tool.
    Named(String),
}

/// The form of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        strict: bool,
    },
}

impl ResponseFormat {
    /// Whether the answer must be JSON.
    pub fn is_json(&self) -> bool {
        !matches!(self, ResponseFormat::Text)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub top_p: Option<f64>,
    /// Asks providers that support it (OpenAI, Gemini, Ollama; not Anthropic) for a
    /// reproducible answer; 0 to 2^31-1.
    pub seed: Option<u32>,
    pub stop: Vec<String>,
    /// Whether context fitting may lower `max_tokens` to what fits (`options.fit`).
    pub fit: FitMode,
}

/// What context fitting may change besides dropping context chunks and old messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FitMode {
    /// Lower `max_tokens` to the room the window leaves (never below 16 tokens).
    #[default]
    Trim,
    /// Keep `max_tokens` as asked: a job that does not fit with it is not sent.
    Strict,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub input: Vec<String>,
    pub dimensions: Option<u32>,
}
