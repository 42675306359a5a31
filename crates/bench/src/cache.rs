//! The response cache scenario: deterministic jobs answered by the provider (misses, each
//! stored) and identical ones answered from the cache (hits), at a steady rate and in a burst;
//! one cache lookup against one provider round trip (to the fake); and what counting tokens
//! and fitting a 4,000-token prompt into a window cost.

use std::time::{Duration, Instant};

use llm_worker::context::{self, Fit, Window};
use llm_worker::contract::{GenerateRequest, Message, Role};
use llm_worker::tokens::{self, Counter};

use llm_worker_testkit::FakeLlmServer;

use crate::harness::{Deployment, Target};
use crate::load::{self, Pace, Received, percentile};
use crate::scenarios::{
    self, Options, Row, cpu_used, per_job, rate, row, short_answers_deployment, thousands,
};

/// `n` jobs of `shape` (not streamed), every one answered `ok`.
async fn shaped_round(
    dep: &Deployment,
    n: usize,
    shape: load::Shape,
    pace: Pace,
) -> anyhow::Result<(Vec<Instant>, Received)> {
    let subject = dep.job_subject();
    let jobs = (n, false, shape);
    scenarios::shaped_round(&dep.client, &dep.js, &subject, jobs, pace, false).await
}

/// Publish → result latencies of a round, in ms, sorted.
pub(crate) fn latencies_ms(sent: &[Instant], received: &Received) -> Vec<f64> {
    let mut ms: Vec<f64> = sent
        .iter()
        .zip(&received.result_at)
        .filter_map(|(s, r)| r.map(|r| r.duration_since(*s).as_secs_f64() * 1e3))
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// Misses and hits at 500 jobs/s (publish → result), then hits in a burst.
pub async fn cache(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (fake, mut dep) = short_answers_deployment(target, options).await?;
    let outcome = async {
        dep.spawn_worker().await?;
        let n = if options.quick { 1_000 } else { 5_000 };
        let paced = Pace::Rate(500);
        let (sent, got) = shaped_round(&dep, n, load::Shape::Distinct, paced).await?;
        let misses = latencies_ms(&sent, &got);
        // One answer stored, then the same question again and again.
        shaped_round(&dep, 1, load::Shape::Same, Pace::Burst).await?;
        let (sent, got) = shaped_round(&dep, n, load::Shape::Same, paced).await?;
        let hits = latencies_ms(&sent, &got);
        let calls = fake.request_count();
        let cpu_before = dep.cpu_time(0);
        let (sent, got) = shaped_round(&dep, n, load::Shape::Same, Pace::Burst).await?;
        let burst = rate(n, &sent, got.last_result().unwrap_or_else(Instant::now));
        let cpu = cpu_used(cpu_before, dep.cpu_time(0));
        anyhow::ensure!(
            fake.request_count() == calls,
            "{} hits reached the provider",
            fake.request_count() - calls
        );
        let p = |v: &[f64]| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(v, 50.0),
                percentile(v, 99.0)
            )
        };
        let saved = percentile(&misses, 50.0) - percentile(&hits, 50.0);
        let (lookup, round_trip, near) = lookup_and_round_trip(&dep, &fake, 2_000).await?;
        let mut rows = vec![
            row(
                format!(
                    "cache: {} misses at 500 jobs/s (provider call + store), publish → result",
                    thousands(n as f64)
                ),
                p(&misses),
                "",
            ),
            row(
                format!(
                    "cache: {} hits at 500 jobs/s, publish → result",
                    thousands(n as f64)
                ),
                format!("{}; {saved:.2} ms less than a miss at p50", p(&hits)),
                "",
            ),
            row(
                format!("cache: {} hits, burst", thousands(n as f64)),
                format!(
                    "{} jobs/s{}",
                    thousands(burst),
                    cpu.map(|c| format!(", {} worker CPU per hit", per_job(c, n)))
                        .unwrap_or_default()
                ),
                "",
            ),
            row(
                "cache: one provider round trip to the fake (HTTP on loopback, not streamed)",
                p(&round_trip),
                "",
            ),
            row(
                "cache: one lookup in the fleet's bucket (KV get: a first hit on a worker)",
                format!(
                    "{}: {:.0} % of a round trip at p50",
                    p(&lookup),
                    100.0 * percentile(&lookup, 50.0) / percentile(&round_trip, 50.0)
                ),
                "< 33 %",
            ),
            row(
                "cache: one lookup in a worker's near cache (a repeated hit)",
                format!(
                    "{:.2} us: {:.2} % of a round trip at p50",
                    near.as_secs_f64() * 1e6,
                    100.0 * near.as_secs_f64() * 1e3 / percentile(&round_trip, 50.0)
                ),
                "< 33 %",
            ),
        ];
        rows.extend(counting());
        Ok(rows)
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}

