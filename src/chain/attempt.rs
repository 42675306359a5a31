//! One provider call of the chain, consumed to its end: the first-token and stall limits, the
//! job deadline, the output bound, cancellation, the sink's held-back text, and the tokens the
//! call is billed (reported, or counted where the provider reported none).

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{AttemptMeta, DeltaSink, Success, Target, cancelled_call};
use crate::contract::ErrorCode;
use crate::contract::GenerateRequest;
use crate::contract::{AttemptRecord, ErrorBody, elapsed_ms};
use crate::error::ProviderError;
use crate::providers::{FinishReason, Provider, ProviderEvent, Usage};
use crate::tokens::{self, Counter};

/// How long to wait for a usage chunk after the finish signal before finishing without it.
const FINISH_TAIL: Duration = Duration::from_secs(2);

/// One provider call, consumed to its end under the attempt's time and size limits.
pub(super) async fn attempt<S: DeltaSink>(
    target: &Target,
    number: u32,
    req: &GenerateRequest,
    deadline: Instant,
    cancel: &CancellationToken,
    max_output_bytes: usize,
    sink: &mut S,
) -> (AttemptRecord, Result<Success, ProviderError>) {
    let provider = &target.provider;
    let started_at = Utc::now();
    let t0 = Instant::now();
    let first_token_limit = (t0 + provider.timeouts.first_token).min(deadline);
    let meta = AttemptMeta {
        attempt: number,
        provider: &provider.name,
        model: &target.model,
    };

    let mut output = String::new();
    let mut usage: Option<Usage> = None;
    let mut finish: Option<FinishReason> = None;
    let mut ttft: Option<Duration> = None;
    let mut started = false;
    // Text events received: the output estimate of protocols that stream a token per event.
    let mut text_events: u64 = 0;
    // Tool calls as they arrive, by index: id, name, arguments text.
    let mut calls: Vec<PendingCall> = Vec::new();

    // One cancellation waiter for the whole attempt (registered once, not per event).
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let call = tokio::select! {
        biased;
        () = &mut cancelled => Err(cancelled_call()),
        call = tokio::time::timeout_at(first_token_limit, provider.generate(&target.model, req)) => {
            match call {
                Ok(call) => call,
                Err(_) => Err(limit_error(deadline, true)),
            }
        }
    };
    let (error, http_status) = match call {
        Err(e) => {
            let status = e.http_status;
            (Some(e), status)
        }
        Ok(call) => {
            started = true;
            let mut events = call.events;
            let mut last_text = t0;
            let error = loop {
                let limit = if finish.is_some() {
                    // Only trailing usage can follow a finish: wait briefly, then finish without it.
                    (Instant::now() + FINISH_TAIL).min(deadline)
                } else if output.is_empty() && calls.is_empty() {
                    first_token_limit
                } else {
                    (last_text + provider.timeouts.stall).min(deadline)
                };
                // Held-back text goes out on time even while the provider is silent.
                let next = match sink.flush_at().filter(|at| *at < limit) {
                    Some(at) => tokio::select! {
                        biased;
                        () = &mut cancelled => break Some(cancelled_call()),
                        event = events.next() => Ok(event),
                        () = tokio::time::sleep_until(at) => {
                            sink.flush().await;
                            continue;
                        }
                    },
                    None => tokio::select! {
                        biased;
                        () = &mut cancelled => break Some(cancelled_call()),
                        next = tokio::time::timeout_at(limit, events.next()) => next,
                    },
                };
                match next {
                    Err(_) if finish.is_some() => break None,
                    Err(_) => {
                        break Some(limit_error(deadline, output.is_empty() && calls.is_empty()));
                    }
                    Ok(None) if finish.is_some() => break None,
                    Ok(None) => {
                        break Some(ProviderError::new(
                            ErrorCode::Truncated,
                            "the answer ended before a finish signal",
                        ));
                    }
                    Ok(Some(Err(e))) => break Some(e),
                    Ok(Some(Ok(ProviderEvent::Delta(text)))) => {
                        if output.len() + text.len() > max_output_bytes {
                            break Some(too_large(max_output_bytes));
                        }
                        last_text = Instant::now();
                        ttft.get_or_insert(last_text - t0);
                        sink.delta(meta, &text).await;
                        output.push_str(&text);
                        text_events += 1;
                    }
                    Ok(Some(Ok(ProviderEvent::ToolCall(chunk)))) => {
                        let size = output.len()
                            + calls.iter().map(PendingCall::len).sum::<usize>()
                            + chunk.arguments.len();
                        if size > max_output_bytes {
                            break Some(too_large(max_output_bytes));
                        }
                        // A tool call is output: it starts the answer and keeps it alive.
                        last_text = Instant::now();
                        ttft.get_or_insert(last_text - t0);
                        sink.tool_call(meta, &chunk).await;
                        PendingCall::add(&mut calls, chunk);
                        text_events += 1;
                    }
                    Ok(Some(Ok(ProviderEvent::Finish(reason)))) => finish = Some(reason),
                    Ok(Some(Ok(ProviderEvent::Usage(u)))) => usage = Some(u.clamped()),
                }
            };
            // Everything this attempt streamed is out before the next attempt or the result.
            sink.flush().await;
            (error, call.http_status)
        }
    };
    let (tokens, estimated) = attempt_usage(
        provider,
        &target.model,
        req,
        usage,
        started,
        error.is_some(),
        (&output, text_events),
    );
    let finished_at = Utc::now();
    let mut record = AttemptRecord {
        attempt: number,
        provider: provider.name.clone(),
        model: target.model.clone(),
        error: error.as_ref().map(|e| super::attempt_error(provider, e)),
        input_tokens: tokens.input_tokens,
        output_tokens: tokens.output_tokens,
        classes: tokens.classes,
        tokens_estimated: estimated,
        images: None,
        cost_usd: None,
        cache_saved_usd: None,
        http_status,
        service_tier: provider.tier_of(req.service_tier),
        latency_ms: elapsed_ms(started_at, finished_at),
        ttft_ms: ttft.map(|d| d.as_millis() as u64),
        started_at,
        finished_at,
    };
    let result = match (error, finish) {
        (Some(e), _) => Err(e),
        (None, Some(finish_reason)) => {
            super::output::checked(req, output, calls).map(|(output, tool_calls, json)| Success {
                attempt: number,
                provider: provider.name.clone(),
                model: target.model.clone(),
                output,
                tool_calls,
                json,
                finish_reason: finish_reason.as_str().to_string(),
                usage: tokens,
                context_trimmed: None,
            })
        }
        (None, None) => Err(ProviderError::new(ErrorCode::Truncated, "no finish signal")),
    };
    // An answer that broke the job's rules was billed like any other: record why it failed.
    if let Err(e) = &result
        && e.code == ErrorCode::InvalidOutput
    {
        record.error = Some(ErrorBody {
            code: e.code,
            message: e.message.clone(),
            retryable: false,
        });
    }
    (record, result)
}

