//! The HTTP gateway from the outside: a real OpenAI client library (async-openai) and plain
//! HTTP against `llm-worker gateway`, through real NATS to a worker and a fake provider;
//! usage rows in Postgres carry the API key's tenant.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, EncodingFormat};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use llm_worker::gateway::{self, keys};
use llm_worker_testkit::{FakeLlmServer, Reply, fake_vector};
use serde_json::{Value, json};

use crate::helpers::{TestApp, openai_provider};

/// A worker and a gateway on one test's names, and a key of tenant `acme`.
pub(crate) struct Setup {
    pub app: TestApp,
    pub gateway: gateway::Running,
    pub key: String,
    pub fake: FakeLlmServer,
}

impl Setup {
    pub async fn new(
        extra_toml: &str,
        tweak: impl FnOnce(&mut llm_worker::config::Config),
    ) -> Setup {
        Self::build(extra_toml, tweak, true).await
    }

    /// [`Self::new`], with a worker only when `worker` (else start one with
    /// `s.app.start_worker()` later). The JetStream streams exist either way (the gateway
    /// makes them).
    pub async fn build(
        extra_toml: &str,
        tweak: impl FnOnce(&mut llm_worker::config::Config),
        worker: bool,
    ) -> Setup {
        llm_worker::tls::install_crypto_provider();
        let fake = FakeLlmServer::start().await.unwrap();
        let toml = format!(
            "{}\n[routes]\ndefault = [\"openai\"]\n{extra_toml}",
            openai_provider("openai", &fake.base_url(), "gpt-test")
        );
        let mut app = TestApp::new(&toml).await;
        tweak(&mut app.config);
        if worker {
            app.start_worker().await;
        }
        let gateway = gateway::start(app.config.clone(), "127.0.0.1:0")
            .await
            .unwrap();
        let (_, key) = keys::create(&app.db, "acme", Some("tests"), false)
            .await
            .unwrap();
        Setup {
            app,
            gateway,
            key,
            fake,
        }
    }

    /// A key of another tenant (or an operator's, with `admin`).
    pub async fn key_of(&self, tenant: &str, admin: bool) -> String {
        keys::create(&self.app.db, tenant, Some("tests"), admin)
            .await
            .unwrap()
            .1
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    fn openai(&self) -> async_openai::Client<OpenAIConfig> {
        async_openai::Client::with_config(
            OpenAIConfig::new()
                .with_api_base(self.url("/v1"))
                .with_api_key(&self.key),
        )
    }

    /// POST `body` to `path` with the key (or `key`), returning status, headers and body.
    pub async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(key.unwrap_or(&self.key))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// GET `path` with `key`, returning status and body.
    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn teardown(self) {
        self.gateway.shutdown().await;
        self.app.teardown().await;
    }
}

/// The OpenAI error object of a response body, checked for OpenAI's shape.
pub(crate) fn openai_error(body: &Value) -> (&str, &str) {
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e.get("param").is_some(), "{body}");
    (e["type"].as_str().unwrap(), e["code"].as_str().unwrap())
}

#[tokio::test]
async fn an_openai_client_chats_streamed_and_not_and_the_usage_rows_carry_the_keys_tenant() {
    let s = Setup::new("", |_| {}).await;
    let client = s.openai();

    s.fake.push(Reply::answer(&["Hello", " world"], (5, 2)));
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .max_completion_tokens(50u32)
        .messages([
            ChatCompletionRequestSystemMessageArgs::default()
                .content("Be brief.")
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("Say hello")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap();
    let answer = client.chat().create(request.clone()).await.unwrap();
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Hello world")
    );
    let usage = answer.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (5, 2, 7)
    );
    assert_eq!(answer.model, "gpt-test");
    // The request reached the provider as the job the gateway built from it.
    let sent = s.fake.requests().pop().unwrap();
    assert_eq!(sent["messages"][0]["content"], "Be brief.", "{sent}");
    assert_eq!(sent["messages"][1]["content"], "Say hello", "{sent}");
    assert_eq!(
        sent["max_tokens"]
            .as_u64()
            .or(sent["max_completion_tokens"].as_u64()),
        Some(50)
    );

    s.fake.push(Reply::answer(&["Hel", "lo", " again"], (6, 3)));
    let mut streamed = request;
    streamed.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = client.chat().create_stream(streamed).await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(u) = chunk.usage {
            usage = Some(u);
        }
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
            finish = finish.or(choice.finish_reason);
        }
    }
    assert_eq!(text, "Hello again");
    assert!(finish.is_some(), "no finish_reason in the stream");
    let usage = usage.expect("no usage chunk with include_usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (6, 3));

    s.app
        .wait_count(
            "SELECT count(*) FROM llm_jobs WHERE tenant = 'acme' AND status = 'ok'",
            2,
        )
        .await;
    assert_eq!(
        s.app
            .count("SELECT count(*) FROM llm_jobs WHERE tenant <> 'acme'")
            .await,
        0
    );
    s.teardown().await;
}

