//! The fleet's shared tenant counters: JetStream KV entries per tenant (`spend.<tenant>`,
//! `rate.<tenant>`, `busy.<tenant>`), changed only by compare-and-set, and a copy of every
//! entry in each worker, kept current by a KV watch, that admission reads without a round
//! trip. Here: the handle jobs use (refusals, starts, slots, charges), the copy and the watch;
//! [`charges`]: the task that writes charges and publishes budget warnings.
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
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

mod charges;

use charges::{Charge, Writer};

use super::budget::{self, Cost, Spend};
use super::rate::{self, Rate};
use super::slots::{self, Busy};
use crate::config::{NatsConfig, TenantPolicy};

/// Compare-and-set attempts of one reservation before the job waits and tries again later.
const RESERVE_TRIES: usize = 20;
/// Keys are kept this long after their last write (a monthly counter must outlive its month).
const KEEP_KEYS: Duration = Duration::from_secs(40 * 24 * 3600);

/// A tenant name as a KV key and subject token.
pub(crate) use crate::contract::subject_token as token;

/// What one charge adds: to the spend counter (`usd`, `tokens`) or the rate counter
/// (`requests`, `tokens`); and what it takes from the charging worker's budget holding
/// (`unhold`: the reservation the spend used, and what the worker gives back).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Delta {
    pub usd: f64,
    pub tokens: u64,
    pub requests: u64,
    pub unhold: Cost,
}

impl Delta {
    fn plus(self, o: Delta) -> Delta {
        Delta {
            usd: self.usd + o.usd,
            tokens: self.tokens.saturating_add(o.tokens),
            requests: self.requests.saturating_add(o.requests),
            unhold: self.unhold.plus(o.unhold),
        }
    }

    fn minus(self, o: Delta) -> Delta {
        Delta {
            usd: self.usd - o.usd,
            tokens: self.tokens.saturating_sub(o.tokens),
            requests: self.requests.saturating_sub(o.requests),
            unhold: self.unhold.minus(o.unhold),
        }
    }

    fn is_zero(&self) -> bool {
        self.tokens == 0
            && self.requests == 0
            && self.usd.abs() < 1e-12
            && self.unhold.usd.abs() < 1e-12
            && self.unhold.tokens.abs() < 1e-9
    }
}

/// A kind of shared counter: its key prefix, how a charge changes it, and its table here.
trait Tally: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static {
    const PREFIX: &'static str;
    /// This counter plus `d`, charged by `worker`.
    fn add(&self, now: DateTime<Utc>, worker: &str, d: &Delta) -> Self;
    fn table(c: &mut Counters) -> &mut Table<Self>;
}

impl Tally for Spend {
    const PREFIX: &'static str = "spend.";
    fn add(&self, now: DateTime<Utc>, worker: &str, d: &Delta) -> Self {
        let spent = Spend::add(self, now, d.usd, d.tokens);
        if d.unhold == Cost::default() {
            spent
        } else {
            spent.hold(now, worker, Cost::default().minus(d.unhold))
        }
    }
    fn table(c: &mut Counters) -> &mut Table<Self> {
        &mut c.spend
    }
}

impl Tally for Rate {
    const PREFIX: &'static str = "rate.";
    fn add(&self, now: DateTime<Utc>, _: &str, d: &Delta) -> Self {
        Rate::add(self, now, d.requests, d.tokens)
    }
    fn table(c: &mut Counters) -> &mut Table<Self> {
        &mut c.rate
    }
}

/// One kind of counter, for every tenant.
struct Table<V> {
    /// The last value of each tenant's counter this worker knows, with its revision.
    seen: HashMap<String, (u64, V)>,
    /// Charges not yet written (this worker's only).
    pending: HashMap<String, Delta>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            pending: HashMap::new(),
        }
    }
}

impl<V: Tally> Table<V> {
    fn learn(&mut self, token: &str, revision: u64, value: V) {
        match self.seen.get_mut(token) {
            Some((r, _)) if *r >= revision => {}
            Some(slot) => *slot = (revision, value),
            None => {
                self.seen.insert(token.to_string(), (revision, value));
            }
        }
    }

