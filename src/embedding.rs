//! The embedding chain: the same routing, circuit breaking, limits and retry timing as
//! generation, over batches.
//!
//! Inputs are split into provider-sized batches (input count and estimated tokens); each batch
//! is one provider call (one attempt record) retried on transient errors; a batch that cannot
//! be served moves the whole job to the next entry, which embeds every batch again, so all
//! vectors of a job come from one model. Vectors are returned in input order.
//!
//! Dimension safety: with `options.dimensions`, every vector must have that size. Without it,
//! a fallback entry's vectors are accepted only when they have the size the route's first
//! entry last produced in this process, or when the route is listed in
//! `embed_mixed_dimensions`; otherwise the attempt ends as `dimension_mismatch`.

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::chain::{
    Bounds, Call, CallGate, Chain, Refused, Settled, Target, attempt_error, attempt_log, cancelled,
    chain_error, retry_delays, wait_retry, whole_answer,
};
use crate::contract::EmbedRequest;
use crate::contract::ErrorCode;
use crate::contract::{AttemptRecord, ErrorBody, elapsed_ms};
use crate::error::ProviderError;
use crate::job::Job;
use crate::providers::MAX_REPORTED_TOKENS;
use crate::tokens;

/// The vectors of a successful job.
#[derive(Debug, Clone)]
pub struct EmbedSuccess {
    /// The last call that contributed vectors.
    pub attempt: u32,
    pub provider: String,
    pub model: String,
    /// One per input embedded: the `first_inputs` when [`EmbedSuccess::partial`], else every
    /// input of the job.
    pub vectors: Vec<Vec<f32>>,
    pub input_tokens: u64,
    /// The route's first entry embedded only the `first_inputs` it was given.
    pub partial: bool,
}

/// What bounds one job's vectors.
#[derive(Debug, Clone, Copy)]
pub struct EmbedRules {
    /// The route may fall back to vectors of another size (`embed_mixed_dimensions`).
    pub mixed_dimensions: bool,
    /// Room for the vectors in the result (the NATS server's max payload less the rest).
    pub max_vector_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct EmbedOutcome {
    pub attempts: Vec<AttemptRecord>,
    pub result: Result<EmbedSuccess, ErrorBody>,
}

/// Split inputs into batches of at most `max_inputs` inputs and `max_tokens` estimated tokens
/// (a single larger input still gets a batch of its own).
pub(crate) fn batches(inputs: &[String], max_inputs: usize, max_tokens: u64) -> Vec<&[String]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut tokens = 0u64;
    for (i, text) in inputs.iter().enumerate() {
        let t = tokens::rough(text);
        let count = i - start;
        if count > 0 && (count >= max_inputs.max(1) || tokens + t > max_tokens) {
            out.push(&inputs[start..i]);
            start = i;
            tokens = 0;
        }
        tokens += t;
    }
    if start < inputs.len() {
        out.push(&inputs[start..]);
    }
    out
}