#[tokio::test]
async fn embeddings_come_as_floats_or_as_base64_of_the_same_vectors() {
    let s = Setup::new("", |_| {}).await;
    let client = s.openai();
    let request = CreateEmbeddingRequestArgs::default()
        .model("gpt-test")
        .input(vec!["alpha", "beta"])
        .dimensions(6u32)
        .build()
        .unwrap();
    let floats = client.embeddings().create(request.clone()).await.unwrap();
    assert_eq!(floats.data.len(), 2);
    assert_eq!(floats.data[0].embedding, fake_vector("alpha", 6));
    assert_eq!(floats.data[1].embedding, fake_vector("beta", 6));
    assert_eq!(floats.data[1].index, 1);

    let mut b64 = request;
    b64.encoding_format = Some(EncodingFormat::Base64);
    let encoded = client.embeddings().create_base64(b64).await.unwrap();
    let decoded: Vec<Vec<f32>> = encoded
        .data
        .into_iter()
        .map(|e| e.embedding.into())
        .collect();
    assert_eq!(
        decoded,
        vec![fake_vector("alpha", 6), fake_vector("beta", 6)]
    );
    s.app
        .wait_count(
            "SELECT count(*) FROM llm_jobs WHERE tenant = 'acme' AND kind = 'embed'",
            2,
        )
        .await;
    s.teardown().await;
}