    /// The counter as this worker sees it now: the last known value plus its own charges.
    fn current(&self, token: &str, worker: &str, now: DateTime<Utc>) -> V {
        let seen = self
            .seen
            .get(token)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        seen.add(
            now,
            worker,
            &self.pending.get(token).copied().unwrap_or_default(),
        )
    }

    fn owe(&mut self, token: &str, d: Delta) {
        let p = self.pending.entry(token.to_string()).or_default();
        *p = p.plus(d);
    }

    fn settle(&mut self, token: &str, d: Delta) {
        if let Some(p) = self.pending.get_mut(token) {
            *p = p.minus(d);
            if p.is_zero() {
                self.pending.remove(token);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    spend: Table<Spend>,
    rate: Table<Rate>,
    /// Jobs in flight per tenant, by worker (`busy.<tenant>`), with revisions.
    busy: HashMap<String, (u64, Busy)>,
}

/// Handle to the shared counters (cheap to clone).
#[derive(Clone)]
pub(crate) struct Ledger {
    kv: kv::Store,
    counters: Arc<Mutex<Counters>>,
    charges: mpsc::UnboundedSender<Charge>,
    /// Starts this worker took from a tenant's minute and has not used: (minute, left).
    leases: Arc<Mutex<Leases>>,
    /// One change at a time per tenant to what this worker takes from the shared counters.
    gates: Arc<Mutex<Gates>>,
    /// Slots this worker holds per tenant (`max_in_flight`), as it last wrote or will write.
    held: Arc<Mutex<HashMap<String, u64>>>,
    /// Budget this worker holds per tenant for its jobs in flight.
    allowances: Arc<Mutex<HashMap<String, Allowance>>>,
    worker_id: Arc<str>,
}

impl Ledger {
    /// Open (or create) the bucket, load every counter, and keep them current.
    pub(crate) async fn start(
        js: &jetstream::Context,
        client: async_nats::Client,
        nats: &NatsConfig,
        worker_id: String,
    ) -> Result<Self, String> {
        let kv = open_bucket(js, &nats.tenant_bucket, nats.replicas).await?;
        let counters = Arc::new(Mutex::new(Counters::default()));
        let watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("cannot watch the tenant counters: {e}"))?;
        tokio::spawn(follow(kv.clone(), watch, Arc::downgrade(&counters)));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            kv: kv.clone(),
            counters: counters.clone(),
            client,
            events: format!("{}.events.budget", nats.subject_prefix),
            worker_id: worker_id.clone(),
        };
        // Ends when every handle is gone (the process is ending): charges of jobs finishing
        // during shutdown are still written.
        tokio::spawn(writer.run(rx));
        let ledger = Self {
            kv,
            counters,
            charges: tx,
            leases: Arc::default(),
            gates: Arc::default(),
            held: Arc::default(),
            allowances: Arc::default(),
            worker_id: worker_id.into(),
        };
        tokio::spawn(confirm(ledger.downgrade()));
        Ok(ledger)
    }

    /// Why a job of `tenant` may not start now (a spent budget), from this worker's copy of
    /// the counters and its own charges not yet written.
    pub(crate) fn refusal(&self, tenant: &str, policy: &TenantPolicy) -> Option<String> {
        let now = Utc::now();
        let spend = lock(&self.counters)
            .spend
            .current(&token(tenant), &self.worker_id, now);
        budget::refusal(policy, &spend, now)
    }

    /// Whether a job of `tenant` may start now under its rate limits (requests and tokens per
    /// minute, fleet-wide), as far as this worker's copy of the counters tells: a cheap
    /// filter before [`Self::reserve`].
    pub(crate) fn may_start(&self, tenant: &str, policy: &TenantPolicy) -> bool {
        let now = Utc::now();
        let token = token(tenant);
        if let Some(max) = policy.max_in_flight {
            let busy = lock(&self.counters)
                .busy
                .get(&token)
                .map_or(0, |(_, b)| b.total(now));
            if busy >= u64::from(max) {
                return false;
            }
        }
        if policy.requests_per_minute.is_none() && policy.tokens_per_minute.is_none() {
            return true;
        }
        let mut rate = lock(&self.counters)
            .rate
            .current(&token, &self.worker_id, now);
        if policy.requests_per_minute.is_some() {
            // Starts this worker holds are not a reason to wait.
            let held = lock(&self.leases)
                .get(&token)
                .filter(|l| l.0 == rate.minute)
                .map_or(0, |l| l.1);
            rate.requests = rate.requests.saturating_sub(held);
        }
        rate::allows(policy, &rate)
    }

    /// Count a job's start against `requests_per_minute`, so the fleet never starts more
    /// than the limit in a UTC minute; `false` (nothing counted) when the minute is full.
    ///
    /// Starts are taken from the shared counter by compare-and-set in blocks (a sixteenth of
    /// what the minute has left, 1 to 64), held by this worker for its next jobs: one write
    /// per block instead of per job. Starts a worker holds at the end of a minute are lost,
    /// so a tenant may get a little less than its limit, never more. Tenants without the
    /// limit are not counted.
    pub(crate) async fn reserve(&self, tenant: &str, policy: &TenantPolicy) -> bool {
        let Some(limit) = policy.requests_per_minute else {
            return true;
        };
        let token = token(tenant);
        if self.take_held(&token) {
            return true;
        }
        // One block taken at a time per worker and tenant.
        let gate = self.gate(&token);
        let _one = gate.lock().await;
        if self.take_held(&token) {
            return true;
        }
        let key = format!("{}{token}", Rate::PREFIX);
        let mut known = lock(&self.counters).rate.seen.get(&token).cloned();
        for _ in 0..RESERVE_TRIES {
            let now = Utc::now();
            let (revision, seen) = known.clone().unwrap_or_default();
            let current = seen.add(now, 0, 0);
            let room = u64::from(limit).saturating_sub(current.requests);
            if room == 0 {
                return false;
            }
            let block = (room / 16).clamp(1, 64);
            let next = current.add(now, block, 0);
            match put_if(&self.kv, &key, &next, revision).await {
                Ok(revision) => {
                    let minute = next.minute.clone();
                    lock(&self.counters).rate.learn(&token, revision, next);
                    lock(&self.leases).insert(token, (minute, block - 1));
                    return true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "rate counter changed meanwhile; retrying");
                    known = match read::<Rate>(&self.kv, &key).await {
                        Ok(Some((revision, value))) => {
                            lock(&self.counters)
                                .rate
                                .learn(&token, revision, value.clone());
                            Some((revision, value))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, tenant, "cannot read the tenant's rate counter; the job waits");
                            return false;
                        }
                    };
                }
            }
        }
        false
    }

    /// Take one of the tenant's `max_in_flight` slots, fleet-wide, by compare-and-set on its
    /// shared counter; `false` when all are in use. Tenants without the limit take none.
    pub(crate) async fn acquire_slot(&self, tenant: &str, policy: &TenantPolicy) -> bool {
        let Some(max) = policy.max_in_flight else {
            return true;
        };
        let token = token(tenant);
        let gate = self.gate(&token);
        let _one = gate.lock().await;
        let jobs = lock(&self.held).get(&token).copied().unwrap_or(0) + 1;
        let written = self.write_slots(&token, jobs, Some(u64::from(max))).await;
        if written {
            lock(&self.held).insert(token, jobs);
        }
        written
    }

    /// Give back a slot [`Self::acquire_slot`] took. If the counter cannot be written, the
    /// next confirmation (or the holding going stale) corrects it.
    pub(crate) async fn release_slot(&self, tenant: &str) {
        let token = token(tenant);
        if lock(&self.held).get(&token).is_none_or(|n| *n == 0) {
            return;
        }
        let gate = self.gate(&token);
        let _one = gate.lock().await;
        let jobs = {
            let mut held = lock(&self.held);
            let jobs = held.get(&token).copied().unwrap_or(0).saturating_sub(1);
            held.insert(token.clone(), jobs);
            jobs
        };
        if self.write_slots(&token, jobs, None).await && jobs == 0 {
            let mut held = lock(&self.held);
            if held.get(&token) == Some(&0) {
                held.remove(&token);
            }
        }
    }

    /// Write that this worker holds `jobs` of the tenant's slots (refused when that would put
    /// the fleet over `max`).
    async fn write_slots(&self, token: &str, jobs: u64, max: Option<u64>) -> bool {
        let key = format!("busy.{token}");
        let mut known = lock(&self.counters).busy.get(token).cloned();
        for _ in 0..RESERVE_TRIES {
            let now = Utc::now();
            let (revision, current) = known.clone().unwrap_or_default();
            let next = current.with(&self.worker_id, jobs, now);
            if max.is_some_and(|max| next.total(now) > max) {
                return false;
            }
            match put_if(&self.kv, &key, &next, revision).await {
                Ok(revision) => {
                    learn_busy(&mut lock(&self.counters), token, revision, next);
                    return true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "in-flight counter changed meanwhile; retrying");
                    known = match read::<Busy>(&self.kv, &key).await {
                        Ok(Some((revision, busy))) => {
                            learn_busy(&mut lock(&self.counters), token, revision, busy.clone());
                            Some((revision, busy))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read a tenant's in-flight counter");
                            return false;
                        }
                    };
                }
            }
        }
        false
    }

    fn gate(&self, token: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.gates)
            .entry(token.to_string())
            .or_default()
            .clone()
    }

    fn downgrade(&self) -> WeakLedger {
        WeakLedger {
            kv: self.kv.clone(),
            counters: Arc::downgrade(&self.counters),
            charges: self.charges.downgrade(),
            leases: Arc::downgrade(&self.leases),
            gates: Arc::downgrade(&self.gates),
            held: Arc::downgrade(&self.held),
            allowances: Arc::downgrade(&self.allowances),
            worker_id: self.worker_id.clone(),
        }
    }

    /// Use one of the starts this worker holds for `token` in the current minute.
    fn take_held(&self, token: &str) -> bool {
        let minute = Rate::default().add(Utc::now(), 0, 0).minute;
        let mut leases = lock(&self.leases);
        match leases.get_mut(token) {
            Some((m, left)) if *m == minute && *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Reserve `need` (a call's worst case) of the tenant's budgets for one of this
    /// worker's jobs, which holds `already` from earlier calls: out of what the worker holds for the tenant, else by taking more from
    /// the shared counter by compare-and-set while `spent + held <= budget`
    /// ([`budget`]). Give it back with the job's charge ([`Self::charge`]).
    pub(crate) async fn reserve_budget(
        &self,
        tenant: &str,
        policy: &TenantPolicy,
        need: Cost,
        already: Cost,
    ) -> Reserved {
        let token = token(tenant);
        // A job's first reservation makes it one of the worker's jobs of the tenant.
        let first = u64::from(already == Cost::default());
        // Most reservations come out of what this worker holds already: no lock to wait for.
        if self.take_allowance(&token, need, first) {
            return Reserved::Yes;
        }
        let gate = self.gate(&format!("$budget.{token}"));
        let _one = gate.lock().await;
        // While a block is taken, the holding is not given back by a job that ends.
        lock(&self.allowances)
            .entry(token.clone())
            .or_default()
            .reserving += 1;
        let answer = if self.take_allowance(&token, need, first) {
            Reserved::Yes
        } else {
            self.take_block(&token, tenant, policy, need, already, first)
                .await
        };
        let mut all = lock(&self.allowances);
        if let Some(a) = all.get_mut(&token) {
            a.reserving = a.reserving.saturating_sub(1);
            if a.jobs == 0 && a.reserving == 0 && a.held.is_nothing() {
                all.remove(&token);
            }
        }
        answer
    }

    /// Take a block of the tenant's budget from the shared counter (compare-and-set) and
    /// reserve `need` out of it.
    async fn take_block(
        &self,
        token: &str,
        tenant: &str,
        policy: &TenantPolicy,
        need: Cost,
        already: Cost,
        first: u64,
    ) -> Reserved {
        let token = token.to_string();
        let key = format!("{}{token}", Spend::PREFIX);
        let mut known = lock(&self.counters).spend.seen.get(&token).cloned();
        for _ in 0..RESERVE_TRIES {
            let now = Utc::now();
            let (revision, seen) = known.clone().unwrap_or_default();
            let current = seen.at(now);
            let free = lock(&self.allowances)
                .get(&token)
                .map_or(Cost::default(), |a| a.free.floor());
            let short = need.minus(free).floor();
            let room = budget::room(policy, &current, now, true).floor();
            if !room.covers(short) {
                let why = budget::no_room(policy, &current, short, now);
                // Even with nothing held (but what this job holds already) it would not fit:
                // it cannot run this period.
                let whole = need.plus(already);
                let bare = budget::room(policy, &current, now, false);
                return if bare.covers(whole) {
                    Reserved::Wait(why)
                } else {
                    Reserved::No { why, room: bare }
                };
            }
            // Take a block: this call's shortfall, or a sixteenth of the room if more, so
            // that the next jobs reserve without a write (a measure without a budget has
            // infinite room: only the shortfall is held).
            let block_of = |short: f64, room: f64| {
                if room.is_finite() {
                    short.max(room / 16.0).min(room)
                } else {
                    short
                }
            };
            let block = Cost {
                usd: block_of(short.usd, room.usd),
                tokens: block_of(short.tokens, room.tokens),
            };
            let next = current.hold(now, &self.worker_id, block);
            match put_if(&self.kv, &key, &next, revision).await {
                Ok(revision) => {
                    lock(&self.counters).spend.learn(&token, revision, next);
                    let mut all = lock(&self.allowances);
                    let a = all.entry(token.clone()).or_default();
                    a.held = a.held.plus(block);
                    a.free = a.free.plus(block).minus(need);
                    a.jobs += first;
                    return Reserved::Yes;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "spend counter changed meanwhile; retrying");
                    known = match read::<Spend>(&self.kv, &key).await {
                        Ok(Some((revision, value))) => {
                            lock(&self.counters)
                                .spend
                                .learn(&token, revision, value.clone());
                            Some((revision, value))
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(error = %e, tenant, "cannot read the tenant's spend counter; the job waits");
                            return Reserved::Wait(
                                "the tenant's spend counter cannot be read".into(),
                            );
                        }
                    };
                }
            }
        }
        Reserved::Wait("the tenant's spend counter is busy".into())
    }

    /// Rewrite this worker's holding of a tenant's budget with the time now (so that it does
    /// not go stale while its jobs run).
    async fn confirm_hold(&self, token: &str) {
        let key = format!("{}{token}", Spend::PREFIX);
        let mut known = lock(&self.counters).spend.seen.get(token).cloned();
        for _ in 0..RESERVE_TRIES {
            let now = Utc::now();
            let (revision, seen) = known.clone().unwrap_or_default();
            let next = seen.hold(now, &self.worker_id, Cost::default());
            match put_if(&self.kv, &key, &next, revision).await {
                Ok(revision) => {
                    lock(&self.counters).spend.learn(token, revision, next);
                    return;
                }
                Err(_) => match read::<Spend>(&self.kv, &key).await {
                    Ok(value) => known = value,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read a tenant's spend counter");
                        return;
                    }
                },
            }
        }
    }

    /// Serve `need` from what this worker already holds for the tenant, if it can.
    fn take_allowance(&self, token: &str, need: Cost, first: u64) -> bool {
        let mut all = lock(&self.allowances);
        match all.get_mut(token) {
            Some(a) if a.free.covers(need) => {
                a.free = a.free.minus(need);
                a.jobs += first;
                true
            }
            _ => false,
        }
    }

    /// Add a job's spend (budgets) and tokens (tokens per minute) to its tenant's counters;
    /// returns once they are written (or given up). `reserved`: what the job reserved with
    /// [`Self::reserve_budget`] (its spend comes out of the worker's holding, the rest goes
    /// back to it, and a worker with no other job of the tenant gives its holding back).
    pub(crate) async fn charge(
        &self,
        tenant: &str,
        policy: &TenantPolicy,
        usd: f64,
        tokens: u64,
        reserved: Option<Cost>,
    ) {
        let token = token(tenant);
        let unhold = match reserved {
            Some(r) => {
                let spent = Cost {
                    usd,
                    tokens: tokens as f64,
                };
                self.settle_allowance(&token, r, spent)
            }
            None => Cost::default(),
        };
        let spend = if policy.has_budget() {
            Delta {
                usd,
                tokens,
                requests: 0,
                unhold,
            }
        } else {
            Delta::default()
        };
        let rate = if policy.tokens_per_minute.is_some() {
            Delta {
                tokens,
                ..Delta::default()
            }
        } else {
            Delta::default()
        };
        if spend.is_zero() && rate.is_zero() {
            return;
        }
        {
            let mut c = lock(&self.counters);
            c.spend.owe(&token, spend);
            c.rate.owe(&token, rate);
        }
        let (done, written) = oneshot::channel();
        let charge = Charge {
            tenant: tenant.to_string(),
            token,
            policy: policy.clone(),
            spend,
            rate,
            done: Some(done),
        };
        if self.charges.send(charge).is_ok() {
            let _ = written.await;
        }
    }

    /// A job that reserved `reserved` has cost `spent`: take the spend out of this worker's
    /// holding (what the charge removes from the shared one), give the rest back to it, and
    /// when no job of the tenant is left here, give the whole holding back.
    fn settle_allowance(&self, token: &str, reserved: Cost, spent: Cost) -> Cost {
        let mut all = lock(&self.allowances);
        let Some(a) = all.get_mut(token) else {
            return Cost::default();
        };
        a.jobs = a.jobs.saturating_sub(1);
        a.held = a.held.minus(spent).floor();
        a.free = a.free.plus(reserved).minus(spent);
        let mut unhold = spent;
        if a.jobs == 0 && a.reserving == 0 {
            unhold = unhold.plus(a.held);
            all.remove(token);
        }
        unhold
    }
}

