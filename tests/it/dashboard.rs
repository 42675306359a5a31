//! The usage dashboard (`/dashboard` on the gateway): its keys and answers over plain HTTP,
//! then in a real browser (headless Chromium): the page renders its charts, its numbers
//! equal what SQL computes from the raw `llm_calls` and `llm_jobs` rows, and the tenant filter
//! narrows every figure to one tenant.

use reqwest::StatusCode;
use reqwest::header;

use crate::browser::Browser;
use crate::gateway::Setup;
use crate::history_data::{history, priced_database, set_prices};

/// A gateway (dashboard `on` or off) over a history of 252 results of three tenants, and a
/// monthly budget for globex.
async fn setup(on: bool) -> Setup {
    let s = Setup::build("", |c| c.gateway.dashboard = on, false).await;
    set_prices(&s.app.db).await;
    llm_worker::usage::write_batch(&s.app.db, &history(240, 20))
        .await
        .unwrap();
    // And some today, so this month has spend whatever the date.
    llm_worker::usage::write_batch(&s.app.db, &history(12, 0))
        .await
        .unwrap();
    sqlx::query("INSERT INTO llm_tenant_budgets (tenant, monthly_usd) VALUES ('globex', 2)")
        .execute(&s.app.db)
        .await
        .unwrap();
    s
}

/// The start of the dashboard's default period (the last 30 UTC days) in SQL.
const PERIOD_START: &str =
    "(((now() AT TIME ZONE 'UTC')::date - 29)::timestamp AT TIME ZONE 'UTC')";

/// Spend (rounded as the page rounds it) and calls of `tenant` (every tenant for None) over
/// the period, from the raw rows.
async fn spend(db: &sqlx::PgPool, tenant: Option<&str>) -> (f64, i64) {
    sqlx::query_as(&format!(
        "SELECT coalesce(round(sum(cost_usd), 4), 0)::float8, count(*)
         FROM llm_calls WHERE started_at >= {PERIOD_START} AND ($1::text IS NULL OR tenant = $1)"
    ))
    .bind(tenant)
    .fetch_one(db)
    .await
    .unwrap()
}

