//! A generation job: the response cache around the chain. A fresh cached answer is sent
//! without a call; otherwise the chain runs, and an answer that ended normally is stored;
//! when every provider failed, a stale cached answer may stand in (degraded mode). See
//! `crate::cache` for the key and the rules.

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Answer, Outbox, Routing, Worker};
use crate::cache;
use crate::chain::{AttemptMeta, DeltaSink};
use crate::contract::ErrorCode;
use crate::contract::{CacheMode, GenerateRequest};
use crate::contract::{CacheSaving, ErrorBody, ResultEvent, Status, elapsed_ms};
use crate::job::Job;

/// What limits a job's calls: its deadline, its cancellation, its budget gate.
#[derive(Clone, Copy)]
pub(super) struct Bounds<'a> {
    pub(super) deadline: Instant,
    pub(super) cancel: &'a CancellationToken,
    pub(super) gate: Option<&'a super::budget::BudgetGate<'a>>,
}

impl<'a> Bounds<'a> {
    /// The chain's bounds of one run (the budget gate, when there is one).
    pub(super) fn chain(
        &self,
    ) -> crate::chain::Bounds<'_, Option<&'a super::budget::BudgetGate<'a>>> {
        crate::chain::Bounds {
            deadline: self.deadline,
            cancel: self.cancel,
            gate: &self.gate,
        }
    }
}

/// Largest chunk event text of a cached answer.
const CACHED_CHUNK_BYTES: usize = 16 * 1024;

impl<O: Outbox> Worker<O> {
    /// Answer a generation job: from the cache, or through the chain (then stored).
    pub(super) async fn generate(
        &self,
        routing: &Routing,
        job: &Job,
        req: &GenerateRequest,
        received_at: DateTime<Utc>,
        bounds: Bounds<'_>,
    ) -> ResultEvent {
        let Bounds {
            deadline,
            cancel,
            gate,
        } = bounds;
        let env = &job.envelope;
        let reply_to = env.reply_to.as_deref().filter(|_| req.stream);
        let mut sink = self.outbox.chunks(env.job_id, &env.trace_id, reply_to);
        let cached = self.cache.as_ref().and_then(|c| {
            let mode = cache::mode(job, req, cache::Said::of(&routing.limits, env));
            (mode != CacheMode::Off)
                .then(|| (c, mode, c.key(job, req, &routing.chain.cache_scope(job))))
        });
        let mut stale = None;
        if let Some((c, CacheMode::Use, key)) = &cached
            && let Some(hit) = c.get(key).await
        {
            match c.age(&hit) {
                cache::Age::Fresh => {
                    let base = ResultEvent::failure(
                        env,
                        job.kind,
                        no_answer(),
                        &self.worker_id,
                        received_at,
                    );
                    return answer_from_cache(base, hit, &mut sink).await;
                }
                cache::Age::Stale => stale = Some(hit),
                cache::Age::Expired => {}
            }
        }
        let o = routing
            .chain
            .generate(
                job,
                req,
                &mut sink,
                crate::chain::Bounds {
                    deadline,
                    cancel,
                    gate: &gate,
                },
            )
            .await;
        let result = self.result_of(job, o.attempts, o.result.map(Answer::Text), received_at);
        if let Some(hit) = stale
            && result.status == Status::Error
            && cache::degraded(&result)
        {
            // Degraded mode: every provider failed; the old answer stands in, and the failed
            // calls stay in `attempts` (and are billed as such).
            tracing::warn!(stored_at = %hit.stored_at, "every provider failed; answered from the cache past its TTL");
            let mut result = answer_from_cache(result, hit, &mut sink).await;
            result.stale = true;
            return result;
        }
        if let Some((c, _, key)) = cached
            && let Some(entry) = entry_of(&result)
        {
            c.put(&key, &entry).await;
        }
        result
    }
}

/// What is stored of a result: an answer that ended normally (`stop`, `length`, or
/// `tool_calls`).
fn entry_of(result: &ResultEvent) -> Option<cache::Entry> {
    let output = result.output.as_ref()?;
    let finish_reason = result
        .finish_reason
        .clone()
        .filter(|f| f == "stop" || f == "length" || f == "tool_calls")?;
    Some(cache::Entry {
        output: output.clone(),
        finish_reason,
        provider: result.provider.clone().unwrap_or_default(),
        model: result.model_used.clone().unwrap_or_default(),
        input_tokens: result.tokens_used.input,
        output_tokens: result.tokens_used.output,
        cost_usd: result.cost_usd,
        stored_at: result.finished_at,
        tool_calls: result.tool_calls.clone().unwrap_or_default(),
        json: result.json.clone(),
    })
}

/// Send a cached answer: its text as chunk events (a streamed job), then `result` (the job's
/// result so far: no attempts for a hit, the failed ones in degraded mode) turned into a
/// success with `cache_hit` and what the answer saved.
async fn answer_from_cache(
    mut result: ResultEvent,
    hit: cache::Entry,
    sink: &mut impl DeltaSink,
) -> ResultEvent {
    tracing::debug!(stored_at = %hit.stored_at, "answered from the response cache");
    let meta = AttemptMeta {
        attempt: 0,
        provider: &hit.provider,
        model: &hit.model,
    };
    for piece in pieces(&hit.output, CACHED_CHUNK_BYTES) {
        sink.delta(meta, piece).await;
    }
    for (index, call) in (0u32..).zip(&hit.tool_calls) {
        let chunk = crate::contract::ToolCallChunk {
            index,
            id: Some(call.id.clone()),
            name: Some(call.name.clone()),
            arguments: call.arguments.to_string(),
        };
        sink.tool_call(meta, &chunk).await;
    }
    sink.flush().await;
    result.status = Status::Ok;
    result.error = None;
    result.cache_hit = true;
    if result.attempts.is_empty() {
        result.cost_usd = Some(0.0);
    }
    result.attempt = Some(0);
    result.cache = Some(CacheSaving {
        stored_at: hit.stored_at,
        saved_input_tokens: hit.input_tokens,
        saved_output_tokens: hit.output_tokens,
        saved_cost_usd: hit.cost_usd,
        cached_inputs: None,
    });
    result.output = Some(hit.output);
    result.tool_calls = (!hit.tool_calls.is_empty()).then_some(hit.tool_calls);
    result.json = hit.json;
    result.finish_reason = Some(hit.finish_reason);
    result.model_used = Some(hit.model);
    result.provider = Some(hit.provider);
    result.finished_at = Utc::now();
    result.processing_time_ms = elapsed_ms(result.received_at, result.finished_at);
    result
}

/// The error of a result about to be replaced by a cached answer.
fn no_answer() -> ErrorBody {
    ErrorBody {
        code: ErrorCode::AllProvidersFailed,
        message: String::new(),
        retryable: false,
    }
}

/// `text` in pieces of at most `max` bytes, cut at character boundaries.
pub(super) fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 {
            // A character longer than `max`: it goes whole.
            end = rest.char_indices().nth(1).map_or(rest.len(), |(i, _)| i);
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}
