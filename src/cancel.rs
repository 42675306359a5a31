//! Job cancellation. Anyone allowed to publish on `<prefix>.cancel.<job_id>` cancels that job:
//! the cancel stream (`nats.cancel_stream`, one message per job id, kept
//! `nats.cancel_max_age_secs`) captures the request, so it is remembered while no worker runs
//! and by workers started later. Every worker follows the stream (an ordered consumer from the
//! last request per job id) into [`Cancels`]: a job that starts after its cancel is answered
//! `cancelled` without a provider call; a running one has its token cancelled, which ends its
//! chain at once (the call in flight is dropped, its connection closed, its usage estimated).
//!
//! Bounds: the stream keeps at most [`MAX_REMEMBERED`] requests (the oldest go first) of at
//! most 1 KiB, and a worker remembers as many job ids.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::NatsConfig;

/// The most cancel requests remembered (in the stream and in each worker).
pub const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
struct Inner {
    cancelled: HashSet<Uuid>,
    /// Oldest first, to forget beyond [`MAX_REMEMBERED`].
    order: VecDeque<Uuid>,
    /// Jobs running in this process: their token, and how many deliveries run under the id.
    running: HashMap<Uuid, (CancellationToken, usize)>,
}

/// The cancelled job ids this worker knows of, and its running jobs' tokens.
#[derive(Clone, Default)]
pub struct Cancels(Arc<Mutex<Inner>>);

impl Cancels {
    /// Remember that `job_id` is cancelled, and stop it if it runs here.
    pub fn cancel(&self, job_id: Uuid) {
        let Ok(mut inner) = self.0.lock() else {
            return;
        };
        if inner.cancelled.insert(job_id) {
            inner.order.push_back(job_id);
            if inner.order.len() > MAX_REMEMBERED
                && let Some(old) = inner.order.pop_front()
            {
                inner.cancelled.remove(&old);
            }
        }
        if let Some((token, _)) = inner.running.get(&job_id) {
            tracing::info!(%job_id, "cancelling the running job");
            token.cancel();
        }
    }

    pub fn is_cancelled(&self, job_id: Uuid) -> bool {
        self.0
            .lock()
            .is_ok_and(|inner| inner.cancelled.contains(&job_id))
    }

    /// Register a job about to run; its token fires on a cancel request (at once, if one came
    /// already). The job is unregistered when the guard drops.
    pub fn run(&self, job_id: Uuid) -> RunningJob {
        let token = match self.0.lock() {
            Ok(mut inner) => {
                let cancelled = inner.cancelled.contains(&job_id);
                let entry = inner
                    .running
                    .entry(job_id)
                    .or_insert_with(|| (CancellationToken::new(), 0));
                entry.1 += 1;
                if cancelled {
                    entry.0.cancel();
                }
                entry.0.clone()
            }
            Err(_) => CancellationToken::new(),
        };
        RunningJob {
            cancels: self.clone(),
            job_id,
            token,
        }
    }
}

/// A job registered as running; see [`Cancels::run`].
pub struct RunningJob {
    cancels: Cancels,
    job_id: Uuid,
    token: CancellationToken,
}

impl RunningJob {
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.cancels.0.lock()
            && let Some(entry) = inner.running.get_mut(&self.job_id)
        {
            entry.1 -= 1;
            if entry.1 == 0 {
                inner.running.remove(&self.job_id);
            }
        }
    }
}

/// Publish a cancel request for `job_id` and wait until the cancel stream has stored it.
pub async fn request(
    js: &jetstream::Context,
    nats: &NatsConfig,
    job_id: Uuid,
) -> Result<(), String> {
    let stored = js
        .publish(nats.cancel_subject(&job_id), bytes::Bytes::new())
        .await
        .map_err(|e| format!("publishing the cancel request: {e}"))?;
    stored.await.map(|_| ()).map_err(|e| {
        format!(
            "the cancel stream {} did not store the request ({e}); is a worker of this deployment running?",
            nats.cancel_stream
        )
    })
}

/// The job id a cancel subject names (`<prefix>.cancel.<job_id>`).
fn job_id_of(subject: &str) -> Option<Uuid> {
    subject.rsplit_once('.').and_then(|(_, id)| id.parse().ok())
}

/// Follow the cancel stream into `cancels` until `stop` fires: every remembered request
/// first, then new ones as they come. Returns once the first consumer exists, so a worker is
/// ready for cancels when it says it is ready.
pub async fn follow(
    js: jetstream::Context,
    nats: Arc<NatsConfig>,
    cancels: Cancels,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut messages = subscribe(&js, &nats).await?;
    Ok(tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                () = stop.cancelled() => return,
            };
            match next {
                Some(Ok(msg)) => match job_id_of(&msg.subject) {
                    Some(id) => cancels.cancel(id),
                    None => {
                        tracing::debug!(subject = %msg.subject, "cancel request without a job id")
                    }
                },
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, "cancel stream interrupted; following it again");
                    }
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = stop.cancelled() => return,
                        }
                        match subscribe(&js, &nats).await {
                            Ok(m) => {
                                messages = m;
                                break;
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot follow the cancel stream"),
                        }
                    }
                }
            }
        }
    }))
}

async fn subscribe(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<consumer::push::Ordered, String> {
    let stream = js
        .get_stream_no_info(&nats.cancel_stream)
        .await
        .map_err(|e| format!("cancel stream {}: {e}", nats.cancel_stream))?;
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: format!("{}.cancel.{}", nats.inbox_prefix, Uuid::new_v4().simple()),
            deliver_policy: DeliverPolicy::LastPerSubject,
            filter_subject: format!("{}.cancel.*", nats.subject_prefix),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cancel stream consumer: {e}"))?;
    consumer
        .messages()
        .await
        .map_err(|e| format!("cancel stream messages: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_stops_the_running_job_and_marks_later_ones_cancelled_from_the_start() {
        let cancels = Cancels::default();
        let id = Uuid::now_v7();
        let running = cancels.run(id);
        let again = cancels.run(id);
        assert!(!running.token().is_cancelled());
        cancels.cancel(id);
        assert!(running.token().is_cancelled() && again.token().is_cancelled());
        drop((running, again));
        assert!(cancels.is_cancelled(id));
        assert!(cancels.run(id).token().is_cancelled());
        assert!(!cancels.is_cancelled(Uuid::now_v7()));
        assert_eq!(cancels.0.lock().unwrap().running.len(), 0);
    }

    #[test]
    fn at_most_max_remembered_ids_are_kept_oldest_forgotten_first() {
        let cancels = Cancels::default();
        let first = Uuid::now_v7();
        cancels.cancel(first);
        for _ in 0..MAX_REMEMBERED {
            cancels.cancel(Uuid::now_v7());
        }
        assert!(!cancels.is_cancelled(first));
        assert_eq!(cancels.0.lock().unwrap().cancelled.len(), MAX_REMEMBERED);
    }

    #[test]
    fn the_job_id_is_the_last_token_of_the_subject() {
        let id = Uuid::now_v7();
        assert_eq!(job_id_of(&format!("llm.cancel.{id}")), Some(id));
        assert_eq!(job_id_of("llm.cancel.not-a-uuid"), None);
    }
}
