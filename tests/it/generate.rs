//! Generation jobs end to end: streaming, non-streaming, invalid jobs, provider failures.

use std::time::Duration;

use futures::StreamExt;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::json;

use crate::helpers::{TestApp, collect_reply, openai_provider};

async fn app_with_fake() -> (TestApp, FakeLlmServer) {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker().await;
    (app, fake)
}

#[tokio::test]
async fn a_streamed_job_sends_ordered_chunks_and_a_result_equal_to_their_concatenation() {
    // Every delta its own event (no coalescing), to see the chunks mirror the provider's.
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker_with(crate::helpers::ALL_ROLES, |c| {
        c.limits.chunk_interval_ms = 0
    })
    .await;
    fake.push(Reply::answer(&["Hel", "lo", ", ", "world"], (9, 4)));
    let (reply_to, mut sub) = app.reply_inbox().await;

    let job_id = app
        .publish(json!({"prompt": "Say hello", "reply_to": reply_to, "tenant": "acme", "trace_id": "trace-1"}))
        .await;
    let reply = collect_reply(&mut sub).await;

    let seqs: Vec<u64> = reply
        .chunks
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    for c in &reply.chunks {
        assert_eq!(c["job_id"], job_id.to_string());
        assert_eq!(c["trace_id"], "trace-1");
        assert_eq!(c["attempt"], 1);
        assert_eq!(c["provider"], "openai");
        assert_eq!(c["model"], "gpt-test");
    }
    let r = &reply.result;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["output"], "Hello, world");
    assert_eq!(reply.final_text(), "Hello, world");
    assert_eq!(
        r["tokens_used"],
        json!({"input": 9, "output": 4, "total": 13})
    );
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["provider"], "openai");
    assert_eq!(r["model_used"], "gpt-test");
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["attempts"].as_array().unwrap().len(), 1);
    assert!(r["error"].is_null());
    // The provider got a streaming request asking for usage.
    let req = &fake.requests()[0];
    assert_eq!(req["stream"], true);
    assert_eq!(req["stream_options"]["include_usage"], true);
    assert_eq!(
        req["messages"][0],
        json!({"role": "user", "content": "Say hello"})
    );
    // The same result is stored durably.
    let stored = app.wait_stored_result(job_id).await;
    assert_eq!(&stored, r);
    app.teardown().await;
}

#[tokio::test]
async fn deltas_faster_than_the_chunk_interval_are_coalesced_and_slower_ones_are_not() {
    let (app, fake) = app_with_fake().await;
    let deltas: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    let text: String = deltas.concat();
    fake.push(Reply::Answer {
        deltas: deltas.clone(),
        usage: Some((1, 200)),
        done_marker: true,
        chunk_delay: Duration::ZERO,
    });
    // Slower than the 20 ms interval: every delta goes out as it comes.
    fake.push(Reply::Answer {
        deltas: vec!["a".into(), "b".into(), "c".into()],
        usage: Some((1, 3)),
        done_marker: true,
        chunk_delay: Duration::from_millis(60),
    });
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let fast = collect_reply(&mut sub).await;
    assert_eq!(fast.result["output"], text);
    assert_eq!(fast.final_text(), text);
    let seqs: Vec<u64> = fast
        .chunks
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert!(
        seqs.len() < 20,
        "200 deltas in a burst became {} chunk events",
        seqs.len()
    );

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let slow = collect_reply(&mut sub).await;
    let pieces: Vec<&str> = slow
        .chunks
        .iter()
        .map(|c| c["delta"].as_str().unwrap())
        .collect();
    assert_eq!(pieces, ["a", "b", "c"]);
    app.teardown().await;
}

#[tokio::test]
async fn a_non_streamed_job_gets_no_chunks_and_the_full_result() {
    let (app, fake) = app_with_fake().await;
    fake.push(Reply::answer(&["All ", "at ", "once"], (7, 3)));
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "stream": false, "reply_to": reply_to}))
        .await;
    let reply = collect_reply(&mut sub).await;

    assert!(reply.chunks.is_empty(), "{:?}", reply.chunks);
    assert_eq!(reply.result["status"], "ok");
    assert_eq!(reply.result["output"], "All at once");
    assert_eq!(reply.result["tokens_used"]["total"], 10);
    assert_eq!(fake.requests()[0]["stream"], false);
    app.teardown().await;
}

