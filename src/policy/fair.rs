//! Weighted fair share of a worker's job slots across tenants (no I/O).
//!
//! The pull loop parks pulled messages here, one queue per tenant, and takes the next job to
//! run from the tenant that is furthest behind its share: stride scheduling, where each job
//! run advances its tenant's "pass" by `STRIDE / weight`, and the tenant with the lowest pass
//! goes next (ties in arrival order). A tenant that was idle starts at the current pass, not
//! at the one it had: idle time earns no credit to burst later. So with tenants A (weight 1,
//! 20,000 jobs parked) and B (weight 1, 20 jobs), A and B alternate until B's queue is empty;
//! with weight 3 B would get three jobs for every one of A's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

/// The pass one job advances a tenant of weight 1.
const STRIDE: u64 = 1 << 20;

struct Tenant<T> {
    name: Arc<str>,
    queue: VecDeque<(T, usize)>,
    pass: u64,
    weight: u32,
}

/// An emptied queue kept for the next tenant up to this capacity (a tenant's queue empties
/// and fills again all the time; reallocating it each time costs more than the jobs' own
/// bookkeeping).
const SPARE_CAPACITY: usize = 8192;

/// Parked items of many tenants, taken out by weighted fair share.
pub(crate) struct FairQueue<T> {
    tenants: HashMap<Arc<str>, Tenant<T>>,
    /// One entry per tenant with parked items: (pass, arrival order, tenant).
    ready: BinaryHeap<Reverse<(u64, u64, Arc<str>)>>,
    spare: Option<VecDeque<(T, usize)>>,
    /// The pass of the last item taken: where a tenant becoming active starts.
    now: u64,
    arrivals: u64,
    len: usize,
    bytes: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            tenants: HashMap::new(),
            ready: BinaryHeap::new(),
            spare: None,
            now: 0,
            arrivals: 0,
            len: 0,
            bytes: 0,
        }
    }
}

impl<T> FairQueue<T> {
    /// Park `item` (`bytes` long) of `tenant`, whose weight is `weight` (at least 1).
    pub fn push(&mut self, tenant: &str, weight: u32, item: T, bytes: usize) {
        self.len += 1;
        self.bytes += bytes;
        let now = self.now;
        let t = match self.tenants.get_mut(tenant) {
            Some(t) => t,
            None => {
                let name: Arc<str> = Arc::from(tenant);
                let queue = self.spare.take().unwrap_or_default();
                self.tenants.entry(name.clone()).or_insert(Tenant {
                    name,
                    queue,
                    pass: now,
                    weight,
                })
            }
        };
        t.weight = weight.max(1);
        t.queue.push_back((item, bytes));
        if t.queue.len() == 1 {
            // Becoming active: no credit for the time it was idle.
            t.pass = t.pass.max(now);
            self.arrivals += 1;
            self.ready
                .push(Reverse((t.pass, self.arrivals, t.name.clone())));
        }
    }

    /// The next item by fair share, with its tenant.
    #[cfg(test)]
    pub fn pop(&mut self) -> Option<(Arc<str>, T)> {
        let Reverse((pass, _, name)) = self.ready.pop()?;
        self.take(pass, name)
    }

    /// Take the oldest item of `name`, whose ready entry (at `pass`) was just removed.
    fn take(&mut self, pass: u64, name: Arc<str>) -> Option<(Arc<str>, T)> {
        let t = self.tenants.get_mut(&name)?;
        let (item, bytes) = t.queue.pop_front()?;
        self.len -= 1;
        self.bytes -= bytes;
        self.now = pass;
        t.pass = pass + STRIDE / u64::from(t.weight.max(1));
        if t.queue.is_empty() {
            // Forget idle tenants (keeping their pass would only matter while active).
            if let Some(t) = self.tenants.remove(&name)
                && t.queue.capacity() <= SPARE_CAPACITY
            {
                self.spare = Some(t.queue);
            }
        } else {
            self.arrivals += 1;
            self.ready
                .push(Reverse((t.pass, self.arrivals, name.clone())));
        }
        Some((name, item))
    }

