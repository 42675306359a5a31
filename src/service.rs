//! The NATS micro-services protocol (ADR-32): every worker process answers `$SRV.PING`,
//! `$SRV.INFO` and `$SRV.STATS` (also `.llm-worker` and `.llm-worker.<id>`), so standard
//! tooling (`nats micro ls`, `nats micro stats llm-worker`) lists the fleet and its job counts.
//!
//! The worker's two job consumers are described as its endpoints (`generate`, `embed`: their
//! subjects, the durable consumer as the queue group); their stats count the jobs this process
//! answered (`num_requests`), those answered with an error (`num_errors`, `last_error` the
//! code) and the time from receipt to result. Implemented here rather than with async-nats'
//! `service` module because that one answers any reply subject, and a request's reply subject
//! is data like any other: answers go only where the [`ReplyPolicy`] allows, as status
//! replies do.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::NatsConfig;
use crate::contract::JobKind;
use crate::contract::ReplyPolicy;
use crate::contract::{ResultEvent, Status};

/// The service name every worker registers under.
pub use crate::contract::SERVICE_NAME as NAME;

/// Jobs one process answered, per kind (cheap to update from every job).
#[derive(Default)]
pub struct JobStats {
    generate: Counters,
    embed: Counters,
    image: Counters,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    last_error: Mutex<String>,
}

impl JobStats {
    fn of(&self, kind: JobKind) -> &Counters {
        match kind {
            JobKind::Generate => &self.generate,
            JobKind::Embed => &self.embed,
            JobKind::Image => &self.image,
        }
    }

    /// Count a result this process stored.
    pub(crate) fn record(&self, kind: JobKind, result: &ResultEvent) {
        let c = self.of(kind);
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.processing_ns.fetch_add(
            result.processing_time_ms.saturating_mul(1_000_000),
            Ordering::Relaxed,
        );
        if result.status == Status::Error {
            c.errors.fetch_add(1, Ordering::Relaxed);
            if let (Some(e), Ok(mut last)) = (&result.error, c.last_error.lock()) {
                *last = e.code.to_string();
            }
        }
    }
}

/// What a worker says about itself.
pub(crate) struct Identity {
    /// Unique per process, safe as a subject token.
    pub id: String,
    pub metadata: BTreeMap<String, String>,
    pub started: DateTime<Utc>,
    pub kinds: Vec<JobKind>,
}

impl Identity {
    pub(crate) fn new(worker_id: &str, nats: &NatsConfig, kinds: Vec<JobKind>) -> Self {
        let id = crate::config::name_token(worker_id);
        let metadata = BTreeMap::from([
            ("worker_id".to_string(), worker_id.to_string()),
            ("subject_prefix".to_string(), nats.subject_prefix.clone()),
            ("jobs_stream".to_string(), nats.jobs_stream.clone()),
        ]);
        Self {
            id,
            metadata,
            started: Utc::now(),
            kinds,
        }
    }
}

/// The subjects a worker answers: each verb, for all services, this name, and this instance.
fn subjects(id: &str) -> Vec<String> {
    ["PING", "INFO", "STATS"]
        .iter()
        .flat_map(|verb| {
            [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{NAME}"),
                format!("$SRV.{verb}.{NAME}.{id}"),
            ]
        })
        .collect()
}

#[derive(Serialize)]
struct EndpointInfo {
    name: &'static str,
    subject: String,
    queue_group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    processing_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    average_processing_time: Option<u64>,
}

/// The answer to `verb` (`PING`, `INFO`, `STATS`).
fn answer(verb: &str, who: &Identity, nats: &NatsConfig, stats: &JobStats) -> Option<Value> {
    let kind = match verb {
        "PING" => "io.nats.micro.v1.ping_response",
        "INFO" => "io.nats.micro.v1.info_response",
        "STATS" => "io.nats.micro.v1.stats_response",
        _ => return None,
    };
    let mut v = serde_json::json!({
        "type": kind,
        "name": NAME,
        "id": who.id,
        "version": env!("CARGO_PKG_VERSION"),
        "metadata": who.metadata,
    });
    let endpoints = |with_stats: bool| -> Vec<EndpointInfo> {
        who.kinds
            .iter()
            .map(|k| {
                let c = stats.of(*k);
                let n = c.requests.load(Ordering::Relaxed);
                let ns = c.processing_ns.load(Ordering::Relaxed);
                EndpointInfo {
                    name: k.as_str(),
                    subject: nats.job_subject(*k),
                    queue_group: format!("{}-{}", nats.consumer_prefix, k.as_str()),
                    num_requests: with_stats.then_some(n),
                    num_errors: with_stats.then(|| c.errors.load(Ordering::Relaxed)),
                    last_error: with_stats
                        .then(|| c.last_error.lock().map(|s| s.clone()).unwrap_or_default()),
                    processing_time: with_stats.then_some(ns),
                    average_processing_time: with_stats.then(|| ns.checked_div(n).unwrap_or(0)),
                }
            })
            .collect()
    };
    match verb {
        "INFO" => {
            v["description"] = Value::from(
                "LLM jobs from JetStream through a provider fallback chain (llm-worker)",
            );
            v["endpoints"] = serde_json::to_value(endpoints(false)).ok()?;
        }
        "STATS" => {
            v["started"] = Value::from(who.started.to_rfc3339());
            v["endpoints"] = serde_json::to_value(endpoints(true)).ok()?;
        }
        _ => {}
    }
    Some(v)
}

/// Answer `$SRV` requests until `stop` fires.
pub(crate) async fn serve(
    client: async_nats::Client,
    nats: NatsConfig,
    who: Identity,
    stats: std::sync::Arc<JobStats>,
    policy: ReplyPolicy,
    stop: CancellationToken,
) {
    let mut subs = Vec::new();
    for subject in subjects(&who.id) {
        match client.subscribe(subject.clone()).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                tracing::warn!(error = %e, %subject, "cannot serve the NATS service API");
                return;
            }
        }
    }
    let mut requests = futures::stream::select_all(subs);
    loop {
        let request = tokio::select! {
            r = requests.next() => r,
            () = stop.cancelled() => return,
        };
        let Some(request) = request else { return };
        let Some(reply) = request.reply else { continue };
        if policy.check(&reply, "").is_err() {
            continue;
        }
        let verb = request.subject.split('.').nth(1).unwrap_or_default();
        let Some(body) = answer(verb, &who, &nats, &stats) else {
            continue;
        };
        if let Ok(payload) = serde_json::to_vec(&body) {
            let _ = client.publish(reply, payload.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_tokens_and_answers_have_the_protocols_shape() {
        let nats = NatsConfig::default();
        let who = Identity::new("host.example.com-42", &nats, JobKind::ALL.to_vec());
        assert_eq!(who.id, "host_example_com-42");
        assert!(subjects(&who.id).contains(&"$SRV.STATS.llm-worker.host_example_com-42".into()));
        let stats = JobStats::default();
        let ping = answer("PING", &who, &nats, &stats).unwrap();
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(ping["metadata"]["worker_id"], "host.example.com-42");
        let info = answer("INFO", &who, &nats, &stats).unwrap();
        assert_eq!(info["endpoints"][0]["subject"], "llm.jobs.generate");
        assert!(info["endpoints"][0].get("num_requests").is_none());
        assert!(answer("NOPE", &who, &nats, &stats).is_none());
    }
}