#[tokio::test]
async fn invalid_jobs_get_invalid_job_results_are_terminated_and_the_worker_keeps_serving() {
    let (app, fake) = app_with_fake().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    // JetStream announces every terminated message: an Ack would not be announced here.
    let mut terminated = app
        .client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.{}",
            app.config.nats.jobs_stream,
            app.config
                .nats
                .consumer_name(llm_worker::contract::JobKind::Generate)
        ))
        .await
        .unwrap();
    app.client.flush().await.unwrap();

    // Not JSON at all: answered in the results stream under its Nats-Msg-Id.
    let garbage_id = uuid::Uuid::now_v7();
    app.publish_raw(b"{not json".to_vec(), Some(&garbage_id.to_string()))
        .await;
    let stored = app.wait_stored_result(garbage_id).await;
    assert_eq!(stored["status"], "error");
    assert_eq!(stored["error"]["code"], "invalid_job");

    let cases = [
        json!({"reply_to": reply_to, "system_prompt": "no prompt"}),
        json!({"reply_to": reply_to, "prompt": "x", "provider": "nope"}),
        json!({"reply_to": reply_to, "prompt": "x", "stream": "yes"}),
        json!({"reply_to": reply_to, "prompt": 42}),
        json!({"reply_to": reply_to, "prompt": "x", "options": {"temperature": "hot"}}),
    ];
    for job in cases {
        let id = app.publish(job.clone()).await;
        let reply = collect_reply(&mut sub).await;
        assert_eq!(reply.result["job_id"], id.to_string(), "{job}");
        assert_eq!(reply.result["status"], "error", "{job}");
        assert_eq!(reply.result["error"]["code"], "invalid_job", "{job}");
        assert!(
            !reply.result["error"]["message"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        assert_eq!(app.wait_stored_result(id).await, reply.result);
    }
    assert_eq!(fake.request_count(), 0, "no invalid job reached a provider");

    // Still serving.
    app.publish(json!({"reply_to": reply_to, "prompt": "valid"}))
        .await;
    assert_eq!(collect_reply(&mut sub).await.result["status"], "ok");

    // Terminated (one advisory per invalid job), not redelivered: nothing pending, nothing
    // left in the work queue.
    for _ in 0..6 {
        tokio::time::timeout(Duration::from_secs(10), terminated.next())
            .await
            .expect("an invalid job was not terminated")
            .unwrap();
    }
    let info = app.generate_consumer_info().await;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(app.jobs_in_stream().await, 0);
    app.teardown().await;
}

#[tokio::test]
async fn a_persistent_http_500_ends_as_an_error_result_after_retrying() {
    let (app, fake) = app_with_fake().await;
    fake.set_default(Reply::status(500, "internal error"));
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;

    assert_eq!(r["status"], "error");
    assert_eq!(r["error"]["code"], "all_providers_failed");
    let attempts = r["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        2,
        "one call and one retry (max_retries = 1)"
    );
    for a in attempts {
        assert_eq!(a["error"]["code"], "server_error");
        assert_eq!(a["http_status"], 500);
    }
    assert!(r["output"].is_null());
    assert_eq!(fake.request_count(), 2);
    app.teardown().await;
}

#[tokio::test]
async fn a_stream_cut_before_its_finish_reason_is_never_a_success() {
    let (app, fake) = app_with_fake().await;
    fake.set_default(Reply::Cut {
        deltas: vec!["The answer is".into()],
    });
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let reply = collect_reply(&mut sub).await;

    assert_eq!(reply.result["status"], "error");
    assert!(reply.result["output"].is_null());
    for a in reply.result["attempts"].as_array().unwrap() {
        assert_eq!(a["error"]["code"], "truncated", "{a}");
    }
    // The partial text was streamed, tagged with attempts the result does not name as final.
    assert!(!reply.chunks.is_empty());
    assert!(reply.result["attempt"].is_null());
    app.teardown().await;
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_without_a_finish_reason_is_truncated() {
    let (app, fake) = app_with_fake().await;
    let partial = r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"half"},"finish_reason":null}]}"#;
    fake.set_default(Reply::RawStream(vec![partial.into()]));
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;

    assert_eq!(r["status"], "error");
    assert_eq!(r["attempts"][0]["error"]["code"], "truncated");
    app.teardown().await;
}

#[tokio::test]
async fn an_error_inside_a_200_stream_is_an_error_not_a_truncated_success() {
    let (app, fake) = app_with_fake().await;
    let text = r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"Partial"},"finish_reason":null}]}"#;
    let error = r#"{"error":{"message":"The server had an error while processing your request","type":"server_error","code":null}}"#;
    fake.set_default(Reply::RawStream(vec![text.into(), error.into()]));
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;

    assert_eq!(r["status"], "error");
    assert_eq!(r["error"]["code"], "all_providers_failed");
    let a = &r["attempts"][0];
    assert_eq!(a["error"]["code"], "server_error");
    assert!(
        a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server had an error")
    );
    assert!(r["output"].is_null());
    app.teardown().await;
}

