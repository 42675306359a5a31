//! Prometheus metrics (OpenMetrics text) of a worker and of a gateway, and the worker's
//! small HTTP server for them (`telemetry.metrics_listen`: `/metrics`, `/healthz`,
//! `/readyz`).
//!
//! Job and provider-call metrics are counted from each result a worker stores (the same
//! numbers the usage rows hold: every call, failed ones included). Gauges that describe
//! the fleet's queues (consumer pending, recorder backlog and lag), the circuit breakers
//! and the jobs in flight are read when scraped.
//!
//! Cardinality: labels are job kinds, statuses, error codes, provider names (from config)
//! and model names. A job may name its model, so at most [`MAX_MODELS`] distinct model
//! names get series of their own; the rest share `model="_other"`. The tenant label is
//! there only with `telemetry.metrics_tenant_label` (empty otherwise).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub(crate) mod server;

use crate::contract::JobKind;
use crate::contract::{ResultEvent, Status};

/// Distinct model names with series of their own.
pub const MAX_MODELS: usize = 200;
/// The content type of the text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: &'static str,
    status: &'static str,
    error_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    provider: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    model: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    model: String,
    direction: &'static str,
    tenant: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    provider: String,
    model: String,
    class: &'static str,
    tenant: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    provider: String,
    model: String,
    tenant: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

type Seconds = Family<KindLabels, Histogram, fn() -> Histogram>;
type ModelSeconds = Family<ModelLabels, Histogram, fn() -> Histogram>;
type RouteSeconds = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// 5 ms to about 5.5 minutes, doubling.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 17))
}

/// The metrics of one process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    tenant_label: bool,
    models: Mutex<HashSet<String>>,
    jobs: Family<JobLabels, Counter>,
    cache_hits: Family<KindLabels, Counter>,
    job_seconds: Seconds,
    calls: Family<CallLabels, Counter>,
    call_seconds: ModelSeconds,
    ttft_seconds: ModelSeconds,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    token_classes: Family<ClassLabels, Counter>,
    cache_saved: Family<CostLabels, Counter<f64, AtomicU64>>,
    in_flight: Gauge,
    circuit: Family<ModelLabels, Gauge>,
    probe_seconds: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    probe_ok: Family<ModelLabels, Gauge>,
    consumer_pending: Family<KindLabels, Gauge>,
    consumer_ack_pending: Family<KindLabels, Gauge>,
    recorder_backlog: Gauge,
    recorder_lag: Gauge<f64, AtomicU64>,
    http_requests: Family<HttpLabels, Counter>,
    http_seconds: RouteSeconds,
    http_in_flight: Gauge,
}

impl Metrics {
    /// A new registry; `tenant_label` adds the tenant to token and cost counters.
    pub fn new(tenant_label: bool) -> Metrics {
        let mut registry = Registry::default();
        let inner = Inner {
            registry: Registry::default(),
            tenant_label,
            models: Mutex::new(HashSet::new()),
            jobs: Family::default(),
            cache_hits: Family::default(),
            job_seconds: Family::new_with_constructor(seconds_buckets),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(seconds_buckets),
            ttft_seconds: Family::new_with_constructor(seconds_buckets),
            tokens: Family::default(),
            cost: Family::default(),
            token_classes: Family::default(),
            cache_saved: Family::default(),
            in_flight: Gauge::default(),
            circuit: Family::default(),
            probe_seconds: Family::default(),
            probe_ok: Family::default(),
            consumer_pending: Family::default(),
            consumer_ack_pending: Family::default(),
            recorder_backlog: Gauge::default(),
            recorder_lag: Gauge::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(seconds_buckets),
            http_in_flight: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "llm_jobs",
            "Jobs answered (results stored), by kind, status and error code",
            inner.jobs.clone(),
        );
        r.register(
            "llm_cache_hits",
            "Jobs answered from the response cache",
            inner.cache_hits.clone(),
        );
        r.register(
            "llm_job_duration_seconds",
            "Time from a job's first receipt to its result",
            inner.job_seconds.clone(),
        );
        r.register(
            "llm_provider_calls",
            "Provider calls by provider, model and outcome (ok or the error code)",
            inner.calls.clone(),
        );
        r.register(
            "llm_provider_call_duration_seconds",
            "Duration of provider calls",
            inner.call_seconds.clone(),
        );
        r.register(
            "llm_provider_ttft_seconds",
            "Time from a provider call's start to its first chunk of text",
            inner.ttft_seconds.clone(),
        );
        r.register(
            "llm_tokens",
            "Tokens billed by provider calls (input or output)",
            inner.tokens.clone(),
        );
        r.register(
            "llm_cost_usd",
            "Cost of provider calls in USD (calls with a known price)",
            inner.cost.clone(),
        );
        r.register(
            "llm_token_classes",
            "Billed token classes of provider calls (cache_read, cache_write, cache_write_1h, \
             reasoning, image_input): parts of llm_tokens, never in addition to them",
            inner.token_classes.clone(),
        );
        r.register(
            "llm_prompt_cache_saved_usd",
            "What provider prompt-cache reads saved against the input price, in USD",
            inner.cache_saved.clone(),
        );
        r.register(
            "llm_jobs_in_flight",
            "Jobs this process is working on",
            inner.in_flight.clone(),
        );
        r.register(
            "llm_circuit_state",
            "Circuit breaker per provider and model: 0 healthy, 1 degraded, 2 open (unavailable), 3 unknown (listed, not tried yet)",
            inner.circuit.clone(),
        );
        r.register(
            "llm_provider_probe_seconds",
            "Latency of the last active health probe per provider and model (health.probe_interval_secs)",
            inner.probe_seconds.clone(),
        );
        r.register(
            "llm_provider_probe_ok",
            "Whether the last active health probe per provider and model succeeded (1) or failed (0)",
            inner.probe_ok.clone(),
        );
        r.register(
            "llm_consumer_pending",
            "Jobs in the stream not yet delivered to any worker, by kind",
            inner.consumer_pending.clone(),
        );
        r.register(
            "llm_consumer_ack_pending",
            "Jobs delivered and not yet acknowledged, by kind",
            inner.consumer_ack_pending.clone(),
        );
        r.register(
            "llm_recorder_backlog",
            "Results not yet written to Postgres",
            inner.recorder_backlog.clone(),
        );
        r.register(
            "llm_recorder_lag_seconds",
            "Age of the oldest result not yet written to Postgres (0 when none)",
            inner.recorder_lag.clone(),
        );
        r.register(
            "llm_gateway_requests",
            "Gateway requests by route and HTTP status",
            inner.http_requests.clone(),
        );
        r.register(
            "llm_gateway_request_duration_seconds",
            "Time from a gateway request to its response headers",
            inner.http_seconds.clone(),
        );
        r.register(
            "llm_gateway_requests_in_flight",
            "Gateway requests being answered",
            inner.http_in_flight.clone(),
        );
        Metrics(Arc::new(Inner { registry, ..inner }))
    }

