//! Provider health across jobs: a circuit breaker per (provider, model), and a recent
//! time-to-first-token average for the `fastest` strategy.
//!
//! Closed (healthy; degraded after a failure) -> after `failure_threshold` consecutive provider
//! faults the circuit opens (unavailable) and the chain skips the entry without waiting on it ->
//! after `cooldown` one probe call is let through -> success closes the circuit, failure opens
//! it again. Only faults of the provider count (5xx, 429, timeouts, cut streams, auth, unknown
//! model); a bad or oversized request, a context overflow or a content-filter refusal says
//! nothing about the provider's health. State changes are logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::CircuitConfig;
use crate::error::{ErrorCode, ProviderError};

/// Weight of the newest sample in the time-to-first-token average.
const EWMA_ALPHA: f64 = 0.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Healthy,
    Degraded,
    Unavailable,
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
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            state: State::Healthy,
            consecutive_failures: 0,
            opened_at: None,
            probing: false,
            ewma_ttft_ms: None,
            dimensions: None,
        }
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
}

/// Shared by all jobs of a process. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    entries: Arc<Mutex<HashMap<(String, String), Entry>>>,
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
    )
}

impl Health {
    pub fn new(cfg: &CircuitConfig) -> Self {
        Self {
            entries: Arc::new(Mutex::new(HashMap::new())),
            threshold: cfg.failure_threshold.max(1),
            cooldown: Duration::from_secs(cfg.cooldown_secs),
        }
    }

    pub(crate) fn admit(&self, provider: &str, model: &str) -> Admission {
        let Ok(mut map) = self.entries.lock() else {
            return Admission::Go;
        };
        let e = map
            .entry((provider.to_string(), model.to_string()))
            .or_default();
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
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        let e = map
            .entry((provider.to_string(), model.to_string()))
            .or_default();
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
            }
        }
    }

    /// Remember the vector size an entry returned.
    pub(crate) fn record_dimensions(&self, provider: &str, model: &str, dims: usize) {
        if let Ok(mut map) = self.entries.lock() {
            map.entry((provider.to_string(), model.to_string()))
                .or_default()
                .dimensions = Some(dims);
        }
    }

    /// The vector size an entry last returned, if it ever did in this process.
    pub(crate) fn dimensions(&self, provider: &str, model: &str) -> Option<usize> {
        let map = self.entries.lock().ok()?;
        map.get(&(provider.to_string(), model.to_string()))?
            .dimensions
    }

    pub(crate) fn ewma_ttft_ms(&self, provider: &str, model: &str) -> Option<f64> {
        let map = self.entries.lock().ok()?;
        map.get(&(provider.to_string(), model.to_string()))?
            .ewma_ttft_ms
    }

    /// Every entry seen so far.
    pub fn report(&self) -> Vec<Report> {
        let Ok(map) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Report> = map
            .iter()
            .map(|((provider, model), e)| Report {
                provider: provider.clone(),
                model: model.clone(),
                state: e.state,
                consecutive_failures: e.consecutive_failures,
                ewma_ttft_ms: e.ewma_ttft_ms,
            })
            .collect();
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
    async fn time_to_first_token_is_averaged() {
        let h = Health::new(&CircuitConfig::default());
        h.record("p", "m", Ok(Some(Duration::from_millis(100))));
        h.record("p", "m", Ok(Some(Duration::from_millis(200))));
        assert_eq!(h.ewma_ttft_ms("p", "m"), Some(130.0));
    }
}
