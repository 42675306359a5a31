//! Configuration reload in a running worker process: a request on `<prefix>.control.reload`
//! and SIGHUP re-read its file; routes change for new jobs, running jobs finish where they
//! started, and an invalid file is refused with the old configuration kept.

use std::time::Duration;

use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider};

/// Publish a non-streamed job and return its result.
async fn answered_by(app: &TestApp, prompt: &str) -> Value {
    let (reply_to, mut sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": prompt, "reply_to": reply_to, "stream": false}))
        .await;
    collect_reply(&mut sub).await.result
}

async fn request_reload(app: &TestApp) -> Value {
    let subject = format!("{}.control.reload", app.config.nats.subject_prefix);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        app.client.request(subject, bytes::Bytes::new()),
    )
    .await
    .unwrap()
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

fn rewrite(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[tokio::test]
async fn reloads_switch_routes_for_new_jobs_refuse_invalid_files_and_keep_running_jobs() {
    let a = FakeLlmServer::start().await.unwrap();
    let b = FakeLlmServer::start().await.unwrap();
    a.set_default(Reply::answer(&["from a"], (1, 2)));
    let providers = format!(
        "{}{}[routes]\ndefault = [\"a\"]\n",
        openai_provider("a", &a.base_url(), "m"),
        openai_provider("b", &b.base_url(), "m"),
    );
    let app = TestApp::new(&providers).await;
    let worker = app.spawn_process("", &["run"]).await;
    assert_eq!(answered_by(&app, "1").await["provider"], "a");

    // A slow answer is running on `a` while the route moves to `b`.
    a.push(Reply::Answer {
        deltas: (0..10).map(|i| format!("w{i} ")).collect(),
        usage: Some((1, 10)),
        done_marker: true,
        chunk_delay: Duration::from_millis(100),
    });
    let (slow_reply, mut slow_sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": "slow", "reply_to": slow_reply}))
        .await;
    assert_eq!(
        crate::helpers::next_event(&mut slow_sub).await["type"],
        "chunk"
    );
    rewrite(
        &worker.config_path(),
        r#"default = ["a"]"#,
        r#"default = ["b"]"#,
    );
    let answer = request_reload(&app).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("reloaded"),
        "{answer}"
    );
    let slow = collect_reply(&mut slow_sub).await.result;
    assert_eq!(
        (slow["status"].as_str(), slow["provider"].as_str()),
        (Some("ok"), Some("a"))
    );
    assert_eq!(answered_by(&app, "2").await["provider"], "b");

    // An invalid file is refused, with the reason; the configuration in force stays.
    rewrite(
        &worker.config_path(),
        r#"default = ["b"]"#,
        r#"default = ["nobody"]"#,
    );
    let answer = request_reload(&app).await;
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("refused") && error.contains("nobody"),
        "{error}"
    );
    assert_eq!(answered_by(&app, "3").await["provider"], "b");

    // SIGHUP re-reads the file too (no reply: the next jobs show it).
    rewrite(
        &worker.config_path(),
        r#"default = ["nobody"]"#,
        r#"default = ["a"]"#,
    );
    worker.hangup();
    let mut seen = Vec::new();
    for i in 0..100 {
        let provider = answered_by(&app, &format!("h{i}")).await["provider"].clone();
        seen.push(provider.clone());
        if provider == "a" {
            break;
        }
    }
    assert_eq!(seen.last().unwrap(), "a", "{seen:?}");
    assert!(seen.iter().all(|p| p == "a" || p == "b"), "{seen:?}");
    worker.kill().await;
    app.teardown().await;
}

/// Ask every worker to reload; their answers (one per worker).
async fn reload_all(app: &TestApp, workers: usize) -> Vec<Value> {
    let inbox = app.client.new_inbox();
    let mut answers = app.client.subscribe(inbox.clone()).await.unwrap();
    let subject = format!("{}.control.reload", app.config.nats.subject_prefix);
    app.client
        .publish_with_reply(subject, inbox, bytes::Bytes::new())
        .await
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..workers {
        use futures::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .expect("a worker did not answer the reload request")
            .unwrap();
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

#[tokio::test]
async fn a_reload_changes_tenant_policies_on_every_worker_and_an_invalid_one_changes_nothing() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (15, 5)));
    let toml = format!(
        "{}[routes]\ndefault = [\"a\"]\n[tenants.acme]\ndaily_budget_tokens = 1000000\n",
        openai_provider("a", &fake.base_url(), "m"),
    );
    let app = TestApp::new(&toml).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(app.spawn_process("", &["run"]).await);
    }
    let ask = async |n: usize| {
        let (reply_to, mut sub) = app.reply_inbox().await;
        for _ in 0..n {
            app.publish(
                json!({"prompt": "x", "tenant": "acme", "reply_to": reply_to, "stream": false}),
            )
            .await;
        }
        let results = crate::helpers::collect_results(&mut sub, n).await;
        results.into_values().collect::<Vec<_>>()
    };
    assert!(ask(6).await.iter().all(|r| r["status"] == "ok"));

    // The budget drops below what acme spent today: from now on its jobs are refused.
    for w in &workers {
        rewrite(
            &w.config_path(),
            "daily_budget_tokens = 1000000",
            "daily_budget_tokens = 100",
        );
    }
    let answers = reload_all(&app, 3).await;
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:?}");
    let calls = fake.request_count();
    let refused = ask(6).await;
    for r in &refused {
        assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
    }
    assert_eq!(
        fake.request_count(),
        calls,
        "no provider call once the budget is spent"
    );
    app.wait_count(
        "SELECT count(*) FROM llm_tenant_budgets WHERE tenant = 'acme' AND daily_tokens = 100",
        1,
    )
    .await;

    // An invalid policy is refused by every worker, naming the key; the one in force stays.
    for w in &workers {
        rewrite(
            &w.config_path(),
            "daily_budget_tokens = 100",
            "daily_budget_tokens = 100\nweight = 0",
        );
    }
    let answers = reload_all(&app, 3).await;
    for a in &answers {
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            a["error"].as_str().unwrap().contains("tenants.acme.weight"),
            "{a}"
        );
    }
    assert!(
        ask(3)
            .await
            .iter()
            .all(|r| r["error"]["code"] == "budget_exceeded")
    );
    drop(workers);
    app.teardown().await;
}

