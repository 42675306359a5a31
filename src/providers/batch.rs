//! Provider batches (`docs/batch.md`): what a batch API says about a batch and its requests,
//! in one shape for every protocol that has one (OpenAI's Batch API, `super::openai_batch`;
//! Anthropic's Message Batches, `super::anthropic::batch`), and the [`Provider`] methods the
//! batch lane (`crate::batch`) calls.

use super::{Provider, ProviderEvent, ProviderImpl};
use crate::contract::{ErrorCode, GenerateRequest};
use crate::error::ProviderError;

/// A provider batch as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStatus {
    pub id: String,
    /// As the provider says it (`in_progress`, `completed`, `expired`, `ended`, ...).
    pub status: String,
    /// Whether the batch will not change any more: its answers can be read.
    pub ended: bool,
    /// Where its answers are (OpenAI: the output and error files).
    pub files: Vec<String>,
}

/// What a batch said about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLine {
    pub custom_id: String,
    /// The response body of an answered request; why not otherwise (an error inside the
    /// batch, expired, cancelled).
    pub answer: Result<String, String>,
}

impl Provider {
    /// Whether the provider takes batches: OpenAI's Batch API where the server has it
    /// (`service_tiers`), Anthropic's Message Batches.
    pub fn batches(&self) -> bool {
        match &self.imp {
            ProviderImpl::OpenAi(_) => self.service_tiers,
            ProviderImpl::Anthropic(_) => true,
            _ => false,
        }
    }

    fn no_batches(&self) -> ProviderError {
        ProviderError::new(
            ErrorCode::BadRequest,
            format!("provider {} has no batch API", self.name),
        )
    }

    /// Create a batch of `jobs` (custom id, request) for `model`; `record` names it (OpenAI:
    /// in its metadata).
    pub async fn batch_create(
        &self,
        model: &str,
        jobs: &[(String, &GenerateRequest)],
        record: &str,
    ) -> Result<BatchStatus, ProviderError> {
        match &self.imp {
            ProviderImpl::OpenAi(p) if self.service_tiers => {
                let mut jsonl = Vec::new();
                for (custom_id, req) in jobs {
                    let line = p.batch_line(custom_id, model, &req.as_sent());
                    serde_json::to_writer(&mut jsonl, &line).map_err(|e| {
                        ProviderError::new(ErrorCode::BadRequest, format!("batch line: {e}"))
                    })?;
                    jsonl.push(b'\n');
                }
                let (api, http, key) = p.batch_api();
                api.create(http, key, jsonl, record).await
            }
            ProviderImpl::Anthropic(p) => p.batch_create(model, jobs).await,
            _ => Err(self.no_batches()),
        }
    }

    /// The batch `id` now.
    pub async fn batch_status(&self, id: &str) -> Result<BatchStatus, ProviderError> {
        match &self.imp {
            ProviderImpl::OpenAi(p) if self.service_tiers => {
                let (api, http, key) = p.batch_api();
                api.status(http, key, id).await
            }
            ProviderImpl::Anthropic(p) => p.batch_status(id, false).await,
            _ => Err(self.no_batches()),
        }
    }

    /// Ask for the batch `id` to be cancelled.
    pub async fn batch_cancel(&self, id: &str) -> Result<BatchStatus, ProviderError> {
        match &self.imp {
            ProviderImpl::OpenAi(p) if self.service_tiers => {
                let (api, http, key) = p.batch_api();
                api.cancel(http, key, id).await
            }
            ProviderImpl::Anthropic(p) => p.batch_status(id, true).await,
            _ => Err(self.no_batches()),
        }
    }

    /// The lines of an ended batch of `jobs` requests.
    pub async fn batch_lines(
        &self,
        batch: &BatchStatus,
        jobs: usize,
    ) -> Result<Vec<BatchLine>, ProviderError> {
        match &self.imp {
            ProviderImpl::OpenAi(p) if self.service_tiers => {
                let (api, http, key) = p.batch_api();
                let max = http.bounds.max_response_bytes.saturating_mul(jobs.max(1));
                api.lines(http, key, batch, max).await
            }
            ProviderImpl::Anthropic(p) => p.batch_lines(&batch.id, jobs).await,
            _ => Err(self.no_batches()),
        }
    }

    /// A batch line's response body for `req` as the events of a call.
    pub fn batch_answer(
        &self,
        body: &str,
        req: &GenerateRequest,
    ) -> Vec<Result<ProviderEvent, ProviderError>> {
        match &self.imp {
            ProviderImpl::Anthropic(_) => super::anthropic::parse_batch_answer(body, req),
            _ => super::openai::parse_completion(body),
        }
    }
}
