//! The usage history at scale: monthly partitions, the upgrade from unpartitioned tables, the
//! daily rollups (exact against the raw rows), and `llm-worker usage prune`.
//!
//! These tests need Postgres only: results are written with the recorder's own
//! `write_batch`, built as the contract's result JSON.

use chrono::Utc;
use llm_worker::contract::ResultEvent;
use llm_worker_testkit::ScratchDatabase;
use uuid::Uuid;

use crate::helpers::Services;
use crate::history_data::{history, priced_database, record, set_prices, synthetic, wire};

/// The views' definitions before the rollups existed, over the raw rows: the rollup-backed
/// views must give exactly these figures.
const RAW_VIEWS: [(&str, &str); 5] = [
    (
        "llm_usage_daily",
        "SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day, c.tenant, c.provider, c.model,
                count(*) AS calls, count(DISTINCT c.job_id) AS jobs,
                count(*) FILTER (WHERE c.status = 'error') AS failed_calls,
                sum(c.input_tokens)::bigint AS input_tokens,
                sum(c.output_tokens)::bigint AS output_tokens, sum(c.cost_usd) AS cost_usd,
                count(*) FILTER (WHERE c.cost_usd IS NULL AND c.input_tokens + c.output_tokens > 0) AS unpriced_calls,
                sum(c.cache_read_tokens)::bigint, sum(c.cache_write_tokens)::bigint,
                sum(c.cache_write_1h_tokens)::bigint, sum(c.reasoning_tokens)::bigint,
                sum(c.image_input_tokens)::bigint
         FROM llm_calls c GROUP BY 1, 2, 3, 4",
    ),
    (
        "llm_jobs_daily",
        "SELECT (j.finished_at AT TIME ZONE 'UTC')::date AS day, j.tenant, j.kind, j.status,
                j.error_code, count(*) AS jobs, sum(j.input_tokens)::bigint,
                sum(j.output_tokens)::bigint, sum(j.cost_usd)
         FROM llm_jobs j GROUP BY 1, 2, 3, 4, 5",
    ),
    (
        "llm_cache_savings_daily",
        "SELECT (j.finished_at AT TIME ZONE 'UTC')::date AS day, j.tenant,
                count(*) FILTER (WHERE j.kind = 'generate'), count(*) FILTER (WHERE j.cache_hit),
                sum(j.cache_saved_input_tokens + j.cache_saved_output_tokens)::bigint,
                sum(j.cache_saved_cost_usd)
         FROM llm_jobs j GROUP BY 1, 2",
    ),
    (
        "llm_prompt_cache_daily",
        "SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day, c.tenant, c.provider, c.model,
                count(*), count(*) FILTER (WHERE c.cache_read_tokens > 0),
                sum(c.input_tokens)::bigint, sum(c.cache_read_tokens)::bigint,
                sum(c.cache_write_tokens + c.cache_write_1h_tokens)::bigint,
                round(sum(c.cache_read_tokens)::numeric / nullif(sum(c.input_tokens), 0), 4),
                sum(c.cache_read_tokens * (p.input_usd_per_mtok - p.cache_read_usd_per_mtok)) / 1000000
         FROM llm_calls c
         LEFT JOIN llm_prices p ON p.provider = c.provider AND p.model = c.model
                               AND p.effective_from = c.price_effective_from
         GROUP BY 1, 2, 3, 4",
    ),
    (
        "llm_tenant_spend",
        "WITH spend AS (
             SELECT c.tenant,
                    coalesce(sum(c.cost_usd) FILTER (WHERE c.started_at >= d.day), 0) AS day_usd,
                    coalesce(sum(c.input_tokens + c.output_tokens) FILTER (WHERE c.started_at >= d.day), 0)::bigint AS day_tokens,
                    coalesce(sum(c.cost_usd), 0) AS month_usd,
                    coalesce(sum(c.input_tokens + c.output_tokens), 0)::bigint AS month_tokens
             FROM llm_calls c,
                  LATERAL (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day,
                                  date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month) d
             WHERE c.started_at >= d.month
             GROUP BY c.tenant)
         SELECT s.tenant, s.day_usd, s.day_tokens, s.month_usd, s.month_tokens FROM spend s",
    ),
];

/// The columns of each view compared with its raw definition (all but the budget columns of
/// `llm_tenant_spend`, which come from another table either way).
fn view_columns(view: &str) -> &'static str {
    match view {
        "llm_tenant_spend" => "tenant, day_usd, day_tokens, month_usd, month_tokens",
        _ => "*",
    }
}

