//! Logging: a tracing subscriber writing to stderr, as text or JSON, filtered by `RUST_LOG`
//! (default `info`). Job spans carry `job_id`, `trace_id`, `tenant`; prompts are not logged
//! unless `telemetry.log_prompts` is on.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber (once; later calls are ignored). `default_level` applies when
/// `RUST_LOG` is unset (`info` for the worker, `warn` for client commands).
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
