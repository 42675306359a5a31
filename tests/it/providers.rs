//! Every provider's wire format against a fake server speaking it, and the chain's retry,
//! fallback, timeout and circuit-breaking behaviour. Driven through the chain directly.

use std::time::{Duration, Instant};

use llm_worker::chain::{AttemptMeta, Chain, DeltaSink, Outcome};
use llm_worker::config::Config;
use llm_worker::contract::ErrorCode;
use llm_worker::contract::JobKind;
use llm_worker::health::{Health, State};
use llm_worker::job::{Job, JobBody};
use llm_worker::pricing::PriceBook;
use llm_worker::providers::Registry;
use llm_worker_testkit::{FakeLlmServer, Reply};
use serde_json::{Value, json};

use crate::helpers::{decode_job, provider_base_url};

const FLAVORS: [&str; 4] = ["openai", "anthropic", "gemini", "ollama"];

/// A provider section with fast test defaults; `extra` lines (`key = value`) override them.
fn section(name: &str, kind: &str, base: &str, model: &str, extra: &str) -> String {
    let defaults = [
        "max_retries = 1",
        "retry_min_delay_ms = 10",
        "retry_max_delay_ms = 50",
        "first_token_timeout_ms = 2000",
        "stall_timeout_ms = 2000",
    ];
    let overridden = |d: &str| {
        extra
            .lines()
            .any(|l| l.split('=').next().map(str::trim) == d.split('=').next().map(str::trim))
    };
    let kept: Vec<&str> = defaults.into_iter().filter(|d| !overridden(d)).collect();
    format!(
        "[providers.{name}]\ntype = \"{kind}\"\nbase_url = \"{base}\"\ndefault_model = \"{model}\"\n{}\n{extra}\n",
        kept.join("\n")
    )
}

fn chain(toml: &str) -> (Chain, Health) {
    let config = Config::from_toml(toml).unwrap();
    let registry = Registry::from_config(&config).unwrap();
    let health = Health::new(&config.circuit_breaker);
    (
        Chain::new(&config, registry, PriceBook::default(), health.clone()),
        health,
    )
}

fn job(chain: &Chain, v: Value) -> Job {
    decode_job(JobKind::Generate, &v, chain)
}

#[derive(Default)]
struct Collect(Vec<(u32, String)>);

impl DeltaSink for Collect {
    async fn delta(&mut self, meta: AttemptMeta<'_>, text: &str) {
        self.0.push((meta.attempt, text.to_string()));
    }
}

async fn run(chain: &Chain, v: Value) -> (Outcome, Collect) {
    let job = job(chain, v);
    let JobBody::Generate(req) = &job.body else {
        unreachable!()
    };
    let mut sink = Collect::default();
    let deadline = tokio::time::Instant::now() + job.timeout;
    let cancel = tokio_util::sync::CancellationToken::new();
    let outcome = chain
        .generate(
            &job,
            req,
            &mut sink,
            llm_worker::chain::Bounds {
                deadline,
                cancel: &cancel,
                gate: &llm_worker::chain::Open,
            },
        )
        .await;
    (outcome, sink)
}

fn codes(o: &Outcome) -> Vec<Option<ErrorCode>> {
    o.attempts
        .iter()
        .map(|a| a.error.as_ref().map(|e| e.code))
        .collect()
}

async fn single(kind: &str) -> (FakeLlmServer, Chain) {
    let fake = FakeLlmServer::start().await.unwrap();
    let (chain, _) = chain(&section(
        "p",
        kind,
        &provider_base_url(kind, &fake),
        "m",
        "",
    ));
    (fake, chain)
}

#[tokio::test]
async fn every_provider_streams_an_answer_with_its_usage() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.push(Reply::answer(&["Hel", "lo"], (7, 2)));
        let (o, sink) = run(&chain, json!({"prompt": "hi", "system_prompt": "be brief"})).await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!(
            (s.output.as_str(), s.finish_reason.as_str()),
            ("Hello", "stop"),
            "{kind}"
        );
        assert_eq!(
            (s.usage.input_tokens, s.usage.output_tokens),
            (7, 2),
            "{kind}"
        );
        assert_eq!(sink.0, vec![(1, "Hel".into()), (1, "lo".into())], "{kind}");
        assert!(!o.attempts[0].tokens_estimated, "{kind}");
        let req = &fake.requests()[0];
        let sent = req.to_string();
        assert!(
            sent.contains("be brief") && sent.contains("hi"),
            "{kind}: {sent}"
        );
    }
}