/// Rows in one query and not the other, both ways (0 when they are the same multiset).
async fn difference(db: &sqlx::PgPool, a: &str, b: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM (({a}) EXCEPT ALL ({b})) x)
              + (SELECT count(*) FROM (({b}) EXCEPT ALL ({a})) y)"
    ))
    .fetch_one(db)
    .await
    .unwrap();
    n
}

async fn count(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

async fn assert_views_equal_raw_rows(db: &sqlx::PgPool) {
    for (view, raw) in RAW_VIEWS {
        let rows = count(db, &format!("SELECT count(*) FROM {view}")).await;
        assert!(rows > 0, "{view} is empty");
        let from_view = format!("SELECT {} FROM {view}", view_columns(view));
        assert_eq!(
            difference(db, &from_view, raw).await,
            0,
            "{view} differs from its raw rows"
        );
    }
}

#[tokio::test]
async fn rollups_are_exact_against_the_raw_rows_and_a_rebuild_gives_the_same_rollups() {
    let (database, db) = priced_database().await;
    let results = history(900, 75);
    record(&db, &results).await;

    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 900);
    let calls: i64 = results.iter().map(|r| r.attempts.len() as i64).sum();
    assert_eq!(count(&db, "SELECT count(*) FROM llm_calls").await, calls);
    // 75 days reach over at least two month boundaries: three monthly partitions or more.
    assert!(count(&db, "SELECT count(DISTINCT tableoid) FROM llm_calls").await >= 3);
    assert_views_equal_raw_rows(&db).await;
    // Each call carries its job's kind.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM llm_calls c JOIN llm_jobs j USING (job_id) WHERE c.kind <> j.kind"
        )
        .await,
        0
    );

    // Latency: counts and extremes exact, percentiles within one histogram bucket (26 %).
    let exact = "SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day, provider, model,
                        count(*), count(*) FILTER (WHERE status = 'error'),
                        round(avg(latency_ms))::bigint, max(latency_ms)
                 FROM llm_calls c GROUP BY 1, 2, 3";
    let rolled = "SELECT day, provider, model, calls, failed_calls, latency_ms_avg, latency_ms_max
                  FROM llm_provider_latency_daily";
    assert_eq!(difference(&db, exact, rolled).await, 0);
    let far: i64 = count(
        &db,
        "SELECT count(*) FROM llm_provider_latency_daily v
         JOIN (SELECT (started_at AT TIME ZONE 'UTC')::date AS day, provider, model,
                      percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
               FROM llm_calls GROUP BY 1, 2, 3) e USING (day, provider, model)
         WHERE NOT (v.latency_ms_p95 >= e.p95 AND v.latency_ms_p95 <= greatest(e.p95 * 1.26, e.p95 + 1))",
    )
    .await;
    assert_eq!(far, 0, "a p95 is off by more than a bucket");

    // The rebuild (used by the upgrade and by repricing) gives what the recorder built.
    sqlx::query("CREATE TABLE calls_before AS SELECT * FROM llm_rollup_calls")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE jobs_before AS SELECT * FROM llm_rollup_jobs")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("SELECT llm_rollup_rebuild(NULL, NULL)")
        .execute(&db)
        .await
        .unwrap();
    for (rollup, before) in [
        ("llm_rollup_calls", "calls_before"),
        ("llm_rollup_jobs", "jobs_before"),
    ] {
        let a = format!("SELECT * FROM {rollup}");
        let b = format!("SELECT * FROM {before}");
        assert!(count(&db, &format!("SELECT count(*) FROM {rollup}")).await > 20);
        assert_eq!(difference(&db, &a, &b).await, 0, "{rollup} rebuilt differs");
    }
    db.close().await;
    database.drop().await;
}

