//! Errors of the gateway in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`), with the HTTP status a job's error
//! code maps to and `Retry-After` where waiting helps.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::error::ErrorCode;
use crate::event::ResultEvent;

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    pub code: String,
    pub message: String,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_job",
            message,
        )
    }

    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "a valid API key is required (Authorization: Bearer llmw_...)",
        )
    }

    pub fn unknown_model(model: &str) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model {model:?} does not exist here (GET /v1/models lists the ones that do)"
            ),
        )
    }

    pub fn too_large(limit: usize) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("the request body is larger than {limit} bytes (gateway.max_body_bytes)"),
        )
    }

    pub fn busy() -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                "the gateway is answering as many requests as it may (gateway.max_concurrent)",
            )
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "unavailable",
                message,
            )
        }
    }

    pub fn no_result() -> ApiError {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "timeout",
            "no worker answered within the job's deadline",
        )
    }

    /// The error of a failed job, with the status its code maps to.
    pub fn of_result(result: &ResultEvent, now: DateTime<Utc>) -> ApiError {
        let (code, message) = match &result.error {
            Some(e) => (e.code, e.message.clone()),
            None => (ErrorCode::AllProvidersFailed, "the job failed".to_string()),
        };
        let (status, kind) = match code {
            ErrorCode::InvalidJob | ErrorCode::ContextTooLong | ErrorCode::ContentFiltered => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            ErrorCode::BudgetExceeded => (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"),
            ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "api_error"),
            ErrorCode::Cancelled => (StatusCode::CONFLICT, "api_error"),
            ErrorCode::DeadLettered => (StatusCode::INTERNAL_SERVER_ERROR, "api_error"),
            _ => (StatusCode::BAD_GATEWAY, "api_error"),
        };
        let retry_after = (code == ErrorCode::BudgetExceeded).then(|| budget_retry(&message, now));
        ApiError {
            status,
            kind,
            code: code.as_str().to_string(),
            message,
            retry_after,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }})
    }
}

/// Seconds until a spent budget resets: the time the worker's message names ("it resets at
/// <RFC 3339>"), else the next UTC midnight.
fn budget_retry(message: &str, now: DateTime<Utc>) -> u64 {
    let named = message
        .rsplit_once("resets at ")
        .and_then(|(_, t)| DateTime::parse_from_rfc3339(t.trim_end_matches('.')).ok())
        .map(|t| t.with_timezone(&Utc));
    let reset = named.unwrap_or_else(|| {
        let tomorrow = now.date_naive() + chrono::Days::new(1);
        tomorrow.and_time(chrono::NaiveTime::MIN).and_utc()
    });
    u64::try_from((reset - now).num_seconds())
        .unwrap_or(0)
        .max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_is_retried_when_it_resets() {
        let now: DateTime<Utc> = "2026-11-30T23:00:00Z".parse().unwrap();
        let msg = "budget_exceeded: the tenant's daily budget of 10 tokens is spent (12 tokens used); it resets at 2026-12-01T00:00:00Z";
        assert_eq!(budget_retry(msg, now), 3600);
        assert_eq!(budget_retry("spent", now), 3600);
        let monthly = "it resets at 2026-12-01T01:00:00+00:00";
        assert_eq!(budget_retry(monthly, now), 7200);
    }
}
