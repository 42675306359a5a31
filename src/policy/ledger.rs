//! The fleet's shared spend counters: one JetStream KV entry per tenant (`spend.<tenant>`),
//! changed only by compare-and-set, and a copy of every entry in each worker, kept current by
//! a KV watch, that admission reads without a round trip.
//!
//! A job's spend is charged when it ends, before its result is stored and its message acked:
//! a charge waits for the write that carries it (charges of a few milliseconds are written
//! together, one compare-and-set per tenant), so an acked job's spend is in the counter. A
//! job that dies before its charge is redelivered and runs (and is charged) again; spend is
//! never under-counted, only counted twice when it was paid twice.
//!
//! Why KV rather than Postgres: admission reads a local copy (no query per job), the counter
//! changes by compare-and-set (exact under any number of workers), a watch pushes changes to
//! every worker within milliseconds, and answering jobs never depends on Postgres (the ledger
//! there is written asynchronously by the recorder, and may be down).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::budget::{self, Crossing, Measure, Period, Spend};
use crate::config::{NatsConfig, TenantPolicy};

/// Charges arriving within this long of a write go together into the next one.
const COALESCE: Duration = Duration::from_millis(2);
/// How long a charge is retried while the bucket cannot be written, before it is given up
/// (logged; the spend is still in the Postgres ledger).
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// Keys are kept this long after their last write (a monthly counter must outlive its month).
const KEEP_KEYS: Duration = Duration::from_secs(40 * 24 * 3600);

/// A tenant name as a KV key and subject token: letters, digits, `_` and `-` as they are,
/// every other byte as `=XX`.
pub(crate) fn token(tenant: &str) -> String {
    let mut out = String::with_capacity(tenant.len());
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('=');
    }
    out
}

fn key(token: &str) -> String {
    format!("spend.{token}")
}

/// The warning published on `<prefix>.events.budget.<tenant>`.
#[derive(Serialize)]
struct Warning<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    tenant: &'a str,
    period: Period,
    measure: Measure,
    threshold_percent: u8,
    budget: f64,
    spent: f64,
    resets_at: DateTime<Utc>,
    worker_id: &'a str,
    at: DateTime<Utc>,
}

struct Charge {
    tenant: String,
    token: String,
    policy: TenantPolicy,
    usd: f64,
    tokens: u64,
    done: oneshot::Sender<()>,
}

#[derive(Default)]
struct Counters {
    /// The last value of each tenant's counter this worker knows, with its revision.
    seen: HashMap<String, (u64, Spend)>,
    /// Charges not yet written (this worker's only).
    pending: HashMap<String, (f64, u64)>,
}

impl Counters {
    fn learn(&mut self, token: &str, revision: u64, spend: Spend) {
        match self.seen.get_mut(token) {
            Some((r, _)) if *r >= revision => {}
            Some(slot) => *slot = (revision, spend),
            None => {
                self.seen.insert(token.to_string(), (revision, spend));
            }
        }
    }
}

/// Handle to the shared counters (cheap to clone).
#[derive(Clone)]
pub(crate) struct Ledger {
    counters: Arc<Mutex<Counters>>,
    charges: mpsc::UnboundedSender<Charge>,
}

struct Writer {
    kv: kv::Store,
    counters: Arc<Mutex<Counters>>,
    client: async_nats::Client,
    events: String,
    worker_id: String,
}