#[tokio::test]
async fn repricing_changes_the_rollups_with_the_rows() {
    let (database, db) = priced_database().await;
    let results = history(300, 20);
    record(&db, &results).await;
    let before: Option<f64> =
        sqlx::query_scalar("SELECT sum(cost_usd)::float8 FROM llm_usage_daily")
            .fetch_one(&db)
            .await
            .unwrap();
    // A back-dated price for p3/m3, which had none, re-applied to every call.
    sqlx::query(
        "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok, output_usd_per_mtok)
         VALUES ('p3', 'm3', '2000-01-01', 2, 4)",
    )
    .execute(&db)
    .await
    .unwrap();
    let scope = llm_worker::usage::prices::Scope {
        since: "2000-01-01T00:00:00Z".parse().unwrap(),
        until: None,
        provider: None,
        model: None,
        dry_run: false,
    };
    let repriced = llm_worker::usage::prices::reprice(&db, &scope)
        .await
        .unwrap();
    assert!(repriced.calls_changed > 0);
    let after: Option<f64> =
        sqlx::query_scalar("SELECT sum(cost_usd)::float8 FROM llm_usage_daily")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(after.unwrap() > before.unwrap(), "{before:?} -> {after:?}");
    assert_views_equal_raw_rows(&db).await;
    db.close().await;
    database.drop().await;
}

/// The migrations before the history was partitioned, as files of their own.
fn migrations_before_partitioning() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmw-migrations-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.as_str() < "20261203000001" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    dir
}

#[tokio::test]
async fn an_upgrade_from_unpartitioned_tables_keeps_every_row_and_every_view() {
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw_upgrade")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    let dir = migrations_before_partitioning();
    sqlx::migrate::Migrator::new(dir.as_path())
        .await
        .unwrap()
        .run(&db)
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid WHERE c.relname = 'llm_calls'"
        )
        .await,
        0,
        "the old schema is not partitioned"
    );
    set_prices(&db).await;
    // Rows as the recorder of before wrote them (llm_jobs first: its totals come from calls).
    let results = history(400, 70);
    for r in &results {
        for a in &r.attempts {
            sqlx::query(
                "INSERT INTO llm_calls (job_id, attempt, trace_id, tenant, provider, model, status,
                     input_tokens, output_tokens, tokens_estimated, cost_usd, latency_ms,
                     http_status, error_code, started_at, finished_at, cache_read_tokens,
                     reasoning_tokens, images, image_size, image_quality, price_effective_from)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                        llm_call_cost(p, $8, $9, $15, 0, 0, $16, 0, $17, $18, $19),
                        $11, $12, $13, $14, $20, $15, $16, $17, $18, $19, p.effective_from
                 FROM (SELECT 1) one LEFT JOIN LATERAL llm_price_at($5, $6, $14) p ON true",
            )
            .bind(r.job_id)
            .bind(a.attempt as i32)
            .bind(&r.trace_id)
            .bind(&r.tenant)
            .bind(&a.provider)
            .bind(&a.model)
            .bind(if a.error.is_some() { "error" } else { "ok" })
            .bind(a.input_tokens as i64)
            .bind(a.output_tokens as i64)
            .bind(a.tokens_estimated)
            .bind(a.latency_ms as i64)
            .bind(a.http_status.map(i32::from))
            .bind(a.error.as_ref().map(|e| wire(&e.code)))
            .bind(a.started_at)
            .bind(a.classes.cache_read_tokens as i64)
            .bind(a.classes.reasoning_tokens as i64)
            .bind(a.images.as_ref().map_or(0, |m| m.count as i32))
            .bind(a.images.as_ref().and_then(|m| m.size.clone()))
            .bind(a.images.as_ref().and_then(|m| m.quality.clone()))
            .bind(a.finished_at)
            .execute(&db)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO llm_jobs (job_id, trace_id, tenant, kind, status, provider, model,
                 input_tokens, output_tokens, cost_usd, attempts, cache_hit, error_code,
                 received_at, finished_at, processing_ms, cache_saved_input_tokens,
                 cache_saved_output_tokens, cache_saved_cost_usd, cache_read_tokens,
                 reasoning_tokens, images)
             SELECT $1, $2, $3, $4, $5, $6, $7, coalesce(sum(c.input_tokens), 0),
                    coalesce(sum(c.output_tokens), 0),
                    CASE WHEN bool_or(c.cost_usd IS NULL) THEN NULL ELSE coalesce(sum(c.cost_usd), 0) END,
                    $8, $9, $10, $11, $12, $13, $14, $15, $16,
                    coalesce(sum(c.cache_read_tokens), 0), coalesce(sum(c.reasoning_tokens), 0),
                    coalesce(sum(c.images), 0)
             FROM llm_calls c WHERE c.job_id = $1",
        )
        .bind(r.job_id)
        .bind(&r.trace_id)
        .bind(&r.tenant)
        .bind(wire(&r.job_kind))
        .bind(if r.error.is_some() { "error" } else { "ok" })
        .bind(&r.provider)
        .bind(&r.model_used)
        .bind(r.attempts.len() as i32)
        .bind(r.cache_hit)
        .bind(r.error.as_ref().map(|e| wire(&e.code)))
        .bind(r.received_at)
        .bind(r.finished_at)
        .bind(r.processing_time_ms as i64)
        .bind(r.cache.as_ref().map_or(0, |c| c.saved_input_tokens as i64))
        .bind(r.cache.as_ref().map_or(0, |c| c.saved_output_tokens as i64))
        .bind(r.cache.as_ref().and_then(|c| c.saved_cost_usd))
        .execute(&db)
        .await
        .unwrap();
    }
    let views = [
        "llm_usage_daily",
        "llm_jobs_daily",
        "llm_tenant_spend",
        "llm_cache_savings_daily",
        "llm_prompt_cache_daily",
    ];
    for table in ["llm_jobs", "llm_calls"] {
        sqlx::query(&format!(
            "CREATE TABLE before_{table} AS SELECT * FROM {table}"
        ))
        .execute(&db)
        .await
        .unwrap();
    }
    for view in views {
        sqlx::query(&format!(
            "CREATE TABLE before_{view} AS SELECT * FROM {view}"
        ))
        .execute(&db)
        .await
        .unwrap();
    }

    llm_worker::usage::migrate(&db).await.unwrap();

    assert!(
        count(
            &db,
            "SELECT count(*) FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid
             WHERE c.relname IN ('llm_calls', 'llm_jobs')"
        )
        .await
            == 2,
        "both tables are partitioned after the upgrade"
    );
    for table in ["llm_jobs", "llm_calls"] {
        let columns: String = sqlx::query_scalar(
            "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)
             FROM information_schema.columns WHERE table_name = $1",
        )
        .bind(format!("before_{table}"))
        .fetch_one(&db)
        .await
        .unwrap();
        let kept = count(&db, &format!("SELECT count(*) FROM before_{table}")).await;
        assert!(kept > 300, "{table}: {kept} rows before");
        assert_eq!(
            difference(
                &db,
                &format!("SELECT {columns} FROM before_{table}"),
                &format!("SELECT {columns} FROM {table}")
            )
            .await,
            0,
            "{table}: rows changed in the upgrade"
        );
    }
    for view in views {
        let columns = view_columns(view);
        assert_eq!(
            difference(
                &db,
                &format!("SELECT {columns} FROM before_{view}"),
                &format!("SELECT {columns} FROM {view}")
            )
            .await,
            0,
            "{view} gives other figures after the upgrade"
        );
    }
    // Redelivered results of before the upgrade add nothing; new results are recorded.
    llm_worker::usage::write_batch(&db, &results[..50])
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 400);
    let fresh = history(30, 1);
    llm_worker::usage::write_batch(&db, &fresh).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 430);
    assert_views_equal_raw_rows(&db).await;
    db.close().await;
    database.drop().await;
}

