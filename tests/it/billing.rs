//! Money as the provider bills it (CONTRACT.md section 7): token classes read from each wire
//! format, streamed and not, recorded per call and per job; costs per class with the price
//! row recorded; unpriced classes; price changes that leave history alone; `reprice`; the
//! price file; prompt-cache breakpoints passed to the providers.

use llm_worker::usage::prices::{self, PriceFile, Scope};
use llm_worker_testkit::{Billing, FakeLlmServer, Reply};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, collect_reply, provider_base_url};

/// USD per million tokens: input, output, cache read, cache write, 1-hour write, reasoning,
/// image input (each different, so that each class shows in the sum).
const PRICES: [f64; 7] = [2.0, 8.0, 0.5, 2.5, 4.0, 10.0, 3.0];

const BILLED: Billing = Billing {
    input: 1000,
    output: 300,
    cache_read: 600,
    cache_write: 100,
    cache_write_1h: 50,
    reasoning: 120,
    image_input: 40,
};

/// The classes each format reports of [`BILLED`]: cache read, cache write, 1-hour write,
/// reasoning, image input.
fn reported(kind: &str) -> [u64; 5] {
    match kind {
        "openai" => [600, 0, 0, 120, 0],
        "anthropic" => [600, 100, 50, 0, 0],
        "gemini" => [600, 0, 0, 120, 40],
        _ => [0; 5],
    }
}

/// The cost of a call, computed here from the contract's rule (not the worker's code).
fn expected_cost(input: u64, output: u64, c: [u64; 5], p: [f64; 7]) -> f64 {
    let plain_in = input - c[0] - c[1] - c[2] - c[4];
    let plain_out = output - c[3];
    (plain_in as f64 * p[0]
        + plain_out as f64 * p[1]
        + c[0] as f64 * p[2]
        + c[1] as f64 * p[3]
        + c[2] as f64 * p[4]
        + c[3] as f64 * p[5]
        + c[4] as f64 * p[6])
        / 1e6
}

const CLASS_KEYS: [&str; 5] = [
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "image_input_tokens",
];

