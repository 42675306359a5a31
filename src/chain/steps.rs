//! The steps every attempt loop (generation, each embedding batch, image jobs) shares: the
//! attempt log, admission before a call ([`Chain::admit`]), the retry decision after it
//! ([`Chain::settle`]), retry waits, and the job-level error once no attempt succeeded.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Chain, Target};
use crate::contract::ErrorCode;
use crate::contract::{AttemptRecord, ErrorBody};
use crate::error::{Disposition, ProviderError};
use crate::health::Admission;
use crate::providers::Provider;

/// Longest wait the chain accepts from a provider's Retry-After before falling back instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A job's attempt log, with room for one record: most jobs make one call, and a first
/// growth to four records (over 1 KiB) asks glibc for a large chunk, which consolidates its
/// fast bins on every job.
pub(crate) fn attempt_log() -> Vec<AttemptRecord> {
    Vec::with_capacity(1)
}

/// The job-level error of a cancelled job.
pub(crate) fn cancelled() -> ErrorBody {
    ErrorBody {
        code: ErrorCode::Cancelled,
        message: "cancelled: a cancel request for this job arrived while it ran".into(),
        retryable: false,
    }
}

/// Wait out a retry delay; `false` when the job is cancelled meanwhile.
pub(crate) async fn wait_retry(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

/// The error a call in flight ends with when its job is cancelled.
pub(crate) fn cancelled_call() -> ProviderError {
    ProviderError::new(ErrorCode::Cancelled, "cancelled during the call")
}

/// A call that may go ahead: its number, and the capacity it holds while it runs.
pub(crate) struct Admitted {
    pub number: u32,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Why a call may not go ahead.
pub(crate) enum Refused {
    /// The target's circuit is open: go to the next one.
    NextTarget,
    /// The job's deadline passed (before, or while waiting for capacity).
    TimedOut,
    /// The job was cancelled (before, or while waiting for capacity).
    Cancelled,
}

/// What follows a call.
pub(crate) enum Settled<T> {
    Done(T),
    /// Call the same target again after this delay.
    RetryIn(Duration),
    NextTarget,
    TimedOut,
    /// End the job with this error.
    Fail(ErrorBody),
}

/// The steps every attempt loop (generation, each embedding batch) shares, so a change to
/// admission or to the retry decision is made once: [`Chain::admit`] before a call,
/// [`Chain::settle`] after it.
impl Chain {
    /// Admit a call to `target`: within the job's deadline, not while its circuit is open,
    /// and once it has capacity (concurrency, rate). Capacity waits are not part of the
    /// attempt's own timers.
    pub(crate) async fn admit(
        &self,
        target: &Target,
        deadline: Instant,
        cancel: &CancellationToken,
        attempts: &[AttemptRecord],
        skipped: &mut Vec<String>,
    ) -> Result<Admitted, Refused> {
        if cancel.is_cancelled() {
            return Err(Refused::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(Refused::TimedOut);
        }
        let name = &target.provider.name;
        if self.health.admit(name, &target.model) == Admission::Skip {
            // Circuit open: no waiting on a provider known to be down.
            skipped.push(format!("{name}:{}", target.model));
            return Err(Refused::NextTarget);
        }
        let permit = tokio::select! {
            permit = tokio::time::timeout_at(deadline, target.provider.limiter.acquire()) => {
                permit.map_err(|_| Refused::TimedOut)?
            }
            () = cancel.cancelled() => return Err(Refused::Cancelled),
        };
        Ok(Admitted {
            number: attempts.len() as u32 + 1,
            _permit: permit,
        })
    }

    /// Record a call (its attempt, the target's health) and decide what follows it.
    pub(crate) fn settle<T>(
        &self,
        target: &Target,
        record: AttemptRecord,
        result: Result<T, ProviderError>,
        backoff: &mut impl Iterator<Item = Duration>,
        deadline: Instant,
        attempts: &mut Vec<AttemptRecord>,
    ) -> Settled<T> {
        let health = match &result {
            Ok(_) => Ok(record.ttft_ms.map(Duration::from_millis)),
            Err(e) => Err(e),
        };
        self.health
            .record(&target.provider.name, &target.model, health);
        attempts.push(record);
        let err = match result {
            Ok(done) => return Settled::Done(done),
            Err(err) => err,
        };
        match next_step(&err, backoff, &target.provider, deadline) {
            Next::RetryIn(delay) => Settled::RetryIn(delay),
            Next::Fallback => Settled::NextTarget,
            Next::TimedOut => Settled::TimedOut,
            Next::Fail(error) => Settled::Fail(error),
        }
    }
}

/// The backoff delays for retries on one provider (backon: exponential with jitter).
pub(crate) fn retry_delays(provider: &Provider) -> impl Iterator<Item = Duration> + use<> {
    let policy = &provider.retry;
    ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_retries)
        .with_jitter()
        .build()
}

/// What the chain does after a failed call.
enum Next {
    /// Call the same entry again after this delay.
    RetryIn(Duration),
    /// Go to the next entry of the route.
    Fallback,
    /// The job's deadline has passed.
    TimedOut,
    /// End the job with this error.
    Fail(ErrorBody),
}

/// The one retry decision, shared by generation and embeddings: the error's disposition says
/// retry / fall back / final; retries wait for the backoff or the provider's hint if longer,
/// and give way to the next entry when the hint is too long or the deadline too close.
fn next_step(
    err: &ProviderError,
    backoff: &mut impl Iterator<Item = Duration>,
    provider: &Provider,
    deadline: Instant,
) -> Next {
    if err.code == ErrorCode::Timeout {
        return Next::TimedOut;
    }
    if err.code == ErrorCode::Cancelled {
        return Next::Fail(cancelled());
    }
    match err.disposition() {
        Disposition::Final => Next::Fail(ErrorBody {
            code: err.code,
            message: format!("{}: {}", provider.name, provider.redact(&err.message)),
            retryable: false,
        }),
        Disposition::Fallback => Next::Fallback,
        Disposition::Retry => {
            let Some(delay) = backoff.next() else {
                return Next::Fallback;
            };
            let hinted = err.retry_after.unwrap_or(Duration::ZERO);
            if hinted > MAX_RETRY_AFTER {
                return Next::Fallback;
            }
            let delay = delay.max(hinted);
            if Instant::now() + delay >= deadline {
                return Next::Fallback;
            }
            tracing::debug!(provider = %provider.name, ?delay, code = %err.code, "retrying");
            Next::RetryIn(delay)
        }
    }
}

/// The job-level error once no attempt succeeded.
pub(crate) fn chain_error(
    attempts: &[AttemptRecord],
    skipped: &[String],
    timed_out: bool,
    no_targets: bool,
) -> ErrorBody {
    let codes: Vec<ErrorCode> = attempts
        .iter()
        .filter_map(|a| a.error.as_ref().map(|e| e.code))
        .collect();
    let last = attempts
        .last()
        .and_then(|a| {
            a.error
                .as_ref()
                .map(|e| format!("{} {}: {}", a.provider, e.code, e.message))
        })
        .unwrap_or_default();
    if timed_out {
        return ErrorBody {
            code: ErrorCode::Timeout,
            message: format!(
                "the job's deadline passed after {} attempt(s); last: {last}",
                attempts.len()
            ),
            retryable: false,
        };
    }
    if no_targets {
        return ErrorBody {
            code: ErrorCode::AllProvidersFailed,
            message: "no provider in the job's route is configured".into(),
            retryable: false,
        };
    }
    let all = |code: ErrorCode| !codes.is_empty() && codes.iter().all(|c| *c == code);
    let code = if all(ErrorCode::ContextTooLong) {
        ErrorCode::ContextTooLong
    } else if all(ErrorCode::ContentFiltered) {
        // Every entry refused the content (image jobs try each).
        ErrorCode::ContentFiltered
    } else if all(ErrorCode::InvalidOutput) {
        // Every answer broke the job's rules (tool arguments, JSON schema).
        ErrorCode::InvalidOutput
    } else {
        ErrorCode::AllProvidersFailed
    };
    let mut message = if attempts.is_empty() {
        "no provider could be called".to_string()
    } else {
        format!("all {} attempt(s) failed; last: {last}", attempts.len())
    };
    if !skipped.is_empty() {
        message.push_str(&format!("; skipped (circuit open): {}", skipped.join(", ")));
    }
    ErrorBody {
        code,
        message,
        retryable: false,
    }
}
