//! Job cancellation, owned by tenants. A cancel request is a message on
//! `<prefix>.cancel.<tenant>.<job_id>` (the tenant as a subject token, see
//! [`crate::contract::subject_token`]); it takes effect only on a job of that tenant, so one
//! tenant can never cancel another's job, queued or running. With `nats.tenant_from_subject`
//! a tenant's NATS user may publish only on its own `<prefix>.cancel.<tenant>.*`, so NATS
//! vouches for the tenant of a cancel as it does for a job's; otherwise it is a claim, like a
//! job body's `tenant`. The old form `<prefix>.cancel.<job_id>` (no tenant token) is taken
//! as tenant `default`'s.
//!
//! The cancel stream (`nats.cancel_stream`, one message per subject, kept
//! `nats.cancel_max_age_secs`) captures requests, so they are remembered while no worker runs
//! and by workers started later. Every worker follows the stream (an ordered consumer from
//! the last request per subject) into [`Cancels`]: a job that starts after its cancel is
//! answered `cancelled` without a provider call; a running one has its token cancelled, which
//! ends its chain at once (the call in flight is dropped, its connection closed, its usage
//! estimated).
//!
//! Bounds: the stream keeps at most [`MAX_REMEMBERED`] requests (the oldest go first) of at
//! most 1 KiB, and a worker remembers as many.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::NatsConfig;
use crate::contract::subject_token;

/// The most cancel requests remembered (in the stream and in each worker).
pub use crate::nats::MAX_CANCELS as MAX_REMEMBERED;

/// A job as cancels name it: its tenant (as a subject token) and its id.
type Key = (String, Uuid);

#[derive(Default)]
struct Inner {
    cancelled: HashSet<Key>,
    /// Oldest first, to forget beyond [`MAX_REMEMBERED`].
    order: VecDeque<Key>,
    /// Jobs running in this process: their token, and how many deliveries run under the key.
    running: HashMap<Key, (CancellationToken, usize)>,
}

/// The cancel requests this worker knows of, and its running jobs' tokens.
#[derive(Clone, Default)]
pub struct Cancels(Arc<Mutex<Inner>>);

fn key(tenant: &str, job_id: Uuid) -> Key {
    (subject_token(tenant), job_id)
}

impl Cancels {
    /// Remember that `tenant` cancelled its job `job_id`, and stop it if it runs here.
    pub fn cancel(&self, tenant: &str, job_id: Uuid) {
        self.cancel_key((subject_token(tenant), job_id));
    }

    fn cancel_key(&self, key: Key) {
        let Ok(mut inner) = self.0.lock() else {
            return;
        };
        if let Some((token, _)) = inner.running.get(&key) {
            tracing::info!(job_id = %key.1, "cancelling the running job");
            token.cancel();
        }
        if inner.cancelled.insert(key.clone()) {
            inner.order.push_back(key);
            if inner.order.len() > MAX_REMEMBERED
                && let Some(old) = inner.order.pop_front()
            {
                inner.cancelled.remove(&old);
            }
        }
    }

    /// Whether `tenant` cancelled its job `job_id`.
    pub fn is_cancelled(&self, tenant: &str, job_id: Uuid) -> bool {
        let key = key(tenant, job_id);
        self.0
            .lock()
            .is_ok_and(|inner| inner.cancelled.contains(&key))
    }

    /// Register a job of `tenant` about to run; its token fires on that tenant's cancel
    /// request (at once, if one came already). The job is unregistered when the guard drops.
    pub fn run(&self, tenant: &str, job_id: Uuid) -> RunningJob {
        let key = key(tenant, job_id);
        let token = match self.0.lock() {
            Ok(mut inner) => {
                let cancelled = inner.cancelled.contains(&key);
                let entry = inner
                    .running
                    .entry(key.clone())
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
            key,
            token,
        }
    }
}

/// A job registered as running; see [`Cancels::run`].
pub struct RunningJob {
    cancels: Cancels,
    key: Key,
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
            && let Some(entry) = inner.running.get_mut(&self.key)
        {
            entry.1 -= 1;
            if entry.1 == 0 {
                inner.running.remove(&self.key);
            }
        }
    }
}

