//! Rich generation jobs (CONTRACT section 6) through NATS, against the fake provider in all
//! four wire formats: a two-turn tool loop, JSON answers checked against
//! their schema, images in the provider's own shape, escalation past an invalid answer (also
//! from one format to the other), entries skipped for what their model cannot take, and the
//! bounds.

use base64::Engine as _;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, openai_provider, provider_base_url};

/// A worker whose route is `openai:weak` then `openai:strong` (one fake server), with
/// `extra` TOML after the provider table (its own keys, e.g. capabilities).
async fn setup(provider_extra: &str) -> (TestApp, FakeLlmServer) {
    let fake = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{provider_extra}\n[routes]\ndefault = [\"openai:weak\", \"openai:strong\"]\n",
        openai_provider("openai", &fake.base_url(), "weak")
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    (app, fake)
}

fn weather_tool() -> Value {
    json!({"name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}})
}

/// Publish `job` with a fresh reply subject and collect its events to the result.
async fn run(app: &TestApp, mut job: Value) -> crate::helpers::Reply {
    let (reply_to, mut sub) = app.reply_inbox().await;
    job["reply_to"] = json!(reply_to);
    app.publish(job).await;
    collect_reply(&mut sub).await
}

/// Turn 1 of a tool loop: `fake` calls `get_weather` for Paris; the result (and, streamed,
/// the chunks) carry that call under the id the provider gave it.
async fn tool_loop_first_turn(
    app: &TestApp,
    fake: &FakeLlmServer,
    stream: bool,
    tool_choice: &str,
    id: &str,
) -> Value {
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let first = run(
        app,
        json!({"prompt": "What is the weather in Paris?", "stream": stream,
               "tools": [weather_tool()], "tool_choice": tool_choice}),
    )
    .await;
    let r = first.result.clone();
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["finish_reason"], "tool_calls");
    assert_eq!(
        r["tool_calls"],
        json!([{"id": id, "name": "get_weather", "arguments": {"city": "Paris"}}])
    );
    assert_eq!(r["tokens_used"]["output"], 7, "{r}");
    if stream {
        // Streamed as chunk events carrying the call: id and name, then the arguments.
        let calls = first.final_tool_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            (calls[0].0.as_str(), calls[0].1.as_str()),
            (id, "get_weather")
        );
        let args: Value = serde_json::from_str(&calls[0].2).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert!(first.chunks.iter().all(|c| c.get("delta").is_none()));
    }
    r
}

/// Turn 2: the tool's answer goes back (the result of turn 1 as the assistant message); the
/// model answers in text. Returns the request the provider got.
async fn tool_loop_second_turn(
    app: &TestApp,
    fake: &FakeLlmServer,
    stream: bool,
    first: &Value,
) -> Value {
    fake.push(Reply::answer(&["It is 21 °C in Paris."], (40, 9)));
    let id = first["tool_calls"][0]["id"].clone();
    let second = run(
        app,
        json!({"stream": stream, "tools": [weather_tool()], "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": first["tool_calls"]},
            {"role": "tool", "tool_call_id": id, "content": "{\"temp_c\": 21}"}]}),
    )
    .await;
    assert_eq!(second.result["output"], "It is 21 °C in Paris.");
    assert_eq!(second.result["finish_reason"], "stop");
    fake.requests().pop().unwrap()
}

