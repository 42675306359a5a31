//! Provider health across jobs: a circuit breaker per (provider, model), and a recent
//! time-to-first-token average for the `fastest` strategy.
//!
//! Closed (healthy; degraded after a failure) -> after `failure_threshold` consecutive provider
//! faults the circuit opens (unavailable) and the chain skips the entry without waiting on it ->
//! after `cooldown` one probe call is let through -> success closes the circuit, failure opens
//! it again. Only faults of the provider count (5xx, 429, timeouts, cut streams, auth, unknown
//! model); a bad or oversized request, a context overflow or a content-filter refusal says
//! nothing about the provider's health. State changes are logged.
//!
//! Bounded: jobs may choose their model, so names no route lists could grow the table without
//! end. The routes' (provider, model) pairs are always kept; at most [`MAX_UNLISTED`] others
//! are, and a new one replaces the least recently used of them that holds no failure. When
//! every such entry holds failures, a new name is not tracked (its calls go ahead, uncounted).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::CircuitConfig;
use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// Weight of the newest sample in the time-to-first-token average.
const EWMA_ALPHA: f64 = 0.3;
/// Entries kept for (provider, model) pairs no route names.
pub const MAX_UNLISTED: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Healthy,
    Degraded,
    Unavailable,
    /// A pair the routes list that no call or probe has tried yet in this process.
    Unknown,
}

impl State {
    /// The state as the health monitor names it in reports (`llm-worker status`, `/readyz`).
    pub fn label(self) -> &'static str {
        match self {
            State::Healthy => "HEALTHY",
            State::Degraded => "DEGRADED",
            State::Unavailable => "UNAVAILABLE",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// Whether the chain may call an entry now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Go,
    /// The circuit is open and cooled down: this call is its single probe.
    Probe,
    /// The circuit is open (or a probe is already in flight): skip the entry.
    Skip,
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
    ewma_ttft_ms: Option<f64>,
    /// Size of the vectors this entry last returned (embeddings).
    dimensions: Option<usize>,
    last_used: Instant,
    /// The last active probe's outcome (`health.probe_interval_secs`).
    last_probe: Option<Probed>,
}

/// What the last active probe of an entry saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probed {
    pub at: chrono::DateTime<chrono::Utc>,
    pub latency_ms: u64,
    pub ok: bool,
}

impl Entry {
    fn new() -> Self {
        Self {
            state: State::Healthy,
            consecutive_failures: 0,
            opened_at: None,
            probing: false,
            ewma_ttft_ms: None,
            dimensions: None,
            last_used: Instant::now(),
            last_probe: None,
        }
    }

    /// Holds nothing a circuit needs: may be forgotten.
    fn quiet(&self) -> bool {
        self.consecutive_failures == 0 && self.opened_at.is_none() && !self.probing
    }
}

type Key = (String, String);

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// The routes' pairs: always kept.
    listed: HashSet<Key>,
}

impl Table {
    /// The entry of (provider, model), made if the bounds allow; `None`: not tracked.
    fn entry(&mut self, provider: &str, model: &str) -> Option<&mut Entry> {
        let key = (provider.to_string(), model.to_string());
        if !self.entries.contains_key(&key) && !self.listed.contains(&key) {
            let unlisted = self
                .entries
                .keys()
                .filter(|k| !self.listed.contains(*k))
                .count();
            if unlisted >= MAX_UNLISTED {
                let evict = self
                    .entries
                    .iter()
                    .filter(|(k, e)| !self.listed.contains(*k) && e.quiet())
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())?;
                self.entries.remove(&evict);
            }
        }
        let e = self.entries.entry(key).or_insert_with(Entry::new);
        e.last_used = Instant::now();
        Some(e)
    }

    fn get(&self, provider: &str, model: &str) -> Option<&Entry> {
        self.entries.get(&(provider.to_string(), model.to_string()))
    }
}

/// One entry of a health report (`llm-worker status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub provider: String,
    pub model: String,
    pub state: State,
    pub consecutive_failures: u32,
    pub ewma_ttft_ms: Option<f64>,
    /// The last active probe, when probes are on and one has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<Probed>,
}

/// Shared by all jobs of a process. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    table: Arc<Mutex<Table>>,
    threshold: u32,
    cooldown: Duration,
}

/// Whether an error is the provider's fault (and so counts against its circuit).
pub(crate) fn is_provider_fault(e: &ProviderError) -> bool {
    !matches!(
        e.code,
        ErrorCode::BadRequest
            | ErrorCode::ContextTooLong
            | ErrorCode::ContentFiltered
            | ErrorCode::PayloadTooLarge
            | ErrorCode::InvalidJob
            | ErrorCode::Timeout
            | ErrorCode::Cancelled
            | ErrorCode::DeadLettered
            | ErrorCode::BudgetExceeded
            | ErrorCode::InvalidOutput
            | ErrorCode::Unsupported
    )
}

