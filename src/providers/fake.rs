//! The `fake` provider: for tests, demos and benchmarks only, never for production answers.
//!
//! It answers in-process (no network) with deterministic text: `output_tokens` words chosen from
//! the prompt's hash (fewer if the job's `max_tokens` is lower), after `latency_ms`, at
//! `tokens_per_sec` (0 = as fast as possible), and reports exact usage (one token per word;
//! prompt tokens estimated). Failure modes are picked by the model name, so one config can
//! exercise the chain:
//!
//! | model contains | behaviour |
//! |---|---|
//! | `error` | fails at once with a retryable server error (HTTP 500) |
//! | `cut` | streams half the answer, then the stream breaks (truncated) |
//! | `silent` | never sends a token (the first-token timeout fires) |
//! | `filter` | refuses with a content-filter error |
//! | anything else | answers |

use std::time::Duration;

use futures::StreamExt;

use super::{Call, ProviderEvent, Usage, estimate_request_tokens};
use crate::config::ProviderConfig;
use crate::error::{ErrorCode, ProviderError};
use crate::job::GenerateRequest;

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

pub struct Fake {
    dimensions: u32,
    latency: Duration,
    tokens_per_sec: u64,
    output_tokens: u64,
}

impl Fake {
    pub fn new(cfg: &ProviderConfig) -> Self {
        Self {
            dimensions: cfg.embedding_dimensions.max(1),
            latency: Duration::from_millis(cfg.latency_ms),
            tokens_per_sec: cfg.tokens_per_sec,
            output_tokens: cfg.output_tokens.max(1),
        }
    }

    /// Deterministic vectors (a function of each text), `dimensions` long (default
    /// `embedding_dimensions`); usage is estimated like prompts. `error` models fail.
    pub fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<super::Embedded, ProviderError> {
        if model.contains("error") {
            return Err(ProviderError::new(
                ErrorCode::ServerError,
                "fake provider: injected error",
            )
            .with_status(500));
        }
        let dims = dimensions.unwrap_or(self.dimensions) as usize;
        let vectors = inputs.iter().map(|t| fake_vector(t, dims)).collect();
        let tokens = inputs.iter().map(|t| super::estimate_tokens(t)).sum();
        Ok(super::Embedded {
            vectors,
            input_tokens: Some(tokens),
            http_status: None,
        })
    }

    pub fn generate(&self, model: &str, req: &GenerateRequest) -> Result<Call, ProviderError> {
        if model.contains("error") {
            return Err(ProviderError::new(
                ErrorCode::ServerError,
                "fake provider: injected error",
            )
            .with_status(500));
        }
        if model.contains("filter") {
            return Err(ProviderError::new(
                ErrorCode::ContentFiltered,
                "fake provider: injected refusal",
            )
            .with_status(400));
        }
        let n = req
            .options
            .max_tokens
            .map_or(self.output_tokens, |m| self.output_tokens.min(u64::from(m)));
        let words = answer(req, n as usize);
        let usage = Usage {
            input_tokens: estimate_request_tokens(req),
            output_tokens: words.len() as u64,
        };
        let silent = model.contains("silent");
        let cut_at = model.contains("cut").then_some(words.len() / 2);
        let gap = (self.tokens_per_sec > 0)
            .then(|| Duration::from_secs_f64(1.0 / self.tokens_per_sec as f64));
        let latency = self.latency;

        let stream = req.stream;
        let deltas: Vec<String> = if stream {
            words
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    }
                })
                .collect()
        } else {
            vec![words.join(" ")]
        };
        let events = futures::stream::unfold(0usize, move |i| {
            let deltas = deltas.clone();
            async move {
                if i == 0 && !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                if silent {
                    std::future::pending::<()>().await;
                }
                if cut_at.is_some_and(|c| i == c) {
                    let err = ProviderError::new(ErrorCode::Truncated, "fake provider: stream cut");
                    return Some((Err(err), usize::MAX));
                }
                if i == usize::MAX || i > deltas.len() + 1 {
                    return None;
                }
                let ev = match i.cmp(&deltas.len()) {
                    std::cmp::Ordering::Less => {
                        if i > 0
                            && let Some(gap) = gap
                        {
                            tokio::time::sleep(gap).await;
                        }
                        ProviderEvent::Delta(deltas[i].clone())
                    }
                    std::cmp::Ordering::Equal => ProviderEvent::Finish("stop".into()),
                    std::cmp::Ordering::Greater => ProviderEvent::Usage(usage),
                };
                Some((Ok(ev), i + 1))
            }
        })
        .boxed();
        Ok(Call {
            http_status: None,
            events,
        })
    }
}

/// A deterministic vector in [-1, 1) seeded by the text (also used by the fake HTTP server).
pub fn fake_vector(text: &str, dims: usize) -> Vec<f32> {
    let mut h = text.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..dims)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            (h % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// `n` deterministic words seeded by the prompt.
fn answer(req: &GenerateRequest, n: usize) -> Vec<&'static str> {
    let seed = req
        .messages
        .iter()
        .flat_map(|m| m.content.bytes())
        .fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
    (0..n).map(|i| WORDS[(seed + i) % WORDS.len()]).collect()
}
