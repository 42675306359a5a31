//! The worker's HTTP endpoints (`telemetry.metrics_listen`): `/metrics` (read fresh on every
//! scrape: jobs in flight, circuit breakers, consumer and recorder backlogs), `/healthz`
//! (the process answers) and `/readyz` (started, connected to NATS and not shutting down:
//! an orchestrator like Kubernetes sends it no traffic otherwise; while starting, the 503
//! says what start-up waits for).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Metrics;
use crate::config::NatsConfig;
use crate::health::Health;
use crate::startup::{Phase, Progress};

/// What a scrape reads besides the counters.
pub(crate) struct Probe {
    pub metrics: Metrics,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub nats: Arc<NatsConfig>,
    /// Where start-up is; once started, the job kinds this process consumes.
    pub progress: Progress,
    /// Whether this process records usage (then the recorder's backlog is reported).
    pub recorder: bool,
    pub health: Health,
    /// The running jobs.
    pub tracker: TaskTracker,
    pub stop: CancellationToken,
}

/// Bind `listen` and serve until `stop` fires; returns the bound address.
pub(crate) async fn serve(listen: &str, probe: Probe) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let stop = probe.stop.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(Arc::new(probe));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(addr)
}

async fn ready(State(p): State<Arc<Probe>>) -> Response {
    let connected = matches!(
        p.client.connection_state(),
        async_nats::connection::State::Connected
    );
    if p.stop.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if let Phase::Starting(what) = p.progress.get() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("starting: {what}")).into_response()
    } else if !connected {
        (StatusCode::SERVICE_UNAVAILABLE, "NATS is not connected").into_response()
    } else {
        ready_text(&p.health.report()).into_response()
    }
}

/// `ready`, then one line per provider entry: its state as the health monitor names it, and
/// the last active probe's latency when probes are on.
fn ready_text(reports: &[crate::health::Report]) -> String {
    let mut text = String::from("ready\n");
    for r in reports {
        let state = r.state.label();
        text.push_str(&format!("provider {} {} {state}", r.provider, r.model));
        if let Some(probe) = &r.last_probe {
            let outcome = if probe.ok { "ok" } else { "failed" };
            text.push_str(&format!(" probe {outcome} {} ms", probe.latency_ms));
        }
        text.push('\n');
    }
    text
}

async fn metrics(State(p): State<Arc<Probe>>) -> Response {
    p.metrics.set_in_flight(p.tracker.len());
    p.metrics.set_circuits(&p.health.report());
    // Queue depths come from JetStream; a slow or failed read leaves the last values.
    let _ = tokio::time::timeout(Duration::from_secs(2), read_queues(&p)).await;
    (
        [(header::CONTENT_TYPE, super::CONTENT_TYPE)],
        p.metrics.encode(),
    )
        .into_response()
}

async fn read_queues(p: &Probe) {
    let kinds = match p.progress.get() {
        Phase::Ready(kinds) => kinds,
        Phase::Starting(_) => return,
    };
    if let Ok(jobs) = p.js.get_stream_no_info(&p.nats.jobs_stream).await {
        for kind in &kinds {
            if let Ok(info) = jobs.consumer_info(p.nats.consumer_name(*kind)).await {
                p.metrics
                    .set_consumer(*kind, info.num_pending, info.num_ack_pending);
            }
        }
    }
    if !p.recorder {
        return;
    }
    let Ok(results) = p.js.get_stream_no_info(&p.nats.results_stream).await else {
        return;
    };
    let Ok(info) = results.consumer_info(p.nats.recorder_consumer_name()).await else {
        return;
    };
    let backlog = info.num_pending + info.num_ack_pending as u64;
    let mut lag = Duration::ZERO;
    if backlog > 0
        && let Ok(oldest) = results
            .get_raw_message(info.ack_floor.stream_sequence + 1)
            .await
    {
        let age = chrono::Utc::now().timestamp() - oldest.time.unix_timestamp();
        lag = Duration::from_secs(u64::try_from(age).unwrap_or(0));
    }
    p.metrics.set_recorder(backlog, lag);
}
