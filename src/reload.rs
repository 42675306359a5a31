//! Configuration reload without a restart (SIGHUP, or a request on `<prefix>.control.reload`).
//!
//! The worker re-reads its own configuration (file and environment; a request carries no
//! configuration, it only triggers the re-read) and, when the new one is valid, swaps what
//! jobs are routed with: routes and strategies, providers with their limits and keys
//! (`api_key_file` is read again), and the job bounds of `[limits]`. Jobs already running keep
//! the routing they started with; circuit state and latency averages carry over. An invalid
//! configuration is refused with its error and the old one stays. Sections a running process
//! cannot change (`[nats]`, `[database]`, `[recorder]`, `[worker]`, `[telemetry]`,
//! `[circuit_breaker]`, `[cache]`) are reported as needing a restart and left as they were.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::contract::ReplyPolicy;
use crate::health::Health;
use crate::pricing::PriceBook;
use crate::worker::{Routing, Worker};

/// Where the configuration is read from again.
pub type ConfigSource = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Applies reloads to one worker process.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) source: ConfigSource,
    /// The configuration in force (for the sections only a restart can change).
    pub(crate) current: Arc<Mutex<Config>>,
    pub(crate) worker: Worker,
    pub(crate) health: Health,
    pub(crate) prices: PriceBook,
    /// Where the budgets in force are written (`llm_tenant_budgets`), if anywhere.
    pub(crate) pool: Option<sqlx::PgPool>,
}

impl Reloader {
    /// Re-read the configuration and apply it; what happened, or why it was refused.
    pub fn reload(&self) -> Result<String, String> {
        let new = (self.source)().map_err(|e| format!("configuration refused: {e}"))?;
        if let Err(e) = new.require_providers() {
            return Err(format!("configuration refused: {e}"));
        }
        let (routing, _) = Routing::from_config(&new, &self.health, &self.prices)
            .map_err(|e| format!("configuration refused: {e}"))?;
        self.worker
            .reload(routing)
            .map_err(|e| format!("configuration refused: {e}"))?;
        if let (Some(pool), Ok(rt)) = (&self.pool, tokio::runtime::Handle::try_current()) {
            rt.spawn(crate::usage::budgets::sync_logged(
                pool.clone(),
                new.tenants.clone(),
            ));
        }
        let fixed = match self.current.lock() {
            Ok(mut current) => {
                let mut new = new;
                // Names this process kept from before derived names stay kept.
                if current.nats.derived_names.is_empty() && new.nats.names_derived() {
                    new.nats.use_llm_names();
                }
                let fixed = needs_restart(&current, &new);
                *current = new;
                fixed
            }
            Err(_) => Vec::new(),
        };
        let mut message =
            "configuration reloaded: routes, providers, limits and tenant policies".to_string();
        if !fixed.is_empty() {
            message.push_str(&format!(
                "; changes to [{}] need a restart and are not applied",
                fixed.join("], [")
            ));
        }
        Ok(message)
    }

    /// [`Self::reload`], logged.
    pub fn reload_logged(&self) -> Result<String, String> {
        let outcome = self.reload();
        match &outcome {
            Ok(message) => tracing::info!(outcome = %message, "configuration reloaded"),
            Err(error) => {
                tracing::error!(%error, "reload refused; the configuration in force stays")
            }
        }
        outcome
    }
}

/// The sections that differ and that only a restart applies.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    // Debug output stands in for equality (secrets print redacted on both sides).
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut fixed = Vec::new();
    for (name, changed) in [
        ("nats", differs(&old.nats, &new.nats)),
        ("database", differs(&old.database, &new.database)),
        ("recorder", differs(&old.recorder, &new.recorder)),
        ("worker", differs(&old.worker, &new.worker)),
        ("telemetry", differs(&old.telemetry, &new.telemetry)),
        ("cache", differs(&old.cache, &new.cache)),
        (
            "circuit_breaker",
            differs(&old.circuit_breaker, &new.circuit_breaker),
        ),
    ] {
        if changed {
            fixed.push(name);
        }
    }
    fixed
}

/// Answer reload requests on `subject` (every worker of the deployment, not a queue group):
/// each replies `{"worker_id", "ok", "message" | "error"}`. A request whose reply subject the
/// [`ReplyPolicy`] refuses is ignored, reload included (as a job's `reply_to` would be).
pub(crate) async fn serve(
    client: async_nats::Client,
    subject: String,
    worker_id: String,
    reloader: Reloader,
    policy: ReplyPolicy,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, subject, "reload requests are not served");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            () = stop.cancelled() => return,
        };
        if let Some(reply) = &msg.reply
            && let Err(why) = policy.check(reply, "")
        {
            tracing::warn!(reason = %why, "reload request refused");
            continue;
        }
        let outcome = reloader.reload_logged();
        let Some(reply) = msg.reply else { continue };
        let body = match &outcome {
            Ok(message) => {
                serde_json::json!({"worker_id": worker_id, "ok": true, "message": message})
            }
            Err(error) => serde_json::json!({"worker_id": worker_id, "ok": false, "error": error}),
        };
        if let Err(e) = client.publish(reply, body.to_string().into()).await {
            tracing::warn!(error = %e, "answering a reload request failed");
        }
    }
}