#[tokio::test]
async fn every_provider_answers_without_streaming() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.push(Reply::answer(&["All ", "at once"], (5, 3)));
        let (o, sink) = run(&chain, json!({"prompt": "hi", "stream": false})).await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!(s.output, "All at once", "{kind}");
        assert_eq!(
            (s.usage.input_tokens, s.usage.output_tokens),
            (5, 3),
            "{kind}"
        );
        assert_eq!(sink.0, vec![(1, "All at once".into())], "{kind}");
        if kind != "gemini" {
            assert_eq!(fake.requests()[0]["stream"], false, "{kind}");
        }
    }
}

fn rate_limited(kind: &str) -> Reply {
    let (body, headers) = match kind {
        "anthropic" => (
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}),
            vec![("retry-after-ms", "400")],
        ),
        "gemini" => (
            json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.4s"}]}}),
            vec![],
        ),
        "ollama" => (
            json!({"error": "too many requests"}),
            vec![("retry-after-ms", "400")],
        ),
        _ => (
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
            vec![("retry-after-ms", "400")],
        ),
    };
    Reply::Status {
        status: 429,
        body: body.to_string(),
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[tokio::test]
async fn a_429_is_retried_no_earlier_than_the_providers_retry_delay() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.push(rate_limited(kind));
        fake.push(Reply::answer(&["ok"], (1, 1)));
        let started = Instant::now();
        let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
        assert!(o.result.is_ok(), "{kind}: {:?}", o.result);
        assert_eq!(
            codes(&o),
            vec![Some(ErrorCode::RateLimited), None],
            "{kind}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "{kind}: retried after {:?}",
            started.elapsed()
        );
        assert_eq!(fake.request_count(), 2, "{kind}");
    }
}

#[tokio::test]
async fn a_5xx_is_retried_and_the_retry_succeeds() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        let status = if kind == "anthropic" { 529 } else { 503 };
        fake.push(Reply::status(status, "overloaded"));
        fake.push(Reply::answer(&["fine"], (2, 1)));
        let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
        assert_eq!(
            o.result.as_ref().map(|s| s.output.as_str()).ok(),
            Some("fine"),
            "{kind}"
        );
        assert_eq!(codes(&o), vec![Some(ErrorCode::Overloaded), None], "{kind}");
        assert_eq!(o.attempts[0].http_status, Some(status), "{kind}");
    }
}

fn error_inside_200(kind: &str) -> Reply {
    match kind {
        "anthropic" => Reply::Raw {
            content_type: "text/event-stream".into(),
            body: concat!(
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"m\",\"stop_reason\":null,\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Partial\"}}\n\n",
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            ).into(),
        },
        "gemini" => Reply::RawStream(vec![
            r#"{"candidates":[{"content":{"parts":[{"text":"Partial"}],"role":"model"},"index":0}]}"#.into(),
            r#"{"error":{"code":500,"message":"An internal error has occurred","status":"INTERNAL"}}"#.into(),
        ]),
        "ollama" => Reply::Raw {
            content_type: "application/x-ndjson".into(),
            body: "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Partial\"},\"done\":false}\n{\"error\":\"model runner crashed\"}\n".into(),
        },
        _ => Reply::RawStream(vec![
            r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"Partial"},"finish_reason":null}]}"#.into(),
            r#"{"error":{"message":"The server had an error","type":"server_error","code":null}}"#.into(),
        ]),
    }
}