impl Health {
    pub fn new(cfg: &CircuitConfig) -> Self {
        Self {
            table: Arc::new(Mutex::new(Table::default())),
            threshold: cfg.failure_threshold.max(1),
            cooldown: Duration::from_secs(cfg.cooldown_secs),
        }
    }

    /// The (provider, model) pairs the routes name, kept whatever the bound: set at start
    /// and on every reload.
    pub fn set_listed(&self, pairs: impl IntoIterator<Item = (String, String)>) {
        if let Ok(mut table) = self.table.lock() {
            table.listed = pairs.into_iter().collect();
        }
    }

    pub(crate) fn admit(&self, provider: &str, model: &str) -> Admission {
        let Ok(mut table) = self.table.lock() else {
            return Admission::Go;
        };
        let Some(e) = table.entry(provider, model) else {
            return Admission::Go;
        };
        match e.opened_at {
            None => Admission::Go,
            Some(at) if at.elapsed() < self.cooldown || e.probing => Admission::Skip,
            Some(_) => {
                e.probing = true;
                Admission::Probe
            }
        }
    }

    /// Record the outcome of a call: `Ok(ttft)` or the error it ended with.
    pub fn record(
        &self,
        provider: &str,
        model: &str,
        outcome: Result<Option<Duration>, &ProviderError>,
    ) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let Some(e) = table.entry(provider, model) else {
            return;
        };
        let before = e.state;
        match outcome {
            Ok(ttft) => {
                e.consecutive_failures = 0;
                e.opened_at = None;
                e.probing = false;
                e.state = State::Healthy;
                if let Some(t) = ttft {
                    let ms = t.as_secs_f64() * 1000.0;
                    e.ewma_ttft_ms = Some(match e.ewma_ttft_ms {
                        Some(avg) => avg + EWMA_ALPHA * (ms - avg),
                        None => ms,
                    });
                }
            }
            Err(err) if is_provider_fault(err) => {
                e.consecutive_failures += 1;
                if e.probing || e.consecutive_failures >= self.threshold {
                    e.opened_at = Some(Instant::now());
                    e.probing = false;
                    e.state = State::Unavailable;
                } else {
                    e.state = State::Degraded;
                }
            }
            // Not the provider's fault: only release a probe so another call can test it.
            Err(_) => e.probing = false,
        }
        if e.state != before {
            let failures = e.consecutive_failures;
            match e.state {
                State::Unavailable => {
                    tracing::warn!(provider, model, failures, cooldown = ?self.cooldown, "provider unavailable: circuit open")
                }
                State::Degraded => tracing::info!(provider, model, failures, "provider degraded"),
                State::Healthy => {
                    tracing::info!(provider, model, "provider healthy: circuit closed")
                }
                State::Unknown => {}
            }
        }
    }

    /// Record an active probe of (provider, model): its outcome counts like a call's (a
    /// success closes an open circuit, whatever its cooldown; a provider fault counts
    /// towards opening it), and its latency and time are kept for reports.
    pub(crate) fn record_probe(
        &self,
        provider: &str,
        model: &str,
        outcome: Result<Option<Duration>, &ProviderError>,
        latency: Duration,
    ) {
        self.record(provider, model, outcome);
        if let Ok(mut table) = self.table.lock()
            && let Some(e) = table.entry(provider, model)
        {
            e.last_probe = Some(Probed {
                at: chrono::Utc::now(),
                latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
                ok: outcome.is_ok(),
            });
        }
    }

    /// Remember the vector size an entry returned.
    pub(crate) fn record_dimensions(&self, provider: &str, model: &str, dims: usize) {
        if let Ok(mut table) = self.table.lock()
            && let Some(e) = table.entry(provider, model)
        {
            e.dimensions = Some(dims);
        }
    }

    /// The vector size an entry last returned, if it ever did in this process.
    pub(crate) fn dimensions(&self, provider: &str, model: &str) -> Option<usize> {
        self.table.lock().ok()?.get(provider, model)?.dimensions
    }

    pub(crate) fn ewma_ttft_ms(&self, provider: &str, model: &str) -> Option<f64> {
        self.table.lock().ok()?.get(provider, model)?.ewma_ttft_ms
    }

    /// Every entry kept (the routes' pairs, `Unknown` until tried, and at most
    /// [`MAX_UNLISTED`] others).
    pub fn report(&self) -> Vec<Report> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Report> = table
            .entries
            .iter()
            .map(|((provider, model), e)| Report {
                provider: provider.clone(),
                model: model.clone(),
                state: e.state,
                consecutive_failures: e.consecutive_failures,
                ewma_ttft_ms: e.ewma_ttft_ms,
                last_probe: e.last_probe.clone(),
            })
            .collect();
        out.extend(
            table
                .listed
                .iter()
                .filter(|k| !table.entries.contains_key(*k))
                .map(|(provider, model)| Report {
                    provider: provider.clone(),
                    model: model.clone(),
                    state: State::Unknown,
                    consecutive_failures: 0,
                    ewma_ttft_ms: None,
                    last_probe: None,
                }),
        );
        out.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: ErrorCode) -> ProviderError {
        ProviderError::new(code, "x")
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_repeated_faults_and_a_successful_probe_closes_it() {
        let h = Health::new(&CircuitConfig {
            failure_threshold: 3,
            cooldown_secs: 10,
        });
        for _ in 0..2 {
            h.record("p", "m", Err(&err(ErrorCode::ServerError)));
        }
        assert_eq!(h.report()[0].state, State::Degraded);
        assert_eq!(h.admit("p", "m"), Admission::Go);
        h.record("p", "m", Err(&err(ErrorCode::Overloaded)));
        assert_eq!(h.report()[0].state, State::Unavailable);
        assert_eq!(h.admit("p", "m"), Admission::Skip);

        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(h.admit("p", "m"), Admission::Probe);
        assert_eq!(h.admit("p", "m"), Admission::Skip, "one probe at a time");
        h.record("p", "m", Err(&err(ErrorCode::ServerError)));
        assert_eq!(h.admit("p", "m"), Admission::Skip, "a failed probe reopens");

        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(h.admit("p", "m"), Admission::Probe);
        h.record("p", "m", Ok(Some(Duration::from_millis(100))));
        assert_eq!(h.admit("p", "m"), Admission::Go);
        assert_eq!(h.report()[0].state, State::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_pair_is_unknown_until_tried_and_a_probe_closes_an_open_circuit_at_once() {
        let h = Health::new(&CircuitConfig {
            failure_threshold: 1,
            cooldown_secs: 3600,
        });
        h.set_listed([("p".to_string(), "m".to_string())]);
        assert_eq!(h.report()[0].state, State::Unknown);
        h.record_probe(
            "p",
            "m",
            Err(&err(ErrorCode::ServerError)),
            Duration::from_millis(7),
        );
        let r = &h.report()[0];
        assert_eq!(r.state, State::Unavailable);
        assert_eq!(
            r.last_probe.as_ref().map(|p| (p.ok, p.latency_ms)),
            Some((false, 7))
        );
        assert_eq!(h.admit("p", "m"), Admission::Skip);
        // Long before the cooldown ends, a successful probe closes it.
        h.record_probe("p", "m", Ok(None), Duration::from_millis(5));
        assert_eq!(h.admit("p", "m"), Admission::Go);
        assert_eq!(h.report()[0].state, State::Healthy);
    }

    #[tokio::test]
    async fn a_bad_request_says_nothing_about_the_provider() {
        let h = Health::new(&CircuitConfig {
            failure_threshold: 1,
            cooldown_secs: 10,
        });
        h.record("p", "m", Err(&err(ErrorCode::ContextTooLong)));
        h.record("p", "m", Err(&err(ErrorCode::BadRequest)));
        assert_eq!(h.admit("p", "m"), Admission::Go);
    }

    #[tokio::test]
    async fn names_no_route_lists_are_bounded_and_never_push_out_a_failing_one_or_a_listed_one() {
        let h = Health::new(&CircuitConfig {
            failure_threshold: 1,
            cooldown_secs: 60,
        });
        h.set_listed([("p".to_string(), "listed".to_string())]);
        h.record("p", "listed", Ok(None));
        h.record("p", "failing", Err(&err(ErrorCode::ServerError)));
        for i in 0..10_000 {
            h.record("p", &format!("made-up-{i}"), Ok(None));
        }
        let report = h.report();
        assert_eq!(report.len(), 1 + MAX_UNLISTED, "bounded");
        assert!(report.iter().any(|r| r.model == "listed"));
        assert_eq!(
            h.admit("p", "failing"),
            Admission::Skip,
            "its open circuit is kept"
        );
        // The newest names are the ones kept.
        assert!(report.iter().any(|r| r.model == "made-up-9999"));
        assert!(!report.iter().any(|r| r.model == "made-up-0"));
    }

    #[tokio::test]
    async fn when_every_unlisted_entry_holds_failures_a_new_name_goes_untracked() {
        let h = Health::new(&CircuitConfig {
            failure_threshold: 1,
            cooldown_secs: 60,
        });
        for i in 0..MAX_UNLISTED {
            h.record("p", &format!("bad-{i}"), Err(&err(ErrorCode::ServerError)));
        }
        h.record("p", "new", Err(&err(ErrorCode::ServerError)));
        assert_eq!(h.admit("p", "new"), Admission::Go);
        assert_eq!(h.report().len(), MAX_UNLISTED);
    }

    #[tokio::test]
    async fn time_to_first_token_is_averaged() {
        let h = Health::new(&CircuitConfig::default());
        h.record("p", "m", Ok(Some(Duration::from_millis(100))));
        h.record("p", "m", Ok(Some(Duration::from_millis(200))));
        assert_eq!(h.ewma_ttft_ms("p", "m"), Some(130.0));
    }
}
