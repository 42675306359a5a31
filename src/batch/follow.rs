//! Following open batches: every `batch.poll_ms`, each record whose lease this worker takes:
//! jobs near their deadline or cancelled go online; an ended batch's jobs are answered from
//! their lines (online where a line failed or is missing); then the record goes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::Lane;
use super::held::HeldJob;
use super::record::{Held, Lease, State};
use crate::contract::JobKind;
use crate::providers::Provider;

/// Before a job whose online answer could not be stored is tried again.
pub(super) const ONLINE_RETRY: Duration = Duration::from_secs(5);

pub(super) async fn run(lane: Arc<Lane>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(lane.config.poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keys: Vec<String> = match lane.kv.keys().await {
            Ok(keys) => match keys.try_collect().await {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the open batches");
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the open batches");
                continue;
            }
        };
        for key in keys {
            if stop.is_cancelled() {
                return;
            }
            match Lease::take(&lane.kv, &key, &lane.me, lane.lease_until()).await {
                Ok(Some(lease)) => lane.follow(lease).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(key, error = %e, "cannot read a batch record"),
            }
        }
    }
}

impl Lane {
    /// The held job at `seq`; `None` once answered and deleted.
    async fn load(&self, seq: u64) -> Option<HeldJob> {
        match self.stream.direct_get(seq).await {
            Ok(m) => Some(HeldJob::new(&m.headers, m.payload)),
            Err(e) => {
                tracing::debug!(seq, error = %e, "a held job is gone (answered before)");
                None
            }
        }
    }

    /// Answer the held job at `seq` online (or `cancelled`, if it was), then delete it;
    /// `false` when its answer could not be stored (the record must keep it).
    async fn answer_online(&self, held: &Held) -> bool {
        if let Some(job) = self.load(held.seq).await {
            let disposal = self
                .worker
                .handle_parked(JobKind::Generate, job, &self.abandon, None)
                .await;
            if disposal == crate::worker::Disposal::Requeued {
                return false;
            }
        }
        let _ = self.stream.delete_message(held.seq).await;
        true
    }

    /// Answer each of `jobs` with `answer` (a few at a time) while renewing `lease`: the jobs
    /// not answered (their answer could not be stored), or `None` if the lease was lost.
    async fn each<F, Fut>(&self, lease: &mut Lease, jobs: Vec<Held>, answer: F) -> Option<Vec<Held>>
    where
        F: Fn(Held) -> Fut,
        Fut: std::future::Future<Output = (Held, bool)>,
    {
        let work = futures::stream::iter(jobs)
            .map(answer)
            .buffer_unordered(super::ONLINE_AT_ONCE)
            .collect::<Vec<(Held, bool)>>();
        match self.renewing(lease, work).await {
            (answered, true) => Some(
                answered
                    .into_iter()
                    .filter_map(|(h, done)| (!done).then_some(h))
                    .collect(),
            ),
            (_, false) => None,
        }
    }

    /// Keep only `left` in the record (their answers could not be stored: the next pass
    /// tries again), or remove it when none is left.
    async fn settle(&self, mut lease: Lease, left: Vec<Held>) {
        if left.is_empty() {
            let _ = lease.remove(&self.kv).await;
            return;
        }
        tracing::warn!(
            jobs = left.len(),
            "answers not stored; the batch's record keeps them"
        );
        lease.record.jobs = left;
        self.release(lease).await;
    }

    /// Answer the held job from its batch line, or online when the line is not an answer;
    /// `false` when its answer could not be stored.
    async fn answer(
        &self,
        target: (&str, &str),
        held: &Held,
        line: Option<&Result<String, String>>,
        created: chrono::DateTime<Utc>,
    ) -> bool {
        let Some(job) = self.load(held.seq).await else {
            return true;
        };
        let why = match line {
            Some(Ok(body)) => match self
                .worker
                .answer_batched(&job, target, body, created)
                .await
            {
                Ok(crate::worker::Disposal::Requeued) => return false,
                Ok(_) => {
                    let _ = self.stream.delete_message(held.seq).await;
                    return true;
                }
                Err(why) => why,
            },
            Some(Err(why)) => why.clone(),
            None => "no line for it in the batch's files".into(),
        };
        tracing::info!(job_id = %held.job_id, %why, "batch line is no answer; sending the job online");
        self.answer_online(held).await
    }