#[tokio::test]
async fn an_error_inside_a_200_stream_fails_the_attempt_and_the_answer_restarts_cleanly() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.push(error_inside_200(kind));
        fake.push(Reply::answer(&["Whole"], (3, 1)));
        let (o, sink) = run(&chain, json!({"prompt": "hi"})).await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!((s.attempt, s.output.as_str()), (2, "Whole"), "{kind}");
        let first = o.attempts[0].error.as_ref().unwrap();
        assert!(
            matches!(first.code, ErrorCode::Overloaded | ErrorCode::ServerError),
            "{kind}: {first:?}"
        );
        assert_eq!(
            sink.0,
            vec![(1, "Partial".into()), (2, "Whole".into())],
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_truncated_never_a_success() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.set_default(Reply::Cut {
            deltas: vec!["The answer is".into()],
        });
        let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
        assert!(o.result.is_err(), "{kind}: {:?} {:?}", o.result, o.attempts);
        assert_eq!(codes(&o), vec![Some(ErrorCode::Truncated); 2], "{kind}");
        assert!(
            o.attempts
                .iter()
                .all(|a| a.tokens_estimated && a.output_tokens > 0),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn a_stream_cut_before_its_usage_counts_one_token_per_event_where_the_protocol_sends_one() {
    // OpenAI-compatible servers and Ollama stream about one token per event: 40 one-token
    // events are 40 output tokens, not characters / 4.
    // (The old estimate, four characters per token, made 60 tokens of these 40 words.)
    let deltas: Vec<String> = vec![" hello".to_string(); 40];
    for kind in ["openai", "ollama"] {
        let (fake, chain) = single(kind).await;
        fake.set_default(Reply::Cut {
            deltas: deltas.clone(),
        });
        let (o, sink) = run(&chain, json!({"prompt": "count to forty"})).await;
        assert_eq!(sink.0.len(), 80, "{kind}: two attempts of 40 events");
        for a in &o.attempts {
            assert!(a.tokens_estimated, "{kind}");
            let off = (a.output_tokens as f64 - 40.0).abs() / 40.0;
            assert!(
                off <= 0.10,
                "{kind}: {} output tokens for 40 events",
                a.output_tokens
            );
            assert!(a.input_tokens > 0, "{kind}: the prompt is counted");
        }
    }
}

#[tokio::test]
async fn usage_seen_in_a_gemini_stream_that_then_breaks_is_not_final() {
    // Gemini repeats a running total with every chunk; this stream's total lags the text
    // (9 tokens reported after 12 one-token chunks), then a malformed chunk breaks it.
    let fake = FakeLlmServer::start().await.unwrap();
    let (chain, _) = chain(&section(
        "p",
        "gemini",
        &provider_base_url("gemini", &fake),
        "gemini-2.0-flash",
        "max_retries = 0",
    ));
    let mut chunks: Vec<String> = (0..12u64)
        .map(|i| {
            json!({"candidates": [{"content": {"parts": [{"text": " tok"}], "role": "model"}, "index": 0}],
                   "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": (i + 1) * 3 / 4,
                                     "totalTokenCount": 5 + (i + 1) * 3 / 4}})
            .to_string()
        })
        .collect();
    chunks.push("{\"candidates\": [{\"content\"".into());
    fake.set_default(Reply::RawStream(chunks));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert!(o.result.is_err());
    let a = &o.attempts[0];
    assert_eq!(
        a.error.as_ref().map(|e| e.code),
        Some(ErrorCode::MalformedResponse)
    );
    assert!(a.tokens_estimated, "a running total is not the bill");
    assert!(
        (12..=16).contains(&a.output_tokens),
        "the larger of 9 reported and the 12 tokens counted: {}",
        a.output_tokens
    );
    assert_eq!(a.input_tokens, 5, "the reported prompt count stands");
}

#[tokio::test]
async fn a_complete_answer_without_its_terminal_marker_is_a_success() {
    for kind in FLAVORS {
        let (fake, chain) = single(kind).await;
        fake.push(Reply::Answer {
            deltas: vec!["complete".into()],
            usage: Some((4, 1)),
            done_marker: false,
            chunk_delay: Duration::ZERO,
        });
        let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
        let s = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{kind}: {e:?}"));
        assert_eq!(
            (s.output.as_str(), s.usage.output_tokens),
            ("complete", 1),
            "{kind}"
        );
    }
}

async fn two(
    primary: &str,
    backup: &str,
    extra_primary: &str,
) -> (FakeLlmServer, FakeLlmServer, Chain, Health) {
    let p = FakeLlmServer::start().await.unwrap();
    let b = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{}[routes]\ndefault = [\"primary\", \"backup:model-b\"]\n[circuit_breaker]\nfailure_threshold = 2\ncooldown_secs = 1\n",
        section(
            "primary",
            primary,
            &provider_base_url(primary, &p),
            "model-a",
            extra_primary
        ),
        section(
            "backup",
            backup,
            &provider_base_url(backup, &b),
            "unused",
            ""
        ),
    );
    let (chain, health) = chain(&toml);
    (p, b, chain, health)
}

#[tokio::test]
async fn a_persistent_503_falls_back_to_the_next_provider_with_its_model_and_usage() {
    let (primary, backup, chain, _) = two("openai", "anthropic", "").await;
    primary.set_default(Reply::status(503, "unavailable"));
    backup.push(Reply::answer(&["from backup"], (12, 3)));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    let s = o.result.unwrap();
    assert_eq!(
        (s.provider.as_str(), s.model.as_str(), s.attempt),
        ("backup", "model-b", 3)
    );
    assert_eq!((s.usage.input_tokens, s.usage.output_tokens), (12, 3));
    let who: Vec<&str> = o.attempts.iter().map(|a| a.provider.as_str()).collect();
    assert_eq!(who, ["primary", "primary", "backup"]);
    assert_eq!(backup.requests()[0]["model"], "model-b");
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_the_chain_falls_back() {
    let (primary, backup, chain, _) = two("openai", "openai", "").await;
    let elsewhere = FakeLlmServer::start().await.unwrap();
    primary.set_default(Reply::Status {
        status: 307,
        body: String::new(),
        headers: vec![(
            "location".into(),
            format!("{}/chat/completions", elsewhere.base_url()),
        )],
    });
    backup.push(Reply::answer(&["from backup"], (12, 3)));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.result.unwrap().provider, "backup");
    assert_eq!(
        elsewhere.request_count(),
        0,
        "the prompt was re-sent elsewhere"
    );
    assert_eq!(o.attempts[0].http_status, Some(307));
    assert_eq!(
        o.attempts[0].error.as_ref().map(|e| e.code),
        Some(ErrorCode::BadRequest)
    );
}

#[tokio::test]
async fn a_context_overflow_is_not_retried_on_the_same_model() {
    let (primary, backup, chain, _) = two("openai", "gemini", "").await;
    let body = json!({"error": {"message": "This model's maximum context length is 8192 tokens", "type": "invalid_request_error", "code": "context_length_exceeded"}});
    primary.set_default(Reply::Status {
        status: 400,
        body: body.to_string(),
        headers: vec![],
    });
    backup.push(Reply::answer(&["big window"], (9000, 2)));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.result.as_ref().unwrap().output, "big window");
    assert_eq!(codes(&o), vec![Some(ErrorCode::ContextTooLong), None]);
    assert_eq!(primary.request_count(), 1);
}

