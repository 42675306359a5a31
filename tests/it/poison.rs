//! No single job or answer can stop the fleet or the ledger (CONTRACT.md section 5, Bounds and
//! Poison): bounds on every input and output, dead letters for jobs and results that fail the
//! same way repeatedly, and a recorder that recovers from a crash in seconds.

use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, message::PublishMessage};
use futures::StreamExt;
use llm_worker::contract::JobKind;
use llm_worker::dead::{self, Kind};
use llm_worker::replay::{Replayed, replay};
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{JOBS_ONLY, TestApp, collect_reply, openai_provider};

async fn app_with(fake: &FakeLlmServer) -> TestApp {
    TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await
}

/// Wait (bounded) until the dead-letter stream holds `n` letters of `kind`.
async fn wait_letters(app: &TestApp, kind: Kind, n: usize) -> Vec<dead::Letter> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let letters = dead::list(&app.js, &app.config.nats, Some(kind), 100)
            .await
            .unwrap_or_default();
        if letters.len() >= n {
            return letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} dead letters of {kind:?}, expected {n}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_job_delivered_max_deliver_times_is_dead_lettered_answered_and_replayable() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["replayed"], (1, 1)));
    let mut app = app_with(&fake).await;
    let nats = app.config.nats.clone();
    // The consumer as a worker makes it; then four workers that die holding the job (each
    // delivery handed back unanswered).
    llm_worker::nats::ensure_streams(&app.js, &nats)
        .await
        .unwrap();
    let consumer = llm_worker::queue::ensure_consumer(&app.js, &nats, JobKind::Generate, 5)
        .await
        .unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let id = app
        .publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    for _ in 0..4 {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.unwrap().unwrap();
        msg.ack_with(AckKind::Nak(None)).await.unwrap();
    }

    app.start_worker().await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["job_id"], id.to_string());
    assert_eq!(r["error"]["code"], "dead_lettered");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delivered 5 times"),
        "{r}"
    );
    assert_eq!(fake.request_count(), 0, "a dead job is not run again");
    let letters = wait_letters(&app, Kind::Jobs, 1).await;
    let letter = &letters[0];
    assert_eq!(letter.job_id, id.to_string());
    assert_eq!(letter.delivered, Some(5));
    assert_eq!(
        letter.subject.as_deref(),
        Some(nats.job_subject(JobKind::Generate).as_str())
    );
    assert!(letter.reason.contains("delivered 5 times"), "{letter:?}");
    // Terminated: gone from the work queue, nothing pending.
    assert_eq!(app.jobs_in_stream().await, 0);
    assert_eq!(app.generate_consumer_info().await.num_ack_pending, 0);

    // After a fix, the operator replays it: a new job, answered on the original reply subject.
    let replayed = replay(&app.js, &nats, None, letter.sequence).await.unwrap();
    let Replayed::Job(new_id) = replayed else {
        panic!("{replayed:?}")
    };
    assert_ne!(new_id, id);
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["job_id"], new_id.to_string());
    assert_eq!(r["output"], "replayed");
    // Replaying again is the same job: its id does not change.
    assert_eq!(
        replay(&app.js, &nats, None, letter.sequence).await.unwrap(),
        Replayed::Job(new_id)
    );
    app.teardown().await;
}

/// A stored result of a real job, re-addressed to `job_id` with `tenant` (as an old worker
/// or a foreign publisher might have stored it).
fn crafted(template: &Value, job_id: Uuid, tenant: &str) -> Vec<u8> {
    let mut r = template.clone();
    r["job_id"] = json!(job_id.to_string());
    r["trace_id"] = json!(job_id.to_string());
    r["tenant"] = json!(tenant);
    serde_json::to_vec(&r).unwrap()
}

