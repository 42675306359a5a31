//! Error types that carry their own consequence.
//!
//! A [`ProviderError`] says, through its [`ErrorCode`], whether the chain should retry the
//! same provider, fall back to the next entry, or end the job (`Disposition`). The chain never
//! decides by matching strings; provider modules classify their own wire errors into these kinds.
//! The codes themselves are the contract's (`crate::contract::ErrorCode`).

use std::time::Duration;

use crate::contract::ErrorCode;

/// What the chain does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Transient: retry the same provider (with backoff), then fall back.
    Retry,
    /// This provider/model cannot answer this job: go to the next chain entry at once.
    Fallback,
    /// Nobody should answer this job (e.g. a content-filter refusal): end it.
    Final,
}

/// One failed provider call, classified by the provider module that saw it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    pub code: ErrorCode,
    /// Human-readable, from the provider's own error where there is one. Never holds a key.
    pub message: String,
    pub http_status: Option<u16>,
    /// The provider's own retry hint (Retry-After, retry-after-ms, RetryInfo).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            http_status: None,
            retry_after: None,
        }
    }

    pub(crate) fn with_status(mut self, status: u16) -> Self {
        self.http_status = Some(status);
        self
    }

    pub(crate) fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// The consequence of this error for the chain.
    pub(crate) fn disposition(&self) -> Disposition {
        match self.code {
            ErrorCode::RateLimited
            | ErrorCode::Overloaded
            | ErrorCode::ServerError
            | ErrorCode::Truncated
            | ErrorCode::Network => Disposition::Retry,
            // A provider that timed out is not retried for this job: fall over at once.
            ErrorCode::ConnectTimeout
            | ErrorCode::FirstTokenTimeout
            | ErrorCode::Stalled
            | ErrorCode::MalformedResponse
            | ErrorCode::ContextTooLong
            | ErrorCode::QuotaExhausted
            | ErrorCode::BadRequest
            | ErrorCode::Unauthorized
            | ErrorCode::NotFound
            | ErrorCode::DimensionMismatch
            | ErrorCode::ResponseTooLarge
            | ErrorCode::InvalidOutput
            | ErrorCode::Unsupported
            | ErrorCode::PayloadTooLarge => Disposition::Fallback,
            ErrorCode::ContentFiltered
            | ErrorCode::InvalidJob
            | ErrorCode::Cancelled
            | ErrorCode::DeadLettered
            | ErrorCode::BudgetExceeded => Disposition::Final,
            ErrorCode::AllProvidersFailed | ErrorCode::Timeout => Disposition::Fallback,
        }
    }
}

/// Classify an HTTP error status the way every provider's SDK does (see PROVIDERS.md);
/// provider modules refine it with their error bodies (context overflow, quota, ...).
pub(crate) fn code_for_status(status: u16) -> ErrorCode {
    match status {
        400 | 422 => ErrorCode::BadRequest,
        401 | 403 => ErrorCode::Unauthorized,
        404 => ErrorCode::NotFound,
        413 => ErrorCode::PayloadTooLarge,
        429 => ErrorCode::RateLimited,
        529 | 503 => ErrorCode::Overloaded,
        408 | 409 | 500..=599 => ErrorCode::ServerError,
        _ => ErrorCode::BadRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statuses_are_retried_and_client_errors_fall_back() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            let e = ProviderError::new(code_for_status(s), "x");
            assert_eq!(e.disposition(), Disposition::Retry, "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            let e = ProviderError::new(code_for_status(s), "x");
            assert_eq!(e.disposition(), Disposition::Fallback, "{s}");
        }
    }
}