#[tokio::test]
async fn a_content_filter_refusal_ends_the_job_with_the_providers_reason() {
    let (primary, backup, chain, _) = two("anthropic", "openai", "").await;
    let refusal = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":0}}}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal\"},\"usage\":{\"output_tokens\":0}}\n\n";
    primary.push(Reply::Raw {
        content_type: "text/event-stream".into(),
        body: refusal.into(),
    });
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    let e = o.result.unwrap_err();
    assert_eq!(e.code, ErrorCode::ContentFiltered);
    assert!(e.message.contains("refusal"), "{}", e.message);
    assert_eq!(backup.request_count(), 0);
}

#[tokio::test]
async fn a_silent_provider_times_out_and_the_chain_moves_on_without_retrying_it() {
    let (primary, backup, chain, _) = two("ollama", "openai", "first_token_timeout_ms = 300").await;
    primary.set_default(Reply::Hang);
    backup.push(Reply::answer(&["quick"], (1, 1)));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.result.as_ref().unwrap().output, "quick");
    assert_eq!(codes(&o), vec![Some(ErrorCode::FirstTokenTimeout), None]);
    let waited = o.attempts[0].latency_ms;
    assert!(
        (300..5_000).contains(&waited),
        "gave up after {waited} ms (limit 300 ms)"
    );
    assert_eq!(primary.request_count(), 1);
}

