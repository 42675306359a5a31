//! Delivery guarantees: redelivery answered from the stored result, several workers sharing
//! one consumer, graceful shutdown.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{JOBS_ONLY, TestApp, collect_reply, openai_provider};

fn slow_answer(chunks: usize, delay_ms: u64) -> Reply {
    Reply::Answer {
        deltas: (0..chunks).map(|i| format!("w{i} ")).collect(),
        usage: Some((3, chunks as u64)),
        done_marker: true,
        chunk_delay: Duration::from_millis(delay_ms),
    }
}

#[tokio::test]
async fn a_job_whose_result_is_stored_is_answered_from_it_without_calling_the_provider() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    // A job answered once...
    let job =
        json!({"job_id": uuid::Uuid::now_v7().to_string(), "prompt": "x", "reply_to": reply_to});
    app.publish(job.clone()).await;
    let first = collect_reply(&mut sub).await.result;
    assert_eq!(first["status"], "ok");
    // ...delivered again (as after a crash between storing and acking; published without the
    // Nats-Msg-Id header so JetStream's dedup window does not drop it) is answered from the
    // stored result.
    app.publish_raw(serde_json::to_vec(&job).unwrap(), None)
        .await;
    let again = collect_reply(&mut sub).await;
    assert!(again.chunks.is_empty());
    assert_eq!(again.result, first);
    assert_eq!(fake.request_count(), 1);

    // A result stored by a worker that died before acking: the job never reaches a provider.
    let job_id = uuid::Uuid::now_v7();
    let mut stored = first.clone();
    stored["job_id"] = json!(job_id.to_string());
    stored["output"] = json!("stored before the crash");
    let subject = format!("{}.results.{job_id}", app.config.nats.subject_prefix);
    let publish = PublishMessage::build().payload(serde_json::to_vec(&stored).unwrap().into());
    app.js
        .send_publish(subject, publish)
        .await
        .unwrap()
        .await
        .unwrap();
    app.publish(json!({"job_id": job_id.to_string(), "prompt": "x", "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["output"], "stored before the crash");
    assert_eq!(fake.request_count(), 1);
    app.teardown().await;
}

#[tokio::test]
async fn two_workers_share_one_consumer_and_answer_every_job_exactly_once() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(slow_answer(3, 30));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    for _ in 0..2 {
        app.start_worker_with(JOBS_ONLY, |c| c.worker.max_in_flight = 2)
            .await;
    }
    let (reply_to, mut sub) = app.reply_inbox().await;

    let mut ids = HashSet::new();
    for i in 0..20 {
        ids.insert(
            app.publish(
                json!({"prompt": format!("job {i}"), "reply_to": reply_to, "stream": false}),
            )
            .await,
        );
    }
    let mut results: HashMap<String, Value> = HashMap::new();
    while results.len() < ids.len() {
        let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_slice(&msg.payload).unwrap();
        let id = event["job_id"].as_str().unwrap().to_string();
        assert!(
            results.insert(id.clone(), event).is_none(),
            "job {id} answered twice"
        );
    }

    assert!(results.values().all(|r| r["status"] == "ok"));
    let got: HashSet<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(results.keys().cloned().collect::<HashSet<_>>(), got);
    let workers: HashSet<&str> = results
        .values()
        .map(|r| r["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "both workers took jobs: {workers:?}");
    assert_eq!(
        fake.request_count(),
        20,
        "no job was sent to the provider twice"
    );
    let info = app.generate_consumer_info().await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    app.teardown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_in_flight_job_and_stops_pulling() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(slow_answer(6, 150));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let first = crate::helpers::next_event(&mut sub).await;
    assert_eq!(first["type"], "chunk", "the job is in flight");

    let worker = app.workers.pop().unwrap();
    worker.stop_token().cancel();
    // Published during the grace period: the stopping worker must not take it.
    let (late_reply_to, mut late_sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": "during grace", "reply_to": late_reply_to}))
        .await;
    let reply = collect_reply(&mut sub).await;
    assert_eq!(reply.result["status"], "ok");
    assert_eq!(reply.result["output"], "w0 w1 w2 w3 w4 w5 ");
    tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .unwrap();

    // The first job was acked; the one published during the grace period never reached the
    // provider and waits for another worker, which answers it.
    assert_eq!(fake.request_count(), 1);
    assert_eq!(app.jobs_in_stream().await, 1);
    app.start_worker().await;
    assert_eq!(collect_reply(&mut late_sub).await.result["status"], "ok");
    // Two jobs, at most three deliveries: the late job was handed back once, not bounced
    // between the stopping worker's pull requests until max_deliver stranded it.
    let deliveries = app
        .generate_consumer_info()
        .await
        .delivered
        .consumer_sequence;
    assert!(deliveries <= 3, "{deliveries} deliveries");
    app.teardown().await;
}

#[tokio::test]
async fn a_job_still_running_when_the_grace_period_ends_is_handed_to_another_worker() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.push(slow_answer(50, 100));
    fake.set_default(Reply::answer(&["second ", "worker"], (1, 2)));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    // An ack wait the test cannot reach: only the worker's hand-back (Nak) lets the successor
    // have the job in time.
    app.start_worker_with(JOBS_ONLY, |c| {
        c.worker.shutdown_grace_secs = 1;
        c.nats.ack_wait_secs = 120;
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    assert_eq!(crate::helpers::next_event(&mut sub).await["type"], "chunk");
    app.workers.pop().unwrap().shutdown().await;

    app.start_worker_with(JOBS_ONLY, |c| {
        c.worker.id = Some("successor".into());
        c.nats.ack_wait_secs = 120;
    })
    .await;
    let reply = collect_reply(&mut sub).await;
    assert_eq!(reply.result["status"], "ok");
    assert_eq!(reply.result["output"], "second worker");
    assert_eq!(reply.result["worker_id"], "successor");
    assert_eq!(fake.request_count(), 2);
    app.teardown().await;
}

#[tokio::test]
async fn a_job_longer_than_ack_wait_is_kept_alive_by_progress_acks_and_not_redelivered() {
    let fake = FakeLlmServer::start().await.unwrap();
    // About 4.5 s of streaming against an ack wait of 3 s.
    fake.set_default(slow_answer(8, 500));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker_with(JOBS_ONLY, |c| c.nats.ack_wait_secs = 3)
        .await;
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let reply = collect_reply(&mut sub).await;

    assert_eq!(reply.result["status"], "ok");
    assert_eq!(
        fake.request_count(),
        1,
        "the job was not handed to a second call"
    );
    let info = app.generate_consumer_info().await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    app.teardown().await;
}

#[tokio::test]
async fn workers_report_per_provider_health_over_nats() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::status(500, "down"));
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "m")).await;
    app.start_worker_with(JOBS_ONLY, |_| {}).await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    assert_eq!(collect_reply(&mut sub).await.result["status"], "error");

    // Ask until the worker has answered (a loaded machine may take longer than one window).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let workers = loop {
        let workers =
            llm_worker::status::collect(&app.client, &app.config.nats, Duration::from_millis(500))
                .await
                .unwrap();
        if !workers.is_empty() || tokio::time::Instant::now() > deadline {
            break workers;
        }
    };
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker_id, "worker-1");
    let p = &workers[0].providers[0];
    assert_eq!((p.provider.as_str(), p.model.as_str()), ("openai", "m"));
    assert_eq!(p.state, llm_worker::health::State::Degraded);
    assert_eq!(p.consecutive_failures, 2);
    app.teardown().await;
}
