//! The batch lane (`docs/batch.md`): jobs with `service_tier: "batch"` answered through a
//! provider's Batch API at the batch price, within their deadline.
//!
//! The worker hands such a job to the batch stream (`crate::lane`) and acks it. Every worker
//! process then runs two loops here:
//!
//! - [`collect`]: pulls held jobs from the batch stream's durable consumer, up to
//!   `batch.max_jobs` or for `batch.max_wait_secs`, and per provider and model writes a
//!   record ([`record`], state `creating`), creates the provider batch, marks the record
//!   `open`, and only then acks the jobs' messages (which stay in the stream).
//! - [`follow`]: every `batch.poll_ms`, takes the lease of each open record it may (one worker
//!   per batch; another takes over when a lease runs out), sends online the jobs whose
//!   deadline is within `batch.online_margin_secs` or that were cancelled, polls the batch,
//!   and once it ended answers every job from its line, or online when its line failed or is
//!   missing; then deletes the jobs' messages and the record.
//!
//! At-least-once, answered once: a job is acked on the job stream only once the batch stream
//! holds it, and acked there only once an open record names it; a record is removed only
//! after every job in it is answered. A worker killed anywhere leaves either unacked messages
//! (delivered again: at worst a job is in two provider batches) or a record another worker
//! takes over. Every answer goes through the worker's stored-result path, which stores a
//! result only where none is and sends it only when it stored it: a job in two batches, or
//! answered from its batch after it went online, is answered once.

mod collect;
mod follow;
mod held;
mod record;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, kv};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BatchConfig, NatsConfig};
use crate::worker::Worker;

/// Deliveries of a held job in batches that could not be created, before it goes online.
const MAX_CREATE_TRIES: i64 = 3;
/// Held jobs answered online at once by one worker.
const ONLINE_AT_ONCE: usize = 32;

/// What both loops share.
pub(crate) struct Lane {
    worker: Worker,
    stream: jetstream::stream::Stream,
    kv: kv::Store,
    /// This process (`worker_id`), as a lease holder.
    me: String,
    config: BatchConfig,
    /// Fires when the process can wait no longer: online runs hand their jobs back.
    abandon: CancellationToken,
}

impl Lane {
    fn lease(&self) -> Duration {
        Duration::from_secs(self.config.lease_secs)
    }

    /// Run `work` to its end while renewing `lease` every third of a lease; whether the
    /// lease was still held at the end (a record changed by another worker is not renewed
    /// further, and the caller must not write it).
    async fn renewing<T>(
        &self,
        lease: &mut record::Lease,
        work: impl std::future::Future<Output = T>,
    ) -> (T, bool) {
        tokio::pin!(work);
        let every = self.lease() / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut held = true;
        loop {
            tokio::select! {
                out = &mut work => return (out, held),
                _ = renew.tick(), if held => {
                    lease.record.lease_until = self.lease_until();
                    held = lease.save(&self.kv).await.is_ok();
                }
            }
        }
    }

    fn lease_until(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::TimeDelta::seconds(self.config.lease_secs as i64)
    }
}

/// What [`start`] needs.
pub(crate) struct Parts {
    pub stream: jetstream::stream::Stream,
    pub kv: kv::Store,
    pub worker: Worker,
    pub worker_id: String,
    pub stop: CancellationToken,
    pub abandon: CancellationToken,
}

/// The durable consumer all workers collect from.
pub(crate) async fn consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    config: &BatchConfig,
) -> Result<PullConsumer, crate::nats::SetupError> {
    crate::nats::durable_consumer(
        js,
        &nats.batch_stream,
        pull::Config {
            durable_name: Some(format!("{}-batch", nats.consumer_prefix)),
            filter_subject: crate::lane::subject(nats),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            // Held while more are collected, then extended (in-progress acks) while their
            // batch is created; a killed collector's jobs come back after this.
            ack_wait: Duration::from_secs(config.max_wait_secs + nats.ack_wait_secs),
            max_deliver: -1,
            max_ack_pending: 20_000,
            ..Default::default()
        },
    )
    .await
}

/// Run the lane's two loops on `tracker` until `stop`.
pub(crate) fn start(
    parts: Parts,
    consumer: PullConsumer,
    config: &BatchConfig,
    tracker: &TaskTracker,
) {
    let stop = parts.stop.clone();
    let lane = Arc::new(Lane {
        worker: parts.worker,
        stream: parts.stream,
        kv: parts.kv,
        me: parts.worker_id,
        config: config.clone(),
        abandon: parts.abandon,
    });
    tracker.spawn(collect::run(lane.clone(), consumer, stop.clone()));
    tracker.spawn(follow::run(lane, stop));
}
