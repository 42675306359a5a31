//! Collecting held jobs into provider batches: pull up to `batch.max_jobs` (or for
//! `batch.max_wait_secs`), group by provider and model, write each group's record, create
//! its provider batch, open the record, then ack the group's messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::held::HeldJob;
use super::record::{Held, Lease, Record, State};
use super::{Lane, MAX_CREATE_TRIES};
use crate::contract::{GenerateRequest, JobKind};
use crate::error::Disposition;
use crate::job::JobBody;
use crate::lane;
use crate::worker::Disposal;

/// Before a group whose batch could not be created is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(5);

pub(super) async fn run(lane: Arc<Lane>, consumer: PullConsumer, stop: CancellationToken) {
    let wait = Duration::from_secs(lane.config.max_wait_secs);
    loop {
        let pulled = tokio::select! {
            () = stop.cancelled() => return,
            pulled = pull(&consumer, lane.config.max_jobs, wait) => pulled,
        };
        match pulled {
            Ok(messages) if !messages.is_empty() => {
                for ((provider, model), group) in by_target(messages) {
                    lane.open(&provider, &model, group).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the batch stream; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Up to `n` messages, waiting at most `wait` for them.
async fn pull(consumer: &PullConsumer, n: usize, wait: Duration) -> Result<Vec<Message>, String> {
    let mut batch = consumer
        .batch()
        .max_messages(n)
        .expires(wait)
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = Vec::new();
    while let Some(m) = batch.next().await {
        messages.push(m.map_err(|e| e.to_string())?);
    }
    Ok(messages)
}

fn header(m: &Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

fn by_target(messages: Vec<Message>) -> BTreeMap<(String, String), Vec<Message>> {
    let mut groups: BTreeMap<(String, String), Vec<Message>> = BTreeMap::new();
    for m in messages {
        let target = (header(&m, lane::PROVIDER), header(&m, lane::MODEL));
        groups.entry(target).or_default().push(m);
    }
    groups
}

fn held_of(m: &Message) -> HeldJob {
    HeldJob::new(&m.headers.clone().unwrap_or_default(), m.payload.clone())
}

async fn settle(m: &Message, kind: AckKind) {
    if let Err(e) = m.ack_with(kind).await {
        tracing::warn!(error = %e, "settling a held job failed; it is delivered again");
    }
}

impl Lane {
    /// Answer the held job of `m` online now, then drop it from the batch stream.
    async fn online(&self, m: &Message) {
        let disposal = self
            .worker
            .handle_parked(JobKind::Generate, held_of(m), &self.abandon, None)
            .await;
        if disposal == Disposal::Requeued {
            return settle(m, AckKind::Nak(Some(super::follow::ONLINE_RETRY))).await;
        }
        settle(m, AckKind::Ack).await;
        if let Ok(info) = m.info() {
            let _ = self.stream.delete_message(info.stream_sequence).await;
        }
    }

    /// Put the jobs of `messages` (all for `provider` and `model`) in one provider batch.
    async fn open(&self, provider: &str, model: &str, messages: Vec<Message>) {
        let Some(target) = self.worker.provider(provider) else {
            tracing::warn!(
                provider,
                "held jobs for a provider no longer configured go online"
            );
            for m in &messages {
                self.online(m).await;
            }
            return;
        };
        let routing = self.worker.routing();
        let mut jobs: Vec<(Held, GenerateRequest)> = Vec::with_capacity(messages.len());
        let mut kept = Vec::with_capacity(messages.len());
        for m in messages {
            let tries = m.info().map_or(1, |i| i.delivered);
            let seq = m.info().map_or(0, |i| i.stream_sequence);
            let decoded = self
                .worker
                .decode(JobKind::Generate, &held_of(&m), &routing);
            match decoded {
                Ok(job) if tries <= MAX_CREATE_TRIES => {
                    let JobBody::Generate(req) = job.body else {
                        self.online(&m).await;
                        continue;
                    };
                    let held = Held {
                        seq,
                        job_id: job.envelope.job_id,
                        tenant: job.envelope.tenant,
                        deadline: job.expires_at,
                    };
                    jobs.push((held, req));
                    kept.push(m);
                }
                // Invalid now (a reload changed the rules), or its batches cannot be created.
                _ => self.online(&m).await,
            }
        }
        if jobs.is_empty() {
            return;
        }
        let record = Record {
            provider: provider.to_string(),
            model: model.to_string(),
            state: State::Creating,
            batch_id: None,
            created_at: Utc::now(),
            holder: self.me.clone(),
            lease_until: self.lease_until(),
            jobs: jobs.iter().map(|(h, _)| h.clone()).collect(),
        };
        let retry = AckKind::Nak(Some(RETRY_DELAY));
        let mut lease = match Lease::create(&self.kv, record).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(error = %e, "cannot write a batch record; the jobs wait");
                for m in &kept {
                    settle(m, retry).await;
                }
                return;
            }
        };
        // The jobs stay ours while the batch is created.
        for m in &kept {
            settle(m, AckKind::Progress).await;
        }
        let lines: Vec<(String, &GenerateRequest)> = jobs
            .iter()
            .map(|(h, req)| (h.job_id.to_string(), req))
            .collect();
        let key = lease.key.clone();
        let (created, held) = self
            .renewing(&mut lease, target.batch_create(model, &lines, &key))
            .await;
        let status = match created {
            Ok(status) => status,
            Err(e) => {
                let _ = lease.remove(&self.kv).await;
                if e.disposition() == Disposition::Retry {
                    tracing::warn!(provider, model, error = %e.message, "cannot create a provider batch now; the jobs wait");
                    for m in &kept {
                        settle(m, retry).await;
                    }
                } else {
                    // No Batch API there (a compatible server), or it refuses these requests.
                    tracing::warn!(provider, model, error = %e.message, "the provider refuses the batch; its jobs go online");
                    futures::stream::iter(&kept)
                        .for_each_concurrent(super::ONLINE_AT_ONCE, |m| self.online(m))
                        .await;
                }
                return;
            }
        };
        lease.record.state = State::Open;
        lease.record.batch_id = Some(status.id.clone());
        lease.record.lease_until = Utc::now();
        let saved = match held {
            true => lease.save(&self.kv).await,
            false => Err("another worker took the record".into()),
        };
        if let Err(e) = saved {
            // Taken as abandoned meanwhile: the jobs are delivered again, this batch unused.
            tracing::warn!(error = %e, "the batch record changed while its batch was created; cancelling it");
            let _ = target.batch_cancel(&status.id).await;
            for m in &kept {
                settle(m, retry).await;
            }
            return;
        }
        for m in &kept {
            settle(m, AckKind::Ack).await;
        }
        tracing::info!(provider, model, batch = %status.id, record = %lease.key, jobs = kept.len(), "provider batch created");
    }
}