#[tokio::test]
async fn a_two_turn_tool_loop_runs_through_nats_streamed_and_not() {
    let (app, fake) = setup("").await;
    for stream in [true, false] {
        let first = tool_loop_first_turn(&app, &fake, stream, "auto", "call_0").await;
        let sent = fake.requests().pop().unwrap();
        assert_eq!(sent["tools"][0]["type"], "function", "{sent}");
        assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(sent["tool_choice"], "auto");

        let sent = tool_loop_second_turn(&app, &fake, stream, &first).await;
        let m = &sent["messages"];
        assert_eq!(m[1]["role"], "assistant", "{sent}");
        assert_eq!(m[1]["content"], Value::Null);
        assert_eq!(m[1]["tool_calls"][0]["id"], "call_0");
        assert_eq!(m[1]["tool_calls"][0]["type"], "function");
        // OpenAI's format carries arguments as JSON text.
        let args: Value = serde_json::from_str(
            m[1]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(m[2]["role"], "tool");
        assert_eq!(m[2]["tool_call_id"], "call_0");
        assert_eq!(m[2]["content"], "{\"temp_c\": 21}");
    }
    app.teardown().await;
}

fn person_format() -> Value {
    json!({"type": "json_schema", "name": "person", "strict": true,
           "schema": {"type": "object", "properties": {"name": {"type": "string"},
                      "age": {"type": "integer"}}, "required": ["name"]}})
}

#[tokio::test]
async fn a_json_schema_answer_comes_back_parsed_streamed_and_not() {
    let (app, fake) = setup("").await;
    for stream in [true, false] {
        fake.push(Reply::answer(
            &["{\"name\": ", "\"Ada\", \"age\": 36}"],
            (12, 8),
        ));
        let reply = run(
            &app,
            json!({"prompt": "Who wrote the first program?", "stream": stream,
                   "response_format": person_format()}),
        )
        .await;
        let r = &reply.result;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["output"], "{\"name\": \"Ada\", \"age\": 36}");
        assert_eq!(r["json"], json!({"name": "Ada", "age": 36}));
        let sent = fake.requests().pop().unwrap();
        assert_eq!(sent["response_format"]["type"], "json_schema", "{sent}");
        assert_eq!(sent["response_format"]["json_schema"]["name"], "person");
        assert_eq!(sent["response_format"]["json_schema"]["strict"], true);
        assert_eq!(
            sent["response_format"]["json_schema"]["schema"]["required"],
            json!(["name"])
        );
    }
    app.teardown().await;
}

#[tokio::test]
async fn an_image_reaches_the_provider_in_its_own_shape() {
    let (app, fake) = setup("").await;
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\n-fake-pixels-");
    fake.push(Reply::answer(&["A red square."], (800, 4)));
    let reply = run(
        &app,
        json!({"stream": false, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image", "data": png, "media_type": "image/png", "detail": "low"},
            {"type": "image", "url": "https://example.com/cat.png"}]}]}),
    )
    .await;
    assert_eq!(reply.result["output"], "A red square.", "{}", reply.result);
    let sent = fake.requests().pop().unwrap();
    let parts = &sent["messages"][0]["content"];
    assert_eq!(
        parts[0],
        json!({"type": "text", "text": "What is in this picture?"})
    );
    assert_eq!(parts[1]["type"], "image_url", "{sent}");
    assert_eq!(
        parts[1]["image_url"]["url"],
        format!("data:image/png;base64,{png}")
    );
    assert_eq!(parts[1]["image_url"]["detail"], "low");
    assert_eq!(parts[2]["image_url"]["url"], "https://example.com/cat.png");
    app.teardown().await;
}

