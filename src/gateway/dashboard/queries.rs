//! The dashboard's figures: the named queries of `queries.sql`, each run with the period and
//! tenant, their rows as JSON objects (column -> value, as Postgres' `to_jsonb` writes them).

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::Period;

/// The text of `queries.sql`.
pub(crate) const SQL: &str = include_str!("queries.sql");

/// Every query of [`SQL`] by name, without its trailing `;`.
static QUERIES: LazyLock<HashMap<&'static str, &'static str>> = LazyLock::new(|| named(SQL));

/// The `-- name: <name>` sections of `sql`.
pub(crate) fn named(sql: &'static str) -> HashMap<&'static str, &'static str> {
    sql.split("-- name: ")
        .skip(1)
        .filter_map(|section| {
            let (name, body) = section.split_once('\n')?;
            Some((name.trim(), body.trim().trim_end_matches(';').trim()))
        })
        .collect()
}

/// The queries of one page, by name: rows as JSON objects.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    pub rows: HashMap<&'static str, Vec<Value>>,
    /// Tenants with usage in the period (the tenant filter's choices).
    pub tenants: Vec<String>,
}

impl Figures {
    /// The rows of query `name` (none if it returned none).
    pub(crate) fn rows(&self, name: &str) -> &[Value] {
        self.rows.get(name).map_or(&[], Vec::as_slice)
    }

    /// The first row of query `name` (for one-row totals).
    pub(crate) fn one(&self, name: &str) -> &Value {
        self.rows(name).first().unwrap_or(&Value::Null)
    }
}

/// The queries that take the period and tenant, in the page's order.
const PERIOD_QUERIES: &[&str] = &[
    "totals",
    "jobs",
    "spend_by_tenant_daily",
    "spend_by_model_daily",
    "by_tenant",
    "by_model",
    "providers",
    "providers_daily",
    "response_cache_daily",
    "prompt_cache_daily",
    "budgets",
    "top_jobs",
];

fn query(name: &str) -> Result<&'static str, sqlx::Error> {
    QUERIES
        .get(name)
        .copied()
        .ok_or_else(|| sqlx::Error::Protocol(format!("no dashboard query named {name}")))
}

/// Every figure of the page for `period` and `tenant` (every tenant when `None`).
pub(crate) async fn figures(
    pool: &PgPool,
    period: &Period,
    tenant: Option<&str>,
) -> Result<Figures, sqlx::Error> {
    let runs = PERIOD_QUERIES.iter().map(|name| async move {
        let rows = period_rows(pool, query(name)?, period, tenant).await?;
        Ok::<_, sqlx::Error>((*name, rows))
    });
    let mut figures = Figures {
        rows: futures::future::try_join_all(runs)
            .await?
            .into_iter()
            .collect(),
        tenants: Vec::new(),
    };
    figures.tenants = period_rows(pool, query("tenants")?, period, None)
        .await?
        .iter()
        .filter_map(|row| Some(row.get("tenant")?.as_str()?.to_string()))
        .collect();
    let calls = job_calls(pool, figures.rows("top_jobs")).await?;
    figures.rows.insert("top_job_calls", calls);
    Ok(figures)
}

/// `sql`'s rows as JSON objects, with $1 and $2 the period's days and $3 the tenant.
async fn period_rows(
    pool: &PgPool,
    sql: &str,
    period: &Period,
    tenant: Option<&str>,
) -> Result<Vec<Value>, sqlx::Error> {
    let wrapped = format!("SELECT to_jsonb(q) FROM ({sql}) q");
    // Parameters are typed by their binds, so a query may leave out $1 and $2.
    let mut q = sqlx::query_scalar::<_, Value>(&wrapped)
        .bind(period.from)
        .bind(period.to);
    if sql.contains("$3") {
        q = q.bind(tenant);
    }
    q.fetch_all(pool).await
}

/// The calls of the jobs in `jobs` (rows of `top_jobs`).
async fn job_calls(pool: &PgPool, jobs: &[Value]) -> Result<Vec<Value>, sqlx::Error> {
    let ids: Vec<Uuid> = jobs
        .iter()
        .filter_map(|j| j.get("job_id")?.as_str()?.parse().ok())
        .collect();
    let finished: Vec<DateTime<Utc>> = jobs
        .iter()
        .filter_map(|j| j.get("finished_at")?.as_str()?.parse().ok())
        .collect();
    let (Some(first), Some(last)) = (finished.iter().min(), finished.iter().max()) else {
        return Ok(Vec::new());
    };
    // A job's calls start before it finishes, and not days before (its deadline).
    let earliest = *first - chrono::Duration::days(3);
    let wrapped = format!("SELECT to_jsonb(q) FROM ({}) q", query("top_job_calls")?);
    sqlx::query_scalar::<_, Value>(&wrapped)
        .bind(&ids)
        .bind(earliest)
        .bind(*last)
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_query_the_page_runs_is_in_the_file() {
        for name in PERIOD_QUERIES.iter().chain(&["tenants", "top_job_calls"]) {
            let sql = query(name).unwrap();
            assert!(sql.starts_with("SELECT") || sql.starts_with("--"), "{name}");
            assert!(!sql.ends_with(';'), "{name}");
        }
        assert_eq!(QUERIES.len(), PERIOD_QUERIES.len() + 2);
    }
}
