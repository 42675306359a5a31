//! Context-window fitting through the contract: what reaches the (fake) provider when a job
//! does not fit its model's window (context chunks dropped from the last, then the oldest
//! messages), `context_too_long` without any call, and the route's larger-window entry chosen
//! when the first cannot take the job.

use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider};

/// `n` repetitions of `word` after a label (about `n` tokens).
fn text(label: &str, word: &str, n: usize) -> String {
    format!("{label}{}", format!(" {word}").repeat(n))
}

async fn ask(app: &TestApp, job: Value) -> Value {
    let (reply_to, mut sub) = app.reply_inbox().await;
    let mut job = job;
    job["reply_to"] = json!(reply_to);
    app.publish(job).await;
    collect_reply(&mut sub).await.result
}

/// The system text and the messages (role, first word) of the `i`th request the fake got.
fn sent(fake: &FakeLlmServer, i: usize) -> (String, Vec<(String, String)>) {
    let req = &fake.requests()[i];
    let mut system = String::new();
    let mut messages = Vec::new();
    for m in req["messages"].as_array().unwrap() {
        let content = m["content"].as_str().unwrap().to_string();
        match m["role"].as_str().unwrap() {
            "system" => system = content,
            role => messages.push((
                role.to_string(),
                content.split(' ').next().unwrap_or_default().to_string(),
            )),
        }
    }
    (system, messages)
}

#[tokio::test]
async fn a_job_over_its_window_loses_its_last_context_chunks_then_its_oldest_messages() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (5, 1)));
    let providers = format!(
        "{}context_windows = {{ \"small-model\" = 400, \"tiny-model\" = 300 }}\n",
        openai_provider("openai", &fake.base_url(), "small-model")
    );
    let mut app = TestApp::new(&providers).await;
    app.start_worker().await;
    let chunks: Vec<String> = (1..=4)
        .map(|i| text(&format!("chunk{i}"), "fact", 100))
        .collect();

    // ~480 prompt tokens + 50 output in a window of 400: the last two chunks go.
    let r = ask(
        &app,
        json!({"system_prompt": "Answer from the context.", "context": chunks,
               "prompt": "What does chunk1 say?", "options": {"max_tokens": 50}}),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    let t = &r["context_trimmed"];
    assert_eq!(
        (&t["chunks_dropped"], &t["messages_dropped"]),
        (&json!(2), &json!(0)),
        "{r}"
    );
    assert_eq!(t["window"], 400);
    assert!(
        t["tokens_before"].as_u64() > t["tokens_after"].as_u64(),
        "{t}"
    );
    assert!(t["tokens_after"].as_u64().unwrap() + 50 <= 400, "{t}");
    let (system, messages) = sent(&fake, 0);
    assert!(system.starts_with("Answer from the context."), "{system}");
    assert!(
        system.contains("[1] chunk1") && system.contains("[2] chunk2"),
        "{system}"
    );
    assert!(
        !system.contains("chunk3") && !system.contains("chunk4"),
        "{system}"
    );
    assert_eq!(messages, [("user".to_string(), "What".to_string())]);
    assert_eq!(fake.requests()[0]["max_tokens"], 50, "not lowered");

    // A conversation too long even without its chunks: every chunk goes, then the oldest
    // messages; the system prompt and the last question stay, and the conversation does not
    // start with an answer.
    let r = ask(
        &app,
        json!({"model": "tiny-model", "system_prompt": "Answer from the context.",
               "context": chunks[..2],
               "messages": [{"role": "user", "content": text("old-question", "why", 150)},
                            {"role": "assistant", "content": text("old-answer", "because", 150)}],
               "prompt": "What now?", "options": {"max_tokens": 50}}),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    let t = &r["context_trimmed"];
    assert_eq!(
        (&t["chunks_dropped"], &t["messages_dropped"]),
        (&json!(2), &json!(2)),
        "{r}"
    );
    let (system, messages) = sent(&fake, 1);
    assert_eq!(system, "Answer from the context.");
    assert_eq!(messages, [("user".to_string(), "What".to_string())]);

    // A job that fits says nothing about trimming.
    let r = ask(&app, json!({"prompt": "Short?", "context": chunks[..1]})).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r.get("context_trimmed").is_none(), "{r}");
    app.teardown().await;
}

#[tokio::test]
async fn a_job_no_model_can_take_is_context_too_long_without_a_call() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (5, 1)));
    let providers = format!(
        "{}context_windows = {{ \"*\" = 100 }}\n",
        openai_provider("openai", &fake.base_url(), "some-model")
    );
    let mut app = TestApp::new(&providers).await;
    app.start_worker().await;
    let job_id_text = text("question", "word", 200);
    let r = ask(&app, json!({"prompt": job_id_text, "context": ["a chunk"]})).await;
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error"]["code"], "context_too_long", "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the window is 100") && message.contains("openai:some-model"),
        "{message}"
    );
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(fake.request_count(), 0, "no provider call");
    // `strict` with an output reserve that cannot fit: the same, also without a call.
    let r = ask(
        &app,
        json!({"prompt": "hi", "options": {"max_tokens": 200, "fit": "strict"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], "context_too_long", "{r}");
    // `trim` (the default) lowers max_tokens instead.
    let r = ask(
        &app,
        json!({"prompt": "hi", "options": {"max_tokens": 200}}),
    )
    .await;
    assert_eq!(r["status"], "ok", "{r}");
    let lowered = r["context_trimmed"]["max_tokens_after"].as_u64().unwrap();
    assert!((16..100).contains(&lowered), "{r}");
    assert_eq!(r["context_trimmed"]["max_tokens_before"], 200);
    assert_eq!(fake.requests()[0]["max_tokens"], lowered);
    let job_id = r["job_id"].as_str().unwrap().to_string();
    // The refused ones are recorded, without calls.
    app.wait_count(
        "SELECT count(*) FROM llm_jobs WHERE error_code = 'context_too_long' AND attempts = 0",
        2,
    )
    .await;
    app.wait_count(
        &format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}'"),
        1,
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM llm_calls").await, 1);
    app.teardown().await;
}

#[tokio::test]
async fn the_routes_larger_window_entry_takes_a_job_the_first_cannot() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["ok"], (5, 1)));
    let providers = format!(
        "{}context_windows = {{ \"small-model\" = 200 }}\n{}context_windows = {{ \"big-model\" = 100000 }}\n[routes]\ndefault = [\"small\", \"big\"]\n",
        openai_provider("small", &fake.base_url(), "small-model"),
        openai_provider("big", &fake.base_url(), "big-model"),
    );
    let mut app = TestApp::new(&providers).await;
    app.start_worker().await;
    let r = ask(&app, json!({"prompt": text("long", "question", 300)})).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        (&r["provider"], &r["model_used"]),
        (&json!("big"), &json!("big-model"))
    );
    assert_eq!(r["attempts"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["attempt"], 1);
    assert!(
        r.get("context_trimmed").is_none(),
        "sent whole to the larger window: {r}"
    );
    let models: Vec<Value> = fake.requests().iter().map(|q| q["model"].clone()).collect();
    assert_eq!(models, [json!("big-model")], "the small model got nothing");
    // A short job still goes to the first entry.
    let r = ask(&app, json!({"prompt": "short"})).await;
    assert_eq!(r["provider"], "small", "{r}");
    app.teardown().await;
}
