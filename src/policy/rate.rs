//! Rate arithmetic, free of I/O: a tenant's requests and tokens in the current UTC minute
//! (a fixed window), and whether a job may start under `requests_per_minute` and
//! `tokens_per_minute`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::TenantPolicy;

/// Requests started and tokens used by a tenant in one minute, as stored in the shared
/// counter. A past minute's counts read as zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rate {
    /// `YYYY-MM-DDTHH:MM` (UTC) of the minute counted.
    pub minute: String,
    pub requests: u64,
    pub tokens: u64,
}

fn minute_of(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%dT%H:%M").to_string()
}

impl Rate {
    /// This rate as of `now`, plus `requests` and `tokens`.
    pub fn add(&self, now: DateTime<Utc>, requests: u64, tokens: u64) -> Rate {
        let minute = minute_of(now);
        let mut r = if self.minute == minute {
            self.clone()
        } else {
            Rate {
                minute,
                ..Rate::default()
            }
        };
        r.requests = r.requests.saturating_add(requests);
        r.tokens = r.tokens.saturating_add(tokens);
        r
    }
}

/// Whether one more job may start in the minute `rate` counts (already as of now).
pub(crate) fn allows(policy: &TenantPolicy, rate: &Rate) -> bool {
    policy
        .requests_per_minute
        .is_none_or(|limit| rate.requests < u64::from(limit))
        && policy
            .tokens_per_minute
            .is_none_or(|limit| rate.tokens < limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_minute_full_of_requests_or_tokens_waits_for_the_next() {
        let policy = TenantPolicy {
            requests_per_minute: Some(2),
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let t = at("2026-11-30T12:00:10Z");
        let r = Rate::default().add(t, 1, 10);
        assert!(allows(&policy, &r));
        let r = r.add(t, 1, 0);
        assert!(!allows(&policy, &r), "two requests this minute");
        // The next minute starts from zero.
        let next = r.add(at("2026-11-30T12:01:00Z"), 0, 0);
        assert_eq!((next.requests, next.tokens), (0, 0));
        assert!(allows(&policy, &next));
        let heavy = Rate::default().add(t, 0, 100);
        assert!(!allows(&policy, &heavy), "100 tokens this minute");
        assert!(allows(&TenantPolicy::default(), &heavy));
    }
}
