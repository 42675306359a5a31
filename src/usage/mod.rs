//! The usage and cost ledger in Postgres: migrations, the recorder that projects stored
//! results into `llm_jobs` / `llm_calls`, the price refresh, the `usage` report, and the
//! budgets in force (`llm_tenant_budgets`).
//!
//! Nothing here sits on a job's hot path: jobs store their results in JetStream, and the
//! recorder writes them to Postgres in batches, so a slow or absent database delays rows but
//! never jobs, and loses nothing.

pub(crate) mod budgets;
mod recorder;
pub mod report;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

pub use recorder::{Recorder, write_batch};

use crate::pricing::{Price, PriceBook};

/// How often the worker re-reads `llm_prices`.
const PRICE_REFRESH: Duration = Duration::from_secs(30);

/// Apply the embedded migrations (`migrations/`).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

/// Load `llm_prices` into `book`.
pub(crate) async fn load_prices(pool: &sqlx::PgPool, book: &PriceBook) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, String, DateTime<Utc>, f64, f64)> = sqlx::query_as(
        "SELECT provider, model, effective_from, input_usd_per_mtok::float8, output_usd_per_mtok::float8 \
         FROM llm_prices",
    )
    .fetch_all(pool)
    .await?;
    book.replace(
        rows.into_iter()
            .map(|(provider, model, effective_from, input, output)| {
                let price = Price {
                    effective_from,
                    input_per_mtok: input,
                    output_per_mtok: output,
                };
                (provider, model, price)
            })
            .collect(),
    );
    Ok(())
}

/// The database side of a worker process: apply migrations (retrying until the database is
/// reachable, unless `ready`), then keep prices fresh and run the recorder until `stop` fires.
pub(crate) async fn maintain(
    pool: sqlx::PgPool,
    book: PriceBook,
    recorder: Option<Recorder>,
    ready: bool,
    tenants: std::collections::BTreeMap<String, crate::config::TenantPolicy>,
    stop: CancellationToken,
) {
    if !ready {
        loop {
            match migrate(&pool).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "database still unavailable; usage waits in JetStream")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.cancelled() => return,
            }
        }
        tracing::info!("database available: migrations applied");
    }
    budgets::sync_logged(pool.clone(), tenants).await;
    let prices = refresh_prices(pool, book, stop.clone());
    match recorder {
        Some(recorder) => {
            tokio::join!(prices, recorder.run(stop));
        }
        None => prices.await,
    }
}

/// Keep `book` in step with `llm_prices` until `stop` fires.
pub(crate) async fn refresh_prices(pool: sqlx::PgPool, book: PriceBook, stop: CancellationToken) {
    let mut every = tokio::time::interval(PRICE_REFRESH);
    loop {
        tokio::select! {
            _ = every.tick() => {
                if let Err(e) = load_prices(&pool, &book).await {
                    tracing::warn!(error = %e, "refreshing prices failed; keeping the last known ones");
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Connect to Postgres (when configured) and apply migrations.
pub async fn connect(config: &crate::config::Config) -> anyhow::Result<Option<sqlx::PgPool>> {
    let Some(pool) = lazy_pool(config)? else {
        return Ok(None);
    };
    migrate(&pool).await.map_err(|e| {
        anyhow::anyhow!("connecting to Postgres (DATABASE_URL) and applying migrations: {e}")
    })?;
    Ok(Some(pool))
}

/// A pool that connects on first use (no I/O here), when a database is configured.
pub(crate) fn lazy_pool(config: &crate::config::Config) -> anyhow::Result<Option<sqlx::PgPool>> {
    let Some(url) = &config.database.url else {
        return Ok(None);
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_lazy(secrecy::ExposeSecret::expose_secret(url))
        .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {e}"))?;
    Ok(Some(pool))
}
