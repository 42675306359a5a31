//! Trust boundaries (CONTRACT.md section 5), from the outside: a hostile publisher's job can
//! neither make the worker publish where it should not, nor read another job's stored answer,
//! nor steer a provider call elsewhere.

use async_nats::jetstream::{self, message::PublishMessage};
use futures::{FutureExt, StreamExt};
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, collect_reply, openai_provider};

async fn app_with_fake(extra: &str) -> (TestApp, FakeLlmServer) {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["the ", "answer"], (5, 2)));
    let toml = openai_provider("openai", &fake.base_url(), "gpt-test") + extra;
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    (app, fake)
}

/// The error message of a result.
fn message(result: &Value) -> &str {
    result["error"]["message"].as_str().unwrap_or_default()
}

/// A stream of someone else's holding `n` messages, to show it survives.
async fn victim_stream(app: &TestApp, n: usize) -> String {
    let name = format!("VICTIM_{}", &Uuid::new_v4().simple().to_string()[..10]);
    app.js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..n {
        app.js
            .publish(format!("{name}.m{i}"), "precious".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    name
}

async fn messages_in(app: &TestApp, stream: &str) -> u64 {
    let mut s = app.js.get_stream(stream).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// Every job published so far has been acked or terminated (nothing pending, queue empty).
async fn wait_all_jobs_disposed(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let info = app.generate_consumer_info().await;
        if info.num_ack_pending == 0 && info.num_pending == 0 && app.jobs_in_stream().await == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "jobs still pending");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reply_subjects_outside_the_policy_get_invalid_job_stored_and_published_nowhere() {
    let (app, fake) = app_with_fake("").await;
    let victim = victim_stream(&app, 5).await;
    let p = app.config.nats.subject_prefix.clone();
    let foreign_result = Uuid::now_v7();
    let cases: Vec<String> = vec![
        format!("$JS.API.STREAM.PURGE.{victim}"),
        format!("$JS.API.STREAM.DELETE.{victim}"),
        format!("$KV.{victim}.key"),
        format!("{p}.jobs.generate"),
        format!("{p}.results.{foreign_result}"),
        format!("{p}.status"),
        format!("{p}.replies.*"),
        format!("{p}.replies.>"),
        format!("{p}.replies.{}", "x".repeat(300)),
        "somewhere.else".to_string(),
    ];
    // Spies on every target (a wildcard target is spied on as the pattern it is) but the jobs
    // subject, where our own jobs go: the jobs stream's sequence is checked instead.
    let jobs_subject = format!("{p}.jobs.generate");
    let mut spies = Vec::new();
    for subject in cases.iter().filter(|s| **s != jobs_subject) {
        spies.push((
            subject,
            app.client.subscribe(subject.clone()).await.unwrap(),
        ));
    }
    app.client.flush().await.unwrap();

    for subject in &cases {
        let id = app
            .publish(json!({"prompt": "x", "reply_to": subject}))
            .await;
        let stored = app.wait_stored_result(id).await;
        assert_eq!(stored["status"], "error", "{subject}");
        assert_eq!(stored["error"]["code"], "invalid_job", "{subject}");
        let message = message(&stored);
        assert!(
            message.starts_with("reply_to: ") && message.contains("refused"),
            "{subject}: {message}"
        );
    }
    wait_all_jobs_disposed(&app).await;

    // Nothing reached any target: the worker published only to its own results subjects.
    // (Its publishes precede its acks, and NATS delivers in order: anything sent would be
    // buffered here by now.)
    app.client.flush().await.unwrap();
    for (subject, spy) in spies.iter_mut() {
        assert!(
            spy.next().now_or_never().is_none(),
            "something was published to {subject}"
        );
    }
    assert_eq!(
        messages_in(&app, &victim).await,
        5,
        "the victim stream kept its messages"
    );
    let mut jobs = app
        .js
        .get_stream(&app.config.nats.jobs_stream)
        .await
        .unwrap();
    assert_eq!(
        jobs.info().await.unwrap().state.last_sequence,
        cases.len() as u64,
        "no message was published into the jobs stream but ours"
    );
    assert!(app.stored_result(foreign_result).await.is_none());
    assert_eq!(fake.request_count(), 0, "no refused job reached a provider");

    // A reply subject under the prefix still works.
    let (reply_to, mut sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    assert_eq!(collect_reply(&mut sub).await.result["status"], "ok");
    app.js.delete_stream(&victim).await.unwrap();
    app.teardown().await;
}

#[tokio::test]
async fn a_status_request_with_a_refused_reply_subject_is_not_answered() {
    let (app, _fake) = app_with_fake("").await;
    let victim = victim_stream(&app, 3).await;
    let status = format!("{}.status", app.config.nats.subject_prefix);
    let purge = format!("$JS.API.STREAM.PURGE.{victim}");
    let mut spy = app.client.subscribe(purge.clone()).await.unwrap();

    app.client
        .publish_with_reply(status.clone(), purge.clone(), "".into())
        .await
        .unwrap();
    // A good request after it: once it is answered, the bad one (earlier, same connection,
    // one serving loop) has been handled.
    let good = app.client.new_inbox();
    let mut answers = app.client.subscribe(good.clone()).await.unwrap();
    app.client
        .publish_with_reply(status, good, "".into())
        .await
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), answers.next())
        .await
        .expect("the worker answers a good status request")
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["worker_id"], "worker-1");

    app.client.flush().await.unwrap();
    assert!(
        spy.next().now_or_never().is_none(),
        "a status answer went to {purge}"
    );
    assert_eq!(messages_in(&app, &victim).await, 3);
    app.js.delete_stream(&victim).await.unwrap();
    app.teardown().await;
}

#[tokio::test]
async fn a_job_id_that_differs_from_its_nats_msg_id_or_a_header_that_is_no_uuid_is_invalid() {
    let (app, fake) = app_with_fake("").await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let body_id = Uuid::now_v7();
    let header_id = Uuid::now_v7();
    let job = json!({"job_id": body_id.to_string(), "prompt": "x", "reply_to": reply_to});
    app.publish_raw(
        serde_json::to_vec(&job).unwrap(),
        Some(&header_id.to_string()),
    )
    .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["error"]["code"], "invalid_job");
    assert!(
        message(&r).contains("does not match the Nats-Msg-Id header"),
        "{r}"
    );
    assert_eq!(app.wait_stored_result(body_id).await, r);

    let job = json!({"prompt": "x", "reply_to": reply_to});
    app.publish_raw(serde_json::to_vec(&job).unwrap(), Some("order-17"))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["error"]["code"], "invalid_job");
    assert!(message(&r).starts_with("Nats-Msg-Id"), "{r}");
    assert_eq!(fake.request_count(), 0);

    // No id at all: a random UUID v7, under which the result is stored.
    app.publish_raw(serde_json::to_vec(&job).unwrap(), None)
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "ok");
    let id = Uuid::parse_str(r["job_id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(app.wait_stored_result(id).await, r);
    app.teardown().await;
}

#[tokio::test]
async fn a_job_id_reused_by_another_tenant_is_refused_and_never_sees_the_stored_output() {
    let (app, fake) = app_with_fake("").await;
    fake.push(Reply::answer(&["acme's ", "secret"], (5, 2)));
    let (reply_to, mut sub) = app.reply_inbox().await;

    let id = app
        .publish(json!({"prompt": "x", "tenant": "acme", "reply_to": reply_to}))
        .await;
    let original = collect_reply(&mut sub).await.result;
    assert_eq!(original["output"], "acme's secret");

    // Another tenant re-uses the id (without the header, so JetStream's dedup does not drop
    // it): refused, and its answer holds nothing of acme's.
    let reuse =
        json!({"job_id": id.to_string(), "prompt": "y", "tenant": "globex", "reply_to": reply_to});
    app.publish_raw(serde_json::to_vec(&reuse).unwrap(), None)
        .await;
    let refused = collect_reply(&mut sub).await.result;
    assert_eq!(refused["job_id"], id.to_string());
    assert_eq!(refused["tenant"], "globex");
    assert_eq!(refused["error"]["code"], "invalid_job");
    assert!(message(&refused).contains("already used"), "{refused}");
    assert!(!refused.to_string().contains("secret"), "{refused}");
    // An invalid job under the same id does not replace the stored result either.
    let invalid = json!({"job_id": id.to_string(), "tenant": "globex", "reply_to": reply_to});
    app.publish_raw(serde_json::to_vec(&invalid).unwrap(), None)
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["error"]["code"], "invalid_job");
    assert_eq!(app.wait_stored_result(id).await, original);

    // With the header inside the duplicate window, JetStream itself drops the re-use.
    let ack = app
        .js
        .send_publish(
            format!("{}.jobs.generate", app.config.nats.subject_prefix),
            PublishMessage::build()
                .payload(serde_json::to_vec(&reuse).unwrap().into())
                .message_id(id.to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate);

    // The same tenant publishing the same job again gets the stored answer, without a call.
    let again =
        json!({"job_id": id.to_string(), "prompt": "x", "tenant": "acme", "reply_to": reply_to});
    app.publish_raw(serde_json::to_vec(&again).unwrap(), None)
        .await;
    assert_eq!(collect_reply(&mut sub).await.result, original);
    assert_eq!(fake.request_count(), 1);
    app.teardown().await;
}

#[tokio::test]
async fn a_traversal_in_a_gemini_model_name_is_refused_before_any_request() {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "[providers.g]\ntype = \"gemini\"\nbase_url = \"{}\"\ndefault_model = \"gemini-2.5-flash\"\n",
        fake.root_url()
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    for model in ["x/../../v1alpha/models/y", "../y", "m?alt=json", "a b"] {
        app.publish(json!({"prompt": "x", "provider": "g", "model": model, "reply_to": reply_to}))
            .await;
        let r = collect_reply(&mut sub).await.result;
        assert_eq!(r["error"]["code"], "invalid_job", "{model}");
        assert!(message(&r).starts_with("model:"), "{model}: {r}");
    }
    let long = "m".repeat(200);
    app.publish(json!({"prompt": "x", "model": long, "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert!(message(&r).contains("1 to 128 bytes"), "{r}");
    assert_eq!(fake.request_count(), 0);
    app.teardown().await;
}

#[tokio::test]
async fn a_job_may_pin_only_its_routes_providers_and_the_models_a_provider_allows() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (1, 1)));
    let toml = openai_provider("a", &fake.base_url(), "model-a")
        + &openai_provider("b", &fake.base_url(), "gpt-4o")
        + "models = [\"gpt-4o*\"]\n[routes]\ndefault = [\"a\"]\nopen = [\"a\"]\n";
    let mut app = TestApp::new(&toml).await;
    app.start_worker_with(crate::helpers::ALL_ROLES, |c| {
        c.pin_any_provider = vec!["open".into()];
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut run = async |job: Value| {
        let mut job = job;
        job["reply_to"] = json!(reply_to);
        app.publish(job).await;
        collect_reply(&mut sub).await.result
    };

    let r = run(json!({"prompt": "x", "provider": "b"})).await;
    assert_eq!(r["error"]["code"], "invalid_job");
    assert!(message(&r).contains("is not in route 'default'"), "{r}");
    let r = run(json!({"prompt": "x", "provider": "nope", "task_type": "open"})).await;
    assert!(message(&r).starts_with("provider: unknown provider"), "{r}");
    let r = run(json!({"prompt": "x", "provider": "b", "model": "o1", "task_type": "open"})).await;
    assert!(
        message(&r).contains("is not allowed for provider 'b'"),
        "{r}"
    );
    assert_eq!(fake.request_count(), 0);

    // Inside the rules: answered by the pinned provider and model.
    let r =
        run(json!({"prompt": "x", "provider": "b", "model": "gpt-4o-mini", "task_type": "open"}))
            .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        (r["provider"].clone(), r["model_used"].clone()),
        (json!("b"), json!("gpt-4o-mini"))
    );
    app.teardown().await;
}

#[tokio::test]
async fn with_tenants_from_subjects_the_subject_decides_the_tenant_not_the_body() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (1, 1)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker_with(crate::helpers::ALL_ROLES, |c| {
        c.nats.tenant_from_subject = true;
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    let id = Uuid::now_v7();
    let job =
        json!({"job_id": id.to_string(), "prompt": "x", "tenant": "globex", "reply_to": reply_to});
    app.publish_raw_to(
        "generate.acme",
        serde_json::to_vec(&job).unwrap(),
        Some(&id.to_string()),
    )
    .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["tenant"], "acme");
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{id}' AND tenant = 'acme'"),
        1,
    )
    .await;
    app.teardown().await;
}
