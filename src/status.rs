//! Health of the running workers over NATS: every worker process subscribes to
//! `<prefix>.status` (core NATS, no queue group) and answers with its per-provider health;
//! `llm-worker status` publishes one request and gathers the answers for a moment.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::NatsConfig;
use crate::contract::ReplyPolicy;
use crate::health::{Health, Report};

/// Refused status replies are logged at most this often (anyone may send requests).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// One worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub providers: Vec<Report>,
}

pub fn subject(nats: &NatsConfig) -> String {
    format!("{}.status", nats.subject_prefix)
}

/// Answer status requests until `stop` fires. A request's reply subject must pass the same
/// [`ReplyPolicy`] as a job's `reply_to` (a status request carries no tenant).
pub(crate) async fn serve(
    client: async_nats::Client,
    subject: String,
    worker_id: String,
    health: Health,
    policy: ReplyPolicy,
    stop: CancellationToken,
) {
    let mut last_refusal: Option<tokio::time::Instant> = None;
    let mut requests = match client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve status requests");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            r = requests.next() => r,
            _ = stop.cancelled() => return,
        };
        let Some(request) = request else { return };
        let Some(reply) = request.reply else { continue };
        if let Err(why) = policy.check(&reply, "") {
            if last_refusal.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                tracing::warn!(reason = %why, "status request refused");
                last_refusal = Some(tokio::time::Instant::now());
            }
            continue;
        }
        let status = WorkerStatus {
            worker_id: worker_id.clone(),
            providers: health.report(),
        };
        if let Ok(payload) = serde_json::to_vec(&status) {
            let _ = client.publish(reply, payload.into()).await;
        }
    }
}

/// The workers' health as a table, one line per (worker, provider, model): the state as the
/// health monitor names it (HEALTHY, DEGRADED, UNAVAILABLE, UNKNOWN), and the last active
/// probe's latency when probes are on.
pub fn render(workers: &[WorkerStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<16} {:<28} {:<12} {:>8} {:>10} {:>10}\n",
        "worker", "provider", "model", "state", "failures", "ttft_ms", "probe_ms"
    );
    for w in workers {
        if w.providers.is_empty() {
            out.push_str(&format!("{:<24} (no provider called yet)\n", w.worker_id));
        }
        for p in &w.providers {
            let ttft = p
                .ewma_ttft_ms
                .map_or("-".to_string(), |t| format!("{t:.0}"));
            let probe = p.last_probe.as_ref().map_or("-".to_string(), |probe| {
                if probe.ok {
                    probe.latency_ms.to_string()
                } else {
                    format!("{} failed", probe.latency_ms)
                }
            });
            let state = p.state.label();
            out.push_str(&format!(
                "{:<24} {:<16} {:<28} {:<12} {:>8} {:>10} {:>10}\n",
                w.worker_id, p.provider, p.model, state, p.consecutive_failures, ttft, probe
            ));
        }
    }
    out
}

/// Ask every running worker for its status; answers arriving within `wait` are returned.
pub async fn collect(
    client: &async_nats::Client,
    nats: &NatsConfig,
    wait: Duration,
) -> Result<Vec<WorkerStatus>, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject(nats), inbox, bytes::Bytes::new())
        .await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if let Ok(status) = serde_json::from_slice::<WorkerStatus>(&msg.payload) {
            out.push(status);
        }
    }
    out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    Ok(out)
}
