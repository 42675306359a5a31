//! The response cache scenario: deterministic jobs answered by the provider (misses, each
//! stored) and identical ones answered from the cache (hits), at a steady rate and in a burst.

use std::time::Instant;

use llm_worker_testkit::FakeLlmServer;

use crate::harness::{Deployment, Target};
use crate::load::{self, Pace, Received, percentile};
use crate::scenarios::{
    self, Options, Row, cpu_used, per_job, rate, row, short_answer, thousands, worker_toml,
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
fn latencies_ms(sent: &[Instant], received: &Received) -> Vec<f64> {
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
    let fake = FakeLlmServer::start().await?;
    fake.bench_mode(false);
    fake.set_default(short_answer());
    let mut dep = Deployment::new(
        target,
        &worker_toml(&fake, options.max_in_flight, options.tenant_policy),
    )
    .await?;
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
        Ok(vec![
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
        ])
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}
