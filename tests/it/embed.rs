//! Embedding jobs: each provider's embeddings API through the chain, and jobs end to end.

use std::time::Duration;

use llm_worker::chain::Chain;
use llm_worker::config::Config;
use llm_worker::contract::ErrorCode;
use llm_worker::contract::JobKind;
use llm_worker::embedding::{EmbedOutcome, EmbedRules};
use llm_worker::health::Health;
use llm_worker::job::JobBody;
use llm_worker::pricing::PriceBook;
use llm_worker::providers::Registry;
use llm_worker_testkit::{FakeLlmServer, Reply, fake_vector};
use serde_json::{Value, json};

use crate::helpers::{TestApp, collect_reply, decode_job, openai_provider, provider_base_url};

const EMBEDDERS: [&str; 3] = ["openai", "gemini", "ollama"];

fn section(name: &str, kind: &str, base: &str, extra: &str) -> String {
    format!(
        "[providers.{name}]\ntype = \"{kind}\"\nbase_url = \"{base}\"\ndefault_model = \"emb-{name}\"\n\
         retry_min_delay_ms = 10\nretry_max_delay_ms = 50\n{extra}\n"
    )
}

fn chain(toml: &str) -> Chain {
    let config = Config::from_toml(toml).unwrap();
    let routes = config.embedding_routes().unwrap().clone();
    let registry = Registry::from_config(&config).unwrap();
    Chain::with_routes(
        &routes,
        &config,
        registry,
        PriceBook::default(),
        Health::new(&config.circuit_breaker),
    )
}

async fn run(chain: &Chain, v: Value, mixed: bool) -> EmbedOutcome {
    let job = decode_job(JobKind::Embed, &v, chain);
    let JobBody::Embed(req) = &job.body else {
        unreachable!()
    };
    chain
        .embed(
            &job,
            req,
            None,
            EmbedRules {
                mixed_dimensions: mixed,
                max_vector_bytes: usize::MAX,
            },
            llm_worker::chain::Bounds {
                deadline: tokio::time::Instant::now() + job.timeout,
                cancel: &tokio_util::sync::CancellationToken::new(),
                gate: &llm_worker::chain::Open,
            },
        )
        .await
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("document number {i}")).collect()
}

#[tokio::test]
async fn every_provider_returns_vectors_in_input_order_with_usage() {
    for kind in EMBEDDERS {
        let fake = FakeLlmServer::start().await.unwrap();
        let chain = chain(&section("p", kind, &provider_base_url(kind, &fake), ""));
        let inputs = texts(5);
        let o = run(
            &chain,
            json!({"input": inputs, "options": {"dimensions": 16}}),
            false,
        )
        .await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        let expected: Vec<Vec<f32>> = inputs.iter().map(|t| fake_vector(t, 16)).collect();
        assert_eq!(s.vectors, expected, "{kind}");
        assert!(s.input_tokens > 0, "{kind}");
        assert_eq!(
            o.attempts[0].tokens_estimated,
            kind == "gemini",
            "{kind}: Gemini reports no usage"
        );
        let req = fake.requests()[0].to_string();
        assert!(
            req.contains("16") && req.contains("document number 4"),
            "{kind}: {req}"
        );
    }
}

