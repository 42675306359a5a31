//! Charges: the spend and tokens of jobs that ended (and the starts counted per minute),
//! written to the shared counters by one task per worker, a few milliseconds' worth at a
//! time (one compare-and-set per tenant per write); and the budget warnings those writes
//! cross.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{Counters, Delta, Tally, lock, put_if, read};
use crate::config::TenantPolicy;
use crate::policy::budget::{self, Crossing, Measure, Period, Spend};
use crate::policy::rate::Rate;

/// Charges arriving within this long of a write go together into the next one.
const COALESCE: Duration = Duration::from_millis(2);
/// How long a charge is retried while the bucket cannot be written, before it is given up
/// (logged; the spend is still in the Postgres ledger).
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

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

pub(super) struct Charge {
    pub(super) tenant: String,
    pub(super) token: String,
    pub(super) policy: TenantPolicy,
    pub(super) spend: Delta,
    pub(super) rate: Delta,
    /// Told when the charge is written (jobs that end wait for it; starts do not).
    pub(super) done: Option<oneshot::Sender<()>>,
}

pub(super) struct Writer {
    pub(super) kv: kv::Store,
    pub(super) counters: Arc<Mutex<Counters>>,
    pub(super) client: async_nats::Client,
    pub(super) events: String,
    pub(super) worker_id: String,
}

impl Writer {
    pub(super) async fn run(self, mut rx: mpsc::UnboundedReceiver<Charge>) {
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

    /// Write one tenant's charges with compare-and-set, publish the budget warnings that
    /// write crosses, and release the jobs waiting for it.
    async fn write(&self, group: Vec<Charge>) {
        let Some(first) = group.first() else { return };
        let (token, tenant, policy) = (first.token.clone(), first.tenant.clone(), &first.policy);
        let spend = group.iter().fold(Delta::default(), |d, c| d.plus(c.spend));
        let rate = group.iter().fold(Delta::default(), |d, c| d.plus(c.rate));
        if !spend.is_zero()
            && let Some((before, after, now)) = self.cas::<Spend>(&token, &tenant, spend).await
        {
            for crossing in budget::crossings(policy, &before, &after) {
                self.warn(&tenant, &token, crossing, now).await;
            }
        }
        if !rate.is_zero() {
            self.cas::<Rate>(&token, &tenant, rate).await;
        }
        for c in group {
            if let Some(done) = c.done {
                let _ = done.send(());
            }
        }
    }

    /// Add `delta` to the tenant's counter of kind `V` by compare-and-set, retrying on
    /// races; the value before and after (as of the write) on success.
    async fn cas<V: Tally>(
        &self,
        token: &str,
        tenant: &str,
        delta: Delta,
    ) -> Option<(V, V, DateTime<Utc>)> {
        let key = format!("{}{token}", V::PREFIX);
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut failures = 0u32;
        let mut known = V::table(&mut lock(&self.counters)).seen.get(token).cloned();
        let written = loop {
            let now = Utc::now();
            let (revision, before) = known.clone().unwrap_or_default();
            let after = before.add(now, &self.worker_id, &delta);
            match put_if(&self.kv, &key, &after, revision).await {
                Ok(new_revision) => {
                    let before = before.add(now, &self.worker_id, &Delta::default());
                    break Some((before, after, new_revision, now));
                }
                Err(e) => {
                    // Someone else wrote first (usually), or the bucket is unreachable: read
                    // again and retry; back off once it is not a plain race.
                    failures += 1;
                    if started.elapsed() > GIVE_UP_AFTER {
                        tracing::warn!(error = %e, tenant, key, "cannot write a tenant counter; this charge is not counted");
                        break None;
                    }
                    if failures > 3 {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                    match read::<V>(&self.kv, &key).await {
                        Ok(value) => known = value,
                        Err(e) => tracing::debug!(error = %e, "cannot read a tenant counter"),
                    }
                }
            }
        };
        let mut c = lock(&self.counters);
        let table = V::table(&mut c);
        table.settle(token, delta);
        let (before, after, revision, now) = written?;
        table.learn(token, revision, after.clone());
        Some((before, after, now))
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