#[tokio::test]
async fn results_the_database_refuses_are_dead_lettered_and_the_others_recorded() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = app_with(&fake).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    // A constraint an operator added (and will drop again): the database refuses 'evil'.
    sqlx::query("ALTER TABLE llm_jobs ADD CONSTRAINT no_evil CHECK (tenant <> 'evil')")
        .execute(&app.db)
        .await
        .unwrap();

    let first = app
        .publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let template = collect_reply(&mut sub).await.result;
    let prefix = app.config.nats.subject_prefix.clone();
    let store = async |id: Uuid, payload: Vec<u8>| {
        app.js
            .send_publish(
                format!("{prefix}.results.{id}"),
                PublishMessage::build().payload(payload.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    };
    let (garbage, nul, evil) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store(garbage, b"{not a result".to_vec()).await;
    store(nul, crafted(&template, nul, "a\u{0}b")).await;
    store(evil, crafted(&template, evil, "evil")).await;
    let last = app
        .publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    collect_reply(&mut sub).await;

    // The good ones are recorded: the bad ones block nobody.
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id IN ('{first}', '{last}')"),
        2,
    )
    .await;
    let letters = wait_letters(&app, Kind::Usage, 3).await;
    let reason = |id: Uuid| {
        letters
            .iter()
            .find(|l| l.job_id == id.to_string())
            .map(|l| l.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:?}"))
    };
    assert!(reason(nul).contains("0x00"), "{}", reason(nul));
    assert!(reason(evil).contains("no_evil"), "{}", reason(evil));
    let undecodable = letters
        .iter()
        .find(|l| l.reason.starts_with("undecodable result"))
        .unwrap_or_else(|| panic!("{letters:?}"));
    assert_eq!(undecodable.job_id, garbage.to_string());
    assert_eq!(app.count("SELECT count(*) FROM llm_jobs").await, 2);

    // The recorder moved on: nothing of the results stream is left pending or redelivered.
    let mut recorder: async_nats::jetstream::consumer::PullConsumer = app
        .js
        .get_stream(&app.config.nats.results_stream)
        .await
        .unwrap()
        .get_consumer(&app.config.nats.recorder_consumer_name())
        .await
        .unwrap();
    let info = recorder.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));

    // The operator fixes the cause and replays the letter: the row appears.
    sqlx::query("ALTER TABLE llm_jobs DROP CONSTRAINT no_evil")
        .execute(&app.db)
        .await
        .unwrap();
    let seq = letters
        .iter()
        .find(|l| l.job_id == evil.to_string())
        .unwrap()
        .sequence;
    let replayed = replay(&app.js, &app.config.nats, Some(&app.db), seq)
        .await
        .unwrap();
    assert_eq!(replayed, Replayed::Usage);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id = '{evil}' AND tenant = 'evil'"
        ))
        .await,
        1
    );
    app.teardown().await;
}

#[tokio::test]
async fn a_recorder_killed_mid_batch_has_its_batch_written_seconds_after_another_starts() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = app_with(&fake).await;
    app.start_worker_with(JOBS_ONLY, |_| {}).await;
    let recorder = app.spawn_process("", &["run", "--recorder-only"]).await;

    // Hold the ledger's table so the recorder's write blocks mid-batch.
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE llm_calls IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let n = 20;
    for _ in 0..n {
        app.publish(json!({"prompt": "x", "reply_to": reply_to}))
            .await;
        collect_reply(&mut sub).await;
    }
    app.wait_count(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO llm_calls%'",
        1,
    )
    .await;

    recorder.kill().await;
    lock.rollback().await.unwrap();
    let started = Instant::now();
    let _second = app.spawn_process("", &["run", "--recorder-only"]).await;
    app.wait_count("SELECT count(*) FROM llm_jobs", n).await;
    let took = started.elapsed();
    eprintln!(
        "a killed recorder's batch was written {:.1} s after a new recorder started",
        took.as_secs_f64()
    );
    // The ack wait (5 s) bounds it; with the former 60 s this took up to a minute.
    assert!(took < Duration::from_secs(15), "{took:?}");
    app.teardown().await;
}

