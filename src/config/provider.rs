//! One provider's configuration (`[providers.<name>]`) and its defaults, and route entries
//! (`"provider:model"`).
//!
//! A provider table is read as one variant per wire protocol, each accepting only its own
//! keys (a typo, or a key of another protocol, is an error naming it), and becomes a
//! [`ProviderConfig`]: the settings every protocol has, and an [`Api`] holding the protocol's
//! own settings. Whether a provider can embed is part of its [`Api`]: only the variants with an
//! embeddings API carry [`EmbedBatching`].

use std::fmt;

use secrecy::SecretString;
use serde::Deserialize;

/// Which request field carries the output-token limit for OpenAI-style providers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    MaxCompletionTokens,
    MaxTokens,
}

/// The wire protocol a provider speaks, with the settings only that protocol has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// OpenAI Chat Completions, and every compatible server (vLLM, llama.cpp, LM Studio, ...).
    Openai {
        max_tokens_field: MaxTokensField,
        embed: EmbedBatching,
    },
    /// Anthropic Messages API. No embeddings API, so no [`EmbedBatching`].
    Anthropic {
        /// `max_tokens` sent when the job sets none (the API requires one).
        default_max_tokens: u32,
    },
    /// Google Gemini (v1beta generateContent).
    Gemini { embed: EmbedBatching },
    /// Ollama's native API (`/api/chat`); base URL defaults to `OLLAMA_HOST` or localhost.
    Ollama { embed: EmbedBatching },
}

impl Api {
    /// The `type` value of the table.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Api::Openai { .. } => "openai",
            Api::Anthropic { .. } => "anthropic",
            Api::Gemini { .. } => "gemini",
            Api::Ollama { .. } => "ollama",
        }
    }

    /// The model an image route entry without one asks for, for the protocols that generate
    /// images (OpenAI's Images API and compatible servers; Gemini's image output).
    pub(crate) fn image_model(&self) -> Option<&'static str> {
        match self {
            Api::Openai { .. } => Some("gpt-image-2"),
            Api::Gemini { .. } => Some("gemini-2.5-flash-image"),
            Api::Anthropic { .. } | Api::Ollama { .. } => None,
        }
    }

    /// How embedding requests are batched, for the protocols that have an embeddings API.
    pub(crate) fn embedding(&self) -> Option<EmbedBatching> {
        match self {
            Api::Openai { embed, .. } | Api::Gemini { embed } | Api::Ollama { embed } => {
                Some(*embed)
            }
            Api::Anthropic { .. } => None,
        }
    }
}

/// How one embedding job's inputs are split into requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedBatching {
    /// Most inputs per request (default by type: openai 2048, gemini 100, ollama 512).
    pub batch_size: usize,
    /// Most estimated input tokens per request (OpenAI allows 300k).
    pub batch_tokens: u64,
}

/// One provider, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ProviderTable")]
pub struct ProviderConfig {
    /// The protocol (`type`) and its own settings.
    pub api: Api,
    /// Base URL. For `openai`, the SDK convention (`https://api.openai.com/v1`); a URL with no
    /// path gets `/v1` appended, so `http://127.0.0.1:8000` works too.
    pub base_url: Option<String>,
    /// Name of the environment variable that holds the API key (never the key itself).
    pub api_key_env: Option<String>,
    /// Or a file holding it (a mounted secret: read again on every reload, so a rotated key
    /// is picked up without a restart).
    pub api_key_file: Option<std::path::PathBuf>,
    /// Resolved from `api_key_env` or `api_key_file` at load time.
    pub api_key: Option<SecretString>,
    /// Model used when neither the job nor the route names one.
    pub default_model: Option<String>,
    /// Models a job may pin on this provider (exact names, or `prefix*`); any when absent.
    /// Models named by routes are always allowed.
    pub models: Option<Vec<String>>,
    pub connect_timeout_ms: u64,
    /// Longest wait for the first text token of an attempt.
    pub first_token_timeout_ms: u64,
    /// Longest silence between two pieces of text once the answer has started.
    pub stall_timeout_ms: u64,
    /// Retries of a transient error on this provider before falling back.
    pub max_retries: usize,
    /// Backoff before the first retry; doubles with jitter up to `retry_max_delay_ms`.
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// At most this many requests in flight to this provider from one process (queued beyond).
    pub max_concurrent: Option<usize>,
    /// At most this many requests per minute from one process (spaced evenly; queued beyond).
    pub requests_per_minute: Option<u32>,
    /// Context windows in tokens by model (exact names, `prefix*`, or `*` for any other),
    /// over the built-in table (`crate::context`).
    pub context_windows: std::collections::BTreeMap<String, u32>,
    /// What models take beyond text, by model (exact names, `prefix*`, or `*`), over the
    /// built-in table (`crate::providers::capabilities`): an entry that lacks what a job
    /// needs is skipped without a call.
    pub capabilities: std::collections::BTreeMap<String, Vec<Capability>>,
    /// Quality ranks by model (exact names, `prefix*`, or `*`), over the built-in table
    /// (`crate::providers::quality`): the `best_quality` strategy tries higher ranks first.
    pub quality: std::collections::BTreeMap<String, u32>,
    /// OpenAI protocol only: the server offers OpenAI's service tiers, the Batch API (`/files`
    /// and `/batches`) and `service_tier: "flex"`. Default yes; a compatible server without a
    /// Batch API answers batch jobs online anyway (its refusal sends them there), but one that
    /// rejects an unknown `service_tier` field needs `false`.
    pub service_tiers: bool,
}

