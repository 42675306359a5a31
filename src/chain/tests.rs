//! The chain's timing rules on a paused clock, with scripted in-memory providers: retry
//! backoff and Retry-After, the first-token and stall limits, the job deadline, and circuit
//! breaking. Tokio advances the paused clock only when every task waits, so each test runs in
//! microseconds and every instant it asserts is exact.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::contract::ErrorCode;
use crate::contract::{Envelope, GenerateOptions, JobKind, Message, Role};
use crate::error::ProviderError;
use crate::job::JobBody;
use crate::providers::scripted::{Play, Scripted};

const MS: Duration = Duration::from_millis(1);

/// Providers `a` and `b` (route `default = [a, b]`) with `a_settings` added to `a`, the
/// circuit breaker settings given, and `a` and `b` answering from their scripts.
fn chain(a_settings: &str, circuit: &str, a: &Arc<Scripted>, b: &Arc<Scripted>) -> Chain {
    let toml = format!(
        r#"
[providers.a]
type = "openai"
base_url = "http://127.0.0.1:9/v1"
default_model = "m"
retry_min_delay_ms = 100
retry_max_delay_ms = 1000
{a_settings}
[providers.b]
type = "openai"
base_url = "http://127.0.0.1:9/v1"
default_model = "m"
max_retries = 0
[routes]
default = ["a", "b"]
[circuit_breaker]
{circuit}
"#
    );
    let config = Config::from_toml(&toml).unwrap();
    let registry = Registry::scripted(&config, &[("a", a.clone()), ("b", b.clone())]).unwrap();
    let health = Health::new(&config.circuit_breaker);
    Chain::new(&config, registry, PriceBook::default(), health)
}

fn job() -> (Job, GenerateRequest) {
    let req = GenerateRequest {
        system: None,
        messages: vec![Message::text(Role::User, "hi")],
        options: GenerateOptions::default(),
        stream: true,
        ..Default::default()
    };
    let job = Job {
        envelope: Envelope::for_test("default"),
        kind: JobKind::Generate,
        provider: None,
        model: None,
        timeout: Duration::from_secs(120),
        expires_at: None,
        cache: None,
        body: JobBody::Generate(req.clone()),
    };
    (job, req)
}

async fn run(chain: &Chain, deadline: Instant) -> Outcome {
    let (job, req) = job();
    chain
        .generate(
            &job,
            &req,
            &mut NoSink,
            open(deadline, &CancellationToken::new()),
        )
        .await
}

fn answer() -> Play {
    Play::Answer(vec![(Duration::ZERO, "ok")])
}

fn server_error() -> Play {
    Play::Fail(ProviderError::new(ErrorCode::ServerError, "boom").with_status(500))
}

fn rate_limited(after: Duration) -> Play {
    Play::Fail(
        ProviderError::new(ErrorCode::RateLimited, "slow down")
            .with_status(429)
            .with_retry_after(Some(after)),
    )
}

