//! Tenant budgets through the contract, enforced by a fleet of worker processes sharing one
//! counter: jobs past the budget are `budget_exceeded` without a provider call, recorded in
//! `llm_jobs`; with every call's worst case reserved before it is made, spend never passes
//! the budget, however many jobs are in flight; each warning threshold is published once.

use std::time::Duration;

use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_results, openai_provider};

const WORKERS: usize = 3;
const IN_FLIGHT: usize = 4;
/// Tokens of one answered job (15 in, 5 out).
const JOB_TOKENS: u64 = 20;
/// What one job reserves: its prompt `x` (1 byte) plus 16 tokens for each of its message and
/// the system slot, and `max_tokens` (5).
const WORST_CASE: u64 = 1 + 2 * 16 + 5;
const BUDGET: u64 = 1000;

#[tokio::test]
async fn three_workers_hold_a_tenant_to_its_budget_with_jobs_in_flight_and_never_overshoot() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    // Calls take long enough that many jobs are in flight when the budget runs out.
    fake.set_latency(Duration::from_millis(100));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n\
         [tenants.acme]\ndaily_budget_tokens = {BUDGET}\nbudget_warnings = [50, 90]\n",
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
            json!({"prompt": "x", "tenant": tenant, "reply_to": reply_to,
                           "stream": false, "options": {"max_tokens": 5}}),
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
        assert!(message.contains("daily budget of 1000 tokens"), "{message}");
    }
    eprintln!(
        "budget test: {answered} acme jobs answered, {} refused",
        refused.len()
    );
    // Never overshot, though up to 12 jobs run at once; and used up as far as one more
    // job's worst case allows (a job is refused only when even with nothing held it would
    // not fit; one that would fit waits for the jobs in flight).
    assert!(
        answered * JOB_TOKENS <= BUDGET,
        "{answered} jobs answered: the budget of {BUDGET} tokens is overshot"
    );
    assert!(
        answered * JOB_TOKENS + WORST_CASE > BUDGET,
        "refused while the budget had room: {answered} jobs answered"
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
        thresholds.contains(&50) && thresholds.contains(&90),
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
    assert!(own && pct.unwrap() <= 100.0, "{pct:?}");
    drop(workers);
    app.teardown().await;
}

/// A job whose first call is billed and fails (an answer that breaks its JSON format) needs
/// more budget for its fallback: the reservation is raised before that call, and when the
/// budget cannot cover it the job ends `budget_exceeded` with the first call alone, spend
/// within the budget. With room for both, the fallback runs.
#[tokio::test]
async fn a_fallback_call_reserves_again_and_is_refused_when_the_usd_budget_cannot_cover_it() {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}[routes]\ndefault = [\"openai:weak\", \"openai:strong\"]\n\
         [tenants.acme]\ndaily_budget_usd = 0.07\n[tenants.rich]\ndaily_budget_usd = 1.0\n",
        openai_provider("openai", &fake.base_url(), "weak")
            .replace("max_retries = 1", "max_retries = 0")
    );
    let mut app = TestApp::new(&toml).await;
    // 0.001 USD a token, in and out, for both models.
    for model in ["weak", "strong"] {
        app.set_price("openai", model, 1000.0, 1000.0).await;
    }
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    // "Who?" (4 bytes) + 2 × 16 + max_tokens 10: a worst case of 46 tokens, 0.046 USD. The weak
    // model's broken answer bills 30 tokens (0.030 USD); 0.030 + 0.046 > 0.07.
    let job = |tenant: &str| {
        json!({"prompt": "Who?", "tenant": tenant, "reply_to": reply_to, "stream": false,
               "options": {"max_tokens": 10}, "response_format": {"type": "json_object"}})
    };
    for tenant in ["acme", "rich"] {
        fake.push(Reply::answer(&["not json"], (20, 10)));
        if tenant == "rich" {
            fake.push(Reply::answer(&["{\"name\": \"Ada\"}"], (20, 10)));
        }
        app.publish(job(tenant)).await;
        let r = crate::helpers::collect_reply(&mut sub).await.result;
        let attempts = r["attempts"].as_array().unwrap();
        assert_eq!(attempts[0]["error"]["code"], "invalid_output", "{r}");
        if tenant == "acme" {
            assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
            assert_eq!(attempts.len(), 1, "the fallback was not called: {r}");
            let message = r["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("daily budget of 0.07 USD cannot cover"),
                "{message}"
            );
            // What was spent stays within the budget.
            assert!(r["cost_usd"].as_f64().unwrap() <= 0.07, "{r}");
        } else {
            assert_eq!(r["status"], "ok", "{r}");
            assert_eq!(attempts.len(), 2, "{r}");
        }
    }
    assert_eq!(fake.request_count(), 3, "acme's fallback was never called");
    app.teardown().await;
}

