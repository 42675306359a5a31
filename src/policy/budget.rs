//! Budget arithmetic, free of I/O: a tenant's spend in the current UTC day and month, the
//! budget workers hold for jobs in flight, whether a budget is spent or has room for a job's
//! worst case, and which warning thresholds one charge crosses.
//!
//! Reservations (why budgets cannot be overshot): before each provider call a job reserves
//! its worst case (prompt bound plus `max_tokens`, at the model's highest prices) out of
//! what its worker *holds* for the tenant; a worker takes holdings from the shared counter
//! by compare-and-set, only while `spent + held by every worker <= budget`. When the job
//! ends its real cost moves from the worker's holding to `spent` in one write. So `spent`
//! never passes a budget unless a call costs more than its worst case (a provider billing
//! beyond `max_tokens`, a prompt counted above its bound) or its model has no price (USD
//! budgets). Holdings carry the time their worker last confirmed them and stop counting
//! after [`STALE_AFTER`] (a dead worker's holding frees itself).

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::config::TenantPolicy;
pub(crate) use crate::policy::slots::STALE_AFTER;

/// An amount of budget: USD and tokens (a job's worst case, a holding, a cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Cost {
    pub usd: f64,
    pub tokens: f64,
}

impl Cost {
    pub fn plus(self, o: Cost) -> Cost {
        Cost {
            usd: self.usd + o.usd,
            tokens: self.tokens + o.tokens,
        }
    }

    pub fn minus(self, o: Cost) -> Cost {
        Cost {
            usd: self.usd - o.usd,
            tokens: self.tokens - o.tokens,
        }
    }

    /// Each measure at least zero.
    pub fn floor(self) -> Cost {
        Cost {
            usd: self.usd.max(0.0),
            tokens: self.tokens.max(0.0),
        }
    }

    /// Whether this is no amount at all.
    pub fn is_nothing(&self) -> bool {
        self.usd.abs() < 1e-12 && self.tokens.abs() < 1e-9
    }

    /// Whether `need` fits in this amount (each measure, with a hair of float slack).
    pub fn covers(&self, need: Cost) -> bool {
        self.usd + 1e-12 >= need.usd && self.tokens + 1e-9 >= need.tokens
    }
}

/// Budget a worker holds for its tenant's jobs in flight, confirmed at `at`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Hold {
    pub usd: f64,
    pub tokens: f64,
    pub at: DateTime<Utc>,
}

/// What a tenant spent in one day and one month (UTC), as stored in the shared counter.
/// Counters of a past period read as zero: budgets reset at midnight UTC and on the first of
/// the month without anyone resetting them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spend {
    /// `YYYY-MM-DD` of the day counted.
    pub day: String,
    pub day_usd: f64,
    pub day_tokens: u64,
    /// `YYYY-MM` of the month counted.
    pub month: String,
    pub month_usd: f64,
    pub month_tokens: u64,
    /// Budget held for jobs in flight, by worker (counts against every budget line).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holds: BTreeMap<String, Hold>,
}

fn day_of(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%d").to_string()
}

fn month_of(now: DateTime<Utc>) -> String {
    now.format("%Y-%m").to_string()
}

impl Spend {
    /// This spend as of `now`: a past day's or month's counters are zero.
    pub fn at(&self, now: DateTime<Utc>) -> Spend {
        let (day, month) = (day_of(now), month_of(now));
        let mut s = self.clone();
        if s.day != day {
            (s.day, s.day_usd, s.day_tokens) = (day, 0.0, 0);
        }
        if s.month != month {
            (s.month, s.month_usd, s.month_tokens) = (month, 0.0, 0);
        }
        s
    }

    /// What live workers hold as of `now`.
    pub fn held(&self, now: DateTime<Utc>) -> Cost {
        self.holds
            .values()
            .filter(|h| now - h.at < STALE_AFTER)
            .fold(Cost::default(), |c, h| {
                c.plus(Cost {
                    usd: h.usd,
                    tokens: h.tokens,
                })
            })
    }

