//! The fleet's response cache through the contract: an identical deterministic job is
//! answered by another worker process without a provider call (the fake's request count
//! proves it), streamed as chunk events, recorded as a hit with what it saved; `refresh`,
//! `off`, non-deterministic jobs and expired entries go to the provider.

use std::time::Duration;

use llm_worker_testkit::{FakeLlmServer, Reply, fake_vector};
use serde_json::{Value, json};

use crate::helpers::{Reply as Events, TestApp, collect_reply, openai_provider};

async fn ask(app: &TestApp, extra: Value) -> Events {
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut job =
        json!({"prompt": "What is 2+2?", "reply_to": reply_to, "options": {"temperature": 0}});
    for (k, v) in extra.as_object().unwrap() {
        job[k] = v.clone();
    }
    app.publish(job).await;
    collect_reply(&mut sub).await
}

fn setup_toml(fake: &FakeLlmServer) -> String {
    format!(
        "{}[routes]\ndefault = [\"openai\"]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    )
}

#[tokio::test]
async fn an_identical_deterministic_job_is_answered_from_the_cache_by_another_worker() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["Four", ", of course."], (7, 3)));
    let app = TestApp::new(&setup_toml(&fake)).await;
    let first_worker = app.spawn_process("", &["run"]).await;
    let first = ask(&app, json!({})).await.result;
    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(first["cache_hit"], false);
    first_worker.kill().await;

    // Another process, the same question: answered from the cache, streamed as chunks.
    let _second_worker = app.spawn_process("", &["run"]).await;
    let hit = ask(&app, json!({})).await;
    let r = &hit.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["cache_hit"], true, "{r}");
    assert_eq!(r["output"], "Four, of course.");
    assert_eq!(hit.final_text(), "Four, of course.");
    assert_eq!(
        (&r["model_used"], &r["provider"]),
        (&json!("gpt-test"), &json!("openai"))
    );
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(r["cost_usd"], json!(0.0));
    assert!(
        !r.to_string().contains("\"cost_usd\":-0.0"),
        "a negative zero cost: {r}"
    );
    assert_eq!(r["cache"]["saved_input_tokens"], 7);
    assert_eq!(r["cache"]["saved_output_tokens"], 3);
    assert_eq!(fake.request_count(), 1, "the hit made no provider call");

    // `refresh` asks the provider again (and stores the new answer); `off` too, and a job
    // that is not deterministic is not served from the cache by default.
    let refreshed = ask(&app, json!({"cache": "refresh"})).await.result;
    assert_eq!(refreshed["cache_hit"], false);
    assert_eq!(fake.request_count(), 2);
    let off = ask(&app, json!({"cache": "off"})).await.result;
    assert_eq!(off["cache_hit"], false);
    assert_eq!(fake.request_count(), 3);
    for _ in 0..2 {
        let warm = ask(&app, json!({"options": {"temperature": 0.7}}))
            .await
            .result;
        assert_eq!(warm["cache_hit"], false);
    }
    assert_eq!(fake.request_count(), 5);
    // A job may ask for the cache whatever its temperature: the second one hits.
    let asked = ask(
        &app,
        json!({"options": {"temperature": 0.7}, "cache": "use"}),
    )
    .await;
    assert_eq!(asked.result["cache_hit"], false);
    let asked = ask(
        &app,
        json!({"options": {"temperature": 0.7}, "cache": "use"}),
    )
    .await;
    assert_eq!(asked.result["cache_hit"], true);
    assert_eq!(fake.request_count(), 6);
    // Another tenant's identical job is not served this tenant's answer.
    let other = ask(&app, json!({"tenant": "globex"})).await.result;
    assert_eq!(other["cache_hit"], false);
    assert_eq!(fake.request_count(), 7);
    // An invalid cache mode is refused, naming the field.
    let bad = ask(&app, json!({"cache": "maybe"})).await.result;
    assert_eq!(bad["error"]["code"], "invalid_job");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cache"),
        "{bad}"
    );

    // The ledger: hits cost nothing and say what they saved.
    app.wait_count(
        "SELECT coalesce(sum(cache_hits), 0)::bigint FROM llm_cache_savings_daily WHERE tenant = 'default'",
        2,
    )
    .await;
    let (tokens_saved, hit_cost): (i64, f64) = sqlx::query_as(
        "SELECT (SELECT sum(tokens_saved)::bigint FROM llm_cache_savings_daily WHERE tenant = 'default'), \
                (SELECT sum(cost_usd)::float8 FROM llm_jobs WHERE cache_hit)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(tokens_saved, 20);
    assert_eq!(hit_cost, 0.0);
    app.teardown().await;
}

