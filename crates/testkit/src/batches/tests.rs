//! The fake batch APIs from a client's side: uploads, batches that end, fail lines, expire,
//! are cancelled or refused, in both APIs' shapes.
use super::*;
use crate::FakeLlmServer;

#[test]
fn times_are_rfc3339_in_utc() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    let t = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    assert_eq!(rfc3339(t), "2026-05-28T20:26:40Z");
    let leap = UNIX_EPOCH + Duration::from_secs(951_825_600);
    assert_eq!(rfc3339(leap), "2000-02-29T12:00:00Z");
}

/// A client (with a TLS crypto provider: see the dev-dependency on rustls).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn jsonl(n: usize) -> String {
    (1..=n)
        .map(|i| {
            json!({"custom_id": format!("j{i}"), "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-test", "messages": [{"role": "user", "content": format!("q{i}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Upload `file` and create an OpenAI batch of it; the batch object.
async fn openai_batch_of(fake: &FakeLlmServer, file: String) -> Value {
    let http = http();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(file.into_bytes()).file_name("jobs.jsonl"),
        );
    let uploaded: Value = http
        .post(format!("{}/files", fake.base_url()))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(uploaded["purpose"], "batch");
    http.post(format!("{}/batches", fake.base_url()))
        .json(
            &json!({"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": {"lane": "test"}}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn get_json(url: String) -> Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

async fn get_lines(url: String) -> Vec<Value> {
    let text = http().get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Poll the batch at `url` until `done` says it has ended (the fake's own clock).
async fn until(url: String, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let b = get_json(url.clone()).await;
        if done(&b) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the batch at {url} did not end");
}

#[tokio::test]
async fn an_openai_batch_answers_its_lines_after_a_while_and_fails_some() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_millis(300),
        fail_every: 3,
        expire: false,
        ..Default::default()
    });
    let batch = openai_batch_of(&fake, jsonl(5)).await;
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["output_file_id"], Value::Null);
    assert_eq!(batch["metadata"]["lane"], "test");
    let url = format!(
        "{}/batches/{}",
        fake.base_url(),
        batch["id"].as_str().unwrap()
    );
    let done = until(url, |b| b["status"] == "completed").await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 4, "failed": 1})
    );
    let out = get_lines(format!(
        "{}/files/{}/content",
        fake.base_url(),
        done["output_file_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(out.len(), 4);
    assert_eq!(out[0]["custom_id"], "j1");
    assert_eq!(out[0]["response"]["status_code"], 200);
    assert_eq!(
        out[0]["response"]["body"]["choices"][0]["message"]["content"],
        "batched: q1"
    );
    assert!(out[0]["response"]["body"]["usage"]["prompt_tokens"].as_u64() >= Some(1));
    let errors = get_lines(format!(
        "{}/files/{}/content",
        fake.base_url(),
        done["error_file_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "j3");
    assert_eq!(errors[0]["response"]["status_code"], 500);
    let stats = fake.batch_stats();
    assert_eq!((stats.uploads, stats.created, stats.lines), (1, 1, 5));
    assert_eq!(stats.downloads, 2);
    assert!(stats.polls >= 1);
}

#[tokio::test]
async fn an_openai_batch_expires_cancels_or_fails_on_a_bad_file() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_millis(100),
        fail_every: 0,
        expire: true,
        ..Default::default()
    });
    let batch = openai_batch_of(&fake, jsonl(4)).await;
    let url = format!(
        "{}/batches/{}",
        fake.base_url(),
        batch["id"].as_str().unwrap()
    );
    let done = until(url, |b| b["status"] == "expired").await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2})
    );
    let errors = get_lines(format!(
        "{}/files/{}/content",
        fake.base_url(),
        done["error_file_id"].as_str().unwrap()
    ))
    .await;
    let ids: Vec<&str> = errors
        .iter()
        .map(|e| e["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["j3", "j4"]);
    assert_eq!(errors[0]["error"]["code"], "batch_expired");

    // Cancelled before its end: every line cancelled, at once.
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_secs(3600),
        ..BatchPlan::default()
    });
    let batch = openai_batch_of(&fake, jsonl(2)).await;
    let id = batch["id"].as_str().unwrap();
    let cancelled: Value = http()
        .post(format!("{}/batches/{id}/cancel", fake.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let errors = get_lines(format!("{}/files/{id}-errors/content", fake.base_url())).await;
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[1]["error"]["code"], "batch_cancelled");

    // A line that is not a request: the batch fails, saying which line.
    let bad = format!(
        "{}\n{{\"custom_id\": \"x\", \"method\": \"POST\"}}",
        jsonl(1)
    );
    let failed = openai_batch_of(&fake, bad).await;
    assert_eq!(failed["status"], "failed");
    let why = failed["errors"]["data"][0]["message"].as_str().unwrap();
    assert!(why.contains("line 2"), "{why}");
}

#[tokio::test]
async fn an_anthropic_message_batch_ends_with_results_per_request() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_batch_plan(BatchPlan {
        takes: Duration::from_millis(200),
        fail_every: 2,
        expire: false,
        ..Default::default()
    });
    let http = http();
    let requests: Vec<Value> = (1..=3)
        .map(|i| {
            json!({"custom_id": format!("job-{i}"), "params": {"model": "claude-test",
            "max_tokens": 64, "messages": [{"role": "user", "content": format!("q{i}")}]}})
        })
        .collect();
    let created: Value = http
        .post(format!("{}/v1/messages/batches", fake.root_url()))
        .json(&json!({"requests": requests}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["processing_status"], "in_progress");
    assert_eq!(created["request_counts"]["processing"], 3);
    assert_eq!(created["results_url"], Value::Null);
    let url = format!(
        "{}/v1/messages/batches/{}",
        fake.root_url(),
        created["id"].as_str().unwrap()
    );
    let ended = until(url, |b| b["processing_status"] == "ended").await;
    assert_eq!(ended["request_counts"]["succeeded"], 2);
    assert_eq!(ended["request_counts"]["errored"], 1);
    let results = get_lines(ended["results_url"].as_str().unwrap().to_string()).await;
    let types: Vec<&str> = results
        .iter()
        .map(|r| r["result"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["succeeded", "errored", "succeeded"]);
    assert_eq!(
        results[2]["result"]["message"]["content"][0]["text"],
        "batched: q3"
    );
    assert_eq!(results[1]["custom_id"], "job-2");

    // Requests it refuses: a custom_id it does not take, a repeated one.
    for requests in [
        json!([{"custom_id": "no spaces", "params": {"model": "m", "max_tokens": 1, "messages": []}}]),
        json!([{"custom_id": "a", "params": {"model": "m", "max_tokens": 1, "messages": []}},
               {"custom_id": "a", "params": {"model": "m", "max_tokens": 1, "messages": []}}]),
    ] {
        let r = http
            .post(format!("{}/v1/messages/batches", fake.root_url()))
            .json(&json!({"requests": requests}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
}