/// A tool call being assembled from its pieces.
pub(super) struct PendingCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl PendingCall {
    pub(super) fn len(&self) -> usize {
        self.id.len() + self.name.len() + self.arguments.len()
    }

    /// Add a piece to the call it belongs to (by index; a new index starts a call).
    pub(super) fn add(calls: &mut Vec<PendingCall>, chunk: crate::contract::ToolCallChunk) {
        let at = chunk.index as usize;
        // Indexes come in order from 0; a gap (a provider's own numbering) appends.
        let call = match calls.get_mut(at) {
            Some(call) => call,
            None => {
                calls.push(PendingCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
                let last = calls.len() - 1;
                &mut calls[last]
            }
        };
        if let Some(id) = chunk.id {
            call.id = id;
        }
        if let Some(name) = chunk.name {
            call.name.push_str(&name);
        }
        call.arguments.push_str(&chunk.arguments);
    }
}

/// The tokens an attempt is billed: usage reported by a call that ended normally is final. A
/// call that got an answer but no usage (cut, cancelled, a server that sends none) is
/// counted: the prompt with the model's tokenizer ([`crate::tokens`]), the output from its
/// text events where the protocol sends about one token per event, else with the tokenizer.
/// Usage seen in a stream that then failed is not final (Gemini repeats a running total with
/// every chunk): the larger of it and the count, marked estimated.
pub(super) fn attempt_usage(
    provider: &Provider,
    model: &str,
    req: &GenerateRequest,
    reported: Option<Usage>,
    started: bool,
    failed: bool,
    (output, text_events): (&str, u64),
) -> (Usage, bool) {
    let counted = |reported: Usage| {
        let counter = Counter::for_model(model);
        let input = match reported.input_tokens {
            0 => tokens::prompt_tokens(&counter, req),
            n => n,
        };
        let output = if provider.one_token_per_event() {
            text_events
        } else {
            counter.count(output)
        };
        // The classes reported so far stay: a count adds only plain tokens.
        Usage {
            input_tokens: input,
            output_tokens: output.max(reported.output_tokens),
            classes: reported.classes,
        }
    };
    match reported {
        Some(u) if !failed => (u, false),
        Some(u) => (counted(u), true),
        None if started => (counted(Usage::default()), true),
        None => (Usage::default(), false),
    }
}

fn limit_error(deadline: Instant, before_first_text: bool) -> ProviderError {
    if Instant::now() >= deadline {
        ProviderError::new(
            ErrorCode::Timeout,
            "the job's deadline passed during the call",
        )
    } else if before_first_text {
        ProviderError::new(
            ErrorCode::FirstTokenTimeout,
            "no text before the first-token limit",
        )
    } else {
        ProviderError::new(
            ErrorCode::Stalled,
            "the stream stalled: no text within the stall limit",
        )
    }
}

/// The error of an answer that went over `limits.max_output_bytes`.
fn too_large(max_output_bytes: usize) -> ProviderError {
    ProviderError::new(
        ErrorCode::ResponseTooLarge,
        format!("the answer went over {max_output_bytes} bytes (limits.max_output_bytes)"),
    )
}