#[tokio::test]
async fn poison_between_two_good_jobs_is_answered_and_nothing_stalls_or_loops() {
    let fake = FakeLlmServer::start().await.unwrap();
    let app = app_with(&fake).await;
    // A worker process of its own, to see its memory; its circuit stays closed through the
    // provider's tantrums, so the last good job goes to the same provider.
    let worker = app
        .spawn_process("[circuit_breaker]\nfailure_threshold = 100\n", &["run"])
        .await;
    let (reply_to, sub) = app.reply_inbox().await;
    let mut client = Orchestrator {
        app: &app,
        reply_to,
        sub,
        jobs: 0,
    };

    fake.push(Reply::answer(&["first"], (1, 1)));
    assert_eq!(
        client.run("generate", json!({"prompt": "x"})).await.result["output"],
        "first"
    );

    // Inputs: each refused before any work, naming the field. First metadata of 100,000
    // numbers written `1e15` (0.5 MB as published, 1.9 MB as it would be echoed).
    let numbers = vec!["1e15"; 100_000].join(",");
    let r = client
        .run_raw(&format!(r#""prompt":"x","metadata":[{numbers}]"#))
        .await
        .result;
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("metadata: 1900") && message.contains("as echoed"),
        "{message}"
    );
    for (kind, job, field) in [
        ("generate", json!({"prompt": "a\u{0}"}), "prompt"),
        (
            "generate",
            json!({"prompt": "x", "system_prompt": "\u{0}"}),
            "system_prompt",
        ),
        (
            "generate",
            json!({"messages": [{"role": "user", "content": "\u{0}"}]}),
            "messages[0].content",
        ),
        (
            "generate",
            json!({"prompt": "x", "context": ["\u{0}"]}),
            "context[0]",
        ),
        (
            "generate",
            json!({"prompt": "x", "options": {"stop": ["\u{0}"]}}),
            "options.stop",
        ),
        (
            "generate",
            json!({"prompt": "x", "tenant": "\u{0}"}),
            "tenant",
        ),
        (
            "generate",
            json!({"prompt": "x", "task_type": "\u{0}"}),
            "task_type",
        ),
        (
            "generate",
            json!({"prompt": "x", "trace_id": "\u{0}"}),
            "trace_id",
        ),
        (
            "generate",
            json!({"prompt": "x", "metadata": {"k": "\u{0}"}}),
            "metadata",
        ),
        (
            "generate",
            json!({"prompt": "x", "model": "m".repeat(10_000)}),
            "model",
        ),
        ("embed", json!({"input": vec!["a"; 200_000]}), "input"),
        ("embed", json!({"input": ["\u{0}"]}), "input[0]"),
    ] {
        let r = client.run(kind, job).await.result;
        assert_eq!(r["error"]["code"], "invalid_job", "{field}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field}: {message}");
        assert!(message.len() < 300, "{message}");
    }
    assert_eq!(
        fake.request_count(),
        1,
        "no refused job reached the provider"
    );

    // Answers: each a clear error after a bounded number of calls.
    fake.push(Reply::Status {
        status: 429,
        body: r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#.into(),
        headers: vec![("retry-after".into(), "1e20".into())],
    });
    let r = client.run("generate", json!({"prompt": "x"})).await.result;
    assert_eq!(r["error"]["code"], "all_providers_failed", "{r}");
    assert_eq!(r["attempts"][0]["error"]["code"], "rate_limited");
    assert_eq!(
        r["attempts"].as_array().unwrap().len(),
        1,
        "a hint of 1e20 s falls back at once"
    );

    fake.push(Reply::Endless {
        delta: "z".repeat(1024),
    });
    let endless = client.run("generate", json!({"prompt": "x"})).await;
    assert_eq!(
        endless.result["attempts"][0]["error"]["code"], "response_too_large",
        "{}",
        endless.result
    );
    assert!(
        endless.chunks.len() < 200,
        "{} chunk events for one endless answer",
        endless.chunks.len()
    );

    for _ in 0..2 {
        fake.push(Reply::Huge {
            status: 500,
            bytes: 50 << 20,
        });
    }
    let r = client.run("generate", json!({"prompt": "x"})).await.result;
    let attempts = r["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "one call and one retry: {r}");
    assert_eq!(attempts[0]["error"]["code"], "server_error");
    assert!(attempts[0]["error"]["message"].as_str().unwrap().len() <= 600);

    fake.push(Reply::Huge {
        status: 200,
        bytes: 5 << 20,
    });
    let r = client.run("generate", json!({"prompt": "x"})).await.result;
    assert_eq!(
        r["attempts"][0]["error"]["code"], "response_too_large",
        "{r}"
    );

    fake.push(Reply::answer(&["last"], (1, 1)));
    assert_eq!(
        client.run("generate", json!({"prompt": "x"})).await.result["output"],
        "last"
    );

    // Every job is recorded (the ledger never stalled), none is left or delivered twice.
    let jobs = client.jobs;
    app.wait_count("SELECT count(*) FROM llm_jobs", jobs).await;
    let info = app.generate_consumer_info().await;
    assert_eq!((info.num_ack_pending, info.num_redelivered), (0, 0));
    assert_eq!(app.jobs_in_stream().await, 0);
    let rss_mb = worker.peak_rss_kb() / 1024;
    eprintln!("worker peak RSS after the poison jobs: {rss_mb} MB");
    assert!(rss_mb < 200, "peak RSS {rss_mb} MB");
    app.teardown().await;
}

/// Publishes jobs one at a time and waits for each answer.
struct Orchestrator<'a> {
    app: &'a TestApp,
    reply_to: String,
    sub: async_nats::Subscriber,
    jobs: i64,
}

impl Orchestrator<'_> {
    async fn run(&mut self, kind: &str, mut job: Value) -> crate::helpers::Reply {
        job["reply_to"] = json!(self.reply_to);
        self.app.publish_to(kind, job).await;
        self.jobs += 1;
        collect_reply(&mut self.sub).await
    }

    /// A generation job written by hand: `fields` are the JSON object's other members.
    async fn run_raw(&mut self, fields: &str) -> crate::helpers::Reply {
        let id = Uuid::now_v7();
        let raw = format!(
            r#"{{"job_id":"{id}","reply_to":"{}",{fields}}}"#,
            self.reply_to
        );
        self.app
            .publish_raw(raw.into_bytes(), Some(&id.to_string()))
            .await;
        self.jobs += 1;
        collect_reply(&mut self.sub).await
    }
}

#[tokio::test]
async fn a_recorder_consumer_made_by_an_older_worker_gets_the_short_ack_wait() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = app_with(&fake).await;
    let nats = app.config.nats.clone();
    llm_worker::nats::ensure_streams(&app.js, &nats)
        .await
        .unwrap();
    // As milestone 1 made it: a 60 s ack wait.
    let old = async_nats::jetstream::consumer::pull::Config {
        durable_name: Some(nats.recorder_consumer_name()),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        filter_subject: format!("{}.results.>", nats.subject_prefix),
        ..Default::default()
    };
    let stream = app.js.get_stream(&nats.results_stream).await.unwrap();
    stream.create_consumer(old).await.unwrap();

    app.start_worker().await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&nats.recorder_consumer_name())
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(5));
    app.teardown().await;
}
