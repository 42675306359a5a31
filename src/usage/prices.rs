//! Prices in `llm_prices`: loading a price file (`llm-worker prices load`) and re-applying
//! prices to recorded calls on purpose (`llm-worker prices reprice`).
//!
//! A recorded call keeps the cost it was given and the price row it was costed with
//! (`llm_calls.price_effective_from`): adding or changing a price never rewrites history by
//! itself. `reprice` recomputes the calls an operator names (a time range, optionally one
//! provider or model) with the rows in force at each call's start, and the totals of their
//! jobs, and says how many rows and how much money changed.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use uuid::Uuid;

use crate::config::Config;

/// A price file: published list prices, USD per million tokens (see `prices/`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    /// The day the prices were checked against the providers' pricing pages.
    pub checked: NaiveDate,
    /// When the prices take effect (default: `checked`, midnight UTC).
    #[serde(default)]
    pub effective_from: Option<DateTime<Utc>>,
    #[serde(default, rename = "price")]
    pub prices: Vec<FilePrice>,
}

/// One model's prices. `api` is the provider type (`openai`, `anthropic`, `gemini`, ...): the
/// rows go to every configured provider of that type (or, with none, to a provider named
/// like the type). A class left out is not priced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrice {
    pub api: String,
    pub model: String,
    pub input: f64,
    pub output: f64,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
    pub cache_write_1h: Option<f64>,
    pub reasoning: Option<f64>,
    pub image_input: Option<f64>,
}

impl FilePrice {
    fn classes(&self) -> [Option<f64>; 5] {
        [
            self.cache_read,
            self.cache_write,
            self.cache_write_1h,
            self.reasoning,
            self.image_input,
        ]
    }
}

impl PriceFile {
    /// Read and check a price file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let file: PriceFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a price file: {e}", path.display()))?;
        for p in &file.prices {
            let all = [Some(p.input), Some(p.output)]
                .into_iter()
                .chain(p.classes())
                .flatten();
            if all.clone().any(|v| !v.is_finite() || v < 0.0) {
                anyhow::bail!(
                    "{}: the prices of {} {} must be finite and not negative",
                    path.display(),
                    p.api,
                    p.model
                );
            }
        }
        Ok(file)
    }

    fn effective_from(&self) -> DateTime<Utc> {
        self.effective_from
            .unwrap_or_else(|| self.checked.and_time(chrono::NaiveTime::MIN).and_utc())
    }
}

/// What loading a price file did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// New price rows.
    pub added: usize,
    /// Prices already in force with the same values (nothing written).
    pub unchanged: usize,
    /// Rows with the same effective time and other values: left alone (a recorded cost may
    /// have been computed with them), with a new `effective_from` they would be added.
    pub conflicting: Vec<String>,
    /// Provider names the rows went to, by provider type.
    pub providers: BTreeMap<String, Vec<String>>,
}

