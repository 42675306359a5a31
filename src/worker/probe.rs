//! The worker's active health probes (`[health]`): every `probe_interval_secs`, each
//! (provider, model) of the current generation routes gets one tiny call
//! ([`crate::chain::Chain::probe`]), all entries at once. A probe that used tokens is stored
//! as a result (`task_type = "health_probe"`, tenant `health.probe_tenant`, no reply
//! subject), so the recorder prices it into the ledger like any call; a probe that used none
//! leaves no row.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Outbox, Worker};
use crate::config::HealthConfig;
use crate::contract::{
    AttemptRecord, Envelope, ErrorBody, ErrorCode, GenerateRequest, JobKind, Message, ResultEvent,
    Role, Status, TokensUsed,
};
use crate::reply::encode_result;

/// The `task_type` of probe rows in the ledger.
pub(crate) const PROBE_TASK_TYPE: &str = "health_probe";

/// Probe every entry each `cfg.probe_interval_secs` until `stop` fires (off at 0).
pub(crate) async fn run<O: Outbox>(worker: Worker<O>, cfg: HealthConfig, stop: CancellationToken) {
    if cfg.probe_interval_secs == 0 {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_secs(cfg.probe_interval_secs));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = worker.probe_all(&cfg) => {}
            () = stop.cancelled() => return,
        }
    }
}

impl<O: Outbox> Worker<O> {
    /// One probe of every entry of the generation routes, at once.
    pub(crate) async fn probe_all(&self, cfg: &HealthConfig) {
        let routing = self.routing();
        let req = GenerateRequest {
            messages: vec![Message::text(Role::User, cfg.probe_prompt.clone())],
            options: crate::contract::GenerateOptions {
                max_tokens: Some(cfg.probe_max_tokens.max(1)),
                ..Default::default()
            },
            ..Default::default()
        };
        let timeout = Duration::from_millis(cfg.probe_timeout_ms);
        let probes = routing.chain.entries().into_iter().map(|target| {
            let req = &req;
            let routing = &routing;
            async move {
                let received_at = Utc::now();
                let record = routing.chain.probe(&target, req, timeout).await;
                tracing::debug!(
                    provider = %record.provider,
                    model = %record.model,
                    ok = record.error.is_none(),
                    latency_ms = record.latency_ms,
                    "health probe"
                );
                if record.input_tokens + record.output_tokens > 0 {
                    self.store_probe(record, &cfg.probe_tenant, received_at)
                        .await;
                }
            }
        });
        futures::future::join_all(probes).await;
    }

    /// Store a probe's call as a result of its own, for the ledger.
    async fn store_probe(
        &self,
        mut record: AttemptRecord,
        tenant: &str,
        received_at: chrono::DateTime<Utc>,
    ) {
        record.cost_usd = self.prices.attempt_cost(&record);
        let job_id = Uuid::now_v7();
        let envelope = Envelope {
            job_id,
            trace_id: job_id.simple().to_string(),
            tenant: tenant.to_string(),
            task_type: Some(PROBE_TASK_TYPE.into()),
            reply_to: None,
            metadata: serde_json::json!({"probe": true}),
        };
        let error = record.error.clone().unwrap_or(ErrorBody {
            code: ErrorCode::AllProvidersFailed,
            message: String::new(),
            retryable: false,
        });
        let mut result = ResultEvent::failure(
            &envelope,
            JobKind::Generate,
            error,
            &self.worker_id,
            received_at,
        );
        if record.error.is_none() {
            result.status = Status::Ok;
            result.error = None;
            result.provider = Some(record.provider.clone());
            result.model_used = Some(record.model.clone());
            result.attempt = Some(1);
        }
        result.tokens_used =
            TokensUsed::with_classes(record.input_tokens, record.output_tokens, record.classes);
        result.cost_usd = record.cost_usd;
        result.attempts = vec![record];
        let stored = match encode_result(&result, || self.outbox.max_payload()) {
            Ok(payload) => self.outbox.store(job_id, payload).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, "a health probe's call could not be stored for the ledger");
        }
    }
}