#[tokio::test]
async fn a_stalled_stream_is_detected_and_restarted_on_the_fallback() {
    let (primary, backup, chain, _) = two("gemini", "openai", "stall_timeout_ms = 300").await;
    primary.set_default(Reply::Stall {
        deltas: vec!["Once upon".into()],
    });
    backup.push(Reply::answer(&["A full answer"], (1, 3)));
    let (o, sink) = run(&chain, json!({"prompt": "hi"})).await;
    let s = o.result.as_ref().unwrap();
    assert_eq!((s.attempt, s.output.as_str()), (2, "A full answer"));
    assert_eq!(codes(&o), vec![Some(ErrorCode::Stalled), None]);
    assert_eq!(
        sink.0,
        vec![(1, "Once upon".into()), (2, "A full answer".into())]
    );
}

#[tokio::test]
async fn the_circuit_opens_during_an_outage_and_a_probe_closes_it_after_recovery() {
    let (primary, backup, chain, health) = two("openai", "ollama", "max_retries = 0").await;
    primary.set_default(Reply::status(500, "down"));
    backup.set_default(Reply::answer(&["backup"], (1, 1)));

    // Two failures open the circuit (threshold 2)...
    for _ in 0..2 {
        assert_eq!(
            run(&chain, json!({"prompt": "hi"}))
                .await
                .0
                .result
                .unwrap()
                .provider,
            "backup"
        );
    }
    let state = |h: &Health| {
        h.report()
            .into_iter()
            .find(|r| r.provider == "primary")
            .unwrap()
            .state
    };
    assert_eq!(state(&health), State::Unavailable);
    // ...so the primary is skipped without a call while it is open.
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.attempts.len(), 1);
    assert_eq!(primary.request_count(), 2);

    // Recovery: after the cool-down one probe goes through, succeeds, and traffic returns.
    primary.set_default(Reply::answer(&["primary"], (1, 1)));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.result.unwrap().provider, "primary");
    assert_eq!(state(&health), State::Healthy);
    assert_eq!(
        run(&chain, json!({"prompt": "hi"}))
            .await
            .0
            .result
            .unwrap()
            .provider,
        "primary"
    );
}

#[tokio::test]
async fn per_provider_concurrency_limits_queue_work_instead_of_overloading() {
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::Answer {
        deltas: vec!["slow".into()],
        usage: Some((1, 1)),
        done_marker: true,
        chunk_delay: Duration::from_millis(100),
    });
    let (chain, _) = chain(&section(
        "p",
        "openai",
        &fake.base_url(),
        "m",
        "max_concurrent = 1",
    ));
    let started = Instant::now();
    let runs = (0..3).map(|_| run(&chain, json!({"prompt": "hi"})));
    let outcomes = futures::future::join_all(runs).await;
    assert!(outcomes.iter().all(|(o, _)| o.result.is_ok()));
    // Each answer takes >= 400 ms (4 frames x 100 ms); one at a time, three take >= 1.2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1_200),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_cheapest_strategy_orders_a_route_by_price() {
    let a = FakeLlmServer::start().await.unwrap();
    let b = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{}[routes]\ndefault = [\"dear\", \"cheap\"]\n[strategies]\ndefault = \"cheapest\"\n",
        section("dear", "openai", &a.base_url(), "big", ""),
        section("cheap", "openai", &b.base_url(), "small", ""),
    );
    let config = Config::from_toml(&toml).unwrap();
    let prices = PriceBook::default();
    let t0 = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    prices.replace(vec![
        (
            "dear".into(),
            "big".into(),
            llm_worker::pricing::Price {
                effective_from: t0,
                input_per_mtok: 10.0,
                output_per_mtok: 30.0,
                ..Default::default()
            },
        ),
        (
            "cheap".into(),
            "small".into(),
            llm_worker::pricing::Price {
                effective_from: t0,
                input_per_mtok: 0.1,
                output_per_mtok: 0.4,
                ..Default::default()
            },
        ),
    ]);
    let chain = Chain::new(
        &config,
        Registry::from_config(&config).unwrap(),
        prices,
        Health::new(&config.circuit_breaker),
    );
    let plan: Vec<String> = chain
        .plan(&job(&chain, json!({"prompt": "x"})))
        .iter()
        .map(|t| t.provider.name.clone())
        .collect();
    assert_eq!(plan, ["cheap", "dear"]);
    // A pinned provider still goes first.
    let plan: Vec<String> = chain
        .plan(&job(&chain, json!({"prompt": "x", "provider": "dear"})))
        .iter()
        .map(|t| t.provider.name.clone())
        .collect();
    assert_eq!(plan, ["dear", "cheap"]);
}

