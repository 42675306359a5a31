//! The image chain: an image job (CONTRACT.md section 8) through its route with the same
//! admission, circuit breaking, retry timing and budget gate as generation, one call per
//! attempt.
//!
//! Two differences from text: a picture arrives whole, so a call may take the provider's
//! first-token limit plus its stall limit; and a content-policy refusal moves the job to the
//! next entry (image models' policies differ) instead of ending it. A job every entry refuses
//! ends `content_filtered`.

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::chain::{
    Bounds, Call, CallGate, Chain, Refused, Settled, Target, attempt_error, attempt_log, cancelled,
    chain_error, retry_delays, wait_retry, whole_answer,
};
use crate::contract::{AttemptRecord, ErrorBody, ErrorCode, ImageRequest, ImagesMade, elapsed_ms};
use crate::error::ProviderError;
use crate::job::Job;
use crate::providers::Usage;
use crate::providers::pictures::{Picture, Pictures};

/// The pictures of a successful job.
#[derive(Debug, Clone)]
pub struct ImageSuccess {
    /// 1-based index of the call that made them.
    pub attempt: u32,
    pub provider: String,
    pub model: String,
    pub pictures: Vec<Picture>,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct ImageOutcome {
    pub attempts: Vec<AttemptRecord>,
    pub result: Result<ImageSuccess, ErrorBody>,
}

impl Chain {
    /// Make an image job's pictures through its route.
    pub async fn images<G: CallGate>(
        &self,
        job: &Job,
        req: &ImageRequest,
        bounds: Bounds<'_, G>,
    ) -> ImageOutcome {
        let Bounds {
            deadline,
            cancel,
            gate,
        } = bounds;
        let targets = self.plan(job);
        let mut attempts = attempt_log();
        let mut skipped = Vec::new();
        let mut timed_out = false;
        let fail = |attempts, error| ImageOutcome {
            attempts,
            result: Err(error),
        };
        'targets: for target in &targets {
            let mut backoff = retry_delays(&target.provider);
            loop {
                if let Err(error) = gate.before_call(target, Call::Image(req), &attempts).await {
                    return fail(attempts, error);
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
                    Err(Refused::Cancelled) => return fail(attempts, cancelled()),
                };
                let span = crate::chain::attempt_span(target, admitted.number);
                let (record, result) = call(target, admitted.number, req, deadline, cancel)
                    .instrument(span.clone())
                    .await;
                crate::chain::end_attempt_span(&span, &record);
                if let Err(e) = &result
                    && e.code == ErrorCode::ContentFiltered
                {
                    // Another entry's model may draw it: not a fault of this one.
                    tracing::info!(provider = %target.provider.name, "the picture was refused; trying the next entry");
                    attempts.push(record);
                    continue 'targets;
                }
                match self.settle(
                    target,
                    record,
                    result,
                    &mut backoff,
                    deadline,
                    &mut attempts,
                ) {
                    Settled::Done(answer) => {
                        return ImageOutcome {
                            result: Ok(ImageSuccess {
                                attempt: attempts.len() as u32,
                                provider: target.provider.name.clone(),
                                model: target.model.clone(),
                                pictures: answer.pictures,
                                usage: answer.usage.unwrap_or_default(),
                            }),
                            attempts,
                        };
                    }
                    Settled::RetryIn(delay) => {
                        if !wait_retry(delay, cancel).await {
                            return fail(attempts, cancelled());
                        }
                    }
                    Settled::NextTarget => continue 'targets,
                    Settled::TimedOut => {
                        timed_out = true;
                        break 'targets;
                    }
                    Settled::Fail(error) => return fail(attempts, error),
                }
            }
        }
        let error = chain_error(&attempts, &skipped, timed_out, targets.is_empty());
        fail(attempts, error)
    }
}

/// One image request.
async fn call(
    target: &Target,
    number: u32,
    req: &ImageRequest,
    deadline: Instant,
    cancel: &CancellationToken,
) -> (AttemptRecord, Result<Pictures, ProviderError>) {
    let provider = &target.provider;
    let started_at = Utc::now();
    let result = whole_answer(
        provider.images(&target.model, req),
        Instant::now() + provider.timeouts.first_token + provider.timeouts.stall,
        deadline,
        cancel,
        "no picture within the provider's first-token and stall limits",
    )
    .await;
    let finished_at = Utc::now();
    let usage = result
        .as_ref()
        .ok()
        .and_then(|a| a.usage)
        .unwrap_or_default();
    let images = result.as_ref().ok().map(|a| ImagesMade {
        count: a.pictures.len() as u32,
        size: a.size.clone().or_else(|| req.size.clone()),
        quality: a.quality.clone().or_else(|| req.quality.clone()),
    });
    let record = AttemptRecord {
        attempt: number,
        provider: provider.name.clone(),
        model: target.model.clone(),
        error: result.as_ref().err().map(|e| attempt_error(provider, e)),
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        classes: usage.classes,
        tokens_estimated: false,
        images,
        cost_usd: None,
        cache_saved_usd: None,
        service_tier: crate::contract::ServiceTier::Standard,
        http_status: match &result {
            Ok(a) => a.http_status,
            Err(e) => e.http_status,
        },
        latency_ms: elapsed_ms(started_at, finished_at),
        ttft_ms: None,
        started_at,
        finished_at,
    };
    (record, result)
}