#[tokio::test]
async fn an_invalid_answer_is_billed_and_the_route_escalates_to_the_next_model() {
    let (app, fake) = setup("").await;
    // weak answers prose instead of JSON, then calls the tool with arguments that are not
    // JSON; strong answers properly each time.
    fake.push(Reply::answer(&["Sure! Ada, 36."], (12, 6)));
    fake.push(Reply::answer(&["{\"name\": \"Ada\"}"], (12, 5)));
    let json_job = run(
        &app,
        json!({"prompt": "Who?", "stream": false, "response_format": person_format()}),
    )
    .await;
    fake.push(Reply::tool_call("get_weather", r#"{"city": "Par"#, (20, 4)));
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let tool_job = run(
        &app,
        json!({"prompt": "Weather?", "stream": true, "tools": [weather_tool()]}),
    )
    .await;
    for (reply, final_output) in [(&json_job, "json"), (&tool_job, "tool_calls")] {
        let r = &reply.result;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(
            (r["model_used"].as_str(), r["attempt"].as_u64()),
            (Some("strong"), Some(2))
        );
        assert!(!r[final_output].is_null(), "{r}");
        let first = &r["attempts"][0];
        assert_eq!(first["model"], "weak");
        assert_eq!(first["error"]["code"], "invalid_output", "{r}");
        assert!(
            first["output_tokens"].as_u64().unwrap() > 0,
            "billed: {first}"
        );
    }
    // The client keeps only the final attempt's tool calls.
    assert_eq!(tool_job.final_tool_calls()[0].2, r#"{"city": "Paris"}"#);
    let models: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, ["weak", "strong", "weak", "strong"]);
    // The ledger has the failed, billed attempts.
    app.wait_count(
        "SELECT count(*) FROM llm_calls WHERE error_code = 'invalid_output' AND output_tokens > 0",
        2,
    )
    .await;
    app.wait_count("SELECT count(*) FROM llm_jobs WHERE status = 'ok'", 2)
        .await;
    app.teardown().await;
}

#[tokio::test]
async fn every_answer_invalid_ends_invalid_output() {
    let (app, fake) = setup("").await;
    fake.set_default(Reply::answer(&["not json"], (5, 2)));
    let r = run(
        &app,
        json!({"prompt": "x", "stream": false, "response_format": {"type": "json_object"}}),
    )
    .await
    .result;
    assert_eq!(r["error"]["code"], "invalid_output", "{r}");
    assert_eq!(r["attempts"].as_array().unwrap().len(), 2);
    app.teardown().await;
}

#[tokio::test]
async fn a_stream_cut_inside_a_tool_call_restarts_and_the_final_attempts_call_counts() {
    let (app, fake) = setup("").await;
    fake.push(Reply::ToolCalls {
        calls: vec![("get_weather".into(), r#"{"city": "Paris"}"#.into())],
        usage: (20, 7),
        cut: true,
    });
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Lyon"}"#,
        (20, 7),
    ));
    let reply = run(
        &app,
        json!({"prompt": "Weather?", "stream": true, "tools": [weather_tool()]}),
    )
    .await;
    let r = &reply.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["attempt"], 2);
    assert_eq!(r["tool_calls"][0]["arguments"], json!({"city": "Lyon"}));
    // The cut attempt's pieces were streamed under attempt 1; the final ones under 2.
    assert!(
        reply
            .chunks
            .iter()
            .any(|c| c["attempt"] == 1 && c["tool_call"].is_object())
    );
    assert_eq!(reply.final_tool_calls()[0].2, r#"{"city": "Lyon"}"#);
    app.teardown().await;
}

#[tokio::test]
async fn an_entry_whose_model_cannot_take_the_job_is_skipped_without_a_call() {
    // `weak` is configured as text only.
    let (app, fake) = setup("capabilities = { \"weak\" = [] }\n").await;
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let r = run(
        &app,
        json!({"prompt": "Weather?", "stream": false, "tools": [weather_tool()]}),
    )
    .await
    .result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["model_used"], "strong");
    assert_eq!(r["attempts"].as_array().unwrap().len(), 1);
    let models: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, ["strong"], "no call to the entry that lacks tools");
    // A plain job still goes to `weak`.
    fake.push(Reply::answer(&["hi"], (1, 1)));
    let plain = run(&app, json!({"prompt": "hi", "stream": false}))
        .await
        .result;
    assert_eq!(plain["model_used"], "weak");
    app.teardown().await;
}

#[tokio::test]
async fn a_job_no_entry_can_take_ends_unsupported_without_a_call() {
    let (app, fake) =
        setup("capabilities = { \"weak\" = [\"tools\"], \"strong\" = [\"tools\"] }\n").await;
    let r = run(
        &app,
        json!({"stream": false, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "url": "https://example.com/cat.png"}]}]}),
    )
    .await
    .result;
    assert_eq!(r["error"]["code"], "unsupported", "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("openai:weak (images, image URLs)"),
        "{message}"
    );
    assert_eq!(r["attempts"], json!([]));
    assert_eq!(fake.request_count(), 0);
    app.wait_count(
        "SELECT count(*) FROM llm_jobs WHERE error_code = 'unsupported'",
        1,
    )
    .await;
    app.teardown().await;
}