/// A job whose worst case does not fit what a budget has left is sent with less output (as
/// context fitting lowers `max_tokens`), so small budgets are used up without overshoot;
/// with `fit: strict` it is refused instead.
#[tokio::test]
async fn a_call_is_sent_with_the_output_the_budget_has_room_for() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n[tenants.acme]\ndaily_budget_tokens = 200\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut sent = Vec::new();
    let mut answered = 0;
    // Without max_tokens a job would reserve 33 + 4,096 tokens: never within 200.
    for _ in 0..12 {
        app.publish(
            json!({"prompt": "x", "tenant": "acme", "reply_to": reply_to, "stream": false}),
        )
        .await;
        let r = crate::helpers::collect_reply(&mut sub).await.result;
        if r["status"] == "ok" {
            answered += 1;
            let body = fake.requests().pop().unwrap();
            sent.push(
                body["max_completion_tokens"]
                    .as_u64()
                    .or(body["max_tokens"].as_u64()),
            );
        } else {
            assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
            assert_eq!(r["attempts"], json!([]), "{r}");
        }
    }
    // 200 − 33 (the prompt's bound) = 167 for the first, 20 fewer for each after.
    assert_eq!(sent[..3], [Some(167), Some(147), Some(127)], "{sent:?}");
    // Answered while at least 16 tokens of output fit: 20 × 8 = 160 spent, never above 200.
    assert_eq!(answered, 8, "{sent:?}");
    // Strict fitting keeps the job's max_tokens, and so cannot run.
    app.publish(
        json!({"prompt": "x", "tenant": "acme", "reply_to": reply_to, "stream": false,
                       "options": {"fit": "strict"}}),
    )
    .await;
    let r = crate::helpers::collect_reply(&mut sub).await.result;
    assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
    app.teardown().await;
}

/// A monthly USD budget through NATS: jobs are answered while the month's spend and the next
/// call's worst case fit, then refused `budget_exceeded` without a call, naming the budget.
#[tokio::test]
async fn a_monthly_usd_budget_answers_until_it_is_spent_and_then_refuses_without_a_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    let toml = format!(
        "{}[routes]\ndefault = [\"openai\"]\n[tenants.acme]\nmonthly_budget_usd = 0.1\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    );
    let mut app = TestApp::new(&toml).await;
    // 0.001 USD a token, in and out: a job bills 20 tokens, 0.02 USD.
    app.set_price("openai", "gpt-test", 1000.0, 1000.0).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        // Worst case: "x" (1) + 16 + max_tokens 10 = 27 tokens, 0.027 USD.
        app.publish(
            json!({"prompt": "x", "tenant": "acme", "reply_to": reply_to,
                           "stream": false, "options": {"max_tokens": 10}}),
        )
        .await;
        let r = crate::helpers::collect_reply(&mut sub).await.result;
        if r["status"] == "error" {
            assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
            let message = r["error"]["message"].as_str().unwrap();
            assert!(message.contains("monthly budget of 0.1 USD"), "{message}");
        }
        statuses.push(r["status"].as_str().unwrap().to_string());
    }
    // Answered while the spend (0.02 a job) and the next call's worst case fit, then refused
    // for good: at least three answered (0.06 + 0.027 fits 0.1), never a fifth (0.08 + 0.027
    // does not).
    let answered = statuses.iter().take_while(|s| *s == "ok").count();
    assert!((3..=4).contains(&answered), "{statuses:?}");
    assert!(
        statuses[answered..].iter().all(|s| s == "error"),
        "{statuses:?}"
    );
    assert_eq!(fake.request_count(), answered, "a refused job made a call");
    app.wait_count("SELECT count(*) FROM llm_jobs WHERE tenant = 'acme'", 6)
        .await;
    let spent: f64 =
        sqlx::query_scalar("SELECT sum(cost_usd)::float8 FROM llm_jobs WHERE tenant = 'acme'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(
        (spent - 0.02 * answered as f64).abs() < 1e-9 && spent <= 0.1,
        "{spent}"
    );
    app.teardown().await;
}
