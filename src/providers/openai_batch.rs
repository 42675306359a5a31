//! OpenAI's Batch API (`docs/batch.md`): a JSONL file of chat-completion requests
//! uploaded to `POST /files` (`purpose: batch`), a batch created over it with `POST /batches`
//! (`completion_window: 24h`, `metadata`), followed with `GET /batches/{id}`, and its answers
//! read from the output and error files (`GET /files/{id}/content`), one JSON line per request
//! with its `custom_id`. Only the wire format lives here; `crate::batch` drives it.

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Http;
use super::batch::{BatchLine, BatchStatus};
use super::helpers::{clip, endpoint};
use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// Where a server's Batch API lives.
pub(crate) struct BatchApi {
    files: Url,
    batches: Url,
}

#[derive(Deserialize)]
struct WireBatch {
    id: String,
    status: String,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
}

#[derive(Deserialize)]
struct WireFile {
    id: String,
}

#[derive(Deserialize)]
struct WireLine {
    custom_id: String,
    #[serde(default)]
    response: Option<WireResponse>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireResponse {
    status_code: u16,
    #[serde(default)]
    body: serde_json::Value,
}

impl BatchApi {
    pub(crate) fn new(base: &str) -> Result<Self, ProviderError> {
        Ok(Self {
            files: endpoint(base, "files")?,
            batches: endpoint(base, "batches")?,
        })
    }

    fn authed(
        &self,
        builder: reqwest::RequestBuilder,
        key: Option<&SecretString>,
    ) -> reqwest::RequestBuilder {
        match key {
            Some(key) => builder.bearer_auth(key.expose_secret()),
            None => builder,
        }
    }

    /// Upload `jsonl` and create a batch over it for `/v1/chat/completions`, with `record`
    /// in its metadata (`llm_worker_record`) so it can be traced to the lane's record.
    pub(crate) async fn create(
        &self,
        http: &Http,
        key: Option<&SecretString>,
        jsonl: Vec<u8>,
        record: &str,
    ) -> Result<BatchStatus, ProviderError> {
        let boundary = format!("llmw-{}", uuid::Uuid::new_v4().simple());
        let mut body = Vec::with_capacity(jsonl.len() + 512);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{record}.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&jsonl);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let upload = http
            .client
            .post(self.files.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        let max = http.bounds.max_response_bytes;
        let file: WireFile = parse(&self.send(http, key, upload, max).await?, "file")?;
        let create = http
            .client
            .post(self.batches.clone())
            .json(&serde_json::json!({
                "input_file_id": file.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"llm_worker_record": record},
            }));
        status_of(&self.send(http, key, create, max).await?)
    }

    /// Send `builder` with the key; the response, read up to `max_bytes`.
    async fn send(
        &self,
        http: &Http,
        key: Option<&SecretString>,
        builder: reqwest::RequestBuilder,
        max_bytes: usize,
    ) -> Result<String, ProviderError> {
        let (response, _) = http
            .send(
                self.authed(builder, key),
                super::openai::classify_error_body,
            )
            .await?;
        http.read_body_within(response, max_bytes).await
    }

    /// The batch `id` now.
    pub(crate) async fn status(
        &self,
        http: &Http,
        key: Option<&SecretString>,
        id: &str,
    ) -> Result<BatchStatus, ProviderError> {
        let url = endpoint(self.batches.as_str(), id)?;
        let max = http.bounds.max_response_bytes;
        status_of(&self.send(http, key, http.client.get(url), max).await?)
    }

    /// Ask for the batch `id` to be cancelled (its unanswered requests end `batch_cancelled`).
    pub(crate) async fn cancel(
        &self,
        http: &Http,
        key: Option<&SecretString>,
        id: &str,
    ) -> Result<BatchStatus, ProviderError> {
        let url = endpoint(self.batches.as_str(), &format!("{id}/cancel"))?;
        let max = http.bounds.max_response_bytes;
        status_of(&self.send(http, key, http.client.post(url), max).await?)
    }

    /// Every line of an ended batch's output and error files. `max_bytes` bounds each file.
    pub(crate) async fn lines(
        &self,
        http: &Http,
        key: Option<&SecretString>,
        batch: &BatchStatus,
        max_bytes: usize,
    ) -> Result<Vec<BatchLine>, ProviderError> {
        let mut lines = Vec::new();
        for file in &batch.files {
            let url = endpoint(self.files.as_str(), &format!("{file}/content"))?;
            let text = self
                .send(http, key, http.client.get(url), max_bytes)
                .await?;
            lines.extend(parse_lines(&text));
        }
        Ok(lines)
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &str,
) -> Result<T, ProviderError> {
    serde_json::from_str(text).map_err(|e| {
        ProviderError::new(
            ErrorCode::MalformedResponse,
            format!("undecodable {what} ({e}): {}", clip(text)),
        )
    })
}

fn status_of(text: &str) -> Result<BatchStatus, ProviderError> {
    let b: WireBatch = parse(text, "batch")?;
    let ended = matches!(
        b.status.as_str(),
        "completed" | "expired" | "failed" | "cancelled"
    );
    Ok(BatchStatus {
        id: b.id,
        status: b.status,
        ended,
        files: [b.output_file_id, b.error_file_id]
            .into_iter()
            .flatten()
            .collect(),
    })
}

/// The lines of an output or error file; a line that is not one is skipped (its request then
/// has no line, and is sent online).
pub(crate) fn parse_lines(text: &str) -> Vec<BatchLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str::<WireLine>(l) {
            Ok(line) => Some(line),
            Err(e) => {
                tracing::warn!(error = %e, "an undecodable line in a batch file; skipped");
                None
            }
        })
        .map(|line| {
            let answer = match (line.response, line.error) {
                (Some(r), _) if (200..300).contains(&r.status_code) => Ok(r.body.to_string()),
                (Some(r), _) => Err(format!(
                    "HTTP {} in the batch: {}",
                    r.status_code,
                    clip(&r.body.to_string())
                )),
                (None, Some(e)) => Err(clip(&e.to_string())),
                (None, None) => Err("no response and no error".into()),
            };
            BatchLine {
                custom_id: line.custom_id,
                answer,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_error_lines_are_answers_and_reasons() {
        let text = concat!(
            r#"{"id":"r1","custom_id":"a","response":{"status_code":200,"body":{"id":"x"}},"error":null}"#,
            "\n",
            r#"{"id":"r2","custom_id":"b","response":{"status_code":500,"body":{"error":{"message":"boom"}}},"error":null}"#,
            "\n",
            r#"{"id":"r3","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"late"}}"#,
            "\nnot json\n"
        );
        let lines = parse_lines(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].answer, Ok(r#"{"id":"x"}"#.to_string()));
        assert!(lines[1].answer.as_ref().unwrap_err().contains("HTTP 500"));
        assert!(
            lines[2]
                .answer
                .as_ref()
                .unwrap_err()
                .contains("batch_expired")
        );
    }

    #[test]
    fn a_batch_ends_in_four_states_with_its_files() {
        let s = |status: &str| {
            status_of(&format!(
                r#"{{"id":"b","status":"{status}","output_file_id":"o","error_file_id":null}}"#
            ))
            .unwrap()
        };
        for ended in ["completed", "expired", "failed", "cancelled"] {
            assert!(s(ended).ended, "{ended}");
        }
        for open in ["validating", "in_progress", "finalizing", "cancelling"] {
            assert!(!s(open).ended, "{open}");
        }
        assert_eq!(s("completed").files, ["o"]);
    }
}
