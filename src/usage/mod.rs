//! The usage and cost ledger in Postgres: migrations, the recorder that projects stored
//! results into `llm_jobs` / `llm_calls`, the price refresh, price files and repricing
//! ([`prices`]), the `usage` report, the history's monthly partitions ([`history`]: listing
//! and pruning), and the budgets in force (`llm_tenant_budgets`).
//!
//! Nothing here sits on a job's hot path: jobs store their results in JetStream, and the
//! recorder writes them to Postgres in batches, so a slow or absent database delays rows but
//! never jobs, and loses nothing.

pub(crate) mod budgets;
pub mod history;
pub mod prices;
mod recorder;
pub mod report;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use recorder::{Months, Recorder, write_batch, write_batch_in};

use crate::pricing::{Price, PriceBook};

/// How often the worker re-reads `llm_prices`.
const PRICE_REFRESH: Duration = Duration::from_secs(30);

/// How many months ahead of this one `migrate` creates the history's partitions.
const PARTITIONS_AHEAD: i32 = 2;

/// Apply the embedded migrations (`migrations/`), then create the monthly partitions of
/// `llm_calls` and `llm_jobs` for this month and the next two (the recorder
/// creates any other month's when a row needs it).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::Connection as _;
    // A connection of its own, closed afterwards: sqlx takes a session advisory lock while it
    // migrates and leaves it held when the run fails or is cancelled (a start-up deadline); on
    // a pooled connection that lock outlived the run, and every later migration of the
    // database waited for it forever.
    let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .map_err(sqlx::migrate::MigrateError::Execute)?;
    let outcome = sqlx::migrate!("./migrations").run_direct(&mut conn).await;
    let _ = conn.close().await;
    outcome?;
    sqlx::query(
        "SELECT llm_ensure_partitions(ARRAY(
             SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => g))
                    AT TIME ZONE 'UTC'
             FROM generate_series(0, $1) g))",
    )
    .bind(PARTITIONS_AHEAD)
    .execute(pool)
    .await
    .map_err(sqlx::migrate::MigrateError::Execute)?;
    Ok(())
}

/// Load `llm_prices` into `book`.
pub(crate) async fn load_prices(pool: &sqlx::PgPool, book: &PriceBook) -> Result<(), sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT provider, model, effective_from, input_usd_per_mtok::float8, \
                output_usd_per_mtok::float8, cache_read_usd_per_mtok::float8, \
                cache_write_usd_per_mtok::float8, cache_write_1h_usd_per_mtok::float8, \
                reasoning_usd_per_mtok::float8, image_input_usd_per_mtok::float8, per_image_usd, \
                batch_price_factor::float8, flex_price_factor::float8 \
         FROM llm_prices",
    )
    .fetch_all(pool)
    .await?;
    let mut prices: Vec<(String, String, Price)> = Vec::with_capacity(rows.len());
    for r in rows {
        let price = Price {
            effective_from: r.try_get(2)?,
            input_per_mtok: r.try_get(3)?,
            output_per_mtok: r.try_get(4)?,
            cache_read_per_mtok: r.try_get(5)?,
            cache_write_per_mtok: r.try_get(6)?,
            cache_write_1h_per_mtok: r.try_get(7)?,
            reasoning_per_mtok: r.try_get(8)?,
            image_input_per_mtok: r.try_get(9)?,
            per_image: per_image(r.try_get(10)?),
            batch_factor: r.try_get(11)?,
            flex_factor: r.try_get(12)?,
        };
        prices.push((r.try_get(0)?, r.try_get(1)?, price));
    }
    book.replace(prices);
    Ok(())
}

/// `llm_prices.per_image_usd` as a map; keys whose value is not a number are left out.
fn per_image(v: Option<serde_json::Value>) -> std::collections::BTreeMap<String, f64> {
    match v {
        Some(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect(),
        _ => Default::default(),
    }
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