#[tokio::test]
async fn models_lists_the_routes_and_their_entries() {
    let s = Setup::new("code = [\"openai:gpt-big\"]\n", |_| {}).await;
    let models = s.openai().models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    for id in ["default", "code", "openai:gpt-test", "gpt-test", "gpt-big"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    s.teardown().await;
}

#[tokio::test]
async fn the_seed_api_answers_with_the_result_and_streams_contract_events_for_the_keys_tenant() {
    let s = Setup::new("", |_| {}).await;
    s.fake.push(Reply::answer(&["four"], (4, 1)));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .post(s.url("/v1/generate"))
        .bearer_auth(&s.key)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"prompt": "two plus two", "tenant": "someone-else", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-trace-id"], trace);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["type"], "result");
    assert_eq!(result["output"], "four");
    assert_eq!(result["tenant"], "acme", "the body's tenant must not count");
    assert_eq!(result["trace_id"], trace);
    let job_id = result["job_id"].as_str().unwrap().to_string();

    // Streamed: each SSE event is one event of the contract, parsed by a standard parser.
    s.fake.push(Reply::answer(&["a", "b", "c"], (3, 3)));
    let response = reqwest::Client::new()
        .post(s.url("/v1/generate"))
        .bearer_auth(&s.key)
        .json(&json!({"prompt": "abc", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = response.bytes_stream().eventsource();
    let mut kinds = Vec::new();
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event: Value = serde_json::from_str(&event.unwrap().data).unwrap();
        kinds.push(event["type"].as_str().unwrap().to_string());
        if event["type"] == "chunk" {
            text.push_str(event["delta"].as_str().unwrap());
        }
    }
    assert_eq!(text, "abc");
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("result"),
        "{kinds:?}"
    );
    assert!(kinds.len() >= 2, "{kinds:?}");

    // Embeddings through the seed API.
    let (status, _, result) = s
        .post(
            "/v1/embed",
            None,
            json!({"input": ["x"], "options": {"dimensions": 4}}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["embeddings"][0].as_array().unwrap().len(), 4);

    // The recorded trace id is the W3C one, the tenant the key's.
    s.app
        .wait_count(
            &format!(
                "SELECT count(*) FROM llm_jobs WHERE job_id = '{job_id}' \
                 AND trace_id = '{trace}' AND tenant = 'acme'"
            ),
            1,
        )
        .await;
    // The fleet's status.
    let status = reqwest::Client::new()
        .get(s.url("/v1/status"))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["workers"], 1, "{status}");
    s.teardown().await;
}

#[tokio::test]
async fn a_request_without_a_valid_key_is_401_and_a_revoked_key_stops_working() {
    let s = Setup::new("", |c| c.gateway.key_cache_secs = 0).await;
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    for key in [
        "",
        "not-a-key",
        "llmw_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let (status, _, err) = s
            .post("/v1/chat/completions", Some(key), body.to_string())
            .await;
        assert_eq!(status, 401, "{key:?}: {err}");
        assert_eq!(
            openai_error(&err),
            ("invalid_request_error", "invalid_api_key")
        );
    }
    let keys = keys::list(&s.app.db).await.unwrap();
    assert_eq!(keys::revoke(&s.app.db, &keys[0].prefix).await.unwrap(), 1);
    let (status, _, _) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 401);
    assert_eq!(s.fake.request_count(), 0, "no job may reach a provider");
    s.teardown().await;
}

#[tokio::test]
async fn a_revoked_key_already_cached_is_refused_within_the_cache_time() {
    // The default key cache (10 s): the key is looked up once, then trusted from memory.
    let s = Setup::new("", |_| {}).await;
    let cache = Duration::from_secs(s.app.config.gateway.key_cache_secs);
    assert!(!cache.is_zero(), "the test needs a key cache");
    s.fake.set_default(Reply::answer(&["hi"], (1, 1)));
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, answer) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 200, "{answer}");

    let keys = keys::list(&s.app.db).await.unwrap();
    assert_eq!(keys::revoke(&s.app.db, &keys[0].prefix).await.unwrap(), 1);
    let revoked = tokio::time::Instant::now();
    let calls_before = s.fake.request_count();
    loop {
        let (status, _, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
        if status == 401 {
            assert_eq!(
                openai_error(&err),
                ("invalid_request_error", "invalid_api_key")
            );
            break;
        }
        assert_eq!(status, 200, "{err}");
        // One second of slack for the request in flight when the cache entry expires.
        assert!(
            revoked.elapsed() <= cache + Duration::from_secs(1),
            "a revoked key still worked {:?} after revocation (key_cache_secs = {})",
            revoked.elapsed(),
            cache.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And it stays refused.
    let (status, _, _) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 401);
    let served_after = s.fake.request_count() - calls_before;
    eprintln!(
        "revocation: refused {:?} after it, {served_after} requests served from the cache meanwhile",
        revoked.elapsed()
    );
    s.teardown().await;
}

#[tokio::test]
async fn an_invalid_request_is_400_invalid_job_and_an_unknown_model_404() {
    let s = Setup::new("", |_| {}).await;
    // Refused by the gateway (n > 1), and by the worker (no messages: invalid_job).
    for body in [
        json!({"model": "gpt-test", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "gpt-test", "messages": []}),
        json!({"model": "gpt-test"}),
    ] {
        let (status, _, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(
            openai_error(&err),
            ("invalid_request_error", "invalid_job"),
            "{err}"
        );
    }
    let body = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(openai_error(&err).1, "model_not_found");
    assert_eq!(s.fake.request_count(), 0);
    s.teardown().await;
}

#[tokio::test]
async fn a_body_over_the_bound_is_413() {
    let s = Setup::new("", |c| c.gateway.max_body_bytes = 10_000).await;
    let body = json!({"model": "gpt-test",
        "messages": [{"role": "user", "content": "x".repeat(20_000)}]});
    let (status, _, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 413, "{err}");
    assert_eq!(openai_error(&err).1, "payload_too_large");
    s.teardown().await;
}

#[tokio::test]
async fn a_spent_budget_is_429_with_retry_after() {
    // A call of "hi" with max_tokens 10 reserves 2 + 2 × 16 + 10 = 44 tokens and spends 7:
    // the second call's worst case no longer fits in 50.
    let s = Setup::new("[tenants.acme]\ndaily_budget_tokens = 50\n", |_| {}).await;
    let body = json!({"model": "gpt-test", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]});
    s.fake.push(Reply::answer(&["ok"], (5, 2)));
    let (status, _, _) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 200, "the first job fits the budget");
    let (status, headers, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(
        openai_error(&err),
        ("insufficient_quota", "budget_exceeded")
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    s.teardown().await;
}

#[tokio::test]
async fn requests_over_the_concurrency_bound_are_429_and_a_client_that_leaves_cancels_its_job() {
    let s = Setup::new("", |c| c.gateway.max_concurrent = 1).await;
    s.fake.set_default(Reply::Stall {
        deltas: vec!["partial".into()],
    });
    let client = s.openai();
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("tell me everything")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let job_id = first.id.strip_prefix("chatcmpl-").unwrap().to_string();

    // The one slot is taken.
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(openai_error(&err).1, "rate_limit_exceeded");
    assert_eq!(headers["retry-after"], "1");

    // The client goes away: its job is cancelled, and its provider call closed.
    drop(stream);
    drop(client);
    let job_id = uuid::Uuid::parse_str(&job_id).unwrap();
    let result = s.app.wait_stored_result(job_id).await;
    assert_eq!(result["error"]["code"], "cancelled", "{result}");
    s.teardown().await;
}

#[tokio::test]
async fn failing_providers_are_502_all_providers_failed() {
    let s = Setup::new("", |_| {}).await;
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    s.fake.set_default(Reply::status(500, "boom"));
    let (status, headers, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 502, "{err}");
    assert_eq!(openai_error(&err), ("api_error", "all_providers_failed"));
    assert!(headers.contains_key("x-trace-id"));
    s.teardown().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_is_504_timeout() {
    let s = Setup::new("", |c| c.gateway.request_timeout_ms = 1500).await;
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    s.fake.set_default(Reply::Hang);
    let (status, _, err) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 504, "{err}");
    assert_eq!(openai_error(&err), ("api_error", "timeout"));
    s.teardown().await;
}

#[tokio::test]
async fn the_gateway_is_live_and_ready() {
    let s = Setup::new("", |_| {}).await;
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(s.url(path)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    s.teardown().await;
}

#[tokio::test]
async fn a_gateway_counts_its_requests_by_route_and_status() {
    let s = Setup::new("", |_| {}).await;
    let body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, _) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 200);
    let (status, _, _) = s
        .post("/v1/chat/completions", Some("nope"), body.to_string())
        .await;
    assert_eq!(status, 401);
    let text = crate::metrics::scrape(&s.url("/metrics")).await;
    let v = |series: &str| {
        crate::metrics::sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"))
    };
    assert_eq!(
        v(r#"llm_gateway_requests_total{route="/v1/chat/completions",status="200"}"#),
        1.0
    );
    assert_eq!(
        v(r#"llm_gateway_requests_total{route="/v1/chat/completions",status="401"}"#),
        1.0
    );
    assert_eq!(
        v(r#"llm_gateway_request_duration_seconds_count{route="/v1/chat/completions"}"#),
        2.0
    );
    s.teardown().await;
}

#[tokio::test]
async fn a_client_that_leaves_a_non_streamed_request_cancels_its_job() {
    let s = Setup::new("", |_| {}).await;
    s.fake.set_default(Reply::Hang);
    let job_id = uuid::Uuid::now_v7();
    // The client gives up after a moment and closes its connection.
    let gone = reqwest::Client::new()
        .post(s.url("/v1/generate"))
        .bearer_auth(&s.key)
        .json(&json!({"job_id": job_id, "prompt": "hi", "stream": false}))
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the request should have timed out on the client"
    );
    let result = s.app.wait_stored_result(job_id).await;
    assert_eq!(result["error"]["code"], "cancelled", "{result}");
    s.teardown().await;
}

/// A chat request built from OpenAI's JSON, as the client library sends it.
fn chat_request(v: Value) -> async_openai::types::chat::CreateChatCompletionRequest {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn an_openai_client_runs_a_tool_loop_and_a_structured_output_through_the_gateway() {
    use async_openai::types::chat::{ChatCompletionMessageToolCalls, FinishReason};
    let s = Setup::new("", |_| {}).await;
    let client = s.openai();
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let question = json!({"role": "user", "content": "What is the weather in Paris?"});

    // The model calls the tool (not streamed).
    s.fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let answer = client
        .chat()
        .create(chat_request(
            json!({"model": "gpt-test", "messages": [question],
            "tools": tools, "tool_choice": "auto", "parallel_tool_calls": false}),
        ))
        .await
        .unwrap();
    let choice = &answer.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let calls = choice.message.tool_calls.clone().unwrap();
    let ChatCompletionMessageToolCalls::Function(call) = &calls[0] else {
        panic!("not a function call: {calls:?}")
    };
    assert_eq!(call.function.name, "get_weather");
    let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    let sent = s.fake.requests().pop().unwrap();
    assert_eq!(
        sent["tools"][0]["function"]["name"], "get_weather",
        "{sent}"
    );
    assert_eq!(sent["parallel_tool_calls"], false, "passed through: {sent}");

    // The same call streamed: OpenAI's delta.tool_calls pieces.
    s.fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let mut stream = client
        .chat()
        .create_stream(chat_request(json!({"model": "gpt-test", "stream": true,
            "messages": [question], "tools": tools})))
        .await
        .unwrap();
    let (mut id, mut name, mut arguments, mut finish) = (None, None, String::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in chunk.choices {
            for piece in choice.delta.tool_calls.into_iter().flatten() {
                assert_eq!(piece.index, 0);
                id = piece.id.or(id);
                if let Some(f) = piece.function {
                    name = f.name.or(name);
                    arguments.push_str(f.arguments.as_deref().unwrap_or(""));
                }
            }
            finish = choice.finish_reason.or(finish);
        }
    }
    assert_eq!(
        (id.as_deref(), name.as_deref(), arguments.as_str()),
        (Some("call_0"), Some("get_weather"), r#"{"city": "Paris"}"#)
    );
    assert_eq!(finish, Some(FinishReason::ToolCalls));

    // The tool's answer goes back; the model answers in text (streamed).
    s.fake
        .push(Reply::answer(&["It is 21 °C ", "in Paris."], (40, 9)));
    let mut stream = client
        .chat()
        .create_stream(chat_request(json!({"model": "gpt-test", "stream": true,
            "tools": tools, "messages": [question,
                {"role": "assistant", "tool_calls": calls},
                {"role": "tool", "tool_call_id": call.id, "content": "{\"temp_c\": 21}"}]})))
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in chunk.unwrap().choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(text, "It is 21 °C in Paris.");
    let sent = s.fake.requests().pop().unwrap();
    assert_eq!(
        sent["messages"][1]["tool_calls"][0]["id"], "call_0",
        "{sent}"
    );
    assert_eq!(sent["messages"][2]["role"], "tool");

    // Structured output: the answer parses into the caller's type.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Person {
        name: String,
        age: u32,
    }
    s.fake.push(Reply::answer(
        &["{\"name\": \"Ada\", \"age\": 36}"],
        (12, 8),
    ));
    let answer = client
        .chat()
        .create(chat_request(json!({"model": "gpt-test",
            "messages": [{"role": "user", "content": "Who wrote the first program?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person",
                "strict": true, "schema": {"type": "object", "required": ["name", "age"],
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "additionalProperties": false}}}})))
        .await
        .unwrap();
    let content = answer.choices[0].message.content.clone().unwrap();
    let person: Person = serde_json::from_str(&content).unwrap();
    assert_eq!(
        person,
        Person {
            name: "Ada".into(),
            age: 36
        }
    );
    let sent = s.fake.requests().pop().unwrap();
    assert_eq!(
        sent["response_format"]["json_schema"]["name"], "person",
        "{sent}"
    );
    s.teardown().await;
}

#[tokio::test]
async fn cached_and_reasoning_tokens_show_in_usage_and_a_prompt_cache_key_reaches_the_provider() {
    let s = Setup::new("", |_| {}).await;
    s.fake.push(Reply::billed(
        &["hi"],
        llm_worker_testkit::Billing {
            cache_read: 64,
            reasoning: 5,
            ..llm_worker_testkit::Billing::plain(100, 9)
        },
    ));
    let body = json!({"model": "gpt-test", "prompt_cache_key": "doc-7",
                      "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, reply) = s.post("/v1/chat/completions", None, body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    let usage = &reply["usage"];
    assert_eq!(usage["prompt_tokens"], 100, "{reply}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 64,
        "{reply}"
    );
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"], 5,
        "{reply}"
    );
    assert_eq!(
        s.fake.requests().pop().unwrap()["prompt_cache_key"],
        "doc-7"
    );
    s.teardown().await;
}
