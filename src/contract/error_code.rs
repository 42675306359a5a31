//! The contract's error codes (`error.code` of results and attempts, CONTRACT.md section 3).

use serde::{Deserialize, Serialize};

/// The contract's error codes (`error.code`), for attempts and results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Job-level codes (result.error.code).
    InvalidJob,
    AllProvidersFailed,
    Timeout,
    ContextTooLong,
    ContentFiltered,
    PayloadTooLarge,
    BudgetExceeded,
    Cancelled,
    /// Delivered `worker.max_deliver` times without an answer: kept in the dead-letter stream.
    DeadLettered,
    /// The answer broke the job's rules: tool arguments that are not a JSON object valid
    /// against the tool's parameters, or a JSON answer that does not parse or match its schema.
    /// For an attempt: billed, recorded, and the chain moves on; for a job: every entry failed so.
    InvalidOutput,
    /// No entry of the route can take the job (tools, images, JSON schema); nothing was called.
    Unsupported,
    // Attempt-level codes (result.attempts[].error.code).
    RateLimited,
    QuotaExhausted,
    Overloaded,
    ServerError,
    Truncated,
    MalformedResponse,
    Network,
    ConnectTimeout,
    FirstTokenTimeout,
    Stalled,
    BadRequest,
    Unauthorized,
    NotFound,
    /// An embedding fallback returned vectors of another size than the route's.
    DimensionMismatch,
    /// The provider's answer went over a bound (`[limits]`: text, body, line or event size).
    ResponseTooLarge,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJob => "invalid_job",
            ErrorCode::AllProvidersFailed => "all_providers_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ContextTooLong => "context_too_long",
            ErrorCode::ContentFiltered => "content_filtered",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BudgetExceeded => "budget_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::DeadLettered => "dead_lettered",
            ErrorCode::InvalidOutput => "invalid_output",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExhausted => "quota_exhausted",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ServerError => "server_error",
            ErrorCode::Truncated => "truncated",
            ErrorCode::MalformedResponse => "malformed_response",
            ErrorCode::Network => "network",
            ErrorCode::ConnectTimeout => "connect_timeout",
            ErrorCode::FirstTokenTimeout => "first_token_timeout",
            ErrorCode::Stalled => "stalled",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::DimensionMismatch => "dimension_mismatch",
            ErrorCode::ResponseTooLarge => "response_too_large",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_the_contract_spells_them() {
        let json = serde_json::to_string(&ErrorCode::AllProvidersFailed).unwrap();
        assert_eq!(json, "\"all_providers_failed\"");
        assert_eq!(ErrorCode::InvalidJob.as_str(), "invalid_job");
    }
}