impl Ledger {
    /// Open (or create) the bucket, load every counter, and keep them current.
    pub(crate) async fn start(
        js: &jetstream::Context,
        client: async_nats::Client,
        nats: &NatsConfig,
        worker_id: String,
    ) -> Result<Self, String> {
        let kv = open_bucket(js, &nats.tenant_bucket).await?;
        let counters = Arc::new(Mutex::new(Counters::default()));
        let watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("cannot watch the tenant counters: {e}"))?;
        tokio::spawn(follow(kv.clone(), watch, Arc::downgrade(&counters)));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            kv,
            counters: counters.clone(),
            client,
            events: format!("{}.events.budget", nats.subject_prefix),
            worker_id,
        };
        // Ends when every handle is gone (the process is ending): charges of jobs finishing
        // during shutdown are still written.
        tokio::spawn(writer.run(rx));
        Ok(Self {
            counters,
            charges: tx,
        })
    }

    /// Why a job of `tenant` may not start now (a spent budget), from this worker's copy of
    /// the counters and its own charges not yet written.
    pub(crate) fn refusal(&self, tenant: &str, policy: &TenantPolicy) -> Option<String> {
        let now = Utc::now();
        let token = token(tenant);
        let spend = {
            let c = lock(&self.counters);
            let spend = c
                .seen
                .get(&token)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            let (usd, tokens) = c.pending.get(&token).copied().unwrap_or_default();
            spend.add(now, usd, tokens)
        };
        budget::refusal(policy, &spend, now)
    }

    /// Add a job's spend to its tenant's counters; returns once it is written (or given up).
    pub(crate) async fn charge(&self, tenant: &str, policy: &TenantPolicy, usd: f64, tokens: u64) {
        let token = token(tenant);
        {
            let mut c = lock(&self.counters);
            let p = c.pending.entry(token.clone()).or_default();
            p.0 += usd;
            p.1 = p.1.saturating_add(tokens);
        }
        let (done, written) = oneshot::channel();
        let charge = Charge {
            tenant: tenant.to_string(),
            token,
            policy: policy.clone(),
            usd,
            tokens,
            done,
        };
        if self.charges.send(charge).is_ok() {
            let _ = written.await;
        }
    }
}

fn lock(m: &Mutex<Counters>) -> std::sync::MutexGuard<'_, Counters> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The bucket, created when missing. Created as the stream KV buckets are (what
/// `create_key_value` would make): that call first asks for the account's JetStream info,
/// whose NATS 2.9 answer async-nats 0.51 cannot parse ("data did not match any variant of
/// untagged enum Response"), so it fails on 2.9 whatever the bucket.
async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, String> {
    let stream = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("llm-worker: tenant spend counters".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: KEEP_KEYS,
        max_message_size: 4096,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.get_or_create_stream(stream)
        .await
        .map_err(|e| format!("cannot create the tenant bucket {bucket}: {e}"))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| format!("cannot open the tenant bucket {bucket}: {e}"))
}