#[tokio::test]
async fn an_answer_older_than_the_ttl_is_not_served() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["Four"], (7, 1)));
    let app = TestApp::new(&setup_toml(&fake)).await;
    let _worker = app
        .spawn_process_with("", &["run"], &[("LLM_WORKER__CACHE__TTL_SECS", "1")])
        .await;
    assert_eq!(ask(&app, json!({})).await.result["cache_hit"], false);
    // Wait for the bucket to drop the answer (JetStream expires it: an observable fact).
    let mut stream = app
        .js
        .get_stream(format!("KV_{}", app.config.nats.cache_bucket))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stream.info().await.unwrap().state.messages > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the answer never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ask(&app, json!({})).await.result["cache_hit"], false);
    assert_eq!(fake.request_count(), 2);
    app.teardown().await;
}

#[tokio::test]
async fn when_every_provider_fails_a_stale_answer_is_served_and_the_failures_are_kept() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["Four"], (7, 1)));
    let app = TestApp::new(&setup_toml(&fake)).await;
    let env = [
        ("LLM_WORKER__CACHE__TTL_SECS", "1"),
        ("LLM_WORKER__CACHE__MAX_STALE_SECS", "3600"),
    ];
    let _worker = app.spawn_process_with("", &["run"], &env).await;
    let fresh = ask(&app, json!({})).await.result;
    assert_eq!(fresh["cache_hit"], false);
    // The answer's TTL (1 s) runs out: only the passing of time shows it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Past its TTL, with providers up, the answer is not served: the provider is asked.
    assert_eq!(ask(&app, json!({})).await.result["cache_hit"], false);
    assert_eq!(fake.request_count(), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Every call now fails: the stale answer stands in, the failures are in `attempts`.
    fake.set_default(Reply::status(503, "down for maintenance"));
    let degraded = ask(&app, json!({})).await;
    let r = &degraded.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        (&r["cache_hit"], &r["stale"]),
        (&json!(true), &json!(true)),
        "{r}"
    );
    assert_eq!(r["output"], "Four");
    assert_eq!(degraded.final_text(), "Four");
    let attempts = r["attempts"].as_array().unwrap();
    assert!(!attempts.is_empty());
    assert!(attempts.iter().all(|a| a["http_status"] == 503), "{r}");
    assert_eq!(r["cost_usd"], json!(0.0));
    assert!(
        !r.to_string().contains("\"cost_usd\":-0.0"),
        "a negative zero cost: {r}"
    );
    // A job the cache cannot answer fails as it would without one.
    let unknown = ask(&app, json!({"prompt": "never asked"})).await.result;
    assert_eq!(
        unknown["error"]["code"], "all_providers_failed",
        "{unknown}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_partly_cached_embedding_batch_sends_only_the_missing_inputs() {
    let fake = FakeLlmServer::start().await.unwrap();
    // Any answer but `Vectors`: vectors of the asked dimensions, else 8.
    fake.set_default(Reply::answer(&["-"], (1, 1)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "embed-model")).await;
    app.start_worker().await;
    let embed = |job: Value| {
        let app = &app;
        async move {
            let (reply_to, mut sub) = app.reply_inbox().await;
            let mut job = job;
            job["reply_to"] = json!(reply_to);
            app.publish_to("embed", job).await;
            collect_reply(&mut sub).await.result
        }
    };
    let vectors = |r: &Value| -> Vec<Vec<f32>> {
        serde_json::from_value(r["embeddings"].clone()).unwrap_or_else(|e| panic!("{e}: {r}"))
    };
    let expected =
        |texts: &[&str]| -> Vec<Vec<f32>> { texts.iter().map(|t| fake_vector(t, 8)).collect() };
    let sent = |i: usize| fake.requests()[i]["input"].clone();

    let r = embed(json!({"input": ["alpha", "beta", "gamma"]})).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["cache_hit"], false);
    assert_eq!(sent(0), json!(["alpha", "beta", "gamma"]));

    // Two of four known: only the other two reach the provider, the answer keeps input order.
    let r = embed(json!({"input": ["beta", "delta", "alpha", "epsilon"]})).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(fake.request_count(), 2);
    assert_eq!(sent(1), json!(["delta", "epsilon"]));
    assert_eq!(
        vectors(&r),
        expected(&["beta", "delta", "alpha", "epsilon"])
    );
    assert_eq!(r["cache_hit"], false, "partly cached: {r}");
    assert_eq!(r["cache"]["cached_inputs"], 2, "{r}");
    assert!(
        r["cache"]["saved_input_tokens"].as_u64().unwrap() > 0,
        "{r}"
    );

    // All known: no call at all.
    let r = embed(json!({"input": ["gamma", "delta"]})).await;
    assert_eq!(r["cache_hit"], true, "{r}");
    assert_eq!(vectors(&r), expected(&["gamma", "delta"]));
    assert_eq!((&r["attempts"], &r["attempt"]), (&json!([]), &json!(0)));
    assert_eq!(r["tokens_used"]["input"], 0);
    assert_eq!(r["model_used"], "embed-model");
    assert_eq!(fake.request_count(), 2);

    // Not across tenants, dimensions, or when the job says off.
    let r = embed(json!({"input": ["alpha"], "tenant": "globex"})).await;
    assert_eq!(r["cache_hit"], false);
    let r = embed(json!({"input": ["alpha"], "options": {"dimensions": 4}})).await;
    assert_eq!(
        (r["cache_hit"].clone(), vectors(&r)[0].len()),
        (json!(false), 4)
    );
    let r = embed(json!({"input": ["alpha"], "cache": "off"})).await;
    assert_eq!(r["cache_hit"], false);
    assert_eq!(fake.request_count(), 5);

    // The ledger counts the hit and what it saved.
    app.wait_count(
        "SELECT count(*) FROM llm_jobs WHERE kind = 'embed' AND cache_hit AND cache_saved_input_tokens > 0",
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn task_types_set_the_cache_use_of_their_jobs_and_off_wins() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["An answer"], (7, 2)));
    let toml = format!(
        "{}[cache.task_types]\nfaq = \"use\"\nprivate = \"off\"\n",
        setup_toml(&fake)
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    // faq: cached although not deterministic.
    for expected in [false, true] {
        let r = ask(
            &app,
            json!({"task_type": "faq", "options": {"temperature": 0.9}}),
        )
        .await
        .result;
        assert_eq!(r["cache_hit"], expected, "{r}");
    }
    assert_eq!(fake.request_count(), 1);
    // private: never, even when the job asks.
    for _ in 0..2 {
        let r = ask(&app, json!({"task_type": "private", "cache": "use"}))
            .await
            .result;
        assert_eq!(r["cache_hit"], false, "{r}");
    }
    assert_eq!(fake.request_count(), 3);
    app.teardown().await;
}

