//! Errors of the gateway in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`), with the HTTP status a job's error
//! code maps to and `Retry-After` where waiting helps.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::contract::ErrorCode;
use crate::contract::ResultEvent;

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

    pub fn tenant_busy() -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                "this tenant has as many requests open as its share allows \
                 (gateway.max_concurrent_per_tenant)",
            )
        }
    }

    pub fn too_many_bad_keys(retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                "too many refused API keys from this address (gateway.bad_keys_per_minute)",
            )
        }
    }

    pub fn body_timeout(ms: u64) -> ApiError {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body did not arrive within {ms} ms (gateway.body_timeout_ms)"),
        )
    }

    /// A `job_id` that names another tenant's (or kind's) job.
    pub fn conflict(job_id: uuid::Uuid) -> ApiError {
        Self::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "job_id_conflict",
            format!("job_id {job_id} is already used by another job; send a new id or none"),
        )
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

/// The most characters of a job's error message a client is shown.
const MAX_MESSAGE_CHARS: usize = 300;

/// A result as a tenant's client may see it: a provider's own error text (which can name its
/// internal hosts, request ids, quota details) is replaced by what its code means, wherever
/// the worker quoted it; messages the worker wrote itself stay, cut short.
pub(crate) fn redact(mut result: ResultEvent) -> ResultEvent {
    let mut said = Vec::new();
    for a in &mut result.attempts {
        if let Some(e) = &mut a.error {
            let plain = provider_said(&a.provider, e.code, a.http_status);
            let original = std::mem::replace(&mut e.message, plain.clone());
            if !original.is_empty() {
                said.push((original, plain));
            }
        }
    }
    if let Some(e) = &mut result.error {
        for (original, plain) in &said {
            if e.message.contains(original.as_str()) {
                e.message = e.message.replace(original.as_str(), plain);
            }
        }
        if e.message.chars().count() > MAX_MESSAGE_CHARS {
            e.message = e
                .message
                .chars()
                .take(MAX_MESSAGE_CHARS)
                .collect::<String>()
                + "…";
        }
    }
    result
}

/// What a failed call's code says, without the provider's words.
fn provider_said(provider: &str, code: ErrorCode, http_status: Option<u16>) -> String {
    let what = match code {
        ErrorCode::RateLimited => "rate-limited the request",
        ErrorCode::QuotaExhausted => "has no quota left",
        ErrorCode::Overloaded => "was overloaded",
        ErrorCode::ServerError => "failed with a server error",
        ErrorCode::Truncated => "cut its answer short",
        ErrorCode::MalformedResponse => "answered with something that is not its protocol",
        ErrorCode::Network => "could not be reached",
        ErrorCode::ConnectTimeout => "did not accept the connection in time",
        ErrorCode::FirstTokenTimeout => "sent no text in time",
        ErrorCode::Stalled => "stopped sending text",
        ErrorCode::BadRequest => "refused the request as invalid",
        ErrorCode::Unauthorized => "refused the deployment's credentials",
        ErrorCode::NotFound => "does not know the model",
        ErrorCode::ContentFiltered => "refused the content",
        ErrorCode::ContextTooLong => "found the prompt too long for the model",
        ErrorCode::ResponseTooLarge => "answered more than the deployment's bounds allow",
        ErrorCode::DimensionMismatch => "returned vectors of another size",
        ErrorCode::Cancelled => "was cancelled with the job",
        ErrorCode::Timeout => "did not answer before the job's deadline",
        _ => "failed",
    };
    match http_status {
        Some(status) => format!(
            "{provider} {what} (HTTP {status}, {code})",
            code = code.as_str()
        ),
        None => format!("{provider} {what} ({code})", code = code.as_str()),
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
    fn a_providers_words_never_reach_the_client_and_the_workers_own_stay() {
        let body = |code, message: &str| crate::contract::ErrorBody {
            code,
            message: message.into(),
            retryable: false,
        };
        let leak = "upstream http://10.1.2.3:8080/internal failed, request id abc";
        let mut result: ResultEvent = serde_json::from_value(serde_json::json!({
            "type": "result", "job_id": "0192f0c4-0000-7000-8000-000000000000",
            "trace_id": "t", "status": "error", "finish_reason": null,
            "tokens_used": {"input": 0, "output": 0, "total": 0},
            "model_used": null, "provider": null, "attempt": null, "attempts": [],
            "cost_usd": null, "cache_hit": false, "processing_time_ms": 1, "error": null,
            "job_kind": "generate", "tenant": "a", "task_type": null, "worker_id": "w",
            "received_at": "2026-12-01T00:00:00Z", "finished_at": "2026-12-01T00:00:01Z",
        }))
        .unwrap();
        let mut attempt: crate::contract::AttemptRecord =
            serde_json::from_value(serde_json::json!({
                "attempt": 1, "provider": "local", "model": "m", "error": null,
                "input_tokens": 0, "output_tokens": 0, "tokens_estimated": false,
                "cost_usd": null, "http_status": 500, "latency_ms": 1, "ttft_ms": null,
                "started_at": "2026-12-01T00:00:00Z", "finished_at": "2026-12-01T00:00:01Z",
            }))
            .unwrap();
        attempt.error = Some(body(ErrorCode::ServerError, leak));
        result.attempts = vec![attempt];
        result.error = Some(body(
            ErrorCode::AllProvidersFailed,
            &format!("every provider failed; last: local server_error: {leak}"),
        ));
        let shown = serde_json::to_string(&redact(result.clone())).unwrap();
        assert!(
            !shown.contains("10.1.2.3") && !shown.contains("abc"),
            "{shown}"
        );
        assert!(shown.contains("every provider failed; last: local server_error: local failed with a server error (HTTP 500, server_error)"), "{shown}");

        result.attempts.clear();
        result.error = Some(body(ErrorCode::InvalidJob, &"x".repeat(1000)));
        let message = redact(result).error.unwrap().message;
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
    }

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
