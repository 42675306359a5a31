//! The contract's event messages (CONTRACT.md section 3): `chunk` and `result`, as published
//! on `reply_to` and stored in `LLM_RESULTS`. Serialization only; publishing lives in `reply`.
//!
//! The result carries, per attempt, more than the contract's minimum (tokens, cost, timings,
//! HTTP status): that is what the usage recorder projects into `llm_calls`. Clients ignore
//! fields they do not know.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Envelope, ErrorCode, JobKind, ServiceTier};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct ChunkEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub job_id: Uuid,
    pub trace_id: &'a str,
    pub seq: u64,
    pub attempt: u32,
    pub provider: &'a str,
    pub model: &'a str,
    /// Text of the answer; absent on a chunk that carries a piece of a tool call instead.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_call: Option<ToolCallChunk>,
}

/// A piece of a streamed tool call (CONTRACT section 6): the call's `id` and `name` on its
/// first chunk, then fragments of its `arguments` text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ToolCallChunk {
    /// Which call of the answer (0-based).
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: String,
}

/// `error` of a result or of an attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

/// The token classes a provider bills apart (CONTRACT.md section 7). Each is a part of a
/// call's input or output tokens, never in addition to them: `reasoning_tokens` of the
/// output, the others of the input. Zero (and absent from the JSON) when not reported.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenClasses {
    /// Prompt tokens served from the provider's prompt cache.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache (Anthropic: 5-minute writes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// Anthropic's 1-hour cache writes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_tokens: u64,
    /// Thinking tokens, billed as output.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
    /// Prompt tokens of images.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_input_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TokenClasses {
    /// Whether no class has tokens.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The prompt tokens these classes account for (the rest of the input is plain text).
    pub fn input_part(&self) -> u64 {
        self.cache_read_tokens
            .saturating_add(self.cache_write_tokens)
            .saturating_add(self.cache_write_1h_tokens)
            .saturating_add(self.image_input_tokens)
    }

    /// These classes, each at most what it is a part of (`input`, `output`): a provider's
    /// inconsistent counts never make a class larger than its whole.
    pub fn within(self, input: u64, output: u64) -> Self {
        Self {
            cache_read_tokens: self.cache_read_tokens.min(input),
            cache_write_tokens: self.cache_write_tokens.min(input),
            cache_write_1h_tokens: self.cache_write_1h_tokens.min(input),
            reasoning_tokens: self.reasoning_tokens.min(output),
            image_input_tokens: self.image_input_tokens.min(input),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokensUsed {
    pub input: u64,
    pub output: u64,
    pub total: u64,
    /// The billed classes of `input` and `output`, as the provider reported them.
    #[serde(flatten)]
    pub classes: TokenClasses,
}

impl TokensUsed {
    pub fn new(input: u64, output: u64) -> Self {
        Self {
            input,
            output,
            total: input.saturating_add(output),
            classes: TokenClasses::default(),
        }
    }

    /// Counts with their billed classes.
    pub fn with_classes(input: u64, output: u64, classes: TokenClasses) -> Self {
        Self {
            classes,
            ..Self::new(input, output)
        }
    }
}

/// One provider call of a job, in order; `attempt` is its 1-based index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub provider: String,
    pub model: String,
    /// `null` for the call whose output counts and for none other that succeeded.
    pub error: Option<ErrorBody>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The billed classes of these tokens (cache reads and writes, reasoning, images).
    #[serde(flatten)]
    pub classes: TokenClasses,
    /// True when the provider reported no usage and the worker estimated it.
    pub tokens_estimated: bool,
    /// Image jobs: the pictures this call made (billed per image where not in tokens).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub images: Option<ImagesMade>,
    pub cost_usd: Option<f64>,
    /// What the provider's prompt cache saved on this call: its cache reads at the input
    /// price less their own price. Absent without cache reads or their price.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cache_saved_usd: Option<f64>,
    pub http_status: Option<u16>,
    /// The tier the call was made and billed at (`flex`: OpenAI's flex tier, `batch`: a line
    /// of a provider batch); absent for a standard call.
    #[serde(skip_serializing_if = "ServiceTier::is_standard", default)]
    pub service_tier: ServiceTier,
    pub latency_ms: u64,
    /// Time to the first text, when there was any.
    pub ttft_ms: Option<u64>,
    #[serde(serialize_with = "timestamp")]
    pub started_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub finished_at: DateTime<Utc>,
}

/// The pictures one call of an image job made, with what their per-image price depends on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImagesMade {
    pub count: u32,
    /// The size made (as the provider reported it, else as asked), `1024x1024`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<String>,
    /// The quality made (as reported, else as asked), `medium`, `hd`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub quality: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

/// What a cache hit saved: the usage and cost of the call that produced the answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheSaving {
    #[serde(serialize_with = "timestamp")]
    pub stored_at: DateTime<Utc>,
    pub saved_input_tokens: u64,
    pub saved_output_tokens: u64,
    /// `null` when the original call's price was unknown.
    pub saved_cost_usd: Option<f64>,
    /// Embedding jobs: how many inputs' vectors came from the cache.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cached_inputs: Option<usize>,
}

/// What fitting changed, reported in the result as `context_trimmed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trimmed {
    /// Context chunks dropped (the last ones).
    pub chunks_dropped: u32,
    /// Conversation messages dropped (the oldest ones).
    pub messages_dropped: u32,
    /// Prompt tokens before and after (as counted for the model).
    pub tokens_before: u64,
    pub tokens_after: u64,
    /// `max_tokens` as asked and as sent, when fitting lowered it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_tokens_before: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_tokens_after: Option<u32>,
    /// The model's window.
    pub window: u32,
}