/// Copy every change of the bucket into `counters` while anyone holds them; re-watch after
/// an interruption (the watch is an ordered consumer: it starts from each key's last value).
async fn follow(kv: kv::Store, mut watch: kv::Watch, counters: std::sync::Weak<Mutex<Counters>>) {
    loop {
        while let Some(entry) = watch.next().await {
            let Some(counters) = counters.upgrade() else {
                return;
            };
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "tenant counter watch interrupted");
                    break;
                }
            };
            let Some(token) = entry.key.strip_prefix("spend.") else {
                continue;
            };
            if !matches!(entry.operation, kv::Operation::Put) {
                continue;
            }
            match serde_json::from_slice::<Spend>(&entry.value) {
                Ok(spend) => lock(&counters).learn(token, entry.revision, spend),
                Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable tenant counter"),
            }
        }
        if counters.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        match kv.watch_with_history(">").await {
            Ok(w) => watch = w,
            Err(e) => tracing::warn!(error = %e, "cannot watch the tenant counters; retrying"),
        }
    }
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Charge>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(c) = rx.try_recv() {
                batch.push(c);
            }
            let mut by_tenant: HashMap<String, Vec<Charge>> = HashMap::new();
            for c in batch {
                by_tenant.entry(c.token.clone()).or_default().push(c);
            }
            futures::future::join_all(by_tenant.into_values().map(|group| self.write(group))).await;
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// Write one tenant's charges with compare-and-set, publish the warnings that write
    /// crosses, and release the jobs waiting for it.
    async fn write(&self, group: Vec<Charge>) {
        let Some(first) = group.first() else { return };
        let (token, tenant, policy) = (first.token.clone(), first.tenant.clone(), &first.policy);
        let usd: f64 = group.iter().map(|c| c.usd).sum();
        let tokens = group.iter().fold(0u64, |t, c| t.saturating_add(c.tokens));
        let key = key(&token);
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut failures = 0u32;
        let mut known = lock(&self.counters).seen.get(&token).cloned();
        let written = loop {
            let now = Utc::now();
            let (revision, before) = known.clone().unwrap_or_default();
            let after = before.add(now, usd, tokens);
            let value = match serde_json::to_vec(&after) {
                Ok(v) => Bytes::from(v),
                Err(_) => break None,
            };
            let put = if revision == 0 {
                self.kv.create(&key, value).await.map_err(|e| e.to_string())
            } else {
                self.kv
                    .update(&key, value, revision)
                    .await
                    .map_err(|e| e.to_string())
            };
            match put {
                Ok(new_revision) => break Some((before.at(now), after, new_revision, now)),
                Err(e) => {
                    // Someone else wrote first (usually), or the bucket is unreachable: read
                    // again and retry; back off once it is not a plain race.
                    failures += 1;
                    if started.elapsed() > GIVE_UP_AFTER {
                        tracing::warn!(error = %e, tenant = %tenant, "cannot write the tenant's spend counter; this spend is not counted against its budget");
                        break None;
                    }
                    if failures > 3 {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    match self.kv.entry(&key).await {
                        Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => {
                            let spend = serde_json::from_slice(&entry.value).unwrap_or_default();
                            known = Some((entry.revision, spend));
                        }
                        Ok(_) => known = None,
                        Err(e) => tracing::debug!(error = %e, "cannot read the tenant counter"),
                    }
                }
            }
        };
        {
            let mut c = lock(&self.counters);
            if let Some(p) = c.pending.get_mut(&token) {
                p.0 -= usd;
                p.1 = p.1.saturating_sub(tokens);
                if p.1 == 0 && p.0.abs() < 1e-12 {
                    c.pending.remove(&token);
                }
            }
            if let Some((_, after, revision, _)) = &written {
                c.learn(&token, *revision, after.clone());
            }
        }
        if let Some((before, after, _, now)) = written {
            for crossing in budget::crossings(policy, &before, &after) {
                self.warn(&tenant, &token, crossing, now).await;
            }
        }
        for c in group {
            let _ = c.done.send(());
        }
    }

    async fn warn(&self, tenant: &str, token: &str, c: Crossing, now: DateTime<Utc>) {
        tracing::warn!(
            tenant,
            period = ?c.line.period,
            measure = ?c.line.measure,
            threshold_percent = c.percent,
            budget = c.line.budget,
            spent = c.line.spent,
            "tenant budget threshold reached"
        );
        let warning = Warning {
            kind: "budget_warning",
            tenant,
            period: c.line.period,
            measure: c.line.measure,
            threshold_percent: c.percent,
            budget: c.line.budget,
            spent: c.line.spent,
            resets_at: budget::resets_at(c.line.period, now),
            worker_id: &self.worker_id,
            at: now,
        };
        let Ok(payload) = serde_json::to_vec(&warning) else {
            return;
        };
        let subject = format!("{}.{token}", self.events);
        if let Err(e) = self.client.publish(subject, payload.into()).await {
            tracing::warn!(error = %e, "cannot publish the budget warning");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_become_safe_keys_and_tokens() {
        assert_eq!(token("acme"), "acme");
        assert_eq!(token("team_a-1"), "team_a-1");
        assert_eq!(token("a.b *>"), "a=2Eb=20=2A=3E");
        assert_eq!(token("é"), "=C3=A9");
        assert_eq!(token(""), "=");
        // Different names stay different: `=` itself is escaped.
        assert_ne!(token("a=2E"), token("a."));
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let mut c = Counters::default();
        let spend = |t| Spend {
            day_tokens: t,
            ..Default::default()
        };
        c.learn("a", 5, spend(50));
        c.learn("a", 4, spend(40));
        assert_eq!(c.seen["a"], (5, spend(50)));
        c.learn("a", 6, spend(60));
        assert_eq!(c.seen["a"].0, 6);
    }
}