/// The answer to a budget reservation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reserved {
    Yes,
    /// Jobs in flight hold the room; it may come back when they end.
    Wait(String),
    /// Even with nothing held the budget cannot cover it this period: `room` is what the
    /// budget has left for the job (what it holds already included).
    No {
        why: String,
        room: Cost,
    },
}

/// What this worker holds of one tenant's budget: `held` (its holding in the shared
/// counter), `free` (the part no job of its has reserved), and its jobs holding the rest.
#[derive(Debug, Clone, Copy, Default)]
struct Allowance {
    held: Cost,
    free: Cost,
    jobs: u64,
    /// Reservations taking a block from the shared counter now.
    reserving: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Write `value` under `key` if the key is still at `revision` (0: absent): its new
/// revision, or why not (usually: someone else wrote first).
async fn put_if(
    kv: &kv::Store,
    key: &str,
    value: &impl Serialize,
    revision: u64,
) -> Result<u64, String> {
    let value = Bytes::from(serde_json::to_vec(value).map_err(|e| e.to_string())?);
    if revision == 0 {
        kv.create(key, value).await.map_err(|e| e.to_string())
    } else {
        kv.update(key, value, revision)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The value of `key` and its revision; `None` when it is absent (or deleted). An unreadable
/// value reads as the default (the next write replaces it).
async fn read<V: DeserializeOwned + Default>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(u64, V)>, String> {
    match kv.entry(key).await {
        Ok(Some(entry)) if matches!(entry.operation, kv::Operation::Put) => Ok(Some((
            entry.revision,
            serde_json::from_slice(&entry.value).unwrap_or_default(),
        ))),
        Ok(_) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn learn_busy(c: &mut Counters, token: &str, revision: u64, busy: Busy) {
    match c.busy.get_mut(token) {
        Some((r, _)) if *r >= revision => {}
        Some(slot) => *slot = (revision, busy),
        None => {
            c.busy.insert(token.to_string(), (revision, busy));
        }
    }
}

/// A [`Ledger`] that does not keep it alive (for its own background task).
struct WeakLedger {
    kv: kv::Store,
    counters: std::sync::Weak<Mutex<Counters>>,
    charges: mpsc::WeakUnboundedSender<Charge>,
    leases: std::sync::Weak<Mutex<Leases>>,
    gates: std::sync::Weak<Mutex<Gates>>,
    held: std::sync::Weak<Mutex<HashMap<String, u64>>>,
    allowances: std::sync::Weak<Mutex<HashMap<String, Allowance>>>,
    worker_id: Arc<str>,
}

impl WeakLedger {
    fn upgrade(&self) -> Option<Ledger> {
        Some(Ledger {
            kv: self.kv.clone(),
            counters: self.counters.upgrade()?,
            charges: self.charges.upgrade()?,
            leases: self.leases.upgrade()?,
            gates: self.gates.upgrade()?,
            held: self.held.upgrade()?,
            allowances: self.allowances.upgrade()?,
            worker_id: self.worker_id.clone(),
        })
    }
}

/// Confirm this worker's slot holdings every [`slots::CONFIRM_EVERY`] (so they do not go
/// stale while its jobs run), while the ledger is in use.
async fn confirm(weak: WeakLedger) {
    loop {
        tokio::time::sleep(slots::CONFIRM_EVERY).await;
        let Some(ledger) = weak.upgrade() else { return };
        let holdings: Vec<(String, u64)> = lock(&ledger.held)
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        for (token, _) in holdings {
            let gate = ledger.gate(&token);
            let _one = gate.lock().await;
            let jobs = lock(&ledger.held).get(&token).copied().unwrap_or(0);
            if ledger.write_slots(&token, jobs, None).await && jobs == 0 {
                lock(&ledger.held).remove(&token);
            }
        }
        // Budget holdings too: confirmed (a zero charge rewrites the holding's time).
        let budgets: Vec<String> = lock(&ledger.allowances).keys().cloned().collect();
        for token in budgets {
            let gate = ledger.gate(&format!("$budget.{token}"));
            let _one = gate.lock().await;
            ledger.confirm_hold(&token).await;
        }
    }
}

type Leases = HashMap<String, (String, u64)>;
type Gates = HashMap<String, Arc<tokio::sync::Mutex<()>>>;

/// The bucket, created when missing. Created as the stream KV buckets are (what
/// `create_key_value` would make): that call first asks for the account's JetStream info,
/// whose NATS 2.9 answer async-nats 0.51 cannot parse ("data did not match any variant of
/// untagged enum Response"), so it fails on 2.9 whatever the bucket.
async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    let stream = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("llm-worker: tenant counters (spend, rate)".into()),
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
    crate::nats::ensure_stream(js, stream, replicas)
        .await
        .map_err(|e| format!("cannot create the tenant bucket {bucket}: {e}"))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| format!("cannot open the tenant bucket {bucket}: {e}"))
}

fn learn_entry<V: Tally>(counters: &Mutex<Counters>, token: &str, entry: &kv::Entry) {
    match serde_json::from_slice::<V>(&entry.value) {
        Ok(v) => V::table(&mut lock(counters)).learn(token, entry.revision, v),
        Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable tenant counter"),
    }
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
            if !matches!(entry.operation, kv::Operation::Put) {
                continue;
            }
            if let Some(token) = entry.key.strip_prefix(Spend::PREFIX) {
                learn_entry::<Spend>(&counters, token, &entry);
            } else if let Some(token) = entry.key.strip_prefix(Rate::PREFIX) {
                learn_entry::<Rate>(&counters, token, &entry);
            } else if let Some(token) = entry.key.strip_prefix("busy.") {
                match serde_json::from_slice::<Busy>(&entry.value) {
                    Ok(busy) => learn_busy(&mut lock(&counters), token, entry.revision, busy),
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "unreadable tenant counter")
                    }
                }
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
        let mut t = Table::<Spend>::default();
        let spend = |t| Spend {
            day_tokens: t,
            ..Default::default()
        };
        t.learn("a", 5, spend(50));
        t.learn("a", 4, spend(40));
        assert_eq!(t.seen["a"], (5, spend(50)));
        t.learn("a", 6, spend(60));
        assert_eq!(t.seen["a"].0, 6);
    }

    #[test]
    fn a_workers_own_unwritten_charges_count_until_written() {
        let now = Utc::now();
        let mut t = Table::<Rate>::default();
        let one = Delta {
            requests: 1,
            ..Delta::default()
        };
        t.owe("a", one);
        t.owe("a", one);
        assert_eq!(t.current("a", "w", now).requests, 2);
        t.settle("a", one);
        t.learn("a", 1, Rate::default().add(now, 1, 0));
        assert_eq!(t.current("a", "w", now).requests, 2);
        t.settle("a", one);
        assert!(t.pending.is_empty());
    }
}