/// What a model may take beyond text (`providers.<name>.capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Tool definitions, tool calls and tool results.
    Tools,
    /// Images in user messages (as bytes).
    Images,
    /// Images given by URL, fetched by the provider.
    ImageUrls,
    /// JSON output (`json_object`).
    Json,
    /// JSON output constrained by a schema (`json_schema`).
    JsonSchema,
}

/// The value `map` holds for `model`: its exact name, else the longest `prefix*` it starts
/// with (`*` matches any model, last).
pub fn by_model<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    model: &str,
) -> Option<&'a V> {
    map.get(model).or_else(|| {
        map.iter()
            .filter_map(|(k, v)| Some((k.strip_suffix('*')?, v)))
            .filter(|(prefix, _)| model.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, v)| v)
    })
}

/// Whether a `models` allow-list (exact names, or `prefix*`; `None`: any) admits `model`.
pub fn model_allowed(list: Option<&[String]>, model: &str) -> bool {
    list.is_none_or(|list| {
        list.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => m == model,
        })
    })
}

impl ProviderConfig {
    /// A provider of this protocol with every other setting at its default.
    pub fn new(api: Api) -> Self {
        Self {
            api,
            base_url: None,
            api_key_env: None,
            api_key_file: None,
            api_key: None,
            default_model: None,
            models: None,
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 60_000,
            stall_timeout_ms: 30_000,
            max_retries: 2,
            retry_min_delay_ms: 500,
            retry_max_delay_ms: 20_000,
            max_concurrent: None,
            requests_per_minute: None,
            context_windows: Default::default(),
            capabilities: Default::default(),
            quality: Default::default(),
            service_tiers: false,
        }
    }
}

/// Declares the TOML table of one protocol: the keys every protocol has, repeated (serde's
/// `flatten` cannot be combined with `deny_unknown_fields`), then the protocol's own keys.
/// Every key is optional; [`ProviderConfig::new`] and [`Api`] hold the defaults.
macro_rules! provider_table {
    ($name:ident { $($own:ident: $ty:ty),* $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            base_url: Option<String>,
            api_key_env: Option<String>,
            api_key_file: Option<std::path::PathBuf>,
            default_model: Option<String>,
            models: Option<Vec<String>>,
            connect_timeout_ms: Option<u64>,
            first_token_timeout_ms: Option<u64>,
            stall_timeout_ms: Option<u64>,
            max_retries: Option<usize>,
            retry_min_delay_ms: Option<u64>,
            retry_max_delay_ms: Option<u64>,
            max_concurrent: Option<usize>,
            requests_per_minute: Option<u32>,
            context_windows: Option<std::collections::BTreeMap<String, u32>>,
            capabilities: Option<std::collections::BTreeMap<String, Vec<Capability>>>,
            quality: Option<std::collections::BTreeMap<String, u32>>,
            $($own: Option<$ty>,)*
        }

        impl $name {
            fn into_config(self, api: Api) -> ProviderConfig {
                let d = ProviderConfig::new(api);
                ProviderConfig {
                    base_url: self.base_url,
                    api_key_env: self.api_key_env,
                    api_key_file: self.api_key_file,
                    default_model: self.default_model,
                    models: self.models,
                    connect_timeout_ms: self.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
                    first_token_timeout_ms: self
                        .first_token_timeout_ms
                        .unwrap_or(d.first_token_timeout_ms),
                    stall_timeout_ms: self.stall_timeout_ms.unwrap_or(d.stall_timeout_ms),
                    max_retries: self.max_retries.unwrap_or(d.max_retries),
                    retry_min_delay_ms: self.retry_min_delay_ms.unwrap_or(d.retry_min_delay_ms),
                    retry_max_delay_ms: self.retry_max_delay_ms.unwrap_or(d.retry_max_delay_ms),
                    max_concurrent: self.max_concurrent,
                    requests_per_minute: self.requests_per_minute,
                    context_windows: self.context_windows.unwrap_or_default(),
                    capabilities: self.capabilities.unwrap_or_default(),
                    quality: self.quality.unwrap_or_default(),
                    ..d
                }
            }
        }
    };
}