#[tokio::test]
async fn refresh_stores_the_new_answer_for_other_workers_the_near_cache_needs_no_kv_read_and_the_seed_is_in_the_key()
 {
    let fake = FakeLlmServer::start().await.unwrap();
    let app = TestApp::new(&setup_toml(&fake)).await;

    // One worker answers and stores "old"; another refreshes it to "new".
    let first = app.spawn_process("", &["run"]).await;
    fake.push(Reply::answer(&["old"], (5, 1)));
    assert_eq!(ask(&app, json!({})).await.result["output"], "old");
    first.kill().await;
    let second = app.spawn_process("", &["run"]).await;
    fake.push(Reply::answer(&["new"], (5, 1)));
    let refreshed = ask(&app, json!({"cache": "refresh"})).await.result;
    assert_eq!(
        (&refreshed["output"], &refreshed["cache_hit"]),
        (&json!("new"), &json!(false))
    );
    second.kill().await;

    // A third worker's hit returns the refreshed answer.
    let third = app.spawn_process("", &["run"]).await;
    let calls = fake.request_count();
    let hit = ask(&app, json!({})).await.result;
    assert_eq!(
        (&hit["output"], &hit["cache_hit"]),
        (&json!("new"), &json!(true)),
        "{hit}"
    );
    assert_eq!(fake.request_count(), calls);

    // The bucket emptied behind its back: the third worker still hits, from its memory.
    let mut bucket = app
        .js
        .get_stream(format!("KV_{}", app.config.nats.cache_bucket))
        .await
        .unwrap();
    bucket.purge().await.unwrap();
    assert_eq!(bucket.info().await.unwrap().state.messages, 0);
    let near = ask(&app, json!({})).await.result;
    assert_eq!(
        (&near["output"], &near["cache_hit"]),
        (&json!("new"), &json!(true)),
        "{near}"
    );
    assert_eq!(fake.request_count(), calls, "the near hit made no call");
    third.kill().await;
    // A worker without that memory misses: the hit above was not read from the bucket.
    let fourth = app.spawn_process("", &["run"]).await;
    fake.set_default(Reply::answer(&["fresh"], (5, 1)));
    let missed = ask(&app, json!({})).await.result;
    assert_eq!(missed["cache_hit"], false, "{missed}");
    assert_eq!(fake.request_count(), calls + 1);

    // The seed is part of the key: the same seed hits, another one asks the provider.
    let seeded = |seed: u32| json!({"options": {"temperature": 0.7, "seed": seed}});
    assert_eq!(ask(&app, seeded(1)).await.result["cache_hit"], false);
    assert_eq!(ask(&app, seeded(1)).await.result["cache_hit"], true);
    assert_eq!(ask(&app, seeded(2)).await.result["cache_hit"], false);
    assert_eq!(fake.request_count(), calls + 3);
    drop(fourth);
    app.teardown().await;
}