#[tokio::test]
async fn rich_jobs_over_their_bounds_are_refused_naming_the_bound() {
    let (app, fake) =
        setup("[limits]\nmax_tools = 2\nmax_image_bytes = 1000\nmax_schema_depth = 4\n").await;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 3000]);
    let tool = |name: &str| json!({"name": name, "parameters": {"type": "object"}});
    let deep = json!({"type": "object", "properties": {"a": {"type": "object", "properties":
        {"b": {"type": "object", "properties": {"c": {"type": "string"}}}}}}});
    for (job, bound) in [
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image", "data": big, "media_type": "image/png"}]}]}),
            "limits.max_image_bytes",
        ),
        (
            json!({"prompt": "x", "tools": [tool("a"), tool("b"), tool("c")]}),
            "limits.max_tools",
        ),
        (
            json!({"prompt": "x", "response_format": {"type": "json_schema", "name": "deep",
                   "schema": deep}}),
            "limits.max_schema_depth",
        ),
        (
            json!({"prompt": "x", "tools": [{"name": "remote",
                   "parameters": {"$ref": "https://example.com/s.json"}}]}),
            "not a usable JSON Schema",
        ),
    ] {
        let r = run(&app, job).await.result;
        assert_eq!(r["error"]["code"], "invalid_job", "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(bound), "{bound}: {message}");
    }
    assert_eq!(fake.request_count(), 0);
    app.teardown().await;
}

/// A worker whose route is `claude:claude-sonnet-4` then `openai:strong` (Anthropic's format
/// first, OpenAI's second; one fake server for each).
async fn setup_anthropic() -> (TestApp, FakeLlmServer, FakeLlmServer) {
    let claude = FakeLlmServer::start().await.unwrap();
    let openai = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "[providers.claude]\ntype = \"anthropic\"\nbase_url = \"{}\"\ndefault_model = \"claude-sonnet-4\"\n\
         max_retries = 1\nretry_min_delay_ms = 10\nretry_max_delay_ms = 50\n{}\
         [routes]\ndefault = [\"claude:claude-sonnet-4\", \"openai:strong\"]\n",
        provider_base_url("anthropic", &claude),
        openai_provider("openai", &openai.base_url(), "strong")
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    (app, claude, openai)
}

#[tokio::test]
async fn anthropic_a_two_turn_tool_loop_speaks_tool_use_and_tool_result_blocks() {
    let (app, claude, openai) = setup_anthropic().await;
    for stream in [true, false] {
        let first = tool_loop_first_turn(&app, &claude, stream, "required", "toolu_0").await;
        assert_eq!(first["provider"], "claude");
        let sent = claude.requests().pop().unwrap();
        assert_eq!(
            sent["tools"],
            json!([{"name": "get_weather", "description": "Current weather",
                    "input_schema": weather_tool()["parameters"]}]),
            "{sent}"
        );
        assert_eq!(sent["tool_choice"], json!({"type": "any"}));

        let sent = tool_loop_second_turn(&app, &claude, stream, &first).await;
        assert_eq!(
            sent["messages"],
            json!([
                {"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0",
                    "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0",
                    "content": "{\"temp_c\": 21}"}]}
            ]),
            "{sent}"
        );
    }
    assert!(openai.requests().is_empty());
    app.teardown().await;
}