    /// The next item by fair share among the tenants `open` lets start now (asked about
    /// the tenant's oldest item, in fair-share order, until one is open; `open` is called
    /// once with `true` at most). Tenants passed over keep their place.
    pub fn pop_where(&mut self, mut open: impl FnMut(&str, &T) -> bool) -> Option<(Arc<str>, T)> {
        let mut passed = Vec::new();
        let mut found = None;
        while let Some(entry) = self.ready.pop() {
            let Reverse((_, _, name)) = &entry;
            let head = self.tenants.get(name).and_then(|t| t.queue.front());
            if head.is_some_and(|(item, _)| open(name, item)) {
                found = Some(entry);
                break;
            }
            passed.push(entry);
        }
        self.ready.extend(passed);
        let Reverse((pass, _, name)) = found?;
        self.take(pass, name)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the items parked (as given to [`Self::push`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Every parked item (to keep them alive with the queue).
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.tenants
            .values()
            .flat_map(|t| t.queue.iter().map(|(item, _)| item))
    }

    /// Take every parked item out (to hand them back).
    pub fn drain(&mut self) -> Vec<T> {
        self.ready.clear();
        self.len = 0;
        self.bytes = 0;
        self.tenants
            .drain()
            .flat_map(|(_, t)| t.queue.into_iter().map(|(item, _)| item))
            .collect()
    }
}

/// What the pull loop reads of a job before it is decoded: its tenant (for its fair share)
/// and its `timeout_ms` (how long it may wait parked).
#[derive(Debug, PartialEq)]
pub(crate) struct Peeked {
    pub tenant: String,
    pub timeout_ms: Option<u64>,
}

/// Peek at a job message: the tenant is the subject's last token when tenants are bound to
/// subjects, else the body's `tenant` (`default` when absent). A body that does not parse
/// goes to a queue of its own ("") and is answered `invalid_job` when it runs.
pub(crate) fn peek(payload: &[u8], subject_tenant: Option<&str>, max_bytes: usize) -> Peeked {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        tenant: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        timeout_ms: Option<u64>,
    }
    let parsed = (payload.len() <= max_bytes)
        .then(|| serde_json::from_slice::<Peek<'_>>(payload).ok())
        .flatten();
    let timeout_ms = parsed.as_ref().and_then(|p| p.timeout_ms);
    let tenant = match (subject_tenant, parsed) {
        (Some(t), _) => t.to_string(),
        (None, Some(Peek { tenant: None, .. })) => "default".into(),
        (
            None,
            Some(Peek {
                tenant: Some(t), ..
            }),
        ) if t.len() <= 256 => t.into_owned(),
        _ => String::new(),
    };
    Peeked { tenant, timeout_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(q: &mut FairQueue<u32>) -> String {
        std::iter::from_fn(|| q.pop())
            .map(|(t, _)| t.to_string())
            .collect()
    }

    #[test]
    fn a_small_tenant_behind_a_flood_takes_turns_with_it() {
        let mut q = FairQueue::default();
        for i in 0..6 {
            q.push("A", 1, i, 10);
        }
        for i in 0..2 {
            q.push("B", 1, i, 10);
        }
        assert_eq!((q.len(), q.bytes()), (8, 80));
        assert_eq!(order(&mut q), "ABABAAAA");
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn weights_divide_the_slots() {
        let mut q = FairQueue::default();
        for i in 0..8 {
            q.push("A", 1, i, 1);
            q.push("B", 3, i, 1);
        }
        let first: String = order(&mut q).chars().take(8).collect();
        assert_eq!(first.matches('B').count(), 6, "{first}");
    }

    #[test]
    fn an_idle_tenant_earns_no_credit() {
        let mut q = FairQueue::default();
        for i in 0..4 {
            q.push("A", 1, i, 1);
        }
        assert_eq!(q.pop().map(|(t, _)| t).as_deref(), Some("A"));
        assert_eq!(q.pop().map(|(t, _)| t).as_deref(), Some("A"));
        // B arrives late: it takes turns with A from now on; its idle time does not give it
        // a run of jobs ahead of A.
        for i in 0..3 {
            q.push("B", 1, i, 1);
        }
        assert_eq!(order(&mut q), "BABAB");
    }

    #[test]
    fn each_tenants_jobs_keep_their_order_and_drain_returns_all() {
        let mut q = FairQueue::default();
        for i in 0..3 {
            q.push("A", 1, i, 1);
            q.push("B", 1, 10 + i, 1);
        }
        let a: Vec<u32> = std::iter::from_fn(|| q.pop())
            .filter(|(t, _)| &**t == "A")
            .map(|(_, i)| i)
            .collect();
        assert_eq!(a, [0, 1, 2]);
        for i in 0..5 {
            q.push("C", 1, i, 1);
        }
        assert_eq!(q.iter().count(), 5);
        assert_eq!(q.drain().len(), 5);
        assert!(q.is_empty() && q.pop().is_none());
    }

    #[test]
    fn the_tenant_is_peeked_from_the_subject_or_the_body() {
        let tenant = |payload: &[u8], sub, max| peek(payload, sub, max).tenant;
        assert_eq!(tenant(br#"{"tenant":"acme"}"#, None, 1000), "acme");
        assert_eq!(tenant(br#"{"prompt":"x"}"#, None, 1000), "default");
        assert_eq!(tenant(br#"{"tenant":"acme"}"#, Some("sub"), 1000), "sub");
        assert_eq!(tenant(b"not json", None, 1000), "");
        assert_eq!(tenant(br#"{"tenant":7}"#, None, 1000), "");
        assert_eq!(tenant(br#"{"tenant":"acme"}"#, None, 5), "");
        let long = format!(r#"{{"tenant":"{}"}}"#, "x".repeat(300));
        assert_eq!(tenant(long.as_bytes(), None, 10_000), "");
        let p = peek(br#"{"tenant":"a","timeout_ms":1500}"#, None, 1000);
        assert_eq!(p.timeout_ms, Some(1500));
    }

    #[test]
    fn tenants_that_may_not_start_keep_their_place() {
        let mut q = FairQueue::default();
        for i in 0..3 {
            q.push("A", 1, i, 1);
            q.push("B", 1, 10 + i, 1);
        }
        // A is held (say, rate-limited): B's jobs go, each asked about once per pick.
        let mut asked = Vec::new();
        let picked = q.pop_where(|t, _| {
            asked.push(t.to_string());
            t == "B"
        });
        assert_eq!(picked, Some((Arc::from("B"), 10)));
        assert_eq!(asked, ["A", "B"]);
        assert_eq!(q.pop_where(|t, _| t == "B").map(|(_, i)| i), Some(11));
        assert_eq!(q.pop_where(|_, _| false), None);
        assert_eq!(q.len(), 4);
        // Released, A is first: it was passed over, not sent to the back.
        assert_eq!(q.pop().map(|(t, _)| t).as_deref(), Some("A"));
    }
}
