//! Jobs in flight per tenant across the fleet, free of I/O: who holds how many of a tenant's
//! slots, as stored in its shared counter (`busy.<tenant>`). Each worker's holding carries the
//! time it last confirmed it; a holding older than [`STALE_AFTER`] belongs to a worker that
//! died and no longer counts (its jobs are redelivered to others, which take slots anew).

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// A holding not confirmed for this long no longer counts. Workers confirm theirs every
/// [`CONFIRM_EVERY`].
pub(crate) const STALE_AFTER: TimeDelta = TimeDelta::seconds(30);
pub(crate) const CONFIRM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Holding {
    pub jobs: u64,
    pub at: DateTime<Utc>,
}

/// A tenant's slots in use, by worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Busy {
    pub workers: BTreeMap<String, Holding>,
}

impl Busy {
    /// Jobs in flight fleet-wide as of `now` (holdings of live workers only).
    pub fn total(&self, now: DateTime<Utc>) -> u64 {
        self.workers
            .values()
            .filter(|h| now - h.at < STALE_AFTER)
            .map(|h| h.jobs)
            .sum()
    }

    /// With `worker` holding `jobs` (confirmed at `now`), stale holdings dropped.
    pub fn with(&self, worker: &str, jobs: u64, now: DateTime<Utc>) -> Busy {
        let mut next = self.clone();
        next.workers
            .retain(|w, h| w == worker || now - h.at < STALE_AFTER);
        if jobs == 0 {
            next.workers.remove(worker);
        } else {
            next.workers
                .insert(worker.to_string(), Holding { jobs, at: now });
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_of_dead_workers_stop_counting() {
        let t0: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().unwrap();
        let b = Busy::default().with("w1", 2, t0).with("w2", 1, t0);
        assert_eq!(b.total(t0), 3);
        let later = t0 + TimeDelta::seconds(20);
        let b = b.with("w2", 1, later);
        assert_eq!(b.total(later), 3);
        // w1 stopped confirming: gone after STALE_AFTER; w2 confirmed at `later`.
        let much_later = t0 + TimeDelta::seconds(31);
        assert_eq!(b.total(much_later), 1);
        let b = b.with("w2", 0, much_later);
        assert!(b.workers.is_empty(), "{b:?}");
    }
}
