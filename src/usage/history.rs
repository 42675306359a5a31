//! The history's monthly partitions: listing them and `llm-worker usage prune`, which drops
//! whole months of `llm_calls` and `llm_jobs` (never the daily rollups).
//!
//! A partition is dropped only when every row it can hold is older than the cut-off: its
//! month ended before `now - older_than`. This month's partition is never dropped, whatever
//! the age given. Partitions not named `<table>_pYYYY_MM` (made by hand) are listed, never
//! dropped.

use chrono::{DateTime, Months, NaiveDate, Utc};

/// An age such as `13months`, `400days`, `8weeks`, `2years`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    Days(u32),
    Months(u32),
}

impl std::str::FromStr for Age {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let n: u32 = number
            .parse()
            .map_err(|_| format!("{s:?}: expected a number and a unit, such as 13months"))?;
        let day_count = |per: u32| {
            n.checked_mul(per)
                .map(Age::Days)
                .ok_or_else(|| format!("{s:?} is too long"))
        };
        match unit.trim() {
            "d" | "day" | "days" => Ok(Age::Days(n)),
            "w" | "week" | "weeks" => day_count(7),
            "mo" | "month" | "months" => Ok(Age::Months(n)),
            "y" | "year" | "years" => n
                .checked_mul(12)
                .map(Age::Months)
                .ok_or_else(|| format!("{s:?} is too long")),
            other => Err(format!(
                "{s:?}: unknown unit {other:?} (days, weeks, months or years)"
            )),
        }
    }
}

impl std::fmt::Display for Age {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Age::Days(d) => write!(f, "{d} days"),
            Age::Months(m) => write!(f, "{m} months"),
        }
    }
}

impl Age {
    /// The instant `self` before `now`.
    pub fn before(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Age::Days(d) => now - chrono::Duration::days(i64::from(d)),
            Age::Months(m) => now.checked_sub_months(Months::new(m)).unwrap_or(now),
        }
    }
}

/// One monthly partition of `llm_calls` or `llm_jobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// `llm_calls` or `llm_jobs`.
    pub table: String,
    /// The partition's name.
    pub name: String,
    /// The first day of its month, when it follows the naming (`<table>_pYYYY_MM`).
    pub month: Option<NaiveDate>,
    /// Rows, as Postgres estimates them (its statistics; -1 before the first analyze).
    pub rows_estimate: i64,
    /// Bytes on disk, indexes included.
    pub bytes: i64,
}

impl Partition {
    /// The first instant after its month (`None` when it does not follow the naming).
    pub fn end(&self) -> Option<DateTime<Utc>> {
        let next = self.month?.checked_add_months(Months::new(1))?;
        Some(next.and_time(chrono::NaiveTime::MIN).and_utc())
    }
}

/// Every partition of the history tables, oldest month first.
pub async fn partitions(pool: &sqlx::PgPool) -> Result<Vec<Partition>, sqlx::Error> {
    let rows: Vec<(String, String, f32, i64)> = sqlx::query_as(
        "SELECT parent.relname::text, part.relname::text, part.reltuples,
                pg_total_relation_size(part.oid)
         FROM pg_inherits i
         JOIN pg_class part ON part.oid = i.inhrelid
         JOIN pg_class parent ON parent.oid = i.inhparent
         WHERE parent.relname IN ('llm_calls', 'llm_jobs') AND part.relkind = 'r'
           AND parent.relnamespace = to_regnamespace(current_schema())::oid",
    )
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Partition> = rows
        .into_iter()
        .map(|(table, name, rows, bytes)| Partition {
            month: month_of(&table, &name),
            table,
            name,
            rows_estimate: rows as i64,
            bytes,
        })
        .collect();
    out.sort_by(|a, b| (a.month, &a.table).cmp(&(b.month, &b.table)));
    Ok(out)
}

/// The month of a partition named `<table>_pYYYY_MM`.
fn month_of(table: &str, name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix(table)?.strip_prefix("_p")?;
    let (y, m) = rest.split_once('_')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

/// The partitions whose month ended at or before `cutoff`.
pub fn expired(all: &[Partition], cutoff: DateTime<Utc>) -> Vec<Partition> {
    all.iter()
        .filter(|p| p.end().is_some_and(|end| end <= cutoff))
        .cloned()
        .collect()
}

/// Detach and drop each partition (one transaction each, so a failure leaves the others
/// done and this one whole). Returns the names dropped.
pub async fn drop_partitions(
    pool: &sqlx::PgPool,
    doomed: &[Partition],
) -> Result<Vec<String>, sqlx::Error> {
    let mut dropped = Vec::with_capacity(doomed.len());
    for p in doomed {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!(
            "ALTER TABLE {} DETACH PARTITION {}",
            quote_ident(&p.table),
            quote_ident(&p.name)
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("DROP TABLE {}", quote_ident(&p.name)))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        dropped.push(p.name.clone());
    }
    Ok(dropped)
}

/// A Postgres identifier, quoted.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The table `usage prune` prints: one line per partition, then a total.
pub fn render(parts: &[Partition], verb: &str) -> String {
    let mut out = String::new();
    let (mut rows, mut bytes) = (0i64, 0i64);
    for p in parts {
        let month = p
            .month
            .map_or("-".to_string(), |m| m.format("%Y-%m").to_string());
        let estimate = if p.rows_estimate < 0 {
            "rows unknown (not analyzed yet)".to_string()
        } else {
            format!("~{} rows", p.rows_estimate)
        };
        out.push_str(&format!(
            "{verb} {:<24} {month}  {estimate}, {} MB\n",
            p.name,
            p.bytes / 1_000_000
        ));
        rows += p.rows_estimate.max(0);
        bytes += p.bytes;
    }
    out.push_str(&format!(
        "{} partition(s), ~{rows} rows, {} MB\n",
        parts.len(),
        bytes / 1_000_000
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_or_without_a_space_and_refuse_unknown_units() {
        assert_eq!("13months".parse(), Ok(Age::Months(13)));
        assert_eq!("13 months".parse(), Ok(Age::Months(13)));
        assert_eq!("400days".parse(), Ok(Age::Days(400)));
        assert_eq!("8w".parse(), Ok(Age::Days(56)));
        assert_eq!("2years".parse(), Ok(Age::Months(24)));
        assert!("13".parse::<Age>().is_err());
        assert!("months".parse::<Age>().is_err());
        assert!("3 fortnights".parse::<Age>().is_err());
        assert!("99999999999days".parse::<Age>().is_err());
    }

    #[test]
    fn a_partition_expires_only_when_its_whole_month_is_older_than_the_cutoff() {
        let part = |name: &str| Partition {
            table: "llm_calls".into(),
            name: name.into(),
            month: month_of("llm_calls", name),
            rows_estimate: 10,
            bytes: 0,
        };
        let all = [
            part("llm_calls_p2025_10"),
            part("llm_calls_p2025_11"),
            part("llm_calls_p2025_12"),
            part("llm_calls_by_hand"),
        ];
        assert_eq!(all[3].month, None);
        let now: DateTime<Utc> = "2026-12-15T10:00:00Z".parse().unwrap();
        let cutoff = Age::Months(13).before(now);
        assert_eq!(
            cutoff,
            "2025-11-15T10:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let names: Vec<String> = expired(&all, cutoff).into_iter().map(|p| p.name).collect();
        // November 2025 still holds rows newer than the cut-off; a hand-made one is kept.
        assert_eq!(names, ["llm_calls_p2025_10"]);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
