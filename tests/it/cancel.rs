//! Cancellation through the contract: a plain core-NATS publish on `<prefix>.cancel.<job_id>`.

use std::time::Duration;

use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;

use crate::helpers::{TestApp, collect_reply, collect_results, next_event, openai_provider};

/// Publish a cancel request the way any orchestrator would: core NATS, empty body.
async fn cancel(app: &TestApp, job_id: uuid::Uuid) {
    app.client
        .publish(app.config.nats.cancel_subject(&job_id), bytes::Bytes::new())
        .await
        .unwrap();
    app.client.flush().await.unwrap();
}

#[tokio::test]
async fn a_job_cancelled_while_queued_is_answered_cancelled_without_a_call_even_by_a_later_worker()
{
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    // Streams exist, no worker runs: the request is remembered by the cancel stream.
    llm_worker::queue::ensure_streams(&app.js, &app.config.nats)
        .await
        .unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let doomed = app
        .publish(json!({"prompt": "a", "reply_to": reply_to, "stream": false}))
        .await;
    cancel(&app, doomed).await;
    // Wait until the stream holds the request (a JetStream fact, not a sleep).
    let mut stream = app
        .js
        .get_stream(&app.config.nats.cancel_stream)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream.info().await.unwrap().state.messages == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancel request was not stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live = app
        .publish(json!({"prompt": "b", "reply_to": reply_to, "stream": false}))
        .await;
    app.start_worker().await;
    let results = collect_results(&mut sub, 2).await;
    let r = &results[&doomed.to_string()];
    assert_eq!(r["error"]["code"], "cancelled", "{r}");
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(results[&live.to_string()]["status"], "ok");
    assert_eq!(
        fake.request_count(),
        1,
        "only the other job reached the provider"
    );
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_jobs WHERE job_id = '{doomed}' AND error_code = 'cancelled'"
        ),
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn a_streaming_job_cancelled_stops_its_provider_stream_and_records_the_partial_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    // Forty seconds of answer, a word every 200 ms.
    fake.set_default(Reply::Answer {
        deltas: (0..200).map(|i| format!("w{i} ")).collect(),
        usage: Some((5, 200)),
        done_marker: true,
        chunk_delay: Duration::from_millis(200),
    });
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let id = app
        .publish(json!({"prompt": "long", "reply_to": reply_to}))
        .await;
    // The answer is streaming: its first chunk is here.
    assert_eq!(next_event(&mut sub).await["type"], "chunk");
    assert_eq!(fake.open_responses(), 1);
    let asked = tokio::time::Instant::now();
    llm_worker::cancel::request(&app.js, &app.config.nats, id)
        .await
        .unwrap();
    let reply = collect_reply(&mut sub).await;
    let took = asked.elapsed();
    let r = &reply.result;
    assert_eq!(r["error"]["code"], "cancelled", "{r}");
    // Far sooner than the answer's 40 s (the bound asked for is 100 ms; a loaded test machine
    // gets slack, the benchmark-free margin is still two orders of magnitude).
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The provider's stream was closed, not left running.
    let closed = tokio::time::Instant::now() + Duration::from_secs(5);
    while fake.open_responses() > 0 {
        assert!(
            tokio::time::Instant::now() < closed,
            "the provider stream stayed open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.request_count(), 1);
    // The partial call is billed as estimated.
    app.wait_count(
        &format!(
            "SELECT count(*) FROM llm_calls WHERE job_id = '{id}' AND error_code = 'cancelled' \
             AND tokens_estimated AND output_tokens > 0"
        ),
        1,
    )
    .await;
    app.teardown().await;
}