#[tokio::test]
async fn anthropic_a_json_answer_comes_through_a_forced_answer_tool_streamed_and_not() {
    let (app, claude, _openai) = setup_anthropic().await;
    for stream in [true, false] {
        // The fake answers a forced tool with the scripted text as the tool's input.
        claude.push(Reply::answer(
            &["{\"name\": \"Ada\", \"age\": 36}"],
            (12, 8),
        ));
        let reply = run(
            &app,
            json!({"prompt": "Who wrote the first program?", "stream": stream,
                   "response_format": person_format()}),
        )
        .await;
        let r = &reply.result;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["provider"], "claude");
        assert_eq!(r["json"], json!({"name": "Ada", "age": 36}), "{r}");
        assert_eq!(r["finish_reason"], "stop");
        assert!(r["tool_calls"].is_null(), "{r}");
        if stream {
            // The answer streams as text deltas, as from any provider.
            let text: String = reply
                .chunks
                .iter()
                .filter_map(|c| c["delta"].as_str())
                .collect();
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), r["json"]);
        }
        let sent = claude.requests().pop().unwrap();
        assert_eq!(sent["tools"][0]["name"], "person", "{sent}");
        assert_eq!(sent["tools"][0]["input_schema"], person_format()["schema"]);
        assert_eq!(
            sent["tool_choice"],
            json!({"type": "tool", "name": "person"})
        );
    }
    app.teardown().await;
}

#[tokio::test]
async fn anthropic_an_image_goes_as_an_image_block_before_the_text() {
    let (app, claude, _openai) = setup_anthropic().await;
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nfake");
    claude.push(Reply::answer(&["A cat."], (90, 3)));
    let r = run(
        &app,
        json!({"stream": false, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "data": png, "media_type": "image/png"},
            {"type": "image", "url": "https://example.com/cat.png"}]}]}),
    )
    .await
    .result;
    assert_eq!(r["output"], "A cat.", "{r}");
    let sent = claude.requests().pop().unwrap();
    assert_eq!(
        sent["messages"][0]["content"],
        json!([
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
            {"type": "text", "text": "What is this?"}
        ]),
        "{sent}"
    );
    app.teardown().await;
}

#[tokio::test]
async fn an_invalid_anthropic_tool_call_escalates_to_openai_and_both_attempts_are_recorded() {
    let (app, claude, openai) = setup_anthropic().await;
    // Claude calls the tool without its required argument; OpenAI's model calls it properly.
    claude.push(Reply::tool_call(
        "get_weather",
        r#"{"town": "Paris"}"#,
        (20, 6),
    ));
    openai.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let reply = run(
        &app,
        json!({"prompt": "Weather?", "stream": true, "tools": [weather_tool()]}),
    )
    .await;
    let r = &reply.result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["provider"], "openai");
    assert_eq!(r["tool_calls"][0]["id"], "call_0");
    let first = &r["attempts"][0];
    assert_eq!(first["provider"], "claude", "{r}");
    assert_eq!(first["error"]["code"], "invalid_output", "{r}");
    assert!(
        first["error"]["message"].as_str().unwrap().contains("city"),
        "names what failed: {first}"
    );
    assert_eq!(reply.final_tool_calls()[0].2, r#"{"city": "Paris"}"#);
    app.wait_count(
        "SELECT count(*) FROM llm_calls WHERE provider = 'claude' AND error_code = 'invalid_output' AND output_tokens = 6",
        1,
    )
    .await;
    app.teardown().await;
}

/// A worker whose only route entry is a provider of `kind` (`gemini` or `ollama`) on `fake`.
async fn setup_kind(kind: &str, fake: &FakeLlmServer) -> TestApp {
    setup_kind_with(kind, fake, "").await
}