/// The single final event of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub job_id: Uuid,
    pub trace_id: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub embeddings: Option<Vec<Vec<f32>>>,
    /// Image jobs: the pictures, kept in the object store (CONTRACT.md section 8).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub images: Option<Vec<super::ImageObject>>,
    /// The tool calls of the final answer (`finish_reason: "tool_calls"`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_calls: Option<Vec<super::ToolCall>>,
    /// With a JSON `response_format`: the answer parsed (`output` is its text).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub json: Option<serde_json::Value>,
    pub finish_reason: Option<String>,
    pub tokens_used: TokensUsed,
    pub model_used: Option<String>,
    pub provider: Option<String>,
    /// 1-based index into `attempts` of the call whose output is final.
    pub attempt: Option<u32>,
    pub attempts: Vec<AttemptRecord>,
    pub cost_usd: Option<f64>,
    pub cache_hit: bool,
    /// On a cache hit: when the answer was stored and what it cost then (saved now).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cache: Option<CacheSaving>,
    /// A cached answer past its TTL, served because every provider failed (degraded mode).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub stale: bool,
    /// What context fitting removed so the prompt fit the final attempt's model.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub context_trimmed: Option<Trimmed>,
    pub processing_time_ms: u64,
    pub error: Option<ErrorBody>,
    /// The tier of the call that answered (`batch`: through a provider's batch API); absent
    /// when standard.
    #[serde(skip_serializing_if = "ServiceTier::is_standard", default)]
    pub service_tier: ServiceTier,
    // Beyond the contract's example, for the usage ledger (clients ignore unknown fields).
    pub job_kind: JobKind,
    pub tenant: String,
    pub task_type: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Value,
    pub worker_id: String,
    #[serde(serialize_with = "timestamp")]
    pub received_at: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub finished_at: DateTime<Utc>,
}

impl ResultEvent {
    /// A result for a job that ended before or without a successful provider call.
    pub(crate) fn failure(
        envelope: &Envelope,
        kind: JobKind,
        error: ErrorBody,
        worker_id: &str,
        received_at: DateTime<Utc>,
    ) -> Self {
        let finished_at = Utc::now();
        Self {
            kind: "result".into(),
            job_id: envelope.job_id,
            trace_id: envelope.trace_id.clone(),
            status: Status::Error,
            output: None,
            embeddings: None,
            images: None,
            tool_calls: None,
            json: None,
            finish_reason: None,
            tokens_used: TokensUsed::default(),
            model_used: None,
            provider: None,
            attempt: None,
            attempts: Vec::new(),
            cost_usd: None,
            cache_hit: false,
            cache: None,
            stale: false,
            context_trimmed: None,
            processing_time_ms: elapsed_ms(received_at, finished_at),
            error: Some(error),
            service_tier: ServiceTier::Standard,
            job_kind: kind,
            tenant: envelope.tenant.clone(),
            task_type: envelope.task_type.clone(),
            metadata: envelope.metadata.clone(),
            worker_id: worker_id.to_string(),
            received_at,
            finished_at,
        }
    }
}

/// The same RFC 3339 text as chrono's own `Serialize` (`AutoSi`, `Z`), formatted in one piece
/// on the stack: chrono's impl feeds serde_json one character at a time, and its
/// `to_rfc3339_opts` allocates a string; a result carries five or more of these (about 2 us
/// of a short job's CPU). Years outside 0..=9999 and leap seconds are left to chrono.
fn timestamp<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    }
    // YYYY-MM-DDTHH:MM:SS, then .fff / .ffffff / .fffffffff as the nanoseconds need, then Z.
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, digits: usize, mut v: u32| {
        for i in (at..at + digits).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.unsigned_abs());
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    let len = match nanos {
        0 => 19,
        n if n % 1_000_000 == 0 => {
            put(20, 3, n / 1_000_000);
            23
        }
        n if n % 1_000 == 0 => {
            put(20, 6, n / 1_000);
            26
        }
        n => {
            put(20, 9, n);
            29
        }
    };
    buf[len] = b'Z';
    // Only ASCII digits and separators were written.
    let text = std::str::from_utf8(&buf[..=len]).map_err(serde::ser::Error::custom)?;
    s.serialize_str(text)
}

pub(crate) fn elapsed_ms(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_milliseconds()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_events_have_the_contract_shape() {
        let id = Uuid::nil();
        let c = ChunkEvent {
            kind: "chunk",
            job_id: id,
            trace_id: "t",
            seq: 0,
            attempt: 1,
            provider: "p",
            model: "m",
            delta: Some("Hel"),
            tool_call: None,
        };
        let v: serde_json::Value = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"chunk","job_id":id,"trace_id":"t","seq":0,"attempt":1,
                "provider":"p","model":"m","delta":"Hel"})
        );
    }

    #[test]
    fn timestamps_serialize_exactly_like_chrono() {
        use chrono::TimeZone;
        let base = Utc.with_ymd_and_hms(2026, 11, 22, 7, 21, 33).unwrap();
        let instants = [
            0,
            120_000_000,
            123_456_000,
            123_456_789,
            1,
            999_999_999,
            5_000,
        ]
        .map(|nanos| base + chrono::Duration::nanoseconds(nanos))
        .into_iter()
        .chain([
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 3, 4, 5, 6, 7).unwrap(),
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        ]);
        for t in instants {
            let mut ours = serde_json::Serializer::new(Vec::new());
            timestamp(&t, &mut ours).unwrap();
            assert_eq!(
                String::from_utf8(ours.into_inner()).unwrap(),
                serde_json::to_string(&t).unwrap()
            );
        }
    }
}