async fn set_prices(app: &TestApp, provider: &str, from: &str, p: [Option<f64>; 7]) {
    llm_worker::usage::migrate(&app.db).await.unwrap();
    sqlx::query(
        "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok,
             output_usd_per_mtok, cache_read_usd_per_mtok, cache_write_usd_per_mtok,
             cache_write_1h_usd_per_mtok, reasoning_usd_per_mtok, image_input_usd_per_mtok)
         VALUES ($1, 'm', $2::timestamptz, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(provider)
    .bind(from)
    .bind(p[0])
    .bind(p[1])
    .bind(p[2])
    .bind(p[3])
    .bind(p[4])
    .bind(p[5])
    .bind(p[6])
    .execute(&app.db)
    .await
    .unwrap();
}

/// The first SQL block of the README after the text `after`.
fn readme_query(after: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let from = readme.find(after).expect("the README has the query");
    let block = &readme[from..];
    let start = block.find("```sql\n").unwrap() + "```sql\n".len();
    let len = block[start..].find("```").unwrap();
    block[start..start + len]
        .trim()
        .trim_end_matches(';')
        .to_string()
}

async fn run(app: &TestApp, mut job: Value) -> Value {
    let (reply_to, mut sub) = app.reply_inbox().await;
    job["reply_to"] = json!(reply_to);
    app.publish(job).await;
    collect_reply(&mut sub).await.result
}

fn provider(kind: &str, fake: &FakeLlmServer) -> String {
    format!(
        "[providers.p]\ntype = \"{kind}\"\nbase_url = \"{}\"\ndefault_model = \"m\"\nmax_retries = 0\n",
        provider_base_url(kind, fake)
    )
}

/// One call's classes, cost and price row as recorded.
async fn call_row(
    app: &TestApp,
    job_id: Uuid,
) -> (Vec<i64>, i64, i64, Option<f64>, Option<String>) {
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    let (cr, cw, cw1h, r, img, input, output, cost, from): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<f64>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, reasoning_tokens,
                image_input_tokens, input_tokens, output_tokens, cost_usd::float8,
                to_char(price_effective_from AT TIME ZONE 'UTC', 'YYYY-MM-DD')
         FROM llm_calls WHERE job_id = $1",
    )
    .bind(job_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    (vec![cr, cw, cw1h, r, img], input, output, cost, from)
}

#[tokio::test]
async fn in_every_format_each_token_class_is_recorded_as_billed_and_costed_per_class() {
    for kind in ["openai", "anthropic", "gemini", "ollama"] {
        let fake = FakeLlmServer::start().await.unwrap();
        let mut app = TestApp::new(&provider(kind, &fake)).await;
        set_prices(&app, "p", "2000-01-01", PRICES.map(Some)).await;
        app.start_worker().await;
        let classes = reported(kind);
        let cost = expected_cost(1000, 300, classes, PRICES);
        for stream in [true, false] {
            fake.push(Reply::billed(&["Hel", "lo"], BILLED));
            let r = run(&app, json!({"prompt": "hi", "stream": stream})).await;
            let at = format!("{kind} stream={stream}: {r}");
            assert_eq!(r["status"], "ok", "{at}");
            assert_eq!(r["output"], "Hello", "{at}");
            let used = &r["tokens_used"];
            assert_eq!(
                (used["input"].as_u64(), used["output"].as_u64()),
                (Some(1000), Some(300)),
                "{at}"
            );
            for (key, n) in CLASS_KEYS.iter().zip(classes) {
                // A class the provider did not report is absent, never a zero guess.
                let want = (n > 0).then_some(n);
                assert_eq!(used[key].as_u64(), want, "tokens_used.{key}: {at}");
                assert_eq!(
                    r["attempts"][0][key].as_u64(),
                    want,
                    "attempts[0].{key}: {at}"
                );
            }
            assert!(
                (r["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
                "{cost}: {at}"
            );
            let job_id: Uuid = r["job_id"].as_str().unwrap().parse().unwrap();
            let (got, input, output, recorded, from) = call_row(&app, job_id).await;
            assert_eq!(got, classes.map(|n| n as i64).to_vec(), "{at}");
            assert_eq!((input, output), (1000, 300), "{at}");
            assert!(
                (recorded.unwrap() - cost).abs() < 1e-9,
                "{recorded:?} != {cost}: {at}"
            );
            assert_eq!(from.as_deref(), Some("2000-01-01"), "{at}");
            let (job_classes, job_cost): (Vec<i64>, f64) = sqlx::query_as(
                "SELECT ARRAY[cache_read_tokens, cache_write_tokens, cache_write_1h_tokens,
                              reasoning_tokens, image_input_tokens], cost_usd::float8
                 FROM llm_jobs WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
            assert_eq!(job_classes, classes.map(|n| n as i64).to_vec(), "{at}");
            assert!((job_cost - cost).abs() < 1e-9, "{at}");
        }
        // Every cost recomputes from its row and its price row: the README's query says so.
        let differ = app.count(&readme_query("finds no difference")).await;
        assert_eq!(differ, 0, "{kind}");
        // The README's savings query sees the cache reads of both calls.
        let rows: Vec<(chrono::NaiveDate, String, i64, Option<f64>)> = sqlx::query_as(&format!(
            "SELECT day, tenant, cached_tokens::bigint, saved_usd::float8 FROM ({}) q",
            readme_query("prompt caches saved")
        ))
        .fetch_all(&app.db)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{kind}");
        assert_eq!(rows[0].2, 2 * classes[0] as i64, "{kind}");
        // Cache reads and their savings per tenant and model, in SQL.
        let (reads, saved): (i64, Option<f64>) = sqlx::query_as(
            "SELECT cache_read_tokens, cache_saved_usd::float8 FROM llm_prompt_cache_daily
             WHERE tenant = 'default' AND provider = 'p' AND model = 'm'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        assert_eq!(reads, 2 * classes[0] as i64, "{kind}");
        let want = 2.0 * classes[0] as f64 * (PRICES[0] - PRICES[2]) / 1e6;
        assert!(
            (saved.unwrap() - want).abs() < 1e-9,
            "{kind}: {saved:?} != {want}"
        );
        app.teardown().await;
    }
}

#[tokio::test]
async fn an_unpriced_class_costs_null_a_new_price_changes_no_history_and_reprice_changes_what_it_is_asked()
 {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&provider("openai", &fake)).await;
    // Cache reads are not priced.
    let mut first = PRICES.map(Some);
    first[2] = None;
    set_prices(&app, "p", "2000-01-01", first).await;
    app.start_worker().await;

    fake.push(Reply::billed(&["a"], Billing::plain(1000, 300)));
    let a = run(&app, json!({"prompt": "a"})).await;
    let a_id: Uuid = a["job_id"].as_str().unwrap().parse().unwrap();
    let (_, _, _, a_cost, _) = call_row(&app, a_id).await;
    let plain = expected_cost(1000, 300, [0; 5], PRICES);
    assert!((a_cost.unwrap() - plain).abs() < 1e-9);
    let split: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&app.db)
        .await
        .unwrap();

    let cached = Billing {
        cache_read: 600,
        ..Billing::plain(1000, 300)
    };
    fake.push(Reply::billed(&["b"], cached));
    let b = run(&app, json!({"prompt": "b"})).await;
    assert_eq!(
        b["cost_usd"],
        Value::Null,
        "an unpriced class with tokens: {b}"
    );
    let b_id: Uuid = b["job_id"].as_str().unwrap().parse().unwrap();
    let (_, _, _, b_cost, b_from) = call_row(&app, b_id).await;
    assert_eq!(b_cost, None);
    assert_eq!(b_from.as_deref(), Some("2000-01-01"));
    let job_cost: Option<f64> =
        sqlx::query_scalar("SELECT cost_usd::float8 FROM llm_jobs WHERE job_id = $1")
            .bind(b_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(job_cost, None);

    // A corrected, back-dated price (input 3, cache reads 0.5) is in force for both calls
    // now, but recorded costs stay as they were.
    let mut corrected = PRICES.map(Some);
    corrected[0] = Some(3.0);
    set_prices(&app, "p", "2000-01-02", corrected).await;
    assert_eq!(call_row(&app, a_id).await.3, a_cost);
    assert_eq!(call_row(&app, b_id).await.3, None);

    // A dry run reports and changes nothing.
    let scope = Scope {
        since: split,
        dry_run: true,
        ..Scope::default()
    };
    let dry = prices::reprice(&app.db, &scope).await.unwrap();
    assert_eq!(
        (dry.calls_seen, dry.calls_changed, dry.now_priced),
        (1, 1, 1)
    );
    assert_eq!(call_row(&app, b_id).await.3, None);

    // Since the split: B alone, priced now; A untouched.
    let done = prices::reprice(
        &app.db,
        &Scope {
            dry_run: false,
            ..scope
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (done.calls_changed, done.jobs_changed, done.now_priced),
        (1, 1, 1)
    );
    let b_new = expected_cost(1000, 300, [600, 0, 0, 0, 0], corrected.map(Option::unwrap));
    assert!((done.after_usd - b_new).abs() < 1e-9, "{done}");
    let (_, _, _, b_cost, b_from) = call_row(&app, b_id).await;
    assert!((b_cost.unwrap() - b_new).abs() < 1e-9);
    assert_eq!(b_from.as_deref(), Some("2000-01-02"));
    let job_cost: Option<f64> =
        sqlx::query_scalar("SELECT cost_usd::float8 FROM llm_jobs WHERE job_id = $1")
            .bind(b_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!((job_cost.unwrap() - b_new).abs() < 1e-9);
    assert_eq!(call_row(&app, a_id).await.3, a_cost);

    // Everything, for another model only: nothing. For this provider: A (B is current).
    let other = Scope {
        since: chrono::DateTime::UNIX_EPOCH,
        model: Some("other".into()),
        ..Scope::default()
    };
    assert_eq!(
        prices::reprice(&app.db, &other).await.unwrap().calls_seen,
        0
    );
    let all = Scope {
        since: chrono::DateTime::UNIX_EPOCH,
        provider: Some("p".into()),
        ..Scope::default()
    };
    let r = prices::reprice(&app.db, &all).await.unwrap();
    assert_eq!((r.calls_seen, r.calls_changed), (2, 1), "{r}");
    let a_new = expected_cost(1000, 300, [0; 5], corrected.map(Option::unwrap));
    assert!(
        (r.after_usd - r.before_usd - (a_new - plain)).abs() < 1e-9,
        "{r}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn the_price_file_loads_under_configured_providers_once() {
    let fake = FakeLlmServer::start().await.unwrap();
    let providers = format!(
        "{}[providers.claude]\ntype = \"anthropic\"\nbase_url = \"{}\"\ndefault_model = \"claude-sonnet-4-0\"\n\
         [routes]\ndefault = [\"p\"]\n",
        provider("openai", &fake),
        fake.root_url()
    );
    let app = TestApp::new(&providers).await;
    llm_worker::usage::migrate(&app.db).await.unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prices/list-prices.toml");
    let file = PriceFile::read(&path).unwrap();
    let entries = file.prices.len();
    assert!(
        entries >= 15,
        "the shipped file lists the well-known models"
    );
    let loaded = prices::load(&app.db, &app.config, &file).await.unwrap();
    assert_eq!(loaded.added, entries);
    assert_eq!(loaded.providers["openai"], ["p"]);
    assert_eq!(loaded.providers["anthropic"], ["claude"]);
    // No Gemini provider is configured: its prices go under the type's name.
    assert_eq!(loaded.providers["gemini"], ["gemini"]);
    let (input, cached, written_1h, source): (f64, f64, f64, String) = sqlx::query_as(
        "SELECT input_usd_per_mtok::float8, cache_read_usd_per_mtok::float8,
                cache_write_1h_usd_per_mtok::float8, source
         FROM llm_prices WHERE provider = 'claude' AND model = 'claude-sonnet-4-0'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((input, cached, written_1h), (3.0, 0.3, 6.0));
    assert!(source.contains(&file.checked.to_string()), "{source}");
    // Loading it again adds nothing.
    let again = prices::load(&app.db, &app.config, &file).await.unwrap();
    assert_eq!((again.added, again.unchanged), (0, entries));
    app.teardown().await;
}

#[tokio::test]
async fn cache_breakpoints_reach_anthropic_as_cache_control_and_openai_as_a_prompt_cache_key() {
    let claude = FakeLlmServer::start().await.unwrap();
    let openai = FakeLlmServer::start().await.unwrap();
    let providers = format!(
        "[providers.claude]\ntype = \"anthropic\"\nbase_url = \"{}\"\ndefault_model = \"c\"\nmax_retries = 0\n\
         {}[routes]\ndefault = [\"claude\"]\nopen = [\"p\"]\n",
        claude.root_url(),
        provider("openai", &openai),
    );
    let mut app = TestApp::new(&providers).await;
    app.start_worker().await;
    let job = json!({
        "tenant": "acme",
        "messages": [
            {"role": "system", "content": "You are a careful reader.", "cache": "1h"},
            {"role": "user", "content": "A long document.", "cache": "5m"},
            {"role": "user", "content": "Summarise it."}
        ],
        "context": ["retrieved"],
    });
    claude.push(Reply::billed(
        &["ok"],
        Billing {
            cache_write_1h: 6,
            ..Billing::plain(20, 1)
        },
    ));
    let r = run(&app, job.clone()).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["tokens_used"]["cache_write_1h_tokens"], 6, "{r}");
    let sent = claude.requests().pop().unwrap();
    assert_eq!(
        sent["system"][0],
        json!({"type": "text", "text": "You are a careful reader.",
               "cache_control": {"type": "ephemeral", "ttl": "1h"}})
    );
    assert_eq!(sent["system"][1]["text"], "Context:\n[1] retrieved\n");
    assert_eq!(
        sent["messages"][0]["content"][0]["cache_control"],
        json!({"type": "ephemeral"}),
        "{sent}"
    );
    let mut open = job;
    open["task_type"] = json!("open");
    openai.push(Reply::answer(&["ok"], (20, 1)));
    assert_eq!(run(&app, open.clone()).await["status"], "ok");
    let key = openai.requests().pop().unwrap()["prompt_cache_key"].clone();
    assert!(
        key.as_str().is_some_and(|k| k.starts_with("llmw-")),
        "{key}"
    );
    // The job's own key goes as it is.
    open["prompt_cache_key"] = json!("doc-42");
    openai.push(Reply::answer(&["ok"], (20, 1)));
    run(&app, open).await;
    assert_eq!(
        openai.requests().pop().unwrap()["prompt_cache_key"],
        "doc-42"
    );
    app.teardown().await;
}