impl Chain {
    /// Embed a job's inputs through its route. `rules.max_vector_bytes` is how much room the
    /// result has for its vectors: a job whose
    /// vectors cannot fit is answered `payload_too_large` before any call when the vector size
    /// is known (asked for, or learned from the route's first entry), else right after its
    /// first batch shows how large they are, never after embedding everything.
    ///
    /// With `first_inputs` (the inputs the vector cache does not hold for the route's first
    /// entry), that entry embeds only those; a fallback entry embeds every input, since
    /// cached vectors of the first entry's model must not mix with its own.
    pub async fn embed<G: CallGate>(
        &self,
        job: &Job,
        req: &EmbedRequest,
        first_inputs: Option<&[String]>,
        rules: EmbedRules,
        bounds: Bounds<'_, G>,
    ) -> EmbedOutcome {
        let EmbedRules {
            mixed_dimensions,
            max_vector_bytes,
        } = rules;
        let Bounds {
            deadline,
            cancel,
            gate,
        } = bounds;
        let targets = self.plan(job);
        let mut attempts = attempt_log();
        let mut skipped = Vec::new();
        let mut timed_out = false;
        let expected = req.dimensions.map(|d| d as usize);
        let n = req.input.len();
        let known = expected.or_else(|| {
            targets
                .first()
                .and_then(|t| self.health.dimensions(&t.provider.name, &t.model))
        });
        if let Some(dims) = known {
            // The least a vector can take as JSON: `0.0,` per number, brackets and a comma.
            let least = n.saturating_mul(dims.saturating_mul(4).saturating_add(3));
            if least > max_vector_bytes {
                let message = format!(
                    "{n} vectors of {dims} dimensions need at least {least} bytes as JSON, more than the {max_vector_bytes} bytes a result has for vectors (the NATS server's max_payload less the rest of the result): split the input over several jobs"
                );
                return too_large(attempts, message);
            }
        }
        'targets: for (index, target) in targets.iter().enumerate() {
            let provider = &target.provider;
            // Only providers with an embeddings API reach an embedding route (checked at load).
            let Some(batching) = provider.embedding else {
                continue 'targets;
            };
            let partial = index == 0 && first_inputs.is_some();
            let inputs = first_inputs.filter(|_| index == 0).unwrap_or(&req.input);
            let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(inputs.len());
            let mut tokens = 0u64;
            for batch in batches(inputs, batching.batch_size, batching.batch_tokens) {
                let mut backoff = retry_delays(provider);
                loop {
                    // Embedding calls have no output to lower: only a refusal counts.
                    if let Err(error) = gate
                        .before_call(target, Call::Embed(batch), &attempts)
                        .await
                    {
                        return EmbedOutcome {
                            attempts,
                            result: Err(error),
                        };
                    }
                    let admitted = match self
                        .admit(target, deadline, cancel, &attempts, &mut skipped)
                        .await
                    {
                        Ok(admitted) => admitted,
                        Err(Refused::NextTarget) => continue 'targets,
                        Err(Refused::TimedOut) => {
                            timed_out = true;
                            break 'targets;
                        }
                        Err(Refused::Cancelled) => {
                            return EmbedOutcome {
                                attempts,
                                result: Err(cancelled()),
                            };
                        }
                    };
                    let span = crate::chain::attempt_span(target, admitted.number);
                    let (record, result) = call(
                        target,
                        admitted.number,
                        batch,
                        req.dimensions,
                        deadline,
                        cancel,
                    )
                    .instrument(span.clone())
                    .await;
                    crate::chain::end_attempt_span(&span, &record);
                    match self.settle(
                        target,
                        record,
                        result,
                        &mut backoff,
                        deadline,
                        &mut attempts,
                    ) {
                        Settled::Done(embedded) => {
                            tokens = tokens
                                .saturating_add(attempts.last().map_or(0, |a| a.input_tokens));
                            if vectors.is_empty()
                                && let Some(message) = extrapolate(&embedded, n, max_vector_bytes)
                            {
                                return too_large(attempts, message);
                            }
                            vectors.extend(embedded);
                            break;
                        }
                        Settled::RetryIn(delay) => {
                            if !wait_retry(delay, cancel).await {
                                return EmbedOutcome {
                                    attempts,
                                    result: Err(cancelled()),
                                };
                            }
                        }
                        Settled::NextTarget => continue 'targets,
                        Settled::TimedOut => {
                            timed_out = true;
                            break 'targets;
                        }
                        Settled::Fail(error) => {
                            return EmbedOutcome {
                                attempts,
                                result: Err(error),
                            };
                        }
                    }
                }
            }
            // Every batch answered: check the vectors' size before accepting them.
            let dims = vectors.first().map_or(0, Vec::len);
            let uneven = vectors.iter().any(|v| v.len() != dims);
            let first = targets
                .first()
                .map(|t| (t.provider.name.as_str(), t.model.as_str()));
            let route_dims = first.and_then(|(p, m)| self.health.dimensions(p, m));
            let problem = if uneven || dims == 0 {
                Some(format!(
                    "vectors of uneven or zero size from {}",
                    provider.name
                ))
            } else if let Some(want) = expected.filter(|w| *w != dims) {
                Some(format!("asked for {want} dimensions, got {dims}"))
            } else if index > 0
                && expected.is_none()
                && !mixed_dimensions
                && route_dims != Some(dims)
            {
                Some(match route_dims {
                    Some(r) => format!(
                        "the route's first entry returns {r} dimensions, this fallback {dims}"
                    ),
                    None => format!(
                        "the fallback returns {dims} dimensions and the route's size is unknown (set options.dimensions or embed_mixed_dimensions)"
                    ),
                })
            } else {
                None
            };
            if let Some(message) = problem {
                if let Some(last) = attempts.last_mut() {
                    last.error = Some(ErrorBody {
                        code: ErrorCode::DimensionMismatch,
                        message,
                        retryable: false,
                    });
                }
                continue 'targets;
            }
            self.health
                .record_dimensions(&provider.name, &target.model, dims);
            return EmbedOutcome {
                result: Ok(EmbedSuccess {
                    attempt: attempts.len() as u32,
                    provider: provider.name.clone(),
                    model: target.model.clone(),
                    vectors,
                    input_tokens: tokens,
                    partial,
                }),
                attempts,
            };
        }
        let error = chain_error(&attempts, &skipped, timed_out, targets.is_empty());
        EmbedOutcome {
            attempts,
            result: Err(error),
        }
    }
}

