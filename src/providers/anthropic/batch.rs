//! Anthropic's Message Batches (`docs/batch.md`): `POST /v1/messages/batches` with the
//! requests inline (`custom_id` and the Messages API `params`), followed with
//! `GET /v1/messages/batches/{id}` (`processing_status`: `in_progress`, `canceling`, `ended`),
//! answers read from `GET /v1/messages/batches/{id}/results` (JSONL: `succeeded` with the
//! message, `errored`, `expired`, `canceled`). The results are read from that path under the
//! configured base URL, never from the `results_url` the API names (a provider's answer does
//! not choose where the key is sent).

use secrecy::ExposeSecret;
use serde::Deserialize;

use super::request::{AnswerTool, request_body};
use super::{API_VERSION, Anthropic, classify};
use crate::contract::{ErrorCode, GenerateRequest};
use crate::error::ProviderError;
use crate::providers::batch::{BatchLine, BatchStatus};
use crate::providers::helpers::{clip, endpoint};

#[derive(Deserialize)]
struct WireBatch {
    id: String,
    processing_status: String,
}

#[derive(Deserialize)]
struct WireLine {
    custom_id: String,
    result: WireResult,
}

#[derive(Deserialize)]
struct WireResult {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

fn status_of(text: &str) -> Result<BatchStatus, ProviderError> {
    let b: WireBatch = serde_json::from_str(text).map_err(|e| {
        ProviderError::new(
            ErrorCode::MalformedResponse,
            format!("undecodable message batch ({e}): {}", clip(text)),
        )
    })?;
    Ok(BatchStatus {
        ended: b.processing_status == "ended",
        id: b.id,
        status: b.processing_status,
        files: Vec::new(),
    })
}

/// The lines of a results file; a line that is not one is skipped (its job goes online).
pub(super) fn parse_lines(text: &str) -> Vec<BatchLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<WireLine>(l).ok())
        .map(|line| {
            let answer = match (line.result.kind.as_str(), line.result.message) {
                ("succeeded", Some(message)) => Ok(message.to_string()),
                (kind, _) => Err(match line.result.error {
                    Some(e) => format!("{kind}: {}", clip(&e.to_string())),
                    None => kind.to_string(),
                }),
            };
            BatchLine {
                custom_id: line.custom_id,
                answer,
            }
        })
        .collect()
}

impl Anthropic {
    fn batches_url(&self, path: &str) -> Result<reqwest::Url, ProviderError> {
        endpoint(self.url.as_str(), path)
    }

    fn send_to(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let builder = builder.header("anthropic-version", API_VERSION);
        match &self.key {
            Some(key) => builder.header("x-api-key", key.expose_secret()),
            None => builder,
        }
    }

    pub(crate) async fn batch_create(
        &self,
        model: &str,
        jobs: &[(String, &GenerateRequest)],
    ) -> Result<BatchStatus, ProviderError> {
        let answers: Vec<Option<AnswerTool>> =
            jobs.iter().map(|(_, r)| AnswerTool::of(r)).collect();
        let requests: Vec<serde_json::Value> = jobs
            .iter()
            .zip(&answers)
            .map(|((custom_id, req), answer)| {
                let params = request_body(model, req, self.default_max_tokens, answer.as_ref());
                serde_json::json!({"custom_id": custom_id, "params": params})
            })
            .collect();
        let url = self.batches_url("batches")?;
        let builder = self
            .http
            .client
            .post(url)
            .json(&serde_json::json!({"requests": requests}));
        let (response, _) = self.http.send(self.send_to(builder), classify).await?;
        status_of(&self.http.read_body(response).await?)
    }

    /// The batch `id` now, or after asking for it to be cancelled.
    pub(crate) async fn batch_status(
        &self,
        id: &str,
        cancel: bool,
    ) -> Result<BatchStatus, ProviderError> {
        let builder = if cancel {
            self.http
                .client
                .post(self.batches_url(&format!("batches/{id}/cancel"))?)
        } else {
            self.http
                .client
                .get(self.batches_url(&format!("batches/{id}"))?)
        };
        let (response, _) = self.http.send(self.send_to(builder), classify).await?;
        status_of(&self.http.read_body(response).await?)
    }

    pub(crate) async fn batch_lines(
        &self,
        id: &str,
        jobs: usize,
    ) -> Result<Vec<BatchLine>, ProviderError> {
        let url = self.batches_url(&format!("batches/{id}/results"))?;
        let builder = self.http.client.get(url);
        let (response, _) = self.http.send(self.send_to(builder), classify).await?;
        let max = self
            .http
            .bounds
            .max_response_bytes
            .saturating_mul(jobs.max(1));
        let text = self.http.read_body_within(response, max).await?;
        Ok(parse_lines(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_answers_or_reasons() {
        let text = concat!(
            r#"{"custom_id":"a","result":{"type":"succeeded","message":{"id":"m"}}}"#,
            "\n",
            r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"api_error","message":"boom"}}}}"#,
            "\n",
            r#"{"custom_id":"c","result":{"type":"expired"}}"#,
            "\n{broken\n"
        );
        let lines = parse_lines(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].answer, Ok(r#"{"id":"m"}"#.to_string()));
        assert!(lines[1].answer.as_ref().unwrap_err().contains("boom"));
        assert_eq!(lines[2].answer, Err("expired".to_string()));
    }

    #[test]
    fn a_batch_has_ended_only_when_it_says_so() {
        let s = |status: &str| {
            status_of(&format!(r#"{{"id":"b","processing_status":"{status}"}}"#)).unwrap()
        };
        assert!(s("ended").ended);
        assert!(!s("in_progress").ended);
        assert!(!s("canceling").ended);
    }
}
