//! The gateway scenario: the same short generation jobs published to NATS directly and sent
//! as OpenAI chat completions (not streamed) to an `llm-worker gateway` process, at a steady
//! rate (latency: publish or request -> result or response) and as fast as a fixed number of
//! concurrent clients can go (requests/s). The difference is what the HTTP front door costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cache::latencies_ms;
use crate::harness::{Target, process_cpu};
use crate::load::{self, Pace, percentile};
use crate::scenarios::{
    self, Options, Row, cpu_used, per_job, rate, row, short_answers_deployment, thousands,
};

/// Requests in flight at once in the throughput runs.
const CLIENTS: usize = 64;
/// The steady rate of the latency runs.
const RATE: u32 = 500;

pub async fn gateway(target: &Target, options: &Options) -> anyhow::Result<Vec<Row>> {
    let (_fake, mut dep) = short_answers_deployment(target, options).await?;
    let outcome = async {
        dep.spawn_worker().await?;
        let (addr, gateway_pid) = dep.spawn_gateway().await?;
        let (_, key) = llm_worker::gateway::keys::create(&dep.pool, "bench", Some("bench"), false).await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .build()?;
        let gw = Gateway {
            http,
            url: format!("http://{addr}/v1/chat/completions"),
            key,
        };
        let n = if options.quick { 1_000 } else { 5_000 };
        let subject = dep.job_subject();
        let plain = (n, false, load::Shape::Plain);

        // Warm both paths (connections, tokenizers, consumers).
        gw.paced(200, 200).await?;
        scenarios::shaped_round(&dep.client, &dep.js, &subject, (200, false, load::Shape::Plain), Pace::Burst, false).await?;

        let (sent, got) =
            scenarios::shaped_round(&dep.client, &dep.js, &subject, plain, Pace::Rate(RATE), false)
                .await?;
        let direct = latencies_ms(&sent, &got);
        let via_gateway = gw.paced(n, RATE).await?;

        let (sent, got) =
            scenarios::shaped_round(&dep.client, &dep.js, &subject, plain, Pace::Burst, false)
                .await?;
        let direct_rate = rate(n, &sent, got.last_result().unwrap_or_else(Instant::now));
        let cpu_before = process_cpu(&gateway_pid.to_string());
        let (gateway_rate, failed) = gw.closed_loop(n).await?;
        let cpu = cpu_used(cpu_before, process_cpu(&gateway_pid.to_string()));
        anyhow::ensure!(failed == 0, "{failed} gateway requests failed");

        let p = |v: &[f64]| {
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(v, 50.0),
                percentile(v, 99.0)
            )
        };
        Ok(vec![
            row(
                format!(
                    "gateway: {} jobs at {RATE}/s published to NATS directly, publish → result",
                    thousands(n as f64)
                ),
                p(&direct),
                "",
            ),
            row(
                format!(
                    "gateway: {} chat completions at {RATE}/s through the gateway, request → response",
                    thousands(n as f64)
                ),
                format!(
                    "{}; overhead p50 {:.2} ms, p99 {:.2} ms",
                    p(&via_gateway),
                    percentile(&via_gateway, 50.0) - percentile(&direct, 50.0),
                    percentile(&via_gateway, 99.0) - percentile(&direct, 99.0)
                ),
                "",
            ),
            row(
                format!(
                    "gateway: {} chat completions, {CLIENTS} clients in a closed loop",
                    thousands(n as f64)
                ),
                format!(
                    "{} requests/s{} (NATS directly, burst: {} jobs/s)",
                    thousands(gateway_rate),
                    cpu.map(|c| format!(", {} gateway CPU per request", per_job(c, n)))
                        .unwrap_or_default(),
                    thousands(direct_rate)
                ),
                "",
            ),
        ])
    }
    .await;
    dep.teardown(outcome.is_err()).await;
    outcome
}

struct Gateway {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Gateway {
    /// One chat completion; its latency in ms, or why it failed.
    async fn one(&self, i: usize) -> Result<f64, String> {
        let body = serde_json::json!({
            "model": "bench-model",
            "messages": [{"role": "user", "content": format!("bench {i}")}],
        });
        let start = Instant::now();
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {text}"));
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// `n` requests in an open loop at `per_sec`; their latencies in ms, sorted.
    async fn paced(self: &Gateway, n: usize, per_sec: u32) -> anyhow::Result<Vec<f64>> {
        let this = Arc::new(Gateway {
            http: self.http.clone(),
            url: self.url.clone(),
            key: self.key.clone(),
        });
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec)));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tick.tick().await;
            let gw = this.clone();
            tasks.push(tokio::spawn(async move { gw.one(i).await }));
        }
        let mut ms = Vec::with_capacity(n);
        for t in tasks {
            ms.push(t.await?.map_err(anyhow::Error::msg)?);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms)
    }

    /// `n` requests, [`CLIENTS`] at a time; requests per second and failures.
    async fn closed_loop(&self, n: usize) -> anyhow::Result<(f64, usize)> {
        let this = Arc::new(Gateway {
            http: self.http.clone(),
            url: self.url.clone(),
            key: self.key.clone(),
        });
        let slots = Arc::new(Semaphore::new(CLIENTS));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let permit = slots.clone().acquire_owned().await?;
            let gw = this.clone();
            tasks.push(tokio::spawn(async move {
                let r = gw.one(i).await;
                drop(permit);
                r
            }));
        }
        let mut failed = 0;
        for t in tasks {
            if t.await?.is_err() {
                failed += 1;
            }
        }
        Ok((n as f64 / start.elapsed().as_secs_f64(), failed))
    }
}
