//! Entry points for the fuzz targets (`fuzz/`, `cargo fuzz`) and for the corpus replay test
//! that runs in every CI: each feeds arbitrary bytes to a decoder of untrusted input (a job,
//! a provider's stream, error body or retry hint) and must return, never panic or hang. Not an
//! API: the functions only exercise the decoders.

use std::time::Duration;

use futures::StreamExt;

use crate::config::{LimitsConfig, NatsConfig};
use crate::contract::JobKind;
use crate::job::{self, Catalog, Delivery, Limits, Rules};
use crate::providers::{self, EventStream, ProviderEvent, anthropic, gemini, ollama, openai, sse};

/// One fuzz target: it takes any bytes.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: [(&str, Target); 5] = [
    ("job_decode", job_decode),
    ("sse_streams", sse_streams),
    ("ndjson_stream", ndjson_stream),
    ("error_bodies", error_bodies),
    ("retry_hints", retry_hints),
];

/// A catalog of one provider, which a job may pin with any model (also for unit tests).
pub(crate) struct OneProvider(pub &'static str);

impl Catalog for OneProvider {
    fn check_pin(
        &self,
        _: Option<&str>,
        provider: Option<&str>,
        _: Option<&str>,
    ) -> Result<(), String> {
        match provider {
            Some(p) if p != self.0 => Err(format!("provider: unknown provider {p:?}")),
            _ => Ok(()),
        }
    }
}

/// A job message, decoded as each kind, with the first byte choosing a dedup header.
pub fn job_decode(data: &[u8]) {
    let limits = Limits {
        max_job_bytes: 1 << 20,
        default_timeout: Duration::from_secs(120),
        max_timeout: Duration::from_secs(3600),
        bounds: LimitsConfig {
            max_metadata_bytes: 512,
            max_prompt_bytes: 4096,
            ..Default::default()
        },
        tenants: Default::default(),
        cache_task_types: Default::default(),
        tier_task_types: Default::default(),
        batch_deadline: Duration::from_secs(86_400),
    };
    let Ok(replies) = NatsConfig::default().reply_policy() else {
        return;
    };
    let rules = Rules {
        limits: &limits,
        replies: &replies,
        catalog: &OneProvider("p"),
    };
    let header = match data.first() {
        Some(b) if b % 3 == 0 => Some("0192f0c4-0000-7000-8000-000000000001"),
        Some(b) if b % 3 == 1 => Some("not-a-uuid"),
        _ => None,
    };
    for kind in JobKind::ALL {
        let delivery = Delivery {
            msg_id: header,
            subject_tenant: None,
            published: None,
            traceparent: None,
        };
        let _ = job::decode(kind, data, &delivery, &rules);
    }
}

/// `data` as a body arriving in pieces: the first byte sets the piece size.
fn pieces(data: &[u8]) -> sse::ByteStream {
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let chunks: Vec<reqwest::Result<bytes::Bytes>> = data
        .chunks(size)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks).boxed()
}

/// Read an event stream to its end (bounded: a decoder must end it).
fn drain(mut events: EventStream) {
    futures::executor::block_on(async {
        let mut text = 0usize;
        while let Some(event) = events.next().await {
            if let Ok(ProviderEvent::Delta(d)) = event {
                text += d.len();
            }
        }
        text
    });
}

/// The same bytes as an OpenAI, an Anthropic and a Gemini SSE stream.
pub fn sse_streams(data: &[u8]) {
    let max = 4096;
    drain(sse::decode_body(
        pieces(data),
        openai::StreamDecoder::default(),
        max,
    ));
    drain(sse::decode_body(
        pieces(data),
        anthropic::StreamDecoder::default(),
        max,
    ));
    drain(sse::decode_body(
        pieces(data),
        gemini::StreamDecoder::default(),
        max,
    ));
}

/// The bytes as an Ollama NDJSON stream.
pub fn ndjson_stream(data: &[u8]) {
    drain(ollama::decode_body(pieces(data), 4096));
}

/// The bytes (as text) as every provider's error body, with the first byte as the status.
pub fn error_bodies(data: &[u8]) {
    let status = 200 + u16::from(data.first().copied().unwrap_or(0)) * 2;
    let body = String::from_utf8_lossy(data);
    let _ = openai::classify_error_body(status, &body);
    let _ = anthropic::classify(status, &body);
    let _ = gemini::classify(status, &body);
    let _ = ollama::classify(status, &body);
}

/// The bytes as `Retry-After` / `retry-after-ms` header values.
pub fn retry_hints(data: &[u8]) {
    for name in ["retry-after", "retry-after-ms"] {
        let Ok(value) = reqwest::header::HeaderValue::from_bytes(data) else {
            return;
        };
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(name, value);
        if let Some(d) = providers::retry_after(&headers) {
            assert!(d <= providers::MAX_RETRY_HINT);
        }
    }
}