/// Publish `tenant`'s cancel request for its job `job_id` and wait until the cancel stream
/// has stored it.
pub async fn request(
    js: &jetstream::Context,
    nats: &NatsConfig,
    tenant: &str,
    job_id: Uuid,
) -> Result<(), String> {
    let stored = js
        .publish(nats.cancel_subject(tenant, &job_id), bytes::Bytes::new())
        .await
        .map_err(|e| format!("publishing the cancel request: {e}"))?;
    stored.await.map(|_| ()).map_err(|e| {
        format!(
            "the cancel stream {} did not store the request ({e}); is a worker of this deployment running?",
            nats.cancel_stream
        )
    })
}

/// The job a cancel subject names: `<prefix>.cancel.<tenant token>.<job_id>`, or the old
/// `<prefix>.cancel.<job_id>` (tenant `default`). With `subject_tenants` (tenants bound to
/// subjects) only the first form counts: the old one carries no tenant NATS vouched for.
fn key_of(subject: &str, prefix: &str, subject_tenants: bool) -> Option<Key> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix(".cancel.")?;
    match rest.split_once('.') {
        Some((tenant, id)) if !tenant.is_empty() => Some((tenant.to_string(), id.parse().ok()?)),
        Some(_) => None,
        None if subject_tenants => None,
        None => Some((subject_token("default"), rest.parse().ok()?)),
    }
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
                Some(Ok(msg)) => {
                    match key_of(&msg.subject, &nats.subject_prefix, nats.tenant_from_subject) {
                        Some(key) => cancels.cancel_key(key),
                        None => {
                            tracing::debug!(subject = %msg.subject, "cancel request without a tenant and job id")
                        }
                    }
                }
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
            filter_subject: format!("{}.cancel.>", nats.subject_prefix),
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
        let running = cancels.run("acme", id);
        let again = cancels.run("acme", id);
        assert!(!running.token().is_cancelled());
        cancels.cancel("acme", id);
        assert!(running.token().is_cancelled() && again.token().is_cancelled());
        drop((running, again));
        assert!(cancels.is_cancelled("acme", id));
        assert!(cancels.run("acme", id).token().is_cancelled());
        assert!(!cancels.is_cancelled("acme", Uuid::now_v7()));
        assert_eq!(cancels.0.lock().unwrap().running.len(), 0);
    }

    #[test]
    fn another_tenants_cancel_touches_neither_the_running_job_nor_a_later_one() {
        let cancels = Cancels::default();
        let id = Uuid::now_v7();
        let running = cancels.run("b", id);
        cancels.cancel("a", id);
        assert!(!running.token().is_cancelled());
        assert!(!cancels.is_cancelled("b", id));
        assert!(!cancels.run("b", id).token().is_cancelled());
        assert!(cancels.is_cancelled("a", id));
    }

    #[test]
    fn at_most_max_remembered_ids_are_kept_oldest_forgotten_first() {
        let cancels = Cancels::default();
        let first = Uuid::now_v7();
        cancels.cancel("t", first);
        for _ in 0..MAX_REMEMBERED {
            cancels.cancel("t", Uuid::now_v7());
        }
        assert!(!cancels.is_cancelled("t", first));
        assert_eq!(cancels.0.lock().unwrap().cancelled.len(), MAX_REMEMBERED);
    }

    #[test]
    fn the_subject_names_the_tenant_and_the_job() {
        let id = Uuid::now_v7();
        let key = |s: &str, bound| key_of(s, "llm", bound);
        assert_eq!(
            key(&format!("llm.cancel.acme.{id}"), false),
            Some(("acme".into(), id))
        );
        assert_eq!(
            key(&format!("llm.cancel.a=2Eb.{id}"), true),
            Some((subject_token("a.b"), id))
        );
        assert_eq!(
            key(&format!("llm.cancel.{id}"), false),
            Some(("default".into(), id))
        );
        assert_eq!(key(&format!("llm.cancel.{id}"), true), None);
        assert_eq!(key("llm.cancel.acme.not-a-uuid", false), None);
        assert_eq!(key(&format!("other.cancel.acme.{id}"), false), None);
    }
}