#[tokio::test]
async fn prune_drops_whole_old_months_keeps_recent_rows_and_the_rollups() {
    let (database, db) = priced_database().await;
    let now = Utc::now();
    let months_ago = |m: u32, i: u64| {
        let at = now.checked_sub_months(chrono::Months::new(m)).unwrap();
        synthetic(i, at)
    };
    let old: Vec<ResultEvent> = (0..30).map(|i| months_ago(16, i)).collect();
    let kept: Vec<ResultEvent> = (0..30).map(|i| months_ago(1, i)).collect();
    let recent = history(60, 3);
    // One set of known months, as one recorder keeps across its batches.
    let months = llm_worker::usage::Months::default();
    for batch in [&old, &kept, &recent] {
        llm_worker::usage::write_batch_in(&db, batch, &months)
            .await
            .unwrap();
    }
    let old_month = old[0].finished_at.format("%Y_%m").to_string();
    let old_days = count(
        &db,
        &format!(
            "SELECT count(*) FROM llm_jobs_daily WHERE day = '{}'",
            old[0].finished_at.date_naive()
        ),
    )
    .await;
    assert!(old_days > 0);
    let usage_rows = count(&db, "SELECT count(*) FROM llm_usage_daily").await;

    let prune = |dry: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llm-worker"));
        cmd.args(["usage", "prune", "--older-than", "13months"])
            .env("DATABASE_URL", &database.url)
            .env_remove("LLM_WORKER_CONFIG")
            .env_remove("NATS_URL");
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let said = prune(true);
    assert!(
        said.contains(&format!("would drop llm_jobs_p{old_month}")),
        "{said}"
    );
    assert!(
        said.contains(&format!("would drop llm_calls_p{old_month}")),
        "{said}"
    );
    assert!(!said.contains(&now.format("%Y_%m").to_string()), "{said}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM llm_jobs").await,
        120,
        "a dry run drops nothing"
    );

    let said = prune(false);
    assert!(
        said.contains(&format!("dropped llm_jobs_p{old_month}")),
        "{said}"
    );
    let gone: Option<String> = sqlx::query_scalar(&format!(
        "SELECT to_regclass('llm_calls_p{old_month}')::text"
    ))
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(gone, None);
    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 90);
    let old_ids: Vec<Uuid> = old.iter().map(|r| r.job_id).collect();
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM llm_calls WHERE job_id IN ({})",
                old_ids
                    .iter()
                    .map(|u| format!("'{u}'"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        )
        .await,
        0
    );
    // The rollups keep the pruned months: the daily views still show them.
    assert_eq!(
        count(&db, "SELECT count(*) FROM llm_usage_daily").await,
        usage_rows
    );
    // Redelivery after a prune still writes no duplicate.
    llm_worker::usage::write_batch(&db, &kept).await.unwrap();
    llm_worker::usage::write_batch(&db, &recent).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 90);
    let calls: i64 = kept
        .iter()
        .chain(&recent)
        .map(|r| r.attempts.len() as i64)
        .sum();
    assert_eq!(count(&db, "SELECT count(*) FROM llm_calls").await, calls);
    // A second prune finds nothing left to drop.
    assert!(prune(false).contains("0 partition(s)"));
    // A late result in a pruned month, from a recorder that knew the month before the prune:
    // its partition is made again, not the result refused.
    let late = months_ago(16, 99);
    llm_worker::usage::write_batch_in(&db, std::slice::from_ref(&late), &months)
        .await
        .unwrap();
    assert_eq!(
        count(&db, &format!("SELECT count(*) FROM llm_jobs_p{old_month}")).await,
        1
    );
    db.close().await;
    database.drop().await;
}

