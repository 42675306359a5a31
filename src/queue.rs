//! The job consumers: one durable pull consumer per job kind (shared by every worker process
//! of a deployment; streams are made by `crate::nats`), and the pull loop.
//!
//! The loop pulls up to `worker.fair_window` messages (bounded in bytes too) and parks them
//! per tenant (`policy::fair`): each free in-flight permit starts the parked job of the tenant
//! furthest behind its weighted share, so a tenant that floods the queue does not make the
//! others wait behind its backlog. Parked messages get in-progress acks, so their ack timers
//! never run out while they wait. With `fair_window` at most `max_in_flight` the loop pulls
//! only for free permits (first in, first out). Each job runs as a tracked task holding its
//! permit. This module knows nothing about providers: it hands messages to
//! `Worker::handle`.
//!
//! NATS 2.9 notes: a WorkQueue stream allows one consumer per subject, hence one per kind with
//! a single `filter_subject` (`filter_subjects` needs 2.10 and is silently ignored by 2.9).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NatsConfig;
use crate::contract::JobKind;
use crate::nats::{SetupError, durable_consumer, hand_back};
use crate::policy::fair::FairQueue;
use crate::worker::Worker;

/// The durable consumer of one job kind. Workers dead-letter a job on its `max_deliver`-th
/// delivery; the consumer allows one delivery more, so a dead-lettering that fails (NATS
/// trouble) is tried again instead of leaving the job stranded in the work queue.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    kind: JobKind,
    max_deliver: i64,
) -> Result<PullConsumer, SetupError> {
    durable_consumer(
        js,
        &nats.jobs_stream,
        consumer_config(nats, kind, max_deliver),
    )
    .await
}

/// The job consumer of `kind`: explicit acks within `nats.ack_wait`, its kind's subjects
/// only, and one delivery more than `max_deliver` (the last delivery is the one the worker
/// dead-letters instead of running).
fn consumer_config(nats: &NatsConfig, kind: JobKind, max_deliver: i64) -> pull::Config {
    pull::Config {
        durable_name: Some(nats.consumer_name(kind)),
        ack_policy: AckPolicy::Explicit,
        ack_wait: nats.ack_wait(),
        filter_subject: nats.job_filter(kind),
        max_deliver: max_deliver + 1,
        // Each worker bounds its own in-flight work; the fleet as a whole is not capped here.
        max_ack_pending: -1,
        ..Default::default()
    }
}

/// Most messages asked for by one pull request. Measured with `llm-worker bench --only
/// throughput` against the previous loop (which asked for exactly its free permits), in
/// interleaved runs: 512 cost about 10% more worker CPU per job (more messages alive at
/// once; `malloc_consolidate` doubled in `perf`), 64 is within the run-to-run noise.
const MAX_PULL_BATCH: usize = 64;

/// Settings of one pull loop.
#[derive(Clone)]
pub(crate) struct PullLoop {
    pub kind: JobKind,
    /// `worker.max_deliver`, for the consumer's settings.
    pub max_deliver: i64,
    pub max_in_flight: usize,
    /// Jobs pulled but not started, parked for fair share (`worker.fair_window`, and its
    /// size in bytes); at most `max_in_flight` turns fair share off.
    pub fair_window: usize,
    pub fair_window_bytes: usize,
    /// How often parked messages are kept alive (a third of the ack wait).
    pub progress_every: Duration,
    pub pull_expires: Duration,
    /// Fires when the process should stop pulling (SIGTERM).
    pub stop_pulling: CancellationToken,
    /// Fires when in-flight jobs must be handed back (grace period over).
    pub abandon: CancellationToken,
    pub tracker: TaskTracker,
}

