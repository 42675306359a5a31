//! The scaling scenario: 1, 2, 3 worker processes on one consumer against a provider that
//! takes 100 ms per request, first on the given server, then on a 3-node cluster of the
//! benchmark's own nats-servers (child processes on free loopback ports) with R3 streams; and
//! short jobs in a burst on both, for what replication costs.

use std::time::{Duration, Instant};

use llm_worker_testkit::FakeLlmServer;

use crate::harness::{Deployment, Target};
use crate::load::Pace;
use crate::scenarios::{
    Options, Row, rate, round, row, short_answer, short_answers_deployment, thousands, worker_toml,
};

/// [`scaling_on`] the given server, then on a 3-node cluster of the benchmark's own
/// nats-servers with R3 streams (where nats-server is installed), and what replication costs
/// short jobs.
pub async fn scaling(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let mut rows = scaling_on(target, options, "").await?;
    let Some(nodes) = llm_worker_testkit::nats::cluster().await? else {
        return Ok(rows);
    };
    let cluster = Target {
        nats_url: llm_worker_testkit::nats::urls(&nodes),
        replicas: 3,
        ..target.clone()
    };
    rows.extend(scaling_on(&cluster, options, " on a 3-node cluster, R3 streams").await?);
    let n = if options.quick { 2_000 } else { 10_000 };
    let r1 = short_burst(target, options, n).await?;
    let r3 = short_burst(&cluster, options, n).await?;
    rows.push(row(
        format!(
            "replication: {} short jobs, one worker, burst, with usage rows",
            thousands(n as f64)
        ),
        format!(
            "one server (R1) {} jobs/s; 3-node cluster (R3) {} jobs/s ({:+.0} %)",
            thousands(r1),
            thousands(r3),
            100.0 * (r3 - r1) / r1
        ),
        "",
    ));
    drop(nodes);
    Ok(rows)
}

/// `n` short jobs published in a burst to one worker; jobs/s until every usage row is in.
async fn short_burst(target: &Target, options: &Options, n: usize) -> anyhow::Result<f64> {
    let (_fake, mut dep) = short_answers_deployment(target, options).await?;
    let outcome = async {
        dep.spawn_worker().await?;
        let (sent, _) = round(
            &dep.client,
            &dep.js,
            &dep.job_subject(),
            n,
            false,
            Pace::Burst,
            false,
        )
        .await?;
        dep.require_rows(n).await?;
        Ok(rate(n, &sent, Instant::now()))
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}

async fn scaling_on(target: &Target, options: &Options, place: &str) -> anyhow::Result<Vec<Row>> {
    const IN_FLIGHT: usize = 32;
    let per_worker = if options.quick { 640 } else { 1_600 };
    let fake = FakeLlmServer::start().await?;
    fake.bench_mode(false);
    fake.set_default(short_answer());
    fake.set_latency(Duration::from_millis(100));
    let mut dep = Deployment::new(target, &worker_toml(&fake, IN_FLIGHT, options)).await?;
    let outcome = async {
        let mut rates = Vec::new();
        let mut recorded = 0;
        for k in 1..=3usize {
            dep.spawn_worker().await?;
            let n = per_worker * k;
            let (sent, received) =
                round(&dep.client, &dep.js, &dep.job_subject(), n, false, Pace::Burst, false).await?;
            recorded += n;
            dep.require_rows(recorded).await?;
            rates.push(rate(n, &sent, received.last_result().unwrap_or_else(Instant::now)));
        }
        let one = rates.first().copied().unwrap_or(1.0);
        let figures: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{}: {} jobs/s ({:.2}×)", i + 1, thousands(*r), r / one))
            .collect();
        Ok(vec![row(
            format!("scaling: 1/2/3 worker processes, provider 100 ms/request, {IN_FLIGHT} in flight each{place}"),
            figures.join("; "),
            "near-linear (2×, 3×)",
        )])
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}