    /// This spend with `worker`'s holding changed by `change` (confirmed at `now`; never
    /// below zero), and stale holdings of other workers dropped.
    pub fn hold(&self, now: DateTime<Utc>, worker: &str, change: Cost) -> Spend {
        let mut s = self.clone();
        s.holds
            .retain(|w, h| w == worker || now - h.at < STALE_AFTER);
        let mine = s.holds.remove(worker).unwrap_or_default();
        let next = Cost {
            usd: mine.usd,
            tokens: mine.tokens,
        }
        .plus(change)
        .floor();
        if next.usd > 1e-12 || next.tokens > 1e-9 {
            s.holds.insert(
                worker.to_string(),
                Hold {
                    usd: next.usd,
                    tokens: next.tokens,
                    at: now,
                },
            );
        }
        s
    }

    /// This spend as of `now`, plus one charge.
    pub fn add(&self, now: DateTime<Utc>, usd: f64, tokens: u64) -> Spend {
        let mut s = self.at(now);
        s.day_usd += usd;
        s.month_usd += usd;
        s.day_tokens = s.day_tokens.saturating_add(tokens);
        s.month_tokens = s.month_tokens.saturating_add(tokens);
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Period {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Measure {
    Usd,
    Tokens,
}

/// One budget of a policy, and what was spent against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Line {
    pub period: Period,
    pub measure: Measure,
    pub budget: f64,
    pub spent: f64,
}

/// Every budget `policy` sets, with `spend` (already as of now) against it.
pub(crate) fn lines(policy: &TenantPolicy, spend: &Spend) -> Vec<Line> {
    let mut out = Vec::with_capacity(4);
    let tokens = |t: u64| t as f64;
    let candidates = [
        (
            Period::Day,
            Measure::Usd,
            policy.daily_budget_usd,
            spend.day_usd,
        ),
        (
            Period::Day,
            Measure::Tokens,
            policy.daily_budget_tokens.map(tokens),
            tokens(spend.day_tokens),
        ),
        (
            Period::Month,
            Measure::Usd,
            policy.monthly_budget_usd,
            spend.month_usd,
        ),
        (
            Period::Month,
            Measure::Tokens,
            policy.monthly_budget_tokens.map(tokens),
            tokens(spend.month_tokens),
        ),
    ];
    for (period, measure, budget, spent) in candidates {
        if let Some(budget) = budget {
            out.push(Line {
                period,
                measure,
                budget,
                spent,
            });
        }
    }
    out
}

/// For each measure with a budget, the least room its lines have as of `now` (budget less
/// spent, less what workers hold when `holds`); a measure without a budget has room for
/// anything.
pub(crate) fn room(policy: &TenantPolicy, spend: &Spend, now: DateTime<Utc>, holds: bool) -> Cost {
    let held = if holds {
        spend.held(now)
    } else {
        Cost::default()
    };
    let mut room = Cost {
        usd: f64::INFINITY,
        tokens: f64::INFINITY,
    };
    for l in lines(policy, spend) {
        match l.measure {
            Measure::Usd => room.usd = room.usd.min(l.budget - l.spent - held.usd),
            Measure::Tokens => room.tokens = room.tokens.min(l.budget - l.spent - held.tokens),
        }
    }
    room
}

/// Why a job whose worst case is `need` cannot run: its budget line, what is spent and held.
pub(crate) fn no_room(
    policy: &TenantPolicy,
    spend: &Spend,
    need: Cost,
    now: DateTime<Utc>,
) -> String {
    let held = spend.held(now);
    let line = lines(policy, spend).into_iter().find(|l| match l.measure {
        Measure::Usd => l.spent + held.usd + need.usd > l.budget + 1e-12,
        Measure::Tokens => l.spent + held.tokens + need.tokens > l.budget + 1e-9,
    });
    let Some(line) = line else {
        return "the tenant's budget has no room for this job".into();
    };
    let period = match line.period {
        Period::Day => "daily",
        Period::Month => "monthly",
    };
    let (budget, spent, held, need) = match line.measure {
        Measure::Usd => (
            format!("{} USD", line.budget),
            format!("{:.6} USD", line.spent),
            format!("{:.6} USD", held.usd),
            format!("{:.6} USD", need.usd),
        ),
        Measure::Tokens => (
            format!("{} tokens", line.budget),
            format!("{} tokens", line.spent),
            format!("{} tokens", held.tokens),
            format!("{} tokens", need.tokens),
        ),
    };
    let resets = resets_at(line.period, now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!(
        "the tenant's {period} budget of {budget} cannot cover this call's worst case ({need}; \
         {spent} spent, {held} held for jobs in flight); it resets at {resets}"
    )
}

/// When the period that `now` is in ends (its budget resets).
pub(crate) fn resets_at(period: Period, now: DateTime<Utc>) -> DateTime<Utc> {
    let today = now.date_naive();
    let next = match period {
        Period::Day => today.succ_opt(),
        Period::Month => {
            let (y, m) = if today.month() == 12 {
                (today.year() + 1, 1)
            } else {
                (today.year(), today.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1)
        }
    };
    next.and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(now, |t| Utc.from_utc_datetime(&t))
}

/// Why a job of a tenant whose spend is `spend` (as of `now`) may not start: the first budget
/// that is spent. `None` while every budget has room.
pub(crate) fn refusal(policy: &TenantPolicy, spend: &Spend, now: DateTime<Utc>) -> Option<String> {
    let line = lines(policy, spend)
        .into_iter()
        .find(|l| l.spent >= l.budget)?;
    let period = match line.period {
        Period::Day => "daily",
        Period::Month => "monthly",
    };
    let (budget, spent) = match line.measure {
        Measure::Usd => (
            format!("{} USD", line.budget),
            format!("{:.6} USD", line.spent),
        ),
        Measure::Tokens => (
            format!("{} tokens", line.budget),
            format!("{} tokens", line.spent),
        ),
    };
    let resets = resets_at(line.period, now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Some(format!(
        "the tenant's {period} budget of {budget} is spent ({spent} used); it resets at {resets}"
    ))
}

/// A warning threshold crossed by one charge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Crossing {
    pub line: Line,
    pub percent: u8,
}

/// The thresholds (`budget_warnings`, percent of each budget) that the step from `before` to
/// `after` crosses. Counters are changed by compare-and-set, one step at a time, so exactly
/// one step crosses each threshold in a period: each warning is sent once.
pub(crate) fn crossings(policy: &TenantPolicy, before: &Spend, after: &Spend) -> Vec<Crossing> {
    let mut out = Vec::new();
    for (b, a) in lines(policy, before).iter().zip(lines(policy, after)) {
        for &percent in &policy.budget_warnings {
            let mark = a.budget * f64::from(percent) / 100.0;
            if b.spent < mark && a.spent >= mark {
                out.push(Crossing { line: a, percent });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn policy() -> TenantPolicy {
        TenantPolicy {
            daily_budget_tokens: Some(1000),
            monthly_budget_usd: Some(2.0),
            ..Default::default()
        }
    }

    #[test]
    fn counters_of_a_past_day_or_month_read_as_zero() {
        let s = Spend::default().add(at("2026-11-29T23:59:59Z"), 0.5, 900);
        assert_eq!((s.day.as_str(), s.day_tokens), ("2026-11-29", 900));
        // The next day of the same month: the day starts again, the month goes on.
        let next_day = s.add(at("2026-11-30T10:00:00Z"), 0.25, 1);
        assert_eq!(
            (next_day.day.as_str(), next_day.day_tokens),
            ("2026-11-30", 1)
        );
        assert_eq!((next_day.month_usd, next_day.month_tokens), (0.75, 901));
        // A new month: both start again.
        let december = next_day.at(at("2026-12-01T00:00:00Z"));
        assert_eq!((december.day_tokens, december.month_tokens), (0, 0));
        assert_eq!(december.month, "2026-12");
    }

    #[test]
    fn a_spent_budget_refuses_until_it_resets() {
        let now = at("2026-11-30T12:00:00Z");
        let p = policy();
        let s = Spend::default().add(now, 0.1, 999);
        assert_eq!(refusal(&p, &s, now), None);
        let s = s.add(now, 0.0, 1);
        let why = refusal(&p, &s, now).unwrap();
        assert_eq!(
            why,
            "the tenant's daily budget of 1000 tokens is spent (1000 tokens used); it resets at 2026-12-01T00:00:00Z"
        );
        assert_eq!(refusal(&p, &s.at(at("2026-12-01T00:00:00Z")), now), None);
        let s = Spend::default().add(now, 2.5, 1);
        assert!(
            refusal(&p, &s, now)
                .unwrap()
                .contains("monthly budget of 2 USD")
        );
        assert_eq!(
            resets_at(Period::Month, at("2026-12-31T23:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(refusal(&TenantPolicy::default(), &s, now), None);
    }

    #[test]
    fn holdings_count_against_the_room_until_they_go_stale() {
        let now = at("2026-11-30T12:00:00Z");
        let p = policy();
        let s = Spend::default().add(now, 0.5, 600);
        let room = room(&p, &s, now, true);
        assert_eq!((room.usd, room.tokens), (1.5, 400.0));
        let s = s.hold(
            now,
            "w1",
            Cost {
                usd: 1.0,
                tokens: 300.0,
            },
        );
        let r = super::room(&p, &s, now, true);
        assert_eq!((r.usd, r.tokens), (0.5, 100.0));
        assert!(r.covers(Cost {
            usd: 0.5,
            tokens: 100.0
        }));
        assert!(!r.covers(Cost {
            usd: 0.0,
            tokens: 101.0
        }));
        // Without holdings: what spending alone leaves.
        assert_eq!(super::room(&p, &s, now, false).tokens, 400.0);
        let why = no_room(
            &p,
            &s,
            Cost {
                usd: 0.0,
                tokens: 150.0,
            },
            now,
        );
        assert!(
            why.contains("daily budget of 1000 tokens cannot cover"),
            "{why}"
        );
        assert!(why.contains("600 tokens spent, 300 tokens held"), "{why}");
        // Releasing more than is held leaves nothing (never below zero), and the holding goes.
        let s2 = s.hold(
            now,
            "w1",
            Cost {
                usd: -2.0,
                tokens: -400.0,
            },
        );
        assert!(s2.holds.is_empty());
        // A holding not confirmed for STALE_AFTER stops counting, and is dropped on the
        // next write of another worker.
        let later = now + STALE_AFTER;
        assert_eq!(s.held(later), Cost::default());
        assert!(
            !s.hold(later, "w2", Cost::default())
                .holds
                .contains_key("w1")
        );
        // Holdings survive the day's reset; the spend does not.
        let tomorrow = at("2026-12-01T00:00:01Z");
        assert_eq!(s.at(tomorrow).holds.len(), 1);
    }

    #[test]
    fn each_threshold_is_crossed_by_exactly_one_step() {
        let now = at("2026-11-30T12:00:00Z");
        let p = policy();
        let mut s = Spend::default().at(now);
        let mut seen = Vec::new();
        for _ in 0..30 {
            let next = s.add(now, 0.1, 50);
            for c in crossings(&p, &s, &next) {
                seen.push((c.line.period, c.line.measure, c.percent));
            }
            s = next;
        }
        assert_eq!(
            seen,
            vec![
                (Period::Day, Measure::Tokens, 80),
                (Period::Month, Measure::Usd, 80),
                (Period::Day, Measure::Tokens, 100),
                (Period::Month, Measure::Usd, 100),
            ]
        );
        // One big step crosses both thresholds at once.
        let big = Spend::default().add(now, 0.0, 5000);
        assert_eq!(crossings(&p, &Spend::default().at(now), &big).len(), 2);
    }
}