#[tokio::test]
async fn a_batch_larger_than_the_provider_limit_is_split_and_reassembled_in_order() {
    for kind in EMBEDDERS {
        let fake = FakeLlmServer::start().await.unwrap();
        let chain = chain(&section(
            "p",
            kind,
            &provider_base_url(kind, &fake),
            "embed_batch_size = 2",
        ));
        let inputs = texts(5);
        let o = run(&chain, json!({"input": inputs}), false).await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        let expected: Vec<Vec<f32>> = inputs.iter().map(|t| fake_vector(t, 8)).collect();
        assert_eq!(s.vectors, expected, "{kind}");
        assert_eq!(fake.request_count(), 3, "{kind}");
        assert_eq!((o.attempts.len(), s.attempt), (3, 3), "{kind}");
        assert_eq!(
            s.input_tokens,
            o.attempts.iter().map(|a| a.input_tokens).sum::<u64>(),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_429_is_retried_and_then_succeeds() {
    for kind in EMBEDDERS {
        let fake = FakeLlmServer::start().await.unwrap();
        fake.push(Reply::Status {
            status: 429,
            body: r#"{"error":{"message":"slow down"}}"#.into(),
            headers: vec![("retry-after-ms".into(), "200".into())],
        });
        let chain = chain(&section("p", kind, &provider_base_url(kind, &fake), ""));
        let started = std::time::Instant::now();
        let o = run(&chain, json!({"input": ["a"]}), false).await;
        assert!(o.result.is_ok(), "{kind}: {:?}", o.result);
        let codes: Vec<_> = o
            .attempts
            .iter()
            .map(|a| a.error.as_ref().map(|e| e.code))
            .collect();
        assert_eq!(codes, vec![Some(ErrorCode::RateLimited), None], "{kind}");
        assert!(started.elapsed() >= Duration::from_millis(200), "{kind}");
    }
}

async fn two() -> (FakeLlmServer, FakeLlmServer, Chain) {
    let a = FakeLlmServer::start().await.unwrap();
    let b = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{}[routes]\ndefault = [\"primary\"]\n[embed_routes]\ndefault = [\"primary\", \"backup\"]\n",
        section("primary", "openai", &a.base_url(), "max_retries = 0"),
        section("backup", "ollama", &b.root_url(), ""),
    );
    (a, b, chain(&toml))
}

#[tokio::test]
async fn a_failing_provider_falls_back_when_the_vector_size_is_pinned() {
    let (primary, backup, chain) = two().await;
    primary.set_default(Reply::status(500, "down"));
    let o = run(
        &chain,
        json!({"input": ["x", "y"], "options": {"dimensions": 8}}),
        false,
    )
    .await;
    let s = o.result.unwrap();
    assert_eq!((s.provider.as_str(), s.vectors.len()), ("backup", 2));
    assert_eq!(backup.request_count(), 1);
}

#[tokio::test]
async fn a_fallback_to_vectors_of_another_size_is_refused_unless_the_route_allows_it() {
    let (primary, backup, chain) = two().await;
    // The primary has served 8-dimension vectors before...
    assert!(
        run(&chain, json!({"input": ["warm up"]}), false)
            .await
            .result
            .is_ok()
    );
    // ...then fails, and the backup returns 4-dimension vectors.
    primary.set_default(Reply::status(500, "down"));
    backup.set_default(Reply::Vectors { dims: 4 });
    let o = run(&chain, json!({"input": ["x"]}), false).await;
    let e = o.result.unwrap_err();
    assert_eq!(e.code, ErrorCode::AllProvidersFailed);
    assert_eq!(
        o.attempts.last().unwrap().error.as_ref().unwrap().code,
        ErrorCode::DimensionMismatch
    );
    // A route listed in embed_mixed_dimensions accepts them.
    let o = run(&chain, json!({"input": ["x"]}), true).await;
    assert_eq!(o.result.unwrap().vectors[0].len(), 4);
}

#[tokio::test]
async fn anthropic_in_an_embedding_route_is_a_configuration_error() {
    let toml = "[providers.claude]\ntype = \"anthropic\"\ndefault_model = \"c\"\n[embed_routes]\ndefault = [\"claude\"]\n";
    let e = Config::from_toml(toml).unwrap_err().to_string();
    assert!(
        e.starts_with("embed_routes.default") && e.contains("no embeddings API"),
        "{e}"
    );
}

/// A fake server answering every embedding request with `dims`-sized vectors, and an
/// OpenAI-type provider section for it.
async fn fake_embedder(dims: usize) -> (FakeLlmServer, String) {
    let server = FakeLlmServer::start().await.unwrap();
    server.set_default(Reply::Vectors { dims });
    let toml = openai_provider("fake", &server.base_url(), "embed-model");
    (server, toml)
}

#[tokio::test]
async fn an_embedding_job_is_answered_in_order_and_recorded() {
    let (_server, toml) = fake_embedder(32).await;
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    let inputs = texts(3);
    let id = app
        .publish_to(
            "embed",
            json!({"input": inputs, "reply_to": reply_to, "tenant": "rag"}),
        )
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "ok", "{r}");
    let vectors: Vec<Vec<f32>> = serde_json::from_value(r["embeddings"].clone()).unwrap();
    assert_eq!(
        vectors,
        inputs
            .iter()
            .map(|t| fake_vector(t, 32))
            .collect::<Vec<_>>()
    );
    assert!(r.get("output").is_none());
    assert!(r["tokens_used"]["input"].as_u64().unwrap() > 0);
    app.wait_count(&format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{id}' AND kind = 'embed' AND tenant = 'rag' AND input_tokens > 0"), 1).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_result_above_the_nats_payload_limit_is_a_payload_too_large_error_naming_the_limit() {
    let (_server, toml) = fake_embedder(768).await;
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    // 300 x 768 floats as JSON is well above the default 1 MiB max_payload.
    let id = app
        .publish_to("embed", json!({"input": texts(300), "reply_to": reply_to}))
        .await;
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "error");
    assert_eq!(r["error"]["code"], "payload_too_large");
    // Named with both sizes: the vectors' (judged from the first batch, so it stops there)
    // and the limit's.
    let max = app.client.server_info().max_payload;
    let message = r["error"]["message"].as_str().unwrap();
    let numbers: Vec<u64> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(numbers.iter().any(|n| *n > max as u64), "{message}");
    assert!(
        message.contains("max_payload")
            && numbers
                .iter()
                .any(|n| *n < max as u64 && *n > (max / 2) as u64),
        "{message}"
    );
    assert!(r["embeddings"].is_null(), "nothing is silently truncated");
    assert_eq!(
        app.wait_stored_result(id).await["error"]["code"],
        "payload_too_large"
    );
    app.teardown().await;
}

#[tokio::test]
async fn empty_input_or_empty_strings_are_invalid_jobs() {
    let (_server, toml) = fake_embedder(8).await;
    let mut app = TestApp::new(&toml).await;
    app.start_worker().await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    for input in [json!([]), json!(["ok", ""]), json!("not a list")] {
        app.publish_to("embed", json!({"input": input, "reply_to": reply_to}))
            .await;
        let r = collect_reply(&mut sub).await.result;
        assert_eq!(r["error"]["code"], "invalid_job", "{input}: {r}");
    }
    app.teardown().await;
}

#[tokio::test]
async fn embed_mixed_dimensions_in_the_config_lets_a_fallback_change_the_size_through_nats() {
    let primary = FakeLlmServer::start().await.unwrap();
    let backup = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{}[routes]\ndefault = [\"primary\"]\nmixed = [\"primary\"]\n[embed_routes]\ndefault = [\"primary\", \"backup\"]\nmixed = [\"primary\", \"backup\"]\n",
        section("primary", "openai", &primary.base_url(), "max_retries = 0"),
        section("backup", "ollama", &backup.root_url(), ""),
    );
    let mut app = TestApp::new(&toml).await;
    app.start_worker_with(crate::helpers::ALL_ROLES, |c| {
        c.embed_mixed_dimensions = vec!["mixed".into()];
    })
    .await;
    let (reply_to, mut sub) = app.reply_inbox().await;
    // The primary serves 8-dimension vectors, then fails; the backup answers with 4.
    primary.push(Reply::Vectors { dims: 8 });
    app.publish_to("embed", json!({"input": ["warm up"], "reply_to": reply_to}))
        .await;
    assert_eq!(collect_reply(&mut sub).await.result["status"], "ok");
    primary.set_default(Reply::status(500, "down"));
    backup.set_default(Reply::Vectors { dims: 4 });

    app.publish_to("embed", json!({"input": ["x"], "reply_to": reply_to}))
        .await;
    let refused = collect_reply(&mut sub).await.result;
    assert_eq!(
        refused["error"]["code"], "all_providers_failed",
        "{refused}"
    );
    let last = refused["attempts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["error"]["code"], "dimension_mismatch");

    app.publish_to(
        "embed",
        json!({"input": ["x"], "task_type": "mixed", "reply_to": reply_to}),
    )
    .await;
    let accepted = collect_reply(&mut sub).await.result;
    assert_eq!(accepted["status"], "ok", "{accepted}");
    assert_eq!(accepted["embeddings"][0].as_array().unwrap().len(), 4);
    app.teardown().await;
}

#[tokio::test]
async fn only_the_first_entry_gets_the_uncached_inputs_a_fallback_embeds_them_all() {
    let (primary, backup, chain) = two().await;
    let job = decode_job(
        JobKind::Embed,
        &json!({"input": ["known", "new"], "options": {"dimensions": 8}}),
        &chain,
    );
    let JobBody::Embed(req) = &job.body else {
        unreachable!()
    };
    let missing = ["new".to_string()];
    let cancel = tokio_util::sync::CancellationToken::new();
    let embed = || {
        chain.embed(
            &job,
            req,
            Some(&missing),
            EmbedRules {
                mixed_dimensions: false,
                max_vector_bytes: usize::MAX,
            },
            llm_worker::chain::Bounds {
                deadline: tokio::time::Instant::now() + job.timeout,
                cancel: &cancel,
                gate: &llm_worker::chain::Open,
            },
        )
    };
    let s = embed().await.result.unwrap();
    assert!(s.partial);
    assert_eq!(s.vectors, vec![fake_vector("new", 8)]);
    assert_eq!(primary.requests()[0]["input"], json!(["new"]));
    // The first entry fails: the fallback's model embeds every input (no mixing of models).
    primary.set_default(Reply::status(500, "down"));
    let s = embed().await.result.unwrap();
    assert!(!s.partial);
    assert_eq!(s.provider, "backup");
    assert_eq!(s.vectors.len(), 2);
    assert_eq!(backup.requests()[0]["input"], json!(["known", "new"]));
}