/// The same, with more TOML (`extra`, top-level tables) in its configuration.
async fn setup_kind_with(kind: &str, fake: &FakeLlmServer, extra: &str) -> TestApp {
    let toml = format!(
        "[providers.p]\ntype = \"{kind}\"\nbase_url = \"{}\"\ndefault_model = \"m\"\n\
         max_retries = 1\nretry_min_delay_ms = 10\nretry_max_delay_ms = 50\n\
         [routes]\ndefault = [\"p\"]\n{extra}",
        provider_base_url(kind, fake)
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    app
}

#[tokio::test]
async fn gemini_and_ollama_run_a_tool_loop_in_their_own_shapes() {
    for kind in ["gemini", "ollama"] {
        let fake = FakeLlmServer::start().await.unwrap();
        let app = setup_kind(kind, &fake).await;
        for stream in [true, false] {
            // Neither API names calls: the worker numbers them.
            let first = tool_loop_first_turn(&app, &fake, stream, "auto", "call_0").await;
            let sent = fake.requests().pop().unwrap();
            if kind == "gemini" {
                assert_eq!(
                    sent["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"],
                    weather_tool()["parameters"],
                    "{sent}"
                );
                assert_eq!(sent["toolConfig"]["functionCallingConfig"]["mode"], "AUTO");
            } else {
                assert_eq!(
                    sent["tools"][0]["function"]["name"], "get_weather",
                    "{sent}"
                );
            }
            let sent = tool_loop_second_turn(&app, &fake, stream, &first).await;
            if kind == "gemini" {
                let c = &sent["contents"];
                assert_eq!(
                    c[1],
                    json!({"role": "model", "parts": [{"functionCall":
                        {"id": "call_0", "name": "get_weather", "args": {"city": "Paris"}}}]}),
                    "{sent}"
                );
                assert_eq!(
                    c[2]["parts"][0]["functionResponse"],
                    json!({"id": "call_0", "name": "get_weather", "response": {"temp_c": 21}})
                );
            } else {
                let m = &sent["messages"];
                assert_eq!(
                    m[1]["tool_calls"],
                    json!([{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
                    "{sent}"
                );
                assert_eq!(m[2]["role"], "tool");
                assert_eq!(m[2]["tool_name"], "get_weather");
            }
        }
        app.teardown().await;
    }
}

#[tokio::test]
async fn gemini_and_ollama_answer_json_and_take_image_bytes() {
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nfake");
    for kind in ["gemini", "ollama"] {
        let fake = FakeLlmServer::start().await.unwrap();
        let app = setup_kind(kind, &fake).await;
        fake.push(Reply::answer(&["{\"name\": \"Ada\"}"], (12, 5)));
        let r = run(
            &app,
            json!({"prompt": "Who?", "stream": true, "response_format": person_format()}),
        )
        .await
        .result;
        assert_eq!(r["json"], json!({"name": "Ada"}), "{kind}: {r}");
        let sent = fake.requests().pop().unwrap();
        let schema = person_format()["schema"].clone();
        if kind == "gemini" {
            assert_eq!(
                sent["generationConfig"]["responseMimeType"],
                "application/json"
            );
            assert_eq!(
                sent["generationConfig"]["responseJsonSchema"], schema,
                "{sent}"
            );
        } else {
            assert_eq!(sent["format"], schema, "{sent}");
        }

        fake.push(Reply::answer(&["A cat."], (90, 3)));
        let r = run(
            &app,
            json!({"stream": false, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "data": png, "media_type": "image/png"}]}]}),
        )
        .await
        .result;
        assert_eq!(r["output"], "A cat.", "{kind}: {r}");
        let sent = fake.requests().pop().unwrap();
        if kind == "gemini" {
            assert_eq!(
                sent["contents"][0]["parts"][1],
                json!({"inlineData": {"mimeType": "image/png", "data": png}}),
                "{sent}"
            );
        } else {
            assert_eq!(sent["messages"][0]["images"], json!([png]), "{sent}");
        }
        // An image by URL: neither API fetches URLs, so the only entry is skipped.
        let asked = fake.requests().len();
        let r = run(
            &app,
            json!({"stream": false, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "url": "https://example.com/cat.png"}]}]}),
        )
        .await
        .result;
        assert_eq!(r["error"]["code"], "unsupported", "{kind}: {r}");
        assert_eq!(fake.requests().len(), asked, "no call was made");
        app.teardown().await;
    }
}