/// `n` sequential reads of the stored answer from the cache bucket and `n` requests to the
/// fake provider, in ms (sorted), and the mean time of a read from a process's near cache.
async fn lookup_and_round_trip(
    dep: &Deployment,
    fake: &FakeLlmServer,
    n: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, Duration)> {
    use futures::TryStreamExt;
    let kv = dep.js.get_key_value(&dep.nats.cache_bucket).await?;
    let key = kv
        .keys()
        .await?
        .try_next()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the cache bucket is empty"))?;
    let mut lookups = Vec::with_capacity(n);
    let mut value = None;
    for _ in 0..n {
        let t = Instant::now();
        value = kv.get(&key).await?;
        lookups.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(value.is_some(), "the cached answer went away");
    }
    let near = llm_worker::cache::Near::new(Duration::from_secs(60), 64 << 20)
        .ok_or_else(|| anyhow::anyhow!("near cache off"))?;
    near.put(&key, value.unwrap_or_default());
    let near_get = mean(100_000, || {
        std::hint::black_box(near.get(std::hint::black_box(&key)));
    });
    let http = llm_worker::providers::http_client(Duration::from_secs(5))?;
    let url = format!("{}/chat/completions", fake.base_url());
    let body = serde_json::json!({"model": "m", "stream": false,
        "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0});
    let mut trips = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let answer = http.post(&url).json(&body).send().await?.bytes().await?;
        anyhow::ensure!(!answer.is_empty(), "empty answer");
        trips.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lookups.sort_by(f64::total_cmp);
    trips.sort_by(f64::total_cmp);
    Ok((lookups, trips, near_get))
}

/// A prompt of about 4,000 tokens (o200k): 8 context chunks and a question.
fn prompt_4k() -> GenerateRequest {
    let chunk = "The worker counts prompt tokens before it calls a provider, so that a job fits the model's context window. "
        .repeat(25);
    GenerateRequest {
        system: Some("Answer from the context.".into()),
        context: vec![chunk; 8],
        messages: vec![Message::text(Role::User, "What does the worker count?")],
        ..Default::default()
    }
}

/// Mean time of `f` over `n` runs.
fn mean(n: u32, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

/// Counting a 4,000-token prompt with each encoding, and fitting it into a 3,000-token window.
fn counting() -> Vec<Row> {
    let req = prompt_4k();
    let o200k = Counter::for_model("gpt-4o");
    let cl100k = Counter::for_model("gpt-3.5-turbo");
    // The first count of each encoding loads it; load both before timing.
    let n = tokens::prompt_tokens(&o200k, &req);
    tokens::prompt_tokens(&cl100k, &req);
    let count_o = mean(200, || {
        std::hint::black_box(tokens::prompt_tokens(&o200k, std::hint::black_box(&req)));
    });
    let count_c = mean(200, || {
        std::hint::black_box(tokens::prompt_tokens(&cl100k, std::hint::black_box(&req)));
    });
    let window = Window {
        tokens: 3_000,
        counter: o200k,
        default_reserve: None,
    };
    let mut dropped = 0;
    let fit = mean(200, || {
        if let Fit::Trimmed(_, t) = context::fit(std::hint::black_box(&req), window) {
            dropped = t.chunks_dropped;
        }
    });
    let fits = Window {
        tokens: 128_000,
        ..window
    };
    let fast = mean(2_000, || {
        std::hint::black_box(context::fit(std::hint::black_box(&req), fits));
    });
    let us = |d: Duration| format!("{:.0} us", d.as_secs_f64() * 1e6);
    vec![
        row(
            format!(
                "tokens: counting a {}-token prompt (o200k_base / cl100k_base)",
                thousands(n as f64)
            ),
            format!("{} / {}", us(count_o), us(count_c)),
            "",
        ),
        row(
            "tokens: fitting it into a 3,000-token window (count, drop chunks, build the request)",
            format!("{} ({dropped} of 8 chunks dropped)", us(fit)),
            "",
        ),
        row(
            "tokens: the same prompt for a 128k window (the byte bound proves it fits: no count)",
            format!("{:.2} us", fast.as_secs_f64() * 1e6),
            "",
        ),
    ]
}