provider_table!(OpenAiTable {
    max_tokens_field: MaxTokensField,
    embed_batch_size: usize,
    embed_batch_tokens: u64,
    service_tiers: bool,
});
provider_table!(AnthropicTable {
    default_max_tokens: u32
});
provider_table!(GeminiTable {
    embed_batch_size: usize,
    embed_batch_tokens: u64,
});
provider_table!(OllamaTable {
    embed_batch_size: usize,
    embed_batch_tokens: u64,
});

/// `[providers.<name>]` as written: `type` picks the table.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ProviderTable {
    Openai(OpenAiTable),
    Anthropic(AnthropicTable),
    Gemini(GeminiTable),
    Ollama(OllamaTable),
}

const DEFAULT_EMBED_BATCH_TOKENS: u64 = 250_000;

fn batching(size: Option<usize>, tokens: Option<u64>, default_size: usize) -> EmbedBatching {
    EmbedBatching {
        batch_size: size.unwrap_or(default_size),
        batch_tokens: tokens.unwrap_or(DEFAULT_EMBED_BATCH_TOKENS),
    }
}

impl Api {
    /// OpenAI with its defaults.
    pub(crate) fn openai(max_tokens_field: MaxTokensField) -> Self {
        Api::Openai {
            max_tokens_field,
            embed: batching(None, None, 2048),
        }
    }
}

impl From<ProviderTable> for ProviderConfig {
    fn from(table: ProviderTable) -> Self {
        match table {
            ProviderTable::Openai(t) => {
                let api = Api::Openai {
                    max_tokens_field: t.max_tokens_field.unwrap_or(MaxTokensField::MaxTokens),
                    embed: batching(t.embed_batch_size, t.embed_batch_tokens, 2048),
                };
                let tiers = t.service_tiers.unwrap_or(true);
                ProviderConfig {
                    service_tiers: tiers,
                    ..t.into_config(api)
                }
            }
            ProviderTable::Anthropic(t) => {
                let api = Api::Anthropic {
                    default_max_tokens: t.default_max_tokens.unwrap_or(4096),
                };
                t.into_config(api)
            }
            ProviderTable::Gemini(t) => {
                let embed = batching(t.embed_batch_size, t.embed_batch_tokens, 100);
                t.into_config(Api::Gemini { embed })
            }
            ProviderTable::Ollama(t) => {
                let embed = batching(t.embed_batch_size, t.embed_batch_tokens, 512);
                t.into_config(Api::Ollama { embed })
            }
        }
    }
}

/// One entry of a route: `"provider"` or `"provider:model"`, parsed once at load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct RouteEntry {
    pub provider: String,
    /// The model this entry asks for; the provider's `default_model` when absent.
    pub model: Option<String>,
}

impl From<String> for RouteEntry {
    fn from(entry: String) -> Self {
        RouteEntry::parse(&entry)
    }
}

impl RouteEntry {
    /// `"openai:gpt-4o"` -> (`openai`, `gpt-4o`); `"openai"` and `"openai:"` -> (`openai`, none).
    pub(crate) fn parse(entry: &str) -> Self {
        let (provider, model) = match entry.split_once(':') {
            Some((p, m)) => (p, (!m.is_empty()).then(|| m.to_string())),
            None => (entry, None),
        };
        RouteEntry {
            provider: provider.to_string(),
            model,
        }
    }
}

impl fmt::Display for RouteEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(m) => write!(f, "{}:{m}", self.provider),
            None => f.write_str(&self.provider),
        }
    }
}
