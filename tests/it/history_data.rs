//! A synthetic usage history for the history and dashboard tests: a scratch database with
//! prices, varied results built as the contract's result JSON, and writing them with the
//! recorder's own `write_batch` as redeliveries do.

use chrono::{DateTime, Duration, Utc};
use llm_worker::contract::ResultEvent;
use llm_worker_testkit::ScratchDatabase;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::Services;

/// A scratch database with every migration applied, and prices: p1/m1 prices every class,
/// p2/m2 prices tokens but not cache reads, p3/m3 has no price.
pub(crate) async fn priced_database() -> (ScratchDatabase, sqlx::PgPool) {
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw_hist")
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    llm_worker::usage::migrate(&db).await.unwrap();
    set_prices(&db).await;
    (database, db)
}

pub(crate) async fn set_prices(db: &sqlx::PgPool) {
    sqlx::query(
        "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok,
             output_usd_per_mtok, cache_read_usd_per_mtok, reasoning_usd_per_mtok,
             image_input_usd_per_mtok, per_image_usd)
         VALUES ('p1', 'm1', '2000-01-01', 3, 15, 0.3, 15, 3, '{\"*\": 0.04}'),
                ('p2', 'm2', '2000-01-01', 1, 2, NULL, 2, 1, NULL)",
    )
    .execute(db)
    .await
    .unwrap();
}

/// A contract enum as it is spelt on the wire (and in the tables).
pub(crate) fn wire(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// One call of a synthetic result.
fn call(n: u32, provider: &str, error: Option<&str>, started: DateTime<Utc>, i: u64) -> Value {
    let (input, output) = if provider == "p-img" {
        (0, 0)
    } else {
        (100 + i % 900, 10 + i % 300)
    };
    let mut c = json!({
        "attempt": n, "provider": provider,
        "model": provider.replace('p', "m"),
        "error": error.map(|code| json!({"code": code, "message": "synthetic", "retryable": true})),
        "input_tokens": input, "output_tokens": output,
        "tokens_estimated": i.is_multiple_of(11),
        "cost_usd": null,
        "http_status": if error.is_some() { 503 } else { 200 },
        "latency_ms": (i * 37) % 9_000 + 1,
        "ttft_ms": null,
        "started_at": ts(started),
        "finished_at": ts(started + Duration::milliseconds(((i * 37) % 9_000 + 1) as i64)),
    });
    if provider == "p1" && input > 0 {
        c["cache_read_tokens"] = json!(input / 2);
        c["reasoning_tokens"] = json!(output / 3);
    }
    if provider == "p-img" {
        c["provider"] = json!("p1");
        c["model"] = json!("m1");
        c["images"] = json!({"count": 1 + i % 2, "size": "1024x1024", "quality": "hd"});
    }
    c
}

/// The `i`th of a set of varied results finishing at `finished`: answered, answered after a
/// retry and a fallback, failed on every provider, cache hits, refused, unpriced, image jobs; three
/// tenants; some calls started the day before their job finished.
pub(crate) fn synthetic(i: u64, finished: DateTime<Utc>) -> ResultEvent {
    let tenant = ["acme", "globex", "initech"][(i % 3) as usize];
    let kind = match i % 10 {
        7 | 8 => "embed",
        9 => "image",
        _ => "generate",
    };
    let start = finished - Duration::milliseconds(((i * 7919) % 90_000) as i64 + 20_000);
    let pattern = if kind == "image" { 6 } else { i % 6 };
    let (attempts, status, error, provider, attempt, cache): (Vec<Value>, _, _, _, _, _) =
        match pattern {
            0 => (
                vec![call(1, "p1", None, start, i)],
                "ok",
                None,
                Some("p1"),
                Some(1),
                None,
            ),
            1 => (
                vec![
                    call(1, "p2", Some("server_error"), start, i),
                    call(
                        2,
                        "p2",
                        Some("rate_limited"),
                        start + Duration::seconds(1),
                        i + 3,
                    ),
                    call(3, "p1", None, start + Duration::seconds(3), i + 1),
                ],
                "ok",
                None,
                Some("p1"),
                Some(3),
                None,
            ),
            2 => (
                vec![
                    call(1, "p2", Some("server_error"), start, i),
                    call(
                        2,
                        "p3",
                        Some("overloaded"),
                        start + Duration::seconds(2),
                        i + 2,
                    ),
                ],
                "error",
                Some("all_providers_failed"),
                None,
                None,
                None,
            ),
            3 => (
                vec![],
                "ok",
                None,
                Some("p1"),
                None,
                Some(
                    json!({"stored_at": ts(start), "saved_input_tokens": 40 + i % 7,
                            "saved_output_tokens": 9, "saved_cost_usd": if i.is_multiple_of(4) { Value::Null } else { json!(0.00025) }}),
                ),
            ),
            4 => (vec![], "error", Some("invalid_job"), None, None, None),
            5 => (
                vec![call(1, "p3", None, start, i)],
                "ok",
                None,
                Some("p3"),
                Some(1),
                None,
            ),
            _ => (
                vec![call(1, "p-img", None, start, i)],
                "ok",
                None,
                Some("p1"),
                Some(1),
                None,
            ),
        };
    let model = provider.map(|p: &str| p.replace('p', "m"));
    let result = json!({
        "type": "result",
        "job_id": Uuid::new_v4(),
        "trace_id": format!("trace-{i}"),
        "status": status,
        "output": "x",
        "finish_reason": "stop",
        "tokens_used": {"input": 1, "output": 1, "total": 2},
        "model_used": model,
        "provider": provider,
        "attempt": attempt,
        "attempts": attempts,
        "cost_usd": null,
        "cache_hit": cache.is_some(),
        "cache": cache,
        "processing_time_ms": (i * 131) % 60_000,
        "error": error.map(|code| json!({"code": code, "message": "synthetic"})),
        "job_kind": kind,
        "tenant": tenant,
        "task_type": null,
        "metadata": {"i": i},
        "worker_id": "w-1",
        "received_at": ts(start - Duration::milliseconds(5)),
        "finished_at": ts(finished),
    });
    serde_json::from_value(result).unwrap()
}

/// `n` results spread over the `days` days before now (the last minutes of today included).
pub(crate) fn history(n: u64, days: i64) -> Vec<ResultEvent> {
    let now = Utc::now();
    let span = Duration::days(days).num_milliseconds() as u64;
    (0..n)
        .map(|i| {
            let back = span - span * i / n;
            // Every 50th result finishes just after a UTC midnight: its calls started the day before.
            let at = if i.is_multiple_of(50) {
                let day = (now - Duration::milliseconds(back as i64)).date_naive();
                day.and_hms_opt(0, 0, 4).unwrap().and_utc()
            } else {
                now - Duration::milliseconds(back as i64)
            };
            synthetic(i, at.min(now))
        })
        .collect()
}

/// Write results in batches of uneven sizes, each batch twice and with the previous batch's
/// last result again (as redeliveries do).
pub(crate) async fn record(db: &sqlx::PgPool, results: &[ResultEvent]) {
    let mut at = 0;
    let mut size = 1;
    while at < results.len() {
        let end = (at + size).min(results.len());
        let mut batch: Vec<ResultEvent> = results[at..end].to_vec();
        if at > 0 {
            batch.push(results[at - 1].clone());
        }
        llm_worker::usage::write_batch(db, &batch).await.unwrap();
        llm_worker::usage::write_batch(db, &batch).await.unwrap();
        at = end;
        size = size % 37 + 7;
    }
}
