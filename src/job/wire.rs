//! The job JSON as published: read leniently (the envelope) or strictly (the body), before
//! [`super::decode`] turns it into domain types.

use serde::Deserialize;

use super::rich::{WireMessage, WireResponseFormat, WireTool};
use crate::contract::{CacheMode, FitMode, ServiceTier};

/// The envelope fields, read leniently first so that an invalid job can still be answered.
#[derive(Deserialize, Default)]
pub(super) struct WireEnvelope {
    pub(super) job_id: Option<serde_json::Value>,
    pub(super) trace_id: Option<serde_json::Value>,
    pub(super) tenant: Option<serde_json::Value>,
    pub(super) task_type: Option<serde_json::Value>,
    pub(super) reply_to: Option<serde_json::Value>,
    pub(super) metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(super) struct WireGenerate {
    pub(super) provider: Option<String>,
    pub(super) model: Option<String>,
    pub(super) system_prompt: Option<String>,
    pub(super) prompt: Option<String>,
    pub(super) messages: Option<Vec<WireMessage>>,
    pub(super) context: Option<Vec<String>>,
    /// Tools the model may call, whether it must, and the answer's form (section 6).
    pub(super) tools: Option<Vec<WireTool>>,
    pub(super) tool_choice: Option<serde_json::Value>,
    pub(super) parallel_tool_calls: Option<bool>,
    pub(super) response_format: Option<WireResponseFormat>,
    #[serde(default)]
    pub(super) options: WireGenerateOptions,
    pub(super) stream: Option<bool>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) deadline: Option<String>,
    pub(super) expires_in_ms: Option<u64>,
    /// `use`, `refresh` or `off` (the response cache).
    pub(super) cache: Option<CacheMode>,
    /// OpenAI's `prompt_cache_key` (section 7).
    pub(super) prompt_cache_key: Option<String>,
    /// `standard`, `flex` or `batch` (`docs/batch.md`).
    pub(super) service_tier: Option<ServiceTier>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WireGenerateOptions {
    pub(super) temperature: Option<f64>,
    pub(super) max_tokens: Option<u32>,
    pub(super) top_p: Option<f64>,
    pub(super) seed: Option<u32>,
    pub(super) stop: Option<StopWire>,
    /// `trim` or `strict` (context fitting).
    pub(super) fit: Option<FitMode>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum StopWire {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub(super) struct WireEmbed {
    pub(super) provider: Option<String>,
    pub(super) model: Option<String>,
    pub(super) input: Vec<String>,
    #[serde(default)]
    pub(super) options: WireEmbedOptions,
    pub(super) timeout_ms: Option<u64>,
    pub(super) deadline: Option<String>,
    pub(super) expires_in_ms: Option<u64>,
    /// `use`, `refresh` or `off` (the vector cache).
    pub(super) cache: Option<CacheMode>,
    /// Accepted; embedding jobs are answered online whatever they ask (`docs/batch.md`).
    #[allow(dead_code)]
    pub(super) service_tier: Option<ServiceTier>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WireEmbedOptions {
    pub(super) dimensions: Option<u32>,
}

#[derive(Deserialize)]
pub(super) struct WireImage {
    pub(super) provider: Option<String>,
    pub(super) model: Option<String>,
    pub(super) prompt: String,
    #[serde(default)]
    pub(super) options: WireImageOptions,
    pub(super) timeout_ms: Option<u64>,
    pub(super) deadline: Option<String>,
    pub(super) expires_in_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WireImageOptions {
    pub(super) n: Option<u32>,
    pub(super) size: Option<String>,
    pub(super) quality: Option<String>,
    pub(super) output_format: Option<crate::contract::ImageFormat>,
    pub(super) background: Option<String>,
}
