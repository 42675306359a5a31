//! One provider's configuration (`[providers.<name>]`) and its defaults.

use secrecy::SecretString;
use serde::Deserialize;

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// OpenAI Chat Completions, and every compatible server (vLLM, llama.cpp, LM Studio, ...).
    Openai,
    /// Anthropic Messages API (no embeddings).
    Anthropic,
    /// Google Gemini (v1beta generateContent).
    Gemini,
    /// Ollama's native API (`/api/chat`); base URL defaults to `OLLAMA_HOST` or localhost.
    Ollama,
}

/// Which request field carries the output-token limit for OpenAI-style providers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    MaxCompletionTokens,
    MaxTokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(rename = "type")]
    pub kind: ProviderType,
    /// Base URL. For `openai`, the SDK convention (`https://api.openai.com/v1`); a URL with no
    /// path gets `/v1` appended, so `http://127.0.0.1:8000` works too.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Resolved from `api_key_env` at load time.
    #[serde(skip)]
    pub api_key: Option<SecretString>,
    /// Model used when neither the job nor the route names one.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Models a job may pin on this provider (exact names, or `prefix*`); any when absent.
    /// Models named by routes are always allowed.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default = "default_max_tokens_field")]
    pub max_tokens_field: MaxTokensField,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the first text token of an attempt.
    #[serde(default = "default_first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two pieces of text once the answer has started.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// Retries of a transient error on this provider before falling back.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Backoff before the first retry; doubles with jitter up to `retry_max_delay_ms`.
    #[serde(default = "default_retry_min_delay_ms")]
    pub retry_min_delay_ms: u64,
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// `anthropic`: `max_tokens` sent when the job sets none (the API requires one).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// At most this many requests in flight to this provider from one process (queued beyond).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// At most this many requests per minute from one process (spaced evenly; queued beyond).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most inputs per embedding request (default by type: openai 2048, gemini 100, ollama 512).
    #[serde(default)]
    pub embed_batch_size: Option<usize>,
    /// Most estimated input tokens per embedding request (OpenAI allows 300k).
    #[serde(default = "default_embed_batch_tokens")]
    pub embed_batch_tokens: u64,
}

fn default_max_tokens_field() -> MaxTokensField {
    MaxTokensField::MaxTokens
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_first_token_timeout_ms() -> u64 {
    60_000
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_max_retries() -> usize {
    2
}
fn default_retry_min_delay_ms() -> u64 {
    500
}
fn default_retry_max_delay_ms() -> u64 {
    20_000
}
fn default_embed_batch_tokens() -> u64 {
    250_000
}
fn default_max_tokens() -> u32 {
    4096
}

impl ProviderConfig {
    pub(super) fn new(kind: ProviderType) -> Self {
        Self {
            kind,
            base_url: None,
            api_key_env: None,
            api_key: None,
            default_model: None,
            models: None,
            max_tokens_field: default_max_tokens_field(),
            connect_timeout_ms: default_connect_timeout_ms(),
            first_token_timeout_ms: default_first_token_timeout_ms(),
            stall_timeout_ms: default_stall_timeout_ms(),
            max_retries: default_max_retries(),
            retry_min_delay_ms: default_retry_min_delay_ms(),
            retry_max_delay_ms: default_retry_max_delay_ms(),
            default_max_tokens: default_max_tokens(),
            embed_batch_size: None,
            embed_batch_tokens: default_embed_batch_tokens(),
            max_concurrent: None,
            requests_per_minute: None,
        }
    }
}
