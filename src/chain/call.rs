//! What every kind of provider call shares around the call itself: a call whose answer
//! arrives whole (embeddings, pictures) bounded by a limit, the job's deadline and its
//! cancellation; and a failed call's error as its attempt records it (the key scrubbed).

use std::future::Future;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::contract::{ErrorBody, ErrorCode};
use crate::error::{Disposition, ProviderError};
use crate::providers::Provider;

/// Run `call` until `limit` (at most the job's `deadline`) or the job's cancellation: past
/// the deadline the call is `timeout`, past the limit `first_token_timeout` saying
/// `no_answer`, cancelled `cancelled`.
pub(crate) async fn whole_answer<T>(
    call: impl Future<Output = Result<T, ProviderError>>,
    limit: Instant,
    deadline: Instant,
    cancel: &CancellationToken,
    no_answer: &'static str,
) -> Result<T, ProviderError> {
    let answer = tokio::select! {
        biased;
        () = cancel.cancelled() => Ok(Err(super::cancelled_call())),
        r = tokio::time::timeout_at(limit.min(deadline), call) => r,
    };
    match answer {
        Ok(r) => r,
        Err(_) if Instant::now() >= deadline => Err(ProviderError::new(
            ErrorCode::Timeout,
            "the job's deadline passed during the call",
        )),
        Err(_) => Err(ProviderError::new(ErrorCode::FirstTokenTimeout, no_answer)),
    }
}

/// A failed call's error as its attempt record carries it: the provider's key removed, and
/// whether the error is one the chain retries.
pub(crate) fn attempt_error(provider: &Provider, e: &ProviderError) -> ErrorBody {
    ErrorBody {
        code: e.code,
        message: provider.redact(&e.message),
        retryable: e.disposition() == Disposition::Retry,
    }
}