/// When a result's first call started and its last call ended.
fn call_span(r: &Value) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let attempts = r["attempts"].as_array().unwrap();
    let at = |a: &Value, key: &str| a[key].as_str().unwrap().parse().unwrap();
    (
        at(&attempts[0], "started_at"),
        at(attempts.last().unwrap(), "finished_at"),
    )
}

/// Most of `results` calling a provider at once.
fn most_at_once(results: &[&Value]) -> usize {
    crate::helpers::peak_overlap(results.iter().map(|r| call_span(r)))
}

/// A backlog of 40 jobs of A then 40 of B, parked behind 4 jobs that hang until their 1.5 s
/// timeout (the worker's 4 slots): the backlog's results, ordered by when their call started.
async fn backlog(app: &TestApp, fake: &FakeLlmServer) -> Vec<Value> {
    let (reply_to, mut sub) = app.reply_inbox().await;
    for _ in 0..4 {
        fake.push(Reply::Hang);
        app.publish(json!({"prompt": "block", "tenant": "C", "timeout_ms": 1500}))
            .await;
    }
    for tenant in ["A", "B"] {
        for _ in 0..40 {
            app.publish(
                json!({"prompt": "x", "tenant": tenant, "reply_to": reply_to, "stream": false}),
            )
            .await;
        }
    }
    let mut results: Vec<Value> = crate::helpers::collect_results(&mut sub, 80)
        .await
        .into_values()
        .collect();
    assert!(results.iter().all(|r| r["status"] == "ok"));
    results.sort_by_key(|r| call_span(r).0);
    results
}