/// The history's unique keys start with their time column (a new row goes to the end of its
/// month's key whatever its job id), and job ids have an index of their own for look-ups by
/// job; random job ids keep the keys' meaning.
#[tokio::test]
async fn history_keys_start_with_the_time_and_job_ids_have_an_index_of_their_own() {
    let (database, db) = priced_database().await;
    let key_of = |table: &'static str| {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(a.attname, ',' ORDER BY k.n)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::regclass AND i.indisprimary",
        )
        .bind(table)
        .fetch_one(&db)
    };
    assert_eq!(
        key_of("llm_calls").await.unwrap(),
        "started_at,job_id,attempt"
    );
    assert_eq!(key_of("llm_jobs").await.unwrap(), "finished_at,job_id");
    for table in ["llm_calls", "llm_jobs"] {
        let by_job = count(
            &db,
            &format!(
                "SELECT count(*) FROM pg_indexes WHERE tablename = '{table}'
                 AND indexdef LIKE '%btree (job_id)'"
            ),
        )
        .await;
        assert_eq!(by_job, 1, "{table} has no index on job_id alone");
    }
    // Written twice (a redelivery), random job ids add each row once, and each job's row
    // finds its calls (job totals are their calls' sums).
    let results: Vec<ResultEvent> = history(40, 2)
        .into_iter()
        .map(|mut r| {
            r.job_id = Uuid::new_v4();
            r
        })
        .collect();
    record(&db, &results).await;
    record(&db, &results).await;
    assert_eq!(count(&db, "SELECT count(*) FROM llm_jobs").await, 40);
    let calls: usize = results.iter().map(|r| r.attempts.len()).sum();
    assert_eq!(
        count(&db, "SELECT count(*) FROM llm_calls").await,
        calls as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM llm_jobs j WHERE j.input_tokens IS DISTINCT FROM
                 (SELECT coalesce(sum(c.input_tokens), 0) FROM llm_calls c WHERE c.job_id = j.job_id)"
        )
        .await,
        0
    );
    db.close().await;
    database.drop().await;
}