/// Load `file` into `llm_prices` for the providers of `config`.
pub async fn load(
    pool: &sqlx::PgPool,
    config: &Config,
    file: &PriceFile,
) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    let from = file.effective_from();
    let source = format!("price file checked {}", file.checked);
    let mut tx = pool.begin().await?;
    for p in &file.prices {
        let names = loaded
            .providers
            .entry(p.api.clone())
            .or_insert_with(|| {
                let names: Vec<String> = config
                    .providers
                    .iter()
                    .filter(|(_, c)| c.api.name() == p.api)
                    .map(|(n, _)| n.clone())
                    .collect();
                if names.is_empty() {
                    vec![p.api.clone()]
                } else {
                    names
                }
            })
            .clone();
        let [cr, cw, cw1h, reasoning, image] = p.classes();
        for provider in names {
            // The row in force at `from`, if any, with its values.
            let row = sqlx::query(
                "SELECT effective_from, input_usd_per_mtok::float8, output_usd_per_mtok::float8,
                        cache_read_usd_per_mtok::float8, cache_write_usd_per_mtok::float8,
                        cache_write_1h_usd_per_mtok::float8, reasoning_usd_per_mtok::float8,
                        image_input_usd_per_mtok::float8
                 FROM llm_price_at($1, $2, $3)",
            )
            .bind(&provider)
            .bind(&p.model)
            .bind(from)
            .fetch_optional(&mut *tx)
            .await?;
            let current = row.map(|r| in_force(&r)).transpose()?;
            match current {
                Some((_, i, o, classes))
                    if i == p.input && o == p.output && classes == p.classes() =>
                {
                    loaded.unchanged += 1
                }
                Some((at, ..)) if at == from => loaded
                    .conflicting
                    .push(format!("{provider} {} (from {at})", p.model)),
                _ => {
                    sqlx::query(
                        "INSERT INTO llm_prices (provider, model, effective_from,
                             input_usd_per_mtok, output_usd_per_mtok, cache_read_usd_per_mtok,
                             cache_write_usd_per_mtok, cache_write_1h_usd_per_mtok,
                             reasoning_usd_per_mtok, image_input_usd_per_mtok, source)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    )
                    .bind(&provider)
                    .bind(&p.model)
                    .bind(from)
                    .bind(p.input)
                    .bind(p.output)
                    .bind(cr)
                    .bind(cw)
                    .bind(cw1h)
                    .bind(reasoning)
                    .bind(image)
                    .bind(&source)
                    .execute(&mut *tx)
                    .await?;
                    loaded.added += 1;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(loaded)
}

/// A price row as read: its time, input and output prices, and the class prices.
type InForce = (DateTime<Utc>, f64, f64, [Option<f64>; 5]);

fn in_force(r: &sqlx::postgres::PgRow) -> Result<InForce, sqlx::Error> {
    use sqlx::Row;
    Ok((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        [
            r.try_get(3)?,
            r.try_get(4)?,
            r.try_get(5)?,
            r.try_get(6)?,
            r.try_get(7)?,
        ],
    ))
}

/// Which recorded calls to reprice.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Calls started at or after this time.
    pub since: DateTime<Utc>,
    /// And before this one.
    pub until: Option<DateTime<Utc>>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Compute and report, change nothing.
    pub dry_run: bool,
}

/// What a reprice changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Repriced {
    /// Calls in the scope.
    pub calls_seen: u64,
    /// Calls whose cost or price row changed.
    pub calls_changed: u64,
    /// Jobs whose total changed with them.
    pub jobs_changed: u64,
    /// Sum of the changed calls' costs before and after (calls with a cost).
    pub before_usd: f64,
    pub after_usd: f64,
    /// Calls that had no cost and have one now, and the other way round.
    pub now_priced: u64,
    pub now_unpriced: u64,
}

impl std::fmt::Display for Repriced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} calls changed ({} jobs): {:.6} USD before, {:.6} USD after ({:+.6} USD)",
            self.calls_changed,
            self.calls_seen,
            self.jobs_changed,
            self.before_usd,
            self.after_usd,
            self.after_usd - self.before_usd
        )?;
        if self.now_priced + self.now_unpriced > 0 {
            write!(
                f,
                "; {} calls without a cost have one now, {} calls have none now",
                self.now_priced, self.now_unpriced
            )?;
        }
        Ok(())
    }
}