fn share_of(results: &[Value], tenant: &str) -> usize {
    results[..20]
        .iter()
        .filter(|r| r["tenant"] == tenant)
        .count()
}

#[tokio::test]
async fn weights_show_through_nats_and_a_reloaded_weight_rate_limit_and_max_in_flight_take_effect()
{
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (1, 1)));
    fake.set_latency(Duration::from_millis(20));
    let policies = "[tenants.A]\nweight = 3\n[tenants.B]\nweight = 1\n";
    let toml = format!(
        "{}[routes]\ndefault = [\"a\"]\n{policies}",
        openai_provider("a", &fake.base_url(), "m"),
    );
    let app = TestApp::new(&toml).await;
    let env = [("LLM_WORKER__WORKER__MAX_IN_FLIGHT", "4")];
    let worker = app.spawn_process_with("", &["run"], &env).await;

    // 3:1 under a backlog: of the first 20 jobs started, about 15 are A's.
    let before = backlog(&app, &fake).await;
    let (a, b) = (share_of(&before, "A"), share_of(&before, "B"));
    eprintln!("weights 3:1: of the first 20 started, A {a}, B {b}");
    assert!(
        (13..=17).contains(&a),
        "A got {a} of the first 20 (weight 3:1)"
    );
    let a_jobs: Vec<&Value> = before.iter().filter(|r| r["tenant"] == "A").collect();
    assert!(most_at_once(&a_jobs) > 1, "A never ran two jobs at once");
    // Tenant R has no rate limit yet: 10 jobs, all answered.
    let (reply_to, mut sub) = app.reply_inbox().await;
    for _ in 0..10 {
        app.publish(json!({"prompt": "r", "tenant": "R", "reply_to": reply_to, "stream": false}))
            .await;
    }
    let unlimited = crate::helpers::collect_results(&mut sub, 10).await;
    assert!(unlimited.values().all(|r| r["status"] == "ok"));

    // Reloaded: the weights swapped, A at most one job in flight, R 5 requests a minute.
    rewrite(
        &worker.config_path(),
        policies,
        "[tenants.A]\nweight = 1\nmax_in_flight = 1\n[tenants.B]\nweight = 3\n\
         [tenants.R]\nrequests_per_minute = 5\n",
    );
    let answers = reload_all(&app, 1).await;
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:?}");

    let after = backlog(&app, &fake).await;
    let (a, b) = (share_of(&after, "A"), share_of(&after, "B"));
    eprintln!("weights 1:3 after the reload: of the first 20 started, A {a}, B {b}");
    assert!(
        (13..=17).contains(&b),
        "B got {b} of the first 20 (weight 1:3)"
    );
    let a_jobs: Vec<&Value> = after.iter().filter(|r| r["tenant"] == "A").collect();
    assert_eq!(
        most_at_once(&a_jobs),
        1,
        "A ran more than its max_in_flight"
    );

    // 10 jobs of R in one minute: 5 answered, 5 wait past their 3 s timeout uncalled.
    crate::rates::minute_with_room().await;
    let calls = fake.request_count();
    let (reply_to, mut sub) = app.reply_inbox().await;
    for _ in 0..10 {
        app.publish(
            json!({"prompt": "r", "tenant": "R", "reply_to": reply_to, "stream": false,
                           "timeout_ms": 3000}),
        )
        .await;
    }
    let limited: Vec<Value> = crate::helpers::collect_results(&mut sub, 10)
        .await
        .into_values()
        .collect();
    let ok = limited.iter().filter(|r| r["status"] == "ok").count();
    let timed_out = limited
        .iter()
        .filter(|r| r["error"]["code"] == "timeout")
        .count();
    assert_eq!((ok, timed_out), (5, 5), "{limited:?}");
    assert_eq!(fake.request_count() - calls, 5);
    drop(worker);
    app.teardown().await;
}