#[tokio::test]
async fn an_image_url_from_an_allowed_host_is_fetched_and_sent_as_bytes_and_no_other() {
    let fake = FakeLlmServer::start().await.unwrap();
    let app = setup_kind_with(
        "ollama",
        &fake,
        &format!(
            "[limits]\nimage_url_hosts = [\"{}\"]\nmax_image_bytes = 4096\n",
            fake.root_url()
        ),
    )
    .await;
    let job = |url: &str| {
        json!({"stream": false, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "url": url}]}]})
    };
    fake.push(Reply::answer(&["A cat."], (90, 3)));
    let r = run(&app, job(&fake.file_url("image.png"))).await.result;
    assert_eq!(r["output"], "A cat.", "{r}");
    let sent = fake.requests().pop().unwrap();
    let png = base64::engine::general_purpose::STANDARD.encode(llm_worker_testkit::FAKE_PNG);
    assert_eq!(sent["messages"][0]["images"], json!([png]), "{sent}");

    // Not fetched, or fetched and refused: the only entry is skipped, no call, and the
    // error says why.
    let asked = fake.requests().len();
    for (url, why) in [
        ("https://example.com/cat.png".to_string(), "image URLs"),
        (fake.file_url("page.html"), "content type \"text/html\""),
        (fake.file_url("big.png"), "limits.max_image_bytes"),
        (fake.file_url("gone.png"), "HTTP 404"),
    ] {
        let r = run(&app, job(&url)).await.result;
        assert_eq!(r["error"]["code"], "unsupported", "{url}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{url}: {message}");
    }
    assert_eq!(fake.requests().len(), asked, "no call was made");
    app.teardown().await;
}

