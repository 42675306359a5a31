//! Logging and traces: a tracing subscriber writing to stderr, as text or JSON, filtered by
//! `RUST_LOG` (default `info`), and, with `telemetry.otlp_endpoint`, the spans of jobs
//! (`job`, each provider call `attempt`, `store_result`) exported with OTLP (HTTP, JSON
//! encoding) to a collector. Job spans carry `job_id`, `trace_id`, `tenant`; prompts are not
//! logged unless `telemetry.log_prompts` is on.
//!
//! Trace propagation: a job message with a W3C `traceparent` header continues that trace:
//! its `job` span is a child of the caller's span, and the job's `trace_id` (events, usage
//! rows) is the W3C trace id (see `crate::contract::w3c_trace_id`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use = "dropping it without shutdown may lose the last spans"]
pub struct Telemetry {
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Export the buffered spans and stop the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: exporting the last spans failed: {e}");
        }
    }
}

/// Install the global subscriber (once; later calls are ignored). `default_level` applies when
/// `RUST_LOG` is unset (`info` for the worker, `warn` for client commands). `service` names
/// the process in traces (`llm-worker`, `llm-worker-gateway`).
pub fn init(config: &TelemetryConfig, default_level: &str, service: &str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colour only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(endpoint) = config.otlp_endpoint.as_deref() else {
        // Logs only: one global filter, so disabled callsites cost nothing (per-layer filters
        // would make every callsite ask at run time).
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let _ = match config.log_format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.try_init(),
        };
        return Telemetry { traces: None };
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let traces = match tracer_provider(endpoint, service) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("warning: traces are not exported: {e}");
            None
        }
    };
    if traces.is_some() {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let otel = traces.as_ref().map(|provider| {
        // Our own spans at info and above, whatever RUST_LOG says about logs.
        let only_ours = tracing_subscriber::filter::Targets::new()
            .with_target("llm_worker", tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("llm-worker"))
            .with_filter(only_ours)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Telemetry { traces }
}

/// Whether spans are exported: the spans only traces need (provider calls, result stores)
/// are made only then, so a worker without traces does not pay for them.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// An OTLP/HTTP (JSON) exporter to `<endpoint>/v1/traces`, batching in the background.
fn tracer_provider(
    endpoint: &str,
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    crate::tls::install_crypto_provider();
    let endpoint = endpoint.trim_end_matches('/');
    // An endpoint given in code is used as it is (unlike OTEL_EXPORTER_OTLP_ENDPOINT).
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Make `span` a child of the span a valid `traceparent` names (when traces are exported;
/// otherwise nothing happens).
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    struct One<'a>(&'a str);
    impl opentelemetry::propagation::Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    if crate::contract::w3c_trace_id(traceparent).is_none() {
        return;
    }
    let parent =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&One(traceparent));
    let _ = span.set_parent(parent);
}
