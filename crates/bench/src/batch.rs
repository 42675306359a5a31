//! The batch lane scenario: 1,000 jobs with `service_tier: "batch"` from three tenants
//! through the fake's OpenAI Batch API, then the same 1,000 jobs online: the provider
//! requests each took (batch files, polls and downloads against one call per job) and the
//! cost recorded for each in `llm_calls`.

use std::time::{Duration, Instant};

use llm_worker_testkit::{BatchPlan, FakeLlmServer};

use crate::harness::{Deployment, Target};
use crate::load::{self, Pace};
use crate::scenarios::{self, Options, Row, row, short_answer};

/// How long the fake takes to answer a batch.
const TAKES: Duration = Duration::from_secs(2);

pub async fn batch(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let fake = FakeLlmServer::start().await?;
    fake.bench_mode(false);
    fake.set_default(short_answer());
    fake.set_batch_plan(BatchPlan {
        takes: TAKES,
        ..Default::default()
    });
    let toml = format!(
        r#"
[worker]
max_in_flight = {}
[providers.fake]
type = "openai"
base_url = "{}"
default_model = "{}"
service_tiers = true
[batch]
max_wait_secs = 2
poll_ms = 250
"#,
        options.max_in_flight,
        fake.base_url(),
        options.model
    );
    let mut dep = Deployment::new(target, &toml).await?;
    let outcome = async {
        // A list price, so both rounds have a cost to compare.
        sqlx::query(
            "INSERT INTO llm_prices (provider, model, effective_from, input_usd_per_mtok, output_usd_per_mtok)
             VALUES ('fake', $1, '2000-01-01', 0.15, 0.60)",
        )
        .bind(&options.model)
        .execute(&dep.pool)
        .await?;
        dep.spawn_worker().await?;
        let n = 1_000;
        let subject = dep.job_subject();
        let started = Instant::now();
        let jobs = (n, false, load::Shape::Batch);
        scenarios::shaped_round(&dep.client, &dep.js, &subject, jobs, Pace::Burst, false).await?;
        let batch_secs = started.elapsed().as_secs_f64();
        let stats = fake.batch_stats();
        dep.require_rows(n).await?;
        let calls = |tier: &'static str| {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM llm_calls WHERE service_tier = $1")
                .bind(tier)
                .fetch_one(&dep.pool)
        };
        let batch_online = calls("standard").await?;
        let jobs = (n, false, load::Shape::Plain);
        scenarios::shaped_round(&dep.client, &dep.js, &subject, jobs, Pace::Burst, false).await?;
        dep.require_rows(2 * n).await?;
        let online_calls = calls("standard").await? - batch_online;
        // The batch calls' cost, and the same calls (same tokens) at the standard price; the
        // online round's answers have other token counts (the fake answers them otherwise).
        let (batch_usd, standard_usd): (f64, f64) = sqlx::query_as(
            "SELECT coalesce(sum(cost_usd), 0)::float8, coalesce(sum(standard_cost_usd), 0)::float8
             FROM llm_tier_savings WHERE service_tier = 'batch'",
        )
        .fetch_one(&dep.pool)
        .await?;
        let online_usd: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(cost_usd), 0)::float8 FROM llm_calls WHERE service_tier = 'standard'",
        )
        .fetch_one(&dep.pool)
        .await?;
        let requests = stats.uploads + stats.created + stats.polls + stats.downloads + stats.cancels;
        Ok::<_, anyhow::Error>(vec![
            row(
                "batch lane: provider requests for 1,000 batch jobs",
                format!(
                    "{} ({} files, {} batches, {} polls, {} downloads, {} online); online: {}",
                    requests as i64 + batch_online,
                    stats.uploads,
                    stats.created,
                    stats.polls,
                    stats.downloads,
                    batch_online,
                    online_calls
                ),
                "a handful of batch files instead of 1,000 calls",
            ),
            row(
                "batch lane: 1,000 batch jobs answered (the fake's batches take 2 s)",
                format!("{batch_secs:.1} s"),
                "within the jobs' deadline",
            ),
            row(
                "batch lane: recorded cost, 1,000 jobs",
                format!(
                    "{batch_usd:.6} USD; at the standard price {standard_usd:.6} ({:+.0} %)",
                    (batch_usd / standard_usd - 1.0) * 100.0
                ),
                "the batch price (half)",
            ),
            row(
                "the same 1,000 jobs online: recorded cost",
                format!("{online_usd:.6} USD"),
                "",
            ),
        ])
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}
