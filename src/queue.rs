//! JetStream plumbing: the job and result streams, one durable pull consumer per job kind
//! (shared by every worker process of a deployment), and the pull loop.
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
    stream::{self, RetentionPolicy, StorageType},
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NatsConfig;
use crate::job::JobKind;
use crate::policy::fair::FairQueue;
use crate::worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("creating stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("creating consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
}

/// Create the job, result and dead-letter streams if they are missing (idempotent; an existing stream's
/// configuration is left as it is).
pub async fn ensure_streams(js: &jetstream::Context, nats: &NatsConfig) -> Result<(), QueueError> {
    let dup = Duration::from_secs(nats.duplicate_window_secs);
    let jobs = stream::Config {
        name: nats.jobs_stream.clone(),
        subjects: vec![format!("{}.jobs.>", nats.subject_prefix)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: dup,
        ..Default::default()
    };
    let results = stream::Config {
        name: nats.results_stream.clone(),
        subjects: vec![format!("{}.results.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.results_max_age_secs),
        duplicate_window: dup,
        // Direct get lets any worker read a stored result cheaply (works on 2.9).
        allow_direct: true,
        ..Default::default()
    };
    let dead = stream::Config {
        name: nats.dead_stream.clone(),
        subjects: vec![format!("{}.dead.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.dead_max_age_secs),
        duplicate_window: dup,
        ..Default::default()
    };
    // One message per (tenant, job id): a request remembered until cancel_max_age_secs.
    let cancel = stream::Config {
        name: nats.cancel_stream.clone(),
        subjects: vec![format!("{}.cancel.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.cancel_max_age_secs),
        max_messages_per_subject: 1,
        // Requests carry nothing but their subject: bounded, whoever floods them.
        max_message_size: 1024,
        max_messages: crate::cancel::MAX_REMEMBERED as i64,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: dup,
        ..Default::default()
    };
    let cancel_subjects = cancel.subjects.clone();
    for config in [jobs, results, dead, cancel] {
        let name = config.name.clone();
        let stream = ensure_stream(js, config, nats.replicas)
            .await
            .map_err(|message| QueueError::Stream {
                stream: name.clone(),
                message,
            })?;
        if name == nats.cancel_stream
            && let Err(e) = widen_cancel_subjects(js, stream, nats, cancel_subjects.clone()).await
        {
            tracing::warn!(
                stream = %name,
                error = %e,
                "cannot widen the cancel stream to <prefix>.cancel.>: cancel requests are not \
                 stored until it is (nats stream edit)"
            );
        }
    }
    Ok(())
}

/// A cancel stream created before cancels carried their tenant holds `<prefix>.cancel.*`
/// only; widen it to `<prefix>.cancel.>` (a superset: nothing stored is lost), so cancel
/// requests `<prefix>.cancel.<tenant>.<job_id>` are stored.
async fn widen_cancel_subjects(
    js: &jetstream::Context,
    stream: stream::Stream,
    nats: &NatsConfig,
    wanted: Vec<String>,
) -> Result<(), String> {
    let old = vec![format!("{}.cancel.*", nats.subject_prefix)];
    let mut config = stream.cached_info().config.clone();
    if config.subjects != old {
        return Ok(());
    }
    config.subjects = wanted;
    js.update_stream(config).await.map_err(|e| e.to_string())?;
    tracing::info!(stream = %nats.cancel_stream, "cancel stream widened to <prefix>.cancel.> (cancels carry their tenant)");
    Ok(())
}

/// Create a stream (or KV bucket's stream) with `replicas` copies if it is missing. An
/// existing one is left as it is (changing a stream is an operator's decision), with a
/// warning naming every setting that differs from what this configuration would create.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    mut wanted: stream::Config,
    replicas: usize,
) -> Result<stream::Stream, String> {
    wanted.num_replicas = replicas;
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| e.to_string())?;
    let differ = differences(&stream.cached_info().config, &wanted);
    if !differ.is_empty() {
        tracing::warn!(
            stream = %wanted.name,
            differences = %differ.join("; "),
            "an existing stream's settings differ from this configuration; it is used as it is \
             (change it with `nats stream edit`, or delete it to have it created again)"
        );
    }
    Ok(stream)
}

/// The settings this worker chooses where `existing` differs from `wanted`.
pub(crate) fn differences(existing: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut settings = vec![
        (
            "replicas",
            format!("{}", existing.num_replicas),
            format!("{}", wanted.num_replicas),
        ),
        (
            "subjects",
            format!("{:?}", existing.subjects),
            format!("{:?}", wanted.subjects),
        ),
        (
            "retention",
            format!("{:?}", existing.retention),
            format!("{:?}", wanted.retention),
        ),
        (
            "storage",
            format!("{:?}", existing.storage),
            format!("{:?}", wanted.storage),
        ),
        (
            "max_age",
            format!("{:?}", existing.max_age),
            format!("{:?}", wanted.max_age),
        ),
    ];
    // 0 means the server's default (2 minutes).
    if !wanted.duplicate_window.is_zero() {
        settings.push((
            "duplicate_window",
            format!("{:?}", existing.duplicate_window),
            format!("{:?}", wanted.duplicate_window),
        ));
    }
    settings
        .into_iter()
        .filter(|(_, has, wants)| has != wants)
        .map(|(name, has, wants)| format!("{name} is {has}, the configuration says {wants}"))
        .collect()
}

/// The durable consumer of one job kind. Workers dead-letter a job on its `max_deliver`-th
/// delivery; the consumer allows one delivery more, so a dead-lettering that fails (NATS
/// trouble) is tried again instead of leaving the job stranded in the work queue.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    kind: JobKind,
    max_deliver: i64,
) -> Result<PullConsumer, QueueError> {
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

/// Get or create the durable pull consumer `config` names on `stream` (idempotent). An
/// existing consumer whose ack wait or delivery limit differ from `config` is updated (NATS
/// allows it); one whose filter differs is an error, as NATS 2.9 cannot change a filter.
pub(crate) async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> Result<PullConsumer, QueueError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let err = |e: &dyn std::fmt::Display| QueueError::Consumer {
        consumer: name.clone(),
        message: e.to_string(),
    };
    let stream = js.get_stream_no_info(stream).await.map_err(|e| err(&e))?;
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| err(&e))?;
    let found = consumer.info().await.map_err(|e| err(&e))?.config.clone();
    if found.filter_subject != config.filter_subject {
        return Err(err(&format!(
            "it exists with filter '{}' but this configuration needs '{}' \
             (nats.tenant_from_subject changed?): delete the consumer or use another \
             nats.consumer_prefix",
            found.filter_subject, config.filter_subject
        )));
    }
    if found.ack_wait != config.ack_wait || found.max_deliver != config.max_deliver {
        match stream.create_consumer(config).await {
            Ok(updated) => {
                tracing::info!(consumer = %name, "consumer settings updated (ack wait, delivery limit)");
                consumer = updated;
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "cannot update the consumer's settings; keeping them")
            }
        }
    }
    Ok(consumer)
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

/// A Nak for a message this process will not handle. Delayed past the life of this process's
/// pull requests: an immediate Nak is redelivered at once to a pull request the server still
/// holds for the stopping process, again and again (each a delivery, until `max_deliver`
/// strands the job), instead of going to another worker.
pub(crate) fn hand_back(pull_expires: Duration) -> AckKind {
    AckKind::Nak(Some(pull_expires + Duration::from_millis(500)))
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

    #[test]
    fn a_handed_back_job_waits_out_the_pull_requests_in_flight() {
        let AckKind::Nak(Some(delay)) = hand_back(Duration::from_secs(5)) else {
            panic!("not a delayed nak")
        };
        assert_eq!(delay, Duration::from_millis(5500));
    }
}

#[cfg(test)]
mod stream_settings {
    use super::*;

    #[test]
    fn settings_that_differ_are_named_and_equal_ones_are_not() {
        let wanted = stream::Config {
            name: "S".into(),
            subjects: vec!["a.>".into()],
            num_replicas: 3,
            max_age: Duration::from_secs(60),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        assert!(differences(&wanted, &wanted).is_empty());
        let existing = stream::Config {
            num_replicas: 1,
            max_age: Duration::from_secs(30),
            ..wanted.clone()
        };
        let d = differences(&existing, &wanted);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("replicas is 1, the configuration says 3"),
            "{d:?}"
        );
        assert!(d[1].starts_with("max_age is 30s"), "{d:?}");
    }
}
