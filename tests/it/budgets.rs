//! Tenant budgets through the contract, enforced by a fleet of worker processes sharing one
//! counter: jobs past the budget are `budget_exceeded` without a provider call, recorded in
//! `llm_jobs`, the overshoot stays within the jobs in flight, and each warning threshold is
//! published once.

use std::time::Duration;

use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_results, openai_provider};

const WORKERS: usize = 3;
const IN_FLIGHT: usize = 4;
/// Tokens of one answered job (15 in, 5 out).
const JOB_TOKENS: u64 = 20;
const BUDGET: u64 = 1000;

#[tokio::test]
async fn three_workers_hold_a_tenant_to_its_budget_within_the_jobs_in_flight() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    // Calls take long enough that many jobs are in flight when the budget runs out.
    fake.set_latency(Duration::from_millis(100));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n\
         [tenants.acme]\ndaily_budget_tokens = {BUDGET}\nbudget_warnings = [50, 100]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let app = TestApp::new(&toml).await;
    let prefix = app.config.nats.subject_prefix.clone();
    let mut warnings = app
        .client
        .subscribe(format!("{prefix}.events.budget.>"))
        .await
        .unwrap();
    let in_flight = IN_FLIGHT.to_string();
    let env = [("LLM_WORKER__WORKER__MAX_IN_FLIGHT", in_flight.as_str())];
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(app.spawn_process_with("", &["run"], &env).await);
    }
    let (reply_to, mut sub) = app.reply_inbox().await;
    let (acme_jobs, other_jobs) = (120, 12);
    for i in 0..acme_jobs + other_jobs {
        // Another tenant's jobs, without a budget, among them: never refused.
        let tenant = if i % 11 == 0 { "other" } else { "acme" };
        app.publish(
            json!({"prompt": "x", "tenant": tenant, "reply_to": reply_to, "stream": false}),
        )
        .await;
    }
    let results = collect_results(&mut sub, acme_jobs + other_jobs).await;
    let of = |tenant: &str| -> Vec<&Value> {
        results.values().filter(|r| r["tenant"] == tenant).collect()
    };
    assert_eq!(of("other").len(), other_jobs);
    assert!(of("other").iter().all(|r| r["status"] == "ok"));
    let acme = of("acme");
    assert_eq!(acme.len(), acme_jobs);
    let answered = acme.iter().filter(|r| r["status"] == "ok").count() as u64;
    let refused: Vec<_> = acme.iter().filter(|r| r["status"] != "ok").collect();
    for r in &refused {
        assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
        assert_eq!(r["error"]["retryable"], false);
        assert_eq!(r["attempts"], json!([]), "no provider call: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("daily budget of 1000 tokens is spent"),
            "{message}"
        );
    }
    eprintln!(
        "budget test: {answered} acme jobs answered, {} refused",
        refused.len()
    );
    // The budget is used up, and overshot by no more than the jobs in flight fleet-wide.
    let bound = BUDGET / JOB_TOKENS + (WORKERS * IN_FLIGHT) as u64;
    assert!(
        answered * JOB_TOKENS >= BUDGET,
        "refused before the budget was spent: {answered} jobs answered"
    );
    assert!(
        answered <= bound,
        "{answered} jobs answered; the bound is {bound}"
    );
    assert_eq!(
        fake.request_count() as u64,
        answered + other_jobs as u64,
        "refused jobs reach no provider"
    );
    // Each threshold is announced once, whichever worker's charge crossed it.
    let mut seen = Vec::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(500), warnings.next()).await
    {
        seen.push(serde_json::from_slice::<Value>(&msg.payload).unwrap());
    }
    let thresholds: Vec<_> = seen
        .iter()
        .map(|w| w["threshold_percent"].as_u64().unwrap())
        .collect();
    assert_eq!(thresholds.len(), 2, "{seen:?}");
    assert!(
        thresholds.contains(&50) && thresholds.contains(&100),
        "{seen:?}"
    );
    for w in &seen {
        assert_eq!(
            (&w["type"], &w["tenant"], &w["period"], &w["measure"]),
            (
                &json!("budget_warning"),
                &json!("acme"),
                &json!("day"),
                &json!("tokens")
            )
        );
        assert_eq!(w["budget"], json!(1000.0));
    }
    // Refusals are in the ledger like any other outcome.
    app.wait_count(
        "SELECT count(*) FROM llm_jobs WHERE tenant = 'acme' AND error_code = 'budget_exceeded'",
        refused.len() as i64,
    )
    .await;
    // Spend against the budget in SQL, once every call is recorded.
    app.wait_count(
        "SELECT count(*) FROM llm_calls WHERE tenant = 'acme'",
        answered as i64,
    )
    .await;
    let (day_tokens, daily_tokens, pct, own): (i64, Option<i64>, Option<f64>, bool) =
        sqlx::query_as(
            "SELECT day_tokens, daily_tokens, day_tokens_pct::float8, own_policy \
             FROM llm_tenant_spend WHERE tenant = 'acme'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(day_tokens as u64, answered * JOB_TOKENS);
    assert_eq!(daily_tokens, Some(BUDGET as i64));
    assert!(own && pct.unwrap() >= 100.0, "{pct:?}");
    drop(workers);
    app.teardown().await;
}