#[tokio::test]
async fn the_best_quality_strategy_orders_by_rank_and_configured_ranks_win() {
    let fake = FakeLlmServer::start().await.unwrap();
    let plan_of = |extra_local: &str| {
        let toml = format!(
            "{}{}{}[routes]\ndefault = [\"local:llama3.1\", \"openai:gpt-4o-mini\", \"openai:my-finetune\", \"claude:claude-sonnet-4\"]\n[strategies]\ndefault = \"best_quality\"\n",
            section("local", "ollama", &fake.root_url(), "llama3.1", extra_local),
            section("openai", "openai", &fake.base_url(), "gpt-4o-mini", ""),
            section(
                "claude",
                "anthropic",
                &fake.root_url(),
                "claude-sonnet-4",
                ""
            ),
        );
        let (chain, _) = chain(&toml);
        let plan: Vec<String> = chain
            .plan(&job(&chain, json!({"prompt": "x"})))
            .iter()
            .map(|t| t.model.clone())
            .collect();
        plan
    };
    // Built-in ranks; a model the table does not know goes last.
    assert_eq!(
        plan_of(""),
        ["claude-sonnet-4", "gpt-4o-mini", "llama3.1", "my-finetune"]
    );
    // An operator's rank for their own model wins.
    assert_eq!(
        plan_of("quality = { \"llama3*\" = 99 }"),
        ["llama3.1", "claude-sonnet-4", "gpt-4o-mini", "my-finetune"]
    );
}

#[tokio::test]
async fn a_llama_cpp_error_field_inside_a_200_stream_is_seen_and_a_context_overflow_falls_back() {
    let (primary, backup, chain, _) = two("openai", "openai", "").await;
    let body = "error: {\"code\":400,\"message\":\"the request exceeds the available context size, try increasing it\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";
    primary.set_default(Reply::Raw {
        content_type: "text/event-stream".into(),
        body: body.into(),
    });
    backup.push(Reply::answer(&["fits"], (1, 1)));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(o.result.as_ref().unwrap().output, "fits");
    assert_eq!(codes(&o), vec![Some(ErrorCode::ContextTooLong), None]);
    assert_eq!(
        primary.request_count(),
        1,
        "a context overflow is not retried"
    );
}

#[tokio::test]
async fn the_fastest_strategy_prefers_the_lowest_recent_time_to_first_token() {
    let a = FakeLlmServer::start().await.unwrap();
    let b = FakeLlmServer::start().await.unwrap();
    let c = FakeLlmServer::start().await.unwrap();
    let toml = format!(
        "{}{}{}[routes]\ndefault = [\"slow\", \"fast\", \"new\"]\n[strategies]\ndefault = \"fastest\"\n",
        section("slow", "openai", &a.base_url(), "m", ""),
        section("fast", "openai", &b.base_url(), "m", ""),
        section("new", "openai", &c.base_url(), "m", ""),
    );
    let (chain, health) = chain(&toml);
    health.record("slow", "m", Ok(Some(Duration::from_millis(900))));
    health.record("fast", "m", Ok(Some(Duration::from_millis(80))));
    let plan: Vec<String> = chain
        .plan(&job(&chain, json!({"prompt": "x"})))
        .iter()
        .map(|t| t.provider.name.clone())
        .collect();
    assert_eq!(
        plan,
        ["new", "fast", "slow"],
        "untried first, then by measured speed"
    );
}