impl PullLoop {
    /// Pull, park and dispatch until `stop_pulling` fires.
    pub(crate) async fn run(self, js: jetstream::Context, nats: Arc<NatsConfig>, worker: Worker) {
        // One handle for every job: a `Worker` holds a dozen NATS handles (clients,
        // JetStream contexts, buckets), whose clones and drops cost about 3 % of a short
        // job's CPU when each job took a copy.
        let worker = Arc::new(worker);
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let fair = self.fair_window > self.max_in_flight;
        let mut parked: FairQueue<Parked> = FairQueue::default();
        // Set while every parked tenant is held by its rate limits: when to look again.
        let mut held: Option<Instant> = None;
        // Jobs whose tenant's minute filled up before they started come back here.
        let (back_tx, mut back_rx) = tokio::sync::mpsc::unbounded_channel::<(Arc<str>, Parked)>();
        let mut consumer: Option<PullConsumer> = None;
        let mut batch: Option<pull::Batch> = None;
        let mut keep_alive = tokio::time::interval(self.progress_every);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Ask for more when no pull is running and there is room: in the window, or
            // (without fair share) in the free permits.
            let room = if fair {
                if parked.bytes() < self.fair_window_bytes {
                    self.fair_window.saturating_sub(parked.len())
                } else {
                    0
                }
            } else {
                permits.available_permits().saturating_sub(parked.len())
            };
            if batch.is_none() && room > 0 {
                let c = match &consumer {
                    Some(c) => c,
                    None => match ensure_consumer(&js, &nats, self.kind, self.max_deliver).await {
                        Ok(c) => consumer.insert(c),
                        Err(e) => {
                            tracing::error!(error = %e, "job consumer unavailable; retrying");
                            self.pause().await;
                            continue;
                        }
                    },
                };
                let pulled = c
                    .batch()
                    .max_messages(room.min(MAX_PULL_BATCH))
                    .expires(self.pull_expires)
                    .messages()
                    .await;
                match pulled {
                    Ok(b) => batch = Some(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "pull request failed; retrying");
                        consumer = None;
                        self.pause().await;
                        continue;
                    }
                }
            }
            let waiting = batch.is_none() && parked.is_empty();
            tokio::select! {
                biased;
                _ = self.stop_pulling.cancelled() => {
                    for p in parked.drain() {
                        let _ = p.msg.ack_with(hand_back(self.pull_expires)).await;
                    }
                    if let Some(b) = &mut batch {
                        drain(b, self.pull_expires).await;
                    }
                    return;
                }
                permit = permits.clone().acquire_owned(), if !parked.is_empty() && held.is_none() => {
                    let Ok(permit) = permit else { continue };
                    // The tenant furthest behind its share whose rate limits let it start,
                    // or whose job has waited out its timeout.
                    let now = Instant::now();
                    let mut waited_out = false;
                    let picked = parked.pop_where(|tenant, p| {
                        waited_out = p.wait_until <= now;
                        waited_out || worker.may_start(tenant)
                    });
                    let Some((tenant, p)) = picked else {
                        // Every parked tenant is at a limit: look again shortly.
                        held = Some(now + HELD_RECHECK);
                        continue;
                    };
                    let waited_out = waited_out.then(|| {
                        format!("waited {:?} for tenant {tenant:?}'s limits (jobs in flight, requests or tokens per minute), past the job's timeout", now - p.parked_at)
                    });
                    let worker = worker.clone();
                    let abandon = self.abandon.clone();
                    let kind = self.kind;
                    let back = back_tx.clone();
                    let pull_expires = self.pull_expires;
                    // Boxed: a job's future is ~10 KB, and tokio copies an unboxed future
                    // into the task cell and its stage again when the task completes.
                    self.tracker.spawn(Box::pin(async move {
                        // Other workers may have used up the tenant's slots or minute
                        // meanwhile: the start is taken fleet-wide first, and the job goes
                        // back to wait if there is none.
                        let started = waited_out.is_none();
                        if started && !worker.take_start(&tenant).await {
                            if let Err(stopped) = back.send((tenant, p)) {
                                // The loop has stopped: another worker takes it.
                                let msg = &(stopped.0).1.msg;
                                let _ = msg.ack_with(hand_back(pull_expires)).await;
                            }
                            return;
                        }
                        worker.handle_parked(kind, p.msg, &abandon, waited_out).await;
                        if started {
                            worker.job_ended(&tenant).await;
                        }
                        drop(permit);
                    }));
                }
                _ = sleep_until(held), if held.is_some() => held = None,
                Some((tenant, p)) = back_rx.recv() => {
                    let weight = worker.parking_of(&p.msg).1;
                    let bytes = p.msg.payload.len() + p.msg.subject.len() + PARKED_OVERHEAD;
                    parked.push(&tenant, weight, p, bytes);
                }
                next = next_message(&mut batch), if batch.is_some() => match next {
                    Some(Ok(msg)) => {
                        let (tenant, weight, wait) = worker.parking_of(&msg);
                        let bytes = msg.payload.len() + msg.subject.len() + PARKED_OVERHEAD;
                        let now = Instant::now();
                        let p = Parked { msg, parked_at: now, wait_until: now + wait };
                        parked.push(&tenant, weight, p, bytes);
                        // A new tenant may be one that can start.
                        held = None;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pull batch ended with an error");
                        batch = None;
                    }
                    None => batch = None,
                },
                _ = keep_alive.tick(), if !parked.is_empty() => {
                    // Parked messages are in progress as far as JetStream knows: keep their
                    // ack timers from running out while they wait for a slot.
                    for p in parked.iter() {
                        let _ = p.msg.ack_with(AckKind::Progress).await;
                    }
                }
                // Every permit busy and nothing pulled or parked: wait for a free one.
                _ = permits.acquire(), if waiting => {}
            }
        }
    }

    async fn pause(&self) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = self.stop_pulling.cancelled() => {}
        }
    }
}

/// A message pulled and waiting for a slot.
struct Parked {
    msg: jetstream::Message,
    parked_at: Instant,
    /// Past this, it starts whatever its tenant's rate limits say (and is answered
    /// `timeout`): its timeout, counted from when it was pulled.
    wait_until: Instant,
}

/// How soon the loop looks again when every parked tenant is at a limit (rates, slots).
const HELD_RECHECK: Duration = Duration::from_millis(50);

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a parked message costs beyond its payload and subject (headers, reply subject, the
/// message's own fields), for `worker.fair_window_bytes`.
const PARKED_OVERHEAD: usize = 512;

async fn next_message(
    batch: &mut Option<pull::Batch>,
) -> Option<Result<jetstream::Message, async_nats::Error>> {
    match batch {
        Some(b) => b.next().await,
        None => std::future::pending().await,
    }
}

/// On shutdown, hand back any message already delivered to this pull request (instead of
/// letting it wait for its ack timer), waiting briefly for ones in flight.
async fn drain(batch: &mut pull::Batch, pull_expires: Duration) {
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(100), batch.next()).await
    {
        let _ = msg.ack_with(hand_back(pull_expires)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_takes_its_kinds_subjects_and_allows_one_delivery_past_max_deliver() {
        let mut nats = NatsConfig::default();
        let c = consumer_config(&nats, JobKind::Embed, 5);
        assert_eq!(c.filter_subject, "llm.jobs.embed");
        assert_eq!((c.max_deliver, c.ack_wait), (6, nats.ack_wait()));
        assert_eq!(c.max_ack_pending, -1);
        assert!(matches!(c.ack_policy, AckPolicy::Explicit));
        nats.tenant_from_subject = true;
        let c = consumer_config(&nats, JobKind::Generate, 5);
        assert_eq!(c.filter_subject, "llm.jobs.generate.*");
    }
}