/// Recompute the cost of the calls in `scope` with the price rows in force at each call's
/// start, then the totals of their jobs and the daily rollups of the days touched; one
/// transaction (rolled back on a dry run).
pub async fn reprice(pool: &sqlx::PgPool, scope: &Scope) -> Result<Repriced, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (calls_seen,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM llm_calls c
         WHERE c.started_at >= $1 AND ($2::timestamptz IS NULL OR c.started_at < $2)
           AND ($3::text IS NULL OR c.provider = $3) AND ($4::text IS NULL OR c.model = $4)",
    )
    .bind(scope.since)
    .bind(scope.until)
    .bind(&scope.provider)
    .bind(&scope.model)
    .fetch_one(&mut *tx)
    .await?;
    let changed: Vec<(Uuid, Option<f64>, Option<f64>, NaiveDate)> = sqlx::query_as(
        "WITH target AS (
             SELECT c.job_id, c.attempt, c.started_at, c.cost_usd AS old_cost,
                    llm_call_cost(p, c.input_tokens, c.output_tokens, c.cache_read_tokens,
                                  c.cache_write_tokens, c.cache_write_1h_tokens,
                                  c.reasoning_tokens, c.image_input_tokens, c.images,
                                  c.image_size, c.image_quality)
                        * llm_tier_factor(p, c.service_tier) AS new_cost,
                    CASE WHEN c.input_tokens + c.output_tokens + c.images > 0
                         THEN p.effective_from END
                        AS new_from
             FROM llm_calls c
             LEFT JOIN LATERAL llm_price_at(c.provider, c.model, c.started_at) p ON true
             WHERE c.started_at >= $1 AND ($2::timestamptz IS NULL OR c.started_at < $2)
               AND ($3::text IS NULL OR c.provider = $3) AND ($4::text IS NULL OR c.model = $4)
         )
         UPDATE llm_calls c SET cost_usd = t.new_cost, price_effective_from = t.new_from
         FROM target t
         WHERE c.job_id = t.job_id AND c.attempt = t.attempt AND c.started_at = t.started_at
           AND (c.cost_usd IS DISTINCT FROM t.new_cost
                OR c.price_effective_from IS DISTINCT FROM t.new_from)
         RETURNING c.job_id, t.old_cost::float8, t.new_cost::float8,
                   (c.started_at AT TIME ZONE 'UTC')::date",
    )
    .bind(scope.since)
    .bind(scope.until)
    .bind(&scope.provider)
    .bind(&scope.model)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Repriced {
        calls_seen: calls_seen as u64,
        calls_changed: changed.len() as u64,
        ..Repriced::default()
    };
    let mut jobs: Vec<Uuid> = Vec::with_capacity(changed.len());
    let mut days: Vec<NaiveDate> = Vec::with_capacity(changed.len());
    for (job, before, after, day) in &changed {
        jobs.push(*job);
        days.push(*day);
        out.before_usd += before.unwrap_or(0.0);
        out.after_usd += after.unwrap_or(0.0);
        match (before, after) {
            (None, Some(_)) => out.now_priced += 1,
            (Some(_), None) => out.now_unpriced += 1,
            _ => {}
        }
    }
    jobs.sort_unstable();
    jobs.dedup();
    // A job's cost is its calls' sum, unknown when one of them is (as the recorder writes it).
    let job_days: Vec<(NaiveDate,)> = sqlx::query_as(
        "UPDATE llm_jobs j SET cost_usd = s.cost
         FROM (SELECT job_id,
                      CASE WHEN bool_or(cost_usd IS NULL) THEN NULL
                           ELSE coalesce(sum(cost_usd), 0) END AS cost
               FROM llm_calls WHERE job_id = ANY($1) GROUP BY job_id) s
         WHERE j.job_id = s.job_id AND j.cost_usd IS DISTINCT FROM s.cost
         RETURNING (j.finished_at AT TIME ZONE 'UTC')::date",
    )
    .bind(&jobs)
    .fetch_all(&mut *tx)
    .await?;
    out.jobs_changed = job_days.len() as u64;
    days.extend(job_days.into_iter().map(|(d,)| d));
    // The daily rollups of the days whose costs changed are rebuilt from the rows.
    if let (Some(from), Some(to)) = (days.iter().min(), days.iter().max()) {
        sqlx::query("SELECT llm_rollup_rebuild($1, $2)")
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
    }
    if scope.dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(out)
}
