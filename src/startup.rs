//! Start-up that waits, bounded and visible. Every JetStream request a worker makes at start
//! (streams, consumers, KV buckets, the object store, the cancel follower) is one step of a
//! [`Startup`]: each try has a deadline, so no request can hang; a try that fails the way a
//! server that is not ready fails (no leader yet, no answer, not connected) is tried again
//! with backoff, logging what it waits for, until `nats.start_timeout_secs` have passed since
//! the process began; then start-up ends with an error naming the step and its last error. A
//! request the server refuses as wrong (a bad or conflicting setting) ends start-up at once.
//!
//! What start-up is waiting for is in its [`Progress`], which `/readyz` reports (503,
//! `starting: waiting for ...`) until the process consumes.

use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::contract::JobKind;

/// Longest wait for the answer to one try. Longer than async-nats' JetStream request timeout
/// (5 s), so its own timeouts come first and say what timed out.
const TRY_DEADLINE: Duration = Duration::from_secs(10);
/// Shortest deadline a try gets, even when start-up is nearly out of time.
const LAST_TRY: Duration = Duration::from_secs(1);
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Where a process is in its start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not consuming yet: what it is doing or waiting for.
    Starting(String),
    /// Started: the job kinds it consumes (none for a recorder alone).
    Ready(Vec<JobKind>),
}

/// The phase of a process, shared with its `/readyz`.
#[derive(Debug, Clone)]
pub(crate) struct Progress(Arc<Mutex<Phase>>);

impl Default for Progress {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Phase::Starting("connecting".into()))))
    }
}

impl Progress {
    pub(crate) fn get(&self) -> Phase {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set(&self, phase: Phase) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }
}

/// The steps of one start-up, sharing its deadline.
pub(crate) struct Startup {
    began: Instant,
    limit: Duration,
    progress: Progress,
}

impl Startup {
    /// A start-up that began now and may wait `limit` in all.
    pub(crate) fn new(limit: Duration, progress: Progress) -> Self {
        Self {
            began: Instant::now(),
            limit,
            progress,
        }
    }

    /// Run `attempt` until it succeeds, fails for good, or start-up is out of time. `what`
    /// names the step in logs, `/readyz` and the final error ("stream LLM_JOBS").
    pub(crate) async fn step<T, E, F, Fut>(&self, what: &str, mut attempt: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Display,
    {
        self.progress
            .set(Phase::Starting(format!("waiting for {what}")));
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(FIRST_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_jitter()
            .without_max_times()
            .build();
        for tries in 1u32.. {
            let deadline = self
                .limit
                .saturating_sub(self.began.elapsed())
                .clamp(LAST_TRY, TRY_DEADLINE);
            let error = match tokio::time::timeout(deadline, attempt()).await {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:.1} s", deadline.as_secs_f32()),
            };
            if !transient(&error) {
                anyhow::bail!("{what}: {error}");
            }
            let delay = delays.next().unwrap_or(MAX_DELAY);
            if self.began.elapsed() + delay >= self.limit {
                anyhow::bail!(
                    "gave up waiting for {what} after {} s (nats.start_timeout_secs) and {tries} \
                     tries; last error: {error}",
                    self.limit.as_secs()
                );
            }
            tracing::warn!(
                step = what,
                tries,
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "JetStream is not ready; waiting"
            );
            self.progress
                .set(Phase::Starting(format!("waiting for {what}: {error}")));
            tokio::time::sleep(delay).await;
        }
        unreachable!("tries are counted without end")
    }
}

/// Whether an error at start is one of a server that is not ready yet, worth waiting out.
/// JetStream's API errors carry an HTTP-like code: 400 is a request the server refuses as
/// wrong (a name in use with other settings, overlapping subjects, a consumer whose filter
/// cannot change), which no wait mends, except 10005 "no suitable peers for placement", which
/// a cluster answers until its nodes know each other. Everything else (timeouts, no
/// responders, 503 "JetStream system temporarily unavailable", "no stream found" during a
/// leader election, a connection not made yet) is waited out.
pub(crate) fn transient(error: &str) -> bool {
    let refused = error.contains("(code 400,") && !error.contains("error code 10005)");
    let conflict = error.contains("it exists with filter") || error.contains("cannot contain");
    !(refused || conflict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_server_not_ready_is_waited_for_and_a_wrong_request_is_not() {
        for waited in [
            "jetstream request timed out",
            "jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)",
            "jetstream error: no suitable peers for placement (code 400, error code 10005)",
            "jetstream error: stream not found (code 404, error code 10059)",
            "no answer within 10 s",
            "failed to send request: no responders",
        ] {
            assert!(transient(waited), "{waited}");
        }
        for refused in [
            "jetstream error: stream name already in use with a different configuration (code 400, error code 10058)",
            "jetstream error: subjects overlap with an existing stream (code 400, error code 10065)",
            "creating consumer c: it exists with filter 'a' but this configuration needs 'b'",
        ] {
            assert!(!transient(refused), "{refused}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_is_tried_again_until_it_succeeds_and_says_what_it_waits_for() {
        let progress = Progress::default();
        let startup = Startup::new(Duration::from_secs(120), progress.clone());
        let tries = AtomicU32::new(0);
        let done = startup
            .step("stream LLM_JOBS", || async {
                if tries.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err("jetstream request timed out")
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!(done, 7);
        assert_eq!(tries.load(Ordering::SeqCst), 4);
        assert_eq!(
            progress.get(),
            Phase::Starting("waiting for stream LLM_JOBS: jetstream request timed out".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_try_is_cut_and_start_up_gives_up_at_its_deadline() {
        let startup = Startup::new(Duration::from_secs(30), Progress::default());
        let began = Instant::now();
        let tries = AtomicU32::new(0);
        let error = startup
            .step("consumer llm-worker-generate", || async {
                tries.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), String>>().await
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("gave up waiting for consumer llm-worker-generate after 30 s"),
            "{error}"
        );
        assert!(error.contains("no answer within"), "{error}");
        assert!(tries.load(Ordering::SeqCst) >= 3);
        assert!(
            began.elapsed() <= Duration::from_secs(30),
            "{:?}",
            began.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_request_ends_start_up_at_once() {
        let startup = Startup::new(Duration::from_secs(120), Progress::default());
        let tries = AtomicU32::new(0);
        let error = startup
            .step("stream LLM_JOBS", || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("jetstream error: subjects overlap with an existing stream (code 400, error code 10065)")
            })
            .await
            .unwrap_err();
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        assert!(
            error.to_string().starts_with("stream LLM_JOBS: "),
            "{error}"
        );
    }
}