#[tokio::test]
async fn in_every_format_broken_arguments_and_a_cut_stream_move_on_to_the_next_model() {
    for kind in ["openai", "anthropic", "gemini", "ollama"] {
        let fake = FakeLlmServer::start().await.unwrap();
        let toml = format!(
            "[providers.p]\ntype = \"{kind}\"\nbase_url = \"{}\"\ndefault_model = \"weak\"\n\
             max_retries = 0\n[routes]\ndefault = [\"p:weak\", \"p:strong\"]\n",
            provider_base_url(kind, &fake)
        );
        let mut app = TestApp::new(&toml).await;
        app.start_worker().await;
        for stream in [true, false] {
            // Arguments that are not JSON, then a proper call.
            fake.push(Reply::tool_call("get_weather", r#"{"city": "Par"#, (20, 4)));
            fake.push(Reply::tool_call(
                "get_weather",
                r#"{"city": "Paris"}"#,
                (20, 7),
            ));
            let reply = run(
                &app,
                json!({"prompt": "Weather?", "stream": stream, "tools": [weather_tool()]}),
            )
            .await;
            let r = &reply.result;
            assert_eq!(r["status"], "ok", "{kind}: {r}");
            assert_eq!(r["model_used"], "strong", "{kind}: {r}");
            assert_eq!(
                r["attempts"][0]["error"]["code"], "invalid_output",
                "{kind}: {r}"
            );
            assert_eq!(r["tool_calls"][0]["arguments"], json!({"city": "Paris"}));
            // A JSON answer that breaks the schema (age is not an integer), then a good one.
            fake.push(Reply::answer(
                &["{\"name\": \"Ada\", \"age\": \"old\"}"],
                (9, 5),
            ));
            fake.push(Reply::answer(&["{\"name\": \"Ada\", \"age\": 36}"], (9, 5)));
            let r = run(
                &app,
                json!({"prompt": "Who?", "stream": stream, "response_format": person_format()}),
            )
            .await
            .result;
            assert_eq!(r["json"]["age"], 36, "{kind}: {r}");
            assert_eq!(
                r["attempts"][0]["error"]["code"], "invalid_output",
                "{kind}: {r}"
            );
        }
        // A stream cut in the middle of a tool call: the next model's call is the answer, and
        // the client keeps only its chunks.
        fake.push(Reply::ToolCalls {
            calls: vec![("get_weather".into(), r#"{"city": "Lyon"}"#.into())],
            usage: (20, 7),
            cut: true,
        });
        fake.push(Reply::tool_call(
            "get_weather",
            r#"{"city": "Paris"}"#,
            (20, 7),
        ));
        let reply = run(
            &app,
            json!({"prompt": "Weather?", "stream": true, "tools": [weather_tool()]}),
        )
        .await;
        let r = &reply.result;
        assert_eq!(r["model_used"], "strong", "{kind}: {r}");
        assert_eq!(r["tool_calls"][0]["arguments"], json!({"city": "Paris"}));
        let calls = reply.final_tool_calls();
        assert_eq!(calls.len(), 1, "{kind}: {calls:?}");
        let args: Value = serde_json::from_str(&calls[0].2).unwrap();
        assert_eq!(args, json!({"city": "Paris"}), "{kind}");
        app.teardown().await;
    }
}

#[tokio::test]
async fn a_route_across_three_formats_answers_from_the_first_model_whose_output_is_valid() {
    let local = FakeLlmServer::start().await.unwrap();
    let openai = FakeLlmServer::start().await.unwrap();
    let claude = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "[providers.local]\ntype = \"ollama\"\nbase_url = \"{}\"\ndefault_model = \"llama3.1\"\nmax_retries = 0\n\
         {}\
         [providers.anthropic]\ntype = \"anthropic\"\nbase_url = \"{}\"\ndefault_model = \"claude-sonnet-4\"\n\
         [routes]\ndefault = [\"local:llama3.1\", \"openai:gpt-4o-mini\", \"anthropic:claude-sonnet-4\"]\n",
        local.root_url(),
        openai_provider("openai", &openai.base_url(), "gpt-4o-mini"),
        claude.root_url()
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    local.push(Reply::answer(&["Ada Lovelace, 36"], (10, 6)));
    openai.push(Reply::answer(
        &["{\"name\": \"Ada Lovelace\", \"age\": 36}"],
        (10, 9),
    ));
    let r = run(
        &app,
        json!({"prompt": "Who?", "stream": true, "response_format": person_format()}),
    )
    .await
    .result;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        (r["provider"].as_str(), r["model_used"].as_str()),
        (Some("openai"), Some("gpt-4o-mini"))
    );
    assert_eq!(r["json"]["name"], "Ada Lovelace");
    assert_eq!(r["attempts"][0]["model"], "llama3.1");
    assert_eq!(r["attempts"][0]["error"]["code"], "invalid_output");
    assert!(claude.requests().is_empty(), "the third entry is not asked");
    app.teardown().await;
}

#[tokio::test]
async fn a_deterministic_rich_job_is_answered_from_the_cache_with_its_tool_calls_and_json() {
    let (app, fake) = setup("").await;
    let tool_job = |tools: Value| {
        json!({"prompt": "Weather?", "stream": true, "tools": tools,
               "options": {"temperature": 0}})
    };
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let first = run(&app, tool_job(json!([weather_tool()]))).await;
    assert_eq!(first.result["cache_hit"], false, "{}", first.result);
    let second = run(&app, tool_job(json!([weather_tool()]))).await;
    let r = &second.result;
    assert_eq!(r["cache_hit"], true, "{r}");
    assert_eq!(r["tool_calls"], first.result["tool_calls"]);
    assert_eq!(r["finish_reason"], "tool_calls");
    // Streamed from the cache as tool_call chunks (attempt 0).
    let calls = second.final_tool_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"city": "Paris"})
    );
    // Other tools are another question: not a hit.
    let mut other = weather_tool();
    other["description"] = json!("Weather tomorrow");
    fake.push(Reply::tool_call(
        "get_weather",
        r#"{"city": "Paris"}"#,
        (20, 7),
    ));
    let third = run(&app, tool_job(json!([other]))).await;
    assert_eq!(third.result["cache_hit"], false, "{}", third.result);

    // A JSON answer comes back parsed from the cache too.
    let json_job = json!({"prompt": "Who?", "stream": false, "options": {"temperature": 0},
                          "response_format": person_format()});
    fake.push(Reply::answer(&["{\"name\": \"Ada\"}"], (9, 5)));
    let first = run(&app, json_job.clone()).await.result;
    assert_eq!(first["cache_hit"], false, "{first}");
    let again = run(&app, json_job).await.result;
    assert_eq!(again["cache_hit"], true, "{again}");
    assert_eq!(again["json"], json!({"name": "Ada"}));
    assert_eq!(fake.requests().len(), 3, "two hits made no call");
    app.teardown().await;
}