#[tokio::test]
async fn an_api_key_quoted_by_a_provider_never_reaches_the_result() {
    let fake = FakeLlmServer::start().await.unwrap();
    let body = json!({"error": {"message": "Incorrect API key provided: sk-test-9f8e7d6c5b4a. You can find your API key at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "code": "invalid_api_key"}});
    fake.set_default(Reply::Status {
        status: 401,
        body: body.to_string(),
        headers: vec![],
    });
    let chain = chain_with_key(
        &section("p", "openai", &fake.base_url(), "m", ""),
        "p",
        "sk-test-9f8e7d6c5b4a",
    );
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    let everything = format!("{:?} {:?}", o.result, o.attempts);
    assert_eq!(codes(&o), vec![Some(ErrorCode::Unauthorized)]);
    assert!(!everything.contains("9f8e7d6c5b4a"), "{everything}");
    assert!(
        everything.contains("Incorrect API key provided"),
        "the rest of the message is kept"
    );
}

#[tokio::test]
async fn answers_reuse_the_providers_connection() {
    // hyper pools a connection only once its response body has been read to the end; an
    // answer whose body is dropped early costs a new TCP (and TLS) connection per job.
    for kind in FLAVORS {
        for stream in [true, false] {
            let (fake, chain) = single(kind).await;
            for i in 0..20 {
                fake.push(Reply::answer(&["Hel", "lo"], (7, 2)));
                let (o, _) = run(
                    &chain,
                    json!({"prompt": format!("hi {i}"), "stream": stream}),
                )
                .await;
                assert!(o.result.is_ok(), "{kind}: {:?}", o.result);
            }
            // The rest of a finished stream may still be in flight when the next job starts;
            // that one job then opens a second connection. Without reuse this would be 20.
            assert!(
                fake.connections() <= 3,
                "{kind} stream={stream}: {} connections for 20 sequential answers",
                fake.connections()
            );
        }
    }
}

#[tokio::test]
async fn a_configured_key_of_another_shape_quoted_in_a_401_never_reaches_the_result() {
    // Not an `sk-` word, so only the redaction of the configured key itself can catch it.
    let key = "AIzaSyD-4kX9test0secret1key2gemini3";
    let fake = FakeLlmServer::start().await.unwrap();
    let body = json!({"error": {"code": 401, "message": format!("API key not valid: {key}. Please pass a valid API key."), "status": "UNAUTHENTICATED"}});
    fake.set_default(Reply::Status {
        status: 401,
        body: body.to_string(),
        headers: vec![],
    });
    let chain = chain_with_key(
        &section("g", "gemini", &fake.root_url(), "gemini-2.5-flash", ""),
        "g",
        key,
    );
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    let everything = format!("{:?} {:?}", o.result, o.attempts);
    assert_eq!(codes(&o), vec![Some(ErrorCode::Unauthorized)]);
    assert!(!everything.contains("AIzaSyD"), "{everything}");
    assert!(everything.contains("API key not valid"), "{everything}");
}

#[tokio::test]
async fn a_retry_hint_above_a_minute_or_past_the_deadline_falls_back_at_once() {
    let (p, b, chain, _) = two("openai", "openai", "").await;
    let hint = |secs: &str| Reply::Status {
        status: 429,
        body: json!({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}).to_string(),
        headers: vec![("retry-after".into(), secs.into())],
    };
    b.set_default(Reply::answer(&["backup"], (1, 1)));

    // 120 s is more than the chain waits for any provider.
    p.push(hint("120"));
    let (o, _) = run(&chain, json!({"prompt": "hi"})).await;
    assert_eq!(codes(&o), vec![Some(ErrorCode::RateLimited), None]);
    assert_eq!(p.request_count(), 1, "no retry after a 120 s hint");

    // 10 s is allowed, but not with 3 s left before the job's deadline.
    p.push(hint("10"));
    let (o, _) = run(&chain, json!({"prompt": "hi", "timeout_ms": 3000})).await;
    assert_eq!(codes(&o), vec![Some(ErrorCode::RateLimited), None]);
    assert_eq!(o.result.unwrap().provider, "backup");
    assert_eq!(p.request_count(), 2, "no retry past the deadline");
}

/// A chain over `toml` whose provider `name` holds the API key `key`.
fn chain_with_key(toml: &str, name: &str, key: &str) -> Chain {
    let mut config = Config::from_toml(toml).unwrap();
    config.providers.get_mut(name).unwrap().api_key = Some(secrecy::SecretString::from(key));
    Chain::new(
        &config,
        Registry::from_config(&config).unwrap(),
        PriceBook::default(),
        Health::new(&config.circuit_breaker),
    )
}