    /// The model label for `model`: itself, or `_other` past [`MAX_MODELS`] names.
    fn model(&self, model: &str) -> String {
        let Ok(mut seen) = self.0.models.lock() else {
            return "_other".into();
        };
        if seen.contains(model) {
            return model.to_string();
        }
        if seen.len() < MAX_MODELS {
            seen.insert(model.to_string());
            return model.to_string();
        }
        "_other".into()
    }

    /// Count a result this process stored.
    pub(crate) fn observe(&self, kind: JobKind, result: &ResultEvent) {
        let m = &self.0;
        let kind = kind.as_str();
        let (status, error_code) = match (&result.status, &result.error) {
            (Status::Ok, _) => ("ok", ""),
            (Status::Error, e) => ("error", e.as_ref().map_or("unknown", |e| e.code.as_str())),
        };
        m.jobs
            .get_or_create(&JobLabels {
                kind,
                status,
                error_code,
            })
            .inc();
        if result.cache_hit {
            m.cache_hits.get_or_create(&KindLabels { kind }).inc();
        }
        m.job_seconds
            .get_or_create(&KindLabels { kind })
            .observe(result.processing_time_ms as f64 / 1000.0);
        let tenant = m.tenant_label.then(|| result.tenant.clone());
        for call in &result.attempts {
            let labels = ModelLabels {
                provider: call.provider.clone(),
                model: self.model(&call.model),
            };
            let outcome = call.error.as_ref().map_or("ok", |e| e.code.as_str());
            m.calls
                .get_or_create(&CallLabels {
                    provider: labels.provider.clone(),
                    model: labels.model.clone(),
                    outcome,
                })
                .inc();
            m.call_seconds
                .get_or_create(&labels)
                .observe(call.latency_ms as f64 / 1000.0);
            if let Some(ttft) = call.ttft_ms {
                m.ttft_seconds
                    .get_or_create(&labels)
                    .observe(ttft as f64 / 1000.0);
            }
            for (direction, n) in [("input", call.input_tokens), ("output", call.output_tokens)] {
                m.tokens
                    .get_or_create(&TokenLabels {
                        provider: labels.provider.clone(),
                        model: labels.model.clone(),
                        direction,
                        tenant: tenant.clone(),
                    })
                    .inc_by(n);
            }
            let c = &call.classes;
            for (class, n) in [
                ("cache_read", c.cache_read_tokens),
                ("cache_write", c.cache_write_tokens),
                ("cache_write_1h", c.cache_write_1h_tokens),
                ("reasoning", c.reasoning_tokens),
                ("image_input", c.image_input_tokens),
            ] {
                if n > 0 {
                    m.token_classes
                        .get_or_create(&ClassLabels {
                            provider: labels.provider.clone(),
                            model: labels.model.clone(),
                            class,
                            tenant: tenant.clone(),
                        })
                        .inc_by(n);
                }
            }
            if let Some(saved) = call.cache_saved_usd {
                m.cache_saved
                    .get_or_create(&CostLabels {
                        provider: labels.provider.clone(),
                        model: labels.model.clone(),
                        tenant: tenant.clone(),
                    })
                    .inc_by(saved);
            }
            if let Some(cost) = call.cost_usd {
                m.cost
                    .get_or_create(&CostLabels {
                        provider: labels.provider.clone(),
                        model: labels.model.clone(),
                        tenant: tenant.clone(),
                    })
                    .inc_by(cost);
            }
        }
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.0.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_circuits(&self, reports: &[crate::health::Report]) {
        for r in reports {
            let state = match r.state {
                crate::health::State::Healthy => 0,
                crate::health::State::Degraded => 1,
                crate::health::State::Unavailable => 2,
                crate::health::State::Unknown => 3,
            };
            let labels = ModelLabels {
                provider: r.provider.clone(),
                model: self.model(&r.model),
            };
            self.0.circuit.get_or_create(&labels).set(state);
            if let Some(probe) = &r.last_probe {
                self.0
                    .probe_seconds
                    .get_or_create(&labels)
                    .set(probe.latency_ms as f64 / 1000.0);
                self.0
                    .probe_ok
                    .get_or_create(&labels)
                    .set(i64::from(probe.ok));
            }
        }
    }

    pub(crate) fn set_consumer(&self, kind: JobKind, pending: u64, ack_pending: usize) {
        let labels = KindLabels {
            kind: kind.as_str(),
        };
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.0
            .consumer_pending
            .get_or_create(&labels)
            .set(to_i64(pending));
        self.0
            .consumer_ack_pending
            .get_or_create(&labels)
            .set(to_i64(ack_pending as u64));
    }

    pub(crate) fn set_recorder(&self, backlog: u64, lag: Duration) {
        self.0
            .recorder_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        self.0.recorder_lag.set(lag.as_secs_f64());
    }

    /// A gateway request began; the guard counts it when dropped with its status.
    pub(crate) fn http_started(&self) -> HttpTimer {
        self.0.http_in_flight.inc();
        HttpTimer {
            metrics: self.clone(),
            started: std::time::Instant::now(),
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One gateway request in progress.
pub(crate) struct HttpTimer {
    metrics: Metrics,
    started: std::time::Instant,
}

impl HttpTimer {
    /// The request got its response headers.
    pub(crate) fn done(self, route: &str, status: u16) {
        let m = &self.metrics.0;
        m.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                status,
            })
            .inc();
        m.http_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for HttpTimer {
    fn drop(&mut self) {
        self.metrics.0.http_in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_past_the_bound_share_one_series() {
        let m = Metrics::new(false);
        for i in 0..MAX_MODELS {
            assert_eq!(m.model(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(m.model("one-too-many"), "_other");
        assert_eq!(m.model("m0"), "m0");
    }

    #[test]
    fn a_result_counts_its_job_and_every_call() {
        let m = Metrics::new(true);
        let envelope = crate::contract::Envelope::for_test("acme");
        let error = crate::contract::ErrorBody {
            code: crate::contract::ErrorCode::AllProvidersFailed,
            message: String::new(),
            retryable: false,
        };
        let mut r =
            ResultEvent::failure(&envelope, JobKind::Generate, error, "w", chrono::Utc::now());
        r.attempts.push(crate::contract::AttemptRecord {
            attempt: 1,
            provider: "p".into(),
            model: "m".into(),
            error: None,
            input_tokens: 7,
            output_tokens: 3,
            classes: crate::contract::TokenClasses {
                cache_read_tokens: 4,
                ..Default::default()
            },
            tokens_estimated: false,
            images: None,
            cost_usd: Some(0.5),
            cache_saved_usd: Some(0.25),
            http_status: Some(200),
            service_tier: crate::contract::ServiceTier::Standard,
            latency_ms: 20,
            ttft_ms: Some(5),
            started_at: chrono::Utc::now(),
            finished_at: chrono::Utc::now(),
        });
        m.observe(JobKind::Generate, &r);
        let text = m.encode();
        for line in [
            r#"llm_jobs_total{kind="generate",status="error",error_code="all_providers_failed"} 1"#,
            r#"llm_provider_calls_total{provider="p",model="m",outcome="ok"} 1"#,
            r#"llm_tokens_total{provider="p",model="m",direction="input",tenant="acme"} 7"#,
            r#"llm_cost_usd_total{provider="p",model="m",tenant="acme"} 0.5"#,
            r#"llm_token_classes_total{provider="p",model="m",class="cache_read",tenant="acme"} 4"#,
            r#"llm_prompt_cache_saved_usd_total{provider="p",model="m",tenant="acme"} 0.25"#,
            r#"llm_provider_ttft_seconds_count{provider="p",model="m"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