    /// One pass over a record this worker holds.
    async fn follow(&self, mut lease: Lease) {
        if lease.record.state == State::Creating {
            // Its creator died before opening it (or took longer than a lease): its jobs are
            // still unacked, and are delivered again.
            let _ = lease.remove(&self.kv).await;
            return;
        }
        let Some(target) = self.worker.provider(&lease.record.provider) else {
            tracing::warn!(provider = %lease.record.provider, "an open batch's provider is no longer configured; its jobs go online");
            let jobs = lease.record.jobs.clone();
            let left = self
                .each(&mut lease, jobs, |h| async move {
                    let done = self.answer_online(&h).await;
                    (h, done)
                })
                .await;
            if let Some(left) = left {
                self.settle(lease, left).await;
            }
            return;
        };
        // Jobs that cannot wait for the batch any more.
        let margin = chrono::TimeDelta::seconds(self.config.online_margin_secs as i64);
        let now = Utc::now();
        let cancels = self.worker.cancels();
        let (due, waiting): (Vec<Held>, Vec<Held>) =
            lease.record.jobs.iter().cloned().partition(|h| {
                h.deadline.is_some_and(|d| d - margin <= now)
                    || cancels.is_cancelled(&h.tenant, h.job_id)
            });
        if !due.is_empty() {
            tracing::info!(jobs = due.len(), batch = ?lease.record.batch_id, "jobs near their deadline or cancelled leave their batch");
            let left = self
                .each(&mut lease, due, |h| async move {
                    let done = self.answer_online(&h).await;
                    (h, done)
                })
                .await;
            let Some(left) = left else {
                return;
            };
            lease.record.jobs = waiting;
            lease.record.jobs.extend(left);
            if lease.save(&self.kv).await.is_err() {
                return;
            }
        }
        let Some(batch_id) = lease.record.batch_id.clone() else {
            let _ = lease.remove(&self.kv).await;
            return;
        };
        if lease.record.jobs.is_empty() {
            // Nothing in it is wanted any more.
            let _ = target.batch_cancel(&batch_id).await;
            let _ = lease.remove(&self.kv).await;
            return;
        }
        let status = match target.batch_status(&batch_id).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(batch = %batch_id, error = %e.message, "cannot poll a provider batch");
                return self.release(lease).await;
            }
        };
        if !status.ended {
            return self.release(lease).await;
        }
        self.answer_all(lease, &target, &status).await;
    }

    /// Let another worker take the record at once (this one polls again next time too).
    async fn release(&self, mut lease: Lease) {
        lease.record.lease_until = Utc::now();
        let _ = lease.save(&self.kv).await;
    }

    /// Answer every job of an ended batch, then remove its record.
    async fn answer_all(
        &self,
        mut lease: Lease,
        target: &Provider,
        status: &crate::providers::batch::BatchStatus,
    ) {
        let record = lease.record.clone();
        let lines = match target.batch_lines(status, record.jobs.len()).await {
            Ok(lines) => lines,
            Err(e) => {
                tracing::warn!(batch = %status.id, error = %e.message, "cannot read an ended batch's files");
                return self.release(lease).await;
            }
        };
        let lines: HashMap<String, Result<String, String>> =
            lines.into_iter().map(|l| (l.custom_id, l.answer)).collect();
        tracing::info!(batch = %status.id, status = %status.status, jobs = record.jobs.len(), lines = lines.len(), "provider batch ended");
        let which = (record.provider.as_str(), record.model.as_str());
        let (lines, created) = (&lines, record.created_at);
        let left = self
            .each(&mut lease, record.jobs.clone(), |h| async move {
                let line = lines.get(&h.job_id.to_string());
                let done = self.answer(which, &h, line, created).await;
                (h, done)
            })
            .await;
        if let Some(left) = left {
            self.settle(lease, left).await;
        }
    }
}