fn codes(outcome: &Outcome) -> Vec<Option<ErrorCode>> {
    outcome
        .attempts
        .iter()
        .map(|a| a.error.as_ref().map(|e| e.code))
        .collect()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

#[tokio::test(start_paused = true)]
async fn retries_wait_the_jittered_backoff_and_a_longer_retry_after_wins() {
    let a = Scripted::new([
        server_error(),
        rate_limited(Duration::from_secs(5)),
        answer(),
    ]);
    let b = Scripted::new([]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let outcome = run(&chain, far()).await;
    assert_eq!(outcome.result.as_ref().unwrap().provider, "a");
    let calls = a.calls();
    // backon's jitter adds up to the current delay: the first retry waits 100..200 ms.
    let first = calls[1] - calls[0];
    assert!(first >= 100 * MS && first < 200 * MS, "{first:?}");
    // The second backoff (200..400 ms) is shorter than the provider's hint: the hint wins.
    assert_eq!(calls[2] - calls[1], Duration::from_secs(5));
    assert!(b.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn retries_end_after_max_retries_and_the_chain_falls_back() {
    let a = Scripted::new([server_error(), server_error(), server_error()]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 1", "", &a, &b);
    let outcome = run(&chain, far()).await;
    assert_eq!(outcome.result.as_ref().unwrap().provider, "b");
    assert_eq!(a.calls().len(), 2, "one call and one retry");
    assert_eq!(
        codes(&outcome),
        [
            Some(ErrorCode::ServerError),
            Some(ErrorCode::ServerError),
            None
        ]
    );
    // No wait before a fallback.
    assert_eq!(b.calls()[0], a.calls()[1]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_over_a_minute_falls_back_at_once() {
    let a = Scripted::new([rate_limited(Duration::from_secs(61)), answer()]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let outcome = run(&chain, far()).await;
    assert_eq!(outcome.result.as_ref().unwrap().provider, "b");
    assert_eq!(a.calls().len(), 1);
    assert_eq!(b.calls()[0], a.calls()[0]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_delay_past_the_deadline_falls_back_at_once() {
    let a = Scripted::new([rate_limited(Duration::from_secs(3)), answer()]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let start = Instant::now();
    let outcome = run(&chain, start + Duration::from_secs(2)).await;
    assert_eq!(outcome.result.as_ref().unwrap().provider, "b");
    assert_eq!(a.calls().len(), 1);
    assert_eq!(b.calls()[0], start);
}

#[tokio::test(start_paused = true)]
async fn no_first_text_within_the_first_token_limit_moves_to_the_next_provider() {
    // A response that never starts, and one whose first text comes too late (the limit is
    // on the first text, not the first byte).
    for late in [
        Play::Hang,
        Play::Answer(vec![(Duration::from_secs(4), "late")]),
    ] {
        let a = Scripted::new([late]);
        let b = Scripted::new([answer()]);
        let chain = chain("max_retries = 0\nfirst_token_timeout_ms = 3000", "", &a, &b);
        let start = Instant::now();
        let outcome = run(&chain, far()).await;
        assert_eq!(outcome.result.as_ref().unwrap().provider, "b");
        assert_eq!(codes(&outcome), [Some(ErrorCode::FirstTokenTimeout), None]);
        assert_eq!(b.calls()[0] - start, Duration::from_secs(3));
    }
}

#[tokio::test(start_paused = true)]
async fn silence_longer_than_the_stall_limit_fails_the_attempt_and_shorter_does_not() {
    let a = Scripted::new([
        // Pauses under the 2 s limit: a slow but live answer.
        Play::Answer(vec![
            (Duration::ZERO, "a"),
            (1900 * MS, "b"),
            (1900 * MS, "c"),
        ]),
        Play::Stall(vec![(Duration::ZERO, "he")]),
    ]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 0\nstall_timeout_ms = 2000", "", &a, &b);
    let slow = run(&chain, far()).await;
    assert_eq!(slow.result.as_ref().unwrap().output, "abc");
    let start = Instant::now();
    let stalled = run(&chain, far()).await;
    assert_eq!(stalled.result.as_ref().unwrap().provider, "b");
    assert_eq!(codes(&stalled), [Some(ErrorCode::Stalled), None]);
    assert_eq!(b.calls()[0] - start, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_job_deadline_ends_an_answer_mid_stream_as_timeout_and_nothing_follows() {
    let pieces = vec![(Duration::from_secs(2), "x"); 5];
    let a = Scripted::new([Play::Answer(pieces)]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let start = Instant::now();
    let outcome = run(&chain, start + Duration::from_secs(5)).await;
    assert_eq!(Instant::now() - start, Duration::from_secs(5));
    let error = outcome.result.as_ref().unwrap_err();
    assert_eq!(error.code, ErrorCode::Timeout, "{}", error.message);
    assert_eq!(codes(&outcome), [Some(ErrorCode::Timeout)]);
    assert!(b.calls().is_empty(), "no call after the deadline");
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_after_the_threshold_and_one_probe_goes_after_the_cooldown() {
    let a = Scripted::new([server_error(), server_error(), answer()]);
    let b = Scripted::new([answer(), answer(), answer(), answer()]);
    let chain = chain(
        "max_retries = 0",
        "failure_threshold = 2\ncooldown_secs = 30",
        &a,
        &b,
    );
    for _ in 0..2 {
        assert_eq!(
            run(&chain, far()).await.result.as_ref().unwrap().provider,
            "b"
        );
    }
    assert_eq!(a.calls().len(), 2);
    // Open: `a` is skipped without a call, and the result says so.
    let skipped = run(&chain, far()).await;
    assert_eq!(skipped.result.as_ref().unwrap().provider, "b");
    assert_eq!(a.calls().len(), 2);
    assert_eq!(skipped.attempts.len(), 1);
    tokio::time::advance(Duration::from_secs(29)).await;
    run(&chain, far()).await.result.as_ref().unwrap();
    assert_eq!(
        a.calls().len(),
        2,
        "still open 1 s before the cooldown ends"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    // After the cooldown one probe call goes to `a`; it answers and closes the circuit.
    let probed = run(&chain, far()).await;
    assert_eq!(probed.result.as_ref().unwrap().provider, "a");
    assert_eq!(a.calls().len(), 3);
}

#[test]
fn a_pin_of_a_provider_with_no_model_known_is_refused_at_decode() {
    let config = Config::from_toml(
        "pin_any_provider = [\"other\"]\n\
         [providers.a]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
         [providers.b]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\ndefault_model = \"m\"\n\
         [routes]\ndefault = [\"a:x\", \"b\"]\nother = [\"b\"]\n",
    )
    .unwrap();
    let registry = Registry::from_config(&config).unwrap();
    let chain = Chain::new(
        &config,
        registry,
        PriceBook::default(),
        Health::new(&config.circuit_breaker),
    );
    // In its route `a` comes with a model; pinned elsewhere it has none to use.
    assert_eq!(chain.check_pin(None, Some("a"), None), Ok(()));
    let refused = chain.check_pin(Some("other"), Some("a"), None).unwrap_err();
    assert!(refused.contains("no default model"), "{refused}");
    assert_eq!(chain.check_pin(Some("other"), Some("a"), Some("x")), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn a_cancel_mid_answer_ends_the_call_at_once_with_its_usage_estimated() {
    let pieces = vec![(Duration::from_secs(1), "word "); 10];
    let a = Scripted::new([Play::Answer(pieces)]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(3500 * MS).await;
        trigger.cancel();
    });
    let (job, req) = job();
    let start = Instant::now();
    let outcome = chain
        .generate(&job, &req, &mut NoSink, open(far(), &cancel))
        .await;
    assert_eq!(
        Instant::now() - start,
        3500 * MS,
        "no wait after the cancel"
    );
    let error = outcome.result.as_ref().unwrap_err();
    assert_eq!(error.code, ErrorCode::Cancelled);
    assert_eq!(codes(&outcome), [Some(ErrorCode::Cancelled)]);
    let call = &outcome.attempts[0];
    // Three words had arrived: the provider may bill them; counted, and marked estimated.
    assert!(call.tokens_estimated && call.output_tokens > 0 && call.input_tokens > 0);
    assert!(b.calls().is_empty(), "no fallback after a cancel");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_a_retry_wait_ends_the_job_without_another_call() {
    let a = Scripted::new([rate_limited(Duration::from_secs(30)), answer()]);
    let b = Scripted::new([answer()]);
    let chain = chain("max_retries = 2", "", &a, &b);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        trigger.cancel();
    });
    let (job, req) = job();
    let start = Instant::now();
    let outcome = chain
        .generate(&job, &req, &mut NoSink, open(far(), &cancel))
        .await;
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(outcome.result.unwrap_err().code, ErrorCode::Cancelled);
    assert_eq!((a.calls().len(), b.calls().len()), (1, 0));
}

/// Bounds without a gate.
fn open(deadline: Instant, cancel: &CancellationToken) -> super::Bounds<'_, super::Open> {
    super::Bounds {
        deadline,
        cancel,
        gate: &super::Open,
    }
}