fn too_large(attempts: Vec<AttemptRecord>, message: String) -> EmbedOutcome {
    EmbedOutcome {
        attempts,
        result: Err(ErrorBody {
            code: ErrorCode::PayloadTooLarge,
            message,
            retryable: false,
        }),
    }
}

/// Whether all `n` vectors will fit in `max_bytes`, judged by the JSON size of the first batch;
/// the reason when they will not.
fn extrapolate(first: &[Vec<f32>], n: usize, max_bytes: usize) -> Option<String> {
    let bytes = serde_json::to_vec(first).map_or(0, |b| b.len());
    let per_vector = bytes / first.len().max(1);
    let estimate = per_vector.saturating_mul(n);
    (estimate > max_bytes).then(|| {
        format!(
            "{n} vectors of about {per_vector} bytes as JSON (judged by the first batch) are about {estimate} bytes, more than the {max_bytes} bytes a result has for vectors (the NATS server's max_payload less the rest of the result): split the input over several jobs"
        )
    })
}

/// One embedding request for one batch.
async fn call(
    target: &Target,
    number: u32,
    batch: &[String],
    dimensions: Option<u32>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> (AttemptRecord, Result<Vec<Vec<f32>>, ProviderError>) {
    let provider = &target.provider;
    let started_at = Utc::now();
    let result = whole_answer(
        provider.embed(&target.model, batch, dimensions),
        Instant::now() + provider.timeouts.first_token,
        deadline,
        cancel,
        "no answer within the first-token limit",
    )
    .await;
    let finished_at = Utc::now();
    let (input_tokens, estimated, http_status) = match &result {
        Ok(e) => match e.input_tokens {
            Some(t) => (t.min(MAX_REPORTED_TOKENS), false, e.http_status),
            None => (count_inputs(&target.model, batch), true, e.http_status),
        },
        // The request went out: the provider may bill it.
        Err(e) if e.code == ErrorCode::Cancelled => {
            (count_inputs(&target.model, batch), true, None)
        }
        Err(e) => (0, false, e.http_status),
    };
    let record = AttemptRecord {
        attempt: number,
        provider: provider.name.clone(),
        model: target.model.clone(),
        error: result.as_ref().err().map(|e| attempt_error(provider, e)),
        input_tokens,
        output_tokens: 0,
        classes: Default::default(),
        tokens_estimated: estimated,
        images: None,
        cost_usd: None,
        cache_saved_usd: None,
        http_status,
        service_tier: crate::contract::ServiceTier::Standard,
        latency_ms: elapsed_ms(started_at, finished_at),
        ttft_ms: None,
        started_at,
        finished_at,
    };
    (record, result.map(|e| e.vectors))
}

/// Tokens of embedding inputs the provider did not count (`crate::tokens`).
fn count_inputs(model: &str, inputs: &[String]) -> u64 {
    let counter = tokens::Counter::for_model(model);
    inputs.iter().map(|t| counter.count(t)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_input_count_and_token_limits_and_keep_order() {
        let inputs: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let sizes: Vec<usize> = batches(&inputs, 2, 1_000).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        let flat: Vec<&String> = batches(&inputs, 2, 1_000).into_iter().flatten().collect();
        assert_eq!(flat, inputs.iter().collect::<Vec<_>>());
        let long: Vec<String> = vec!["x".repeat(40), "y".repeat(40), "z".repeat(4)];
        let sizes: Vec<usize> = batches(&long, 100, 15).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [1, 2], "10 + 10 tokens exceed 15; 10 + 1 do not");
    }
}
