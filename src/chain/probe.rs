//! Active health probes of the chain's entries: one call of a (provider, model) outside any
//! job, with no retry and no fallback, whatever its circuit says (a probe is how an open
//! circuit learns that its provider is back). The outcome counts in the entry's health as a
//! call's would, with the probe's latency kept for reports.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Chain, NoSink, Target, attempt};
use crate::contract::{AttemptRecord, GenerateRequest};

impl Chain {
    /// Every (provider, model) the routes name, once, in route order.
    pub(crate) fn entries(&self) -> Vec<Target> {
        let mut targets: Vec<Target> = Vec::new();
        for entry in self.routes.values().flatten() {
            let Some(provider) = self.registry.get(&entry.provider) else {
                continue;
            };
            let Some(model) = entry.model.clone().or(provider.default_model.clone()) else {
                continue;
            };
            if !targets
                .iter()
                .any(|t| t.provider.name == entry.provider && t.model == model)
            {
                targets.push(Target {
                    provider: provider.clone(),
                    model,
                });
            }
        }
        targets
    }

    /// Call `target` once with `req` within `timeout` (after the provider's own limits let
    /// it start), and record the outcome as a probe of its health.
    pub(crate) async fn probe(
        &self,
        target: &Target,
        req: &GenerateRequest,
        timeout: Duration,
    ) -> AttemptRecord {
        let _permit = target.provider.limiter.acquire().await;
        let began = Instant::now();
        let (record, result) = attempt(
            target,
            1,
            req,
            began + timeout,
            &CancellationToken::new(),
            self.max_output_bytes,
            &mut NoSink,
        )
        .await;
        let outcome = match &result {
            Ok(_) => Ok(record.ttft_ms.map(Duration::from_millis)),
            Err(e) => Err(e),
        };
        self.health.record_probe(
            &target.provider.name,
            &target.model,
            outcome,
            began.elapsed(),
        );
        record
    }
}