fn number(text: &str) -> f64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_is_off_unless_configured_and_only_for_admin_keys() {
    let off = Setup::build("", |_| {}, false).await;
    let http = reqwest::Client::new();
    let admin = off.key_of("ops", true).await;
    let r = http
        .get(off.url("/dashboard"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "off by default");
    off.app.teardown().await;

    let s = setup(true).await;
    let admin = s.key_of("ops", true).await;
    let page = |key: Option<&str>, query: &str| {
        let mut r = http.get(s.url(&format!("/dashboard{query}")));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // No key, a tenant's key, a wrong key: the login form, 401.
    for key in [None, Some(s.key.as_str()), Some("llmw_not-a-key")] {
        let r = page(key, "").await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        let body = r.text().await.unwrap();
        assert!(body.contains(r#"action="/dashboard/login""#), "{body}");
        assert!(!body.contains("by-tenant"));
    }
    let r = page(Some(&admin), "").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
    let body = r.text().await.unwrap();
    assert!(body.contains(r#"<table id="by-tenant">"#));
    // Bad filters are refused, not guessed.
    assert_eq!(
        page(Some(&admin), "?period=1y").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        page(Some(&admin), "?tenant=a%20b").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // The scripts are served from the gateway itself.
    let js = http
        .get(s.url("/dashboard/assets/uPlot.iife.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    assert!(js.text().await.unwrap().contains("uPlot"));
    assert_eq!(
        http.get(s.url("/dashboard/assets/nope.js"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    // The login form's key becomes an HttpOnly cookie for /dashboard only.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .post(s.url("/dashboard/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("key={admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = http
        .get(s.url("/dashboard"))
        .header(header::COOKIE, &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = no_redirects
        .post(s.url("/dashboard/login"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!("key={}", s.key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a tenant's key");
    assert!(r.headers().get(header::SET_COOKIE).is_none());
    s.app.teardown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_renders_in_a_browser_with_the_numbers_sql_gives_and_a_tenant_filter() {
    let s = setup(true).await;
    let db = s.app.db.clone();
    let admin = s.key_of("ops", true).await;
    let browser = Browser::start().await;

    // Log in through the form: a tenant's key is refused, the admin key lets in.
    browser.goto(&s.url("/dashboard")).await;
    let key = browser.get("#key").await;
    browser.type_into(&key, &s.key).await;
    browser.click(&browser.get("#login button").await).await;
    browser
        .wait_for(
            "the refusal",
            "return !!document.getElementById('login-error')",
        )
        .await;
    assert!(
        browser
            .text_of("#login-error")
            .await
            .contains("not an admin key")
    );
    let key = browser.get("#key").await;
    browser.type_into(&key, &admin).await;
    browser.click(&browser.get("#login button").await).await;
    browser
        .wait_for(
            "the charts",
            "return document.body.getAttribute('data-charts') === 'done'",
        )
        .await;

    // Every chart is drawn (uPlot puts a canvas in each), with lines.
    let charts = browser.all(".chart").await;
    assert_eq!(charts.len(), 7);
    for chart in &charts {
        let drawn = browser.attribute(chart, "data-rendered").await;
        let lines: usize = drawn
            .as_deref()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("a chart was not drawn: {drawn:?}"));
        assert!(lines >= 1);
    }
    assert_eq!(
        browser
            .run("return document.querySelectorAll('.chart canvas').length")
            .await,
        serde_json::json!(7)
    );

    // The numbers equal SQL over the raw rows.
    let (total, calls) = spend(&db, None).await;
    assert!(total > 0.0);
    assert_eq!(number(&browser.text_of("#total-cost_usd").await), total);
    assert_eq!(number(&browser.text_of("#total-calls").await), calls as f64);
    for tenant in ["acme", "globex", "initech"] {
        let (cost, calls) = spend(&db, Some(tenant)).await;
        let row = format!("#by-tenant tr[data-key='{tenant}']");
        let shown = browser
            .text_of(&format!("{row} td[data-col='cost_usd']"))
            .await;
        assert_eq!(number(&shown), cost, "{tenant}");
        let shown = browser
            .text_of(&format!("{row} td[data-col='calls']"))
            .await;
        assert_eq!(number(&shown), calls as f64, "{tenant}");
    }
    let top_cost: f64 = sqlx::query_scalar(&format!(
        "SELECT round(cost_usd, 6)::float8 FROM llm_jobs
         WHERE cost_usd > 0 AND finished_at >= {PERIOD_START} ORDER BY cost_usd DESC LIMIT 1"
    ))
    .fetch_one(&db)
    .await
    .unwrap();
    let jobs = browser.all("#top-jobs tbody.job").await;
    assert_eq!(jobs.len(), 10);
    let first = browser.attribute(&jobs[0], "data-key").await.unwrap();
    let first_cost = browser
        .text_of("#top-jobs tbody.job td[data-col='cost_usd']")
        .await;
    assert_eq!(number(&first_cost), top_cost);
    let calls: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM llm_calls WHERE job_id = '{first}'"
    ))
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(calls >= 1);
    let shown = browser.all(&format!("#calls-{first} tbody tr")).await.len();
    assert_eq!(shown as i64, calls, "the job's calls under it");
    // Budget use against the budget in force (globex's own, 2 USD a month).
    let used: f64 = sqlx::query_scalar(
        "SELECT round(100 * sum(cost_usd) / 2, 1)::float8 FROM llm_calls
         WHERE tenant = 'globex' AND started_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let shown = browser
        .text_of("#budgets tr[data-key='globex'] td[data-col='month_usd_pct']")
        .await;
    assert_eq!(number(&shown), used);
    if let Ok(path) = std::env::var("LLMW_DASHBOARD_SCREENSHOT") {
        std::fs::write(path, browser.screenshot_full().await).unwrap();
    }

    // The tenant filter: one tenant's figures everywhere.
    browser
        .click(&browser.get("#tenant option[value='globex']").await)
        .await;
    browser.click(&browser.get("#apply").await).await;
    browser
        .wait_for(
            "the filtered page",
            "return location.search.includes('tenant=globex') && document.body.getAttribute('data-charts') === 'done'",
        )
        .await;
    assert!(browser.url().await.contains("tenant=globex"));
    assert!(browser.text_of("#scope").await.contains("tenant globex"));
    let (cost, calls) = spend(&db, Some("globex")).await;
    assert_eq!(number(&browser.text_of("#total-cost_usd").await), cost);
    assert_eq!(number(&browser.text_of("#total-calls").await), calls as f64);
    let rows = browser.all("#by-tenant tbody tr").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        browser.attribute(&rows[0], "data-key").await.as_deref(),
        Some("globex")
    );
    for job in browser.all("#top-jobs tbody.job").await {
        let tenant = browser.text(&job).await;
        assert!(tenant.contains("globex"), "{tenant}");
    }

    // Logging out ends the session: the form again.
    browser.click(&browser.get("#logout button").await).await;
    browser
        .wait_for(
            "the login form",
            "return !!document.getElementById('login')",
        )
        .await;
    browser.close().await;
    s.app.teardown().await;
}

/// Grafana's macros and the tenant variable replaced as Grafana would (last 30 days, every
/// tenant).
fn as_grafana_runs_it(sql: &str) -> String {
    let mut sql = sql
        .replace("$__timeFrom()", "(now() - interval '30 days')")
        .replace("$__timeTo()", "now()")
        .replace("${tenant}", "__all");
    while let Some(at) = sql.find("$__timeFilter(") {
        let rest = &sql[at + "$__timeFilter(".len()..];
        let column = &rest[..rest.find(')').unwrap()];
        let filter = format!("{column} BETWEEN now() - interval '30 days' AND now()");
        sql = format!("{}{filter}{}", &sql[..at], &rest[column.len() + 1..]);
    }
    assert!(!sql.contains('$'), "a Grafana macro left: {sql}");
    sql
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_runs_its_sql_and_names_only_metrics_the_fleet_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/llm-worker.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (database, db) = priced_database().await;
    llm_worker::usage::write_batch(&db, &history(120, 10))
        .await
        .unwrap();

    let mut sql = vec![(
        "tenant variable".to_string(),
        dashboard["templating"]["list"][0]["query"]
            .as_str()
            .unwrap()
            .to_string(),
    )];
    let mut promql = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(raw) = target["rawSql"].as_str() {
                sql.push((title.clone(), raw.to_string()));
            }
            if let Some(expr) = target["expr"].as_str() {
                promql.push((title.clone(), expr.to_string()));
            }
        }
    }
    assert!(sql.len() >= 10 && promql.len() >= 7);
    for (title, query) in &sql {
        let rows = sqlx::query(&as_grafana_runs_it(query))
            .fetch_all(&db)
            .await
            .unwrap_or_else(|e| panic!("{title}: {e}"));
        if title.starts_with("Spend per day") {
            assert!(!rows.is_empty(), "{title}: no rows over 10 days of history");
        }
    }

    // Every metric an expression names is one the worker or gateway registers (families
    // without samples are not in /metrics yet, so the registrations are read).
    let registered = include_str!("../../src/metrics/mod.rs");
    for (title, expr) in &promql {
        let names = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("llm_"));
        for name in names {
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                registered.contains(&format!("\"{family}\",")),
                "{title}: {name} is not a metric of llm-worker"
            );
        }
    }
    db.close().await;
    database.drop().await;
}
