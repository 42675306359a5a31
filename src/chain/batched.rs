//! A batch line's answer (`crate::batch`) as one call of the job: the events its response body
//! decodes to, checked as an online answer is (the output bound, tool calls and JSON against
//! the job's rules), with the tokens it was billed.

use chrono::{DateTime, Utc};

use super::Success;
use super::attempt::{PendingCall, attempt_usage};
use crate::contract::{AttemptRecord, ErrorCode, GenerateRequest, ServiceTier, elapsed_ms};
use crate::error::ProviderError;
use crate::providers::{FinishReason, Provider, ProviderEvent, Usage};

impl super::Chain {
    /// The record and outcome of the batch call that answered `req` on `provider` with
    /// `body`; the batch was created at `started_at`.
    pub(crate) fn batched(
        &self,
        provider: &Provider,
        model: &str,
        req: &GenerateRequest,
        body: &str,
        started_at: DateTime<Utc>,
    ) -> (AttemptRecord, Result<Success, ProviderError>) {
        let mut output = String::new();
        let mut calls: Vec<PendingCall> = Vec::new();
        let mut usage: Option<Usage> = None;
        let mut finish: Option<FinishReason> = None;
        let mut events = 0u64;
        let mut error = None;
        for event in provider.batch_answer(body, req) {
            match event {
                Err(e) => {
                    error = Some(e);
                    break;
                }
                Ok(ProviderEvent::Delta(text)) => {
                    output.push_str(&text);
                    events += 1;
                }
                Ok(ProviderEvent::ToolCall(chunk)) => {
                    PendingCall::add(&mut calls, chunk);
                    events += 1;
                }
                Ok(ProviderEvent::Finish(reason)) => finish = Some(reason),
                Ok(ProviderEvent::Usage(u)) => usage = Some(u.clamped()),
            }
            let size = output.len() + calls.iter().map(PendingCall::len).sum::<usize>();
            if size > self.max_output_bytes {
                error = Some(ProviderError::new(
                    ErrorCode::ResponseTooLarge,
                    format!(
                        "the answer went over {} bytes (limits.max_output_bytes)",
                        self.max_output_bytes
                    ),
                ));
                break;
            }
        }
        let (tokens, estimated) = attempt_usage(
            provider,
            model,
            req,
            usage,
            true,
            error.is_some(),
            (&output, events),
        );
        let finished_at = Utc::now();
        let result = match (error, finish) {
            (Some(e), _) => Err(e),
            (None, Some(reason)) => {
                super::output::checked(req, output, calls).map(|(output, tool_calls, json)| {
                    Success {
                        attempt: 1,
                        provider: provider.name.clone(),
                        model: model.to_string(),
                        output,
                        tool_calls,
                        json,
                        finish_reason: reason.as_str().to_string(),
                        usage: tokens,
                        context_trimmed: None,
                    }
                })
            }
            (None, None) => Err(ProviderError::new(
                ErrorCode::Truncated,
                "the batch answer has no finish reason",
            )),
        };
        let record = AttemptRecord {
            attempt: 1,
            provider: provider.name.clone(),
            model: model.to_string(),
            error: result
                .as_ref()
                .err()
                .map(|e| super::attempt_error(provider, e)),
            input_tokens: tokens.input_tokens,
            output_tokens: tokens.output_tokens,
            classes: tokens.classes,
            tokens_estimated: estimated,
            images: None,
            cost_usd: None,
            cache_saved_usd: None,
            http_status: Some(200),
            service_tier: ServiceTier::Batch,
            latency_ms: elapsed_ms(started_at, finished_at),
            ttft_ms: None,
            started_at,
            finished_at,
        };
        (record, result)
    }
}