#[tokio::test]
async fn a_missing_done_marker_after_a_finish_reason_is_a_success() {
    let (app, fake) = app_with_fake().await;
    fake.set_default(Reply::Answer {
        deltas: vec!["complete".into()],
        usage: None,
        done_marker: false,
        chunk_delay: Duration::ZERO,
    });
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;

    assert_eq!(r["status"], "ok");
    assert_eq!(r["output"], "complete");
    // No usage chunk: counted by the worker and marked as estimated.
    assert_eq!(r["attempts"][0]["tokens_estimated"], true);
    assert!(r["tokens_used"]["output"].as_u64().unwrap() > 0);
    app.teardown().await;
}

#[tokio::test]
async fn a_job_whose_deadline_passes_mid_answer_ends_as_timeout() {
    let (app, fake) = app_with_fake().await;
    fake.set_default(Reply::Answer {
        deltas: (0..50).map(|i| format!("w{i} ")).collect(),
        usage: Some((1, 50)),
        done_marker: true,
        chunk_delay: Duration::from_millis(100),
    });
    let (reply_to, mut sub) = app.reply_inbox().await;

    app.publish(json!({"prompt": "x", "timeout_ms": 800, "reply_to": reply_to}))
        .await;
    let reply = collect_reply(&mut sub).await;

    assert_eq!(reply.result["status"], "error");
    assert_eq!(reply.result["error"]["code"], "timeout", "{}", reply.result);
    assert!(!reply.chunks.is_empty(), "the answer had started");
    assert_eq!(fake.request_count(), 1, "the deadline covers every attempt");
    app.teardown().await;
}

#[tokio::test]
async fn jobs_that_expire_before_a_worker_starts_them_are_answered_timeout_without_a_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    llm_worker::nats::ensure_streams(&app.js, &app.config.nats)
        .await
        .unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    // Queued while no worker runs: one with a deadline already past, one that expires 1 ms
    // after JetStream received it (the worker starts far later), one without either.
    let past = (chrono::Utc::now() - chrono::TimeDelta::seconds(5)).to_rfc3339();
    let a = app
        .publish(json!({"prompt": "a", "deadline": past, "reply_to": reply_to, "stream": false}))
        .await;
    let b = app
        .publish(json!({"prompt": "b", "expires_in_ms": 1, "reply_to": reply_to, "stream": false}))
        .await;
    let c = app
        .publish(json!({"prompt": "c", "reply_to": reply_to, "stream": false}))
        .await;
    app.start_worker().await;
    let results = crate::helpers::collect_results(&mut sub, 3).await;
    for id in [a, b] {
        let r = &results[&id.to_string()];
        assert_eq!(r["error"]["code"], "timeout", "{r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("expired"),
            "{r}"
        );
        assert_eq!(r["attempts"], json!([]), "{r}");
    }
    assert_eq!(results[&c.to_string()]["status"], "ok");
    assert_eq!(
        fake.request_count(),
        1,
        "only the live job reached the provider"
    );
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE error_code = 'timeout' AND job_id IN ('{a}', '{b}')"),
        2,
    )
    .await;
    // The operators' view counts them by outcome.
    app.wait_count(
        "SELECT coalesce(sum(jobs), 0)::bigint FROM llm_jobs_daily WHERE error_code = 'timeout' AND day = (now() AT TIME ZONE 'UTC')::date",
        2,
    )
    .await;
    app.wait_count(
        "SELECT coalesce(sum(jobs), 0)::bigint FROM llm_jobs_daily WHERE status = 'ok' AND error_code IS NULL",
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn a_result_that_cannot_be_stored_is_requeued_never_acked() {
    let (app, fake) = app_with_fake().await;
    fake.set_default(Reply::answer(&["stored at last"], (1, 1)));
    // The results stream is full and refuses new messages: no result can be stored, though
    // looking one up still works.
    let mut stream = app
        .js
        .get_stream(&app.config.nats.results_stream)
        .await
        .unwrap();
    let mut full = stream.info().await.unwrap().config.clone();
    full.max_bytes = 1;
    full.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    app.js.update_stream(&full).await.unwrap();
    let (reply_to, mut sub) = app.reply_inbox().await;
    let id = app
        .publish(json!({"prompt": "x", "stream": false, "reply_to": reply_to}))
        .await;
    // Answered by the provider, refused by the stream, handed back: delivered again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app
        .generate_consumer_info()
        .await
        .delivered
        .consumer_sequence
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "never handed back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fake.request_count() >= 1);
    assert_eq!(app.jobs_in_stream().await, 1, "not acked");
    assert!(
        futures::FutureExt::now_or_never(sub.next()).is_none(),
        "nothing is published before the result is stored"
    );

    // Once the stream takes messages again, the requeued job is answered and stored.
    full.max_bytes = -1;
    app.js.update_stream(&full).await.unwrap();
    let reply = collect_reply(&mut sub).await;
    assert_eq!(reply.result["job_id"], id.to_string());
    assert_eq!(reply.result["output"], "stored at last");
    assert_eq!(app.wait_stored_result(id).await, reply.result);
    app.teardown().await;
}
