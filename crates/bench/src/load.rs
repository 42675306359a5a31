//! The benchmark's client side, speaking only the contract: publish generation jobs to
//! JetStream (each with its own `reply_to`, `<prefix>.r.<index>`), and timestamp the chunk and
//! result events that come back. Also the percentile helper.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use uuid::Uuid;

/// How jobs are published.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as JetStream acknowledges (up to 1,000 publishes awaiting their ack).
    Burst,
    /// An open loop at this many jobs per second.
    Rate(u32),
}

/// What the jobs of a round ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `bench <i>`, no options: never cached.
    Plain,
    /// Deterministic (`temperature` 0), each with its own prompt: cache misses, stored.
    Distinct,
    /// Deterministic, all the same prompt: cache hits once one is stored.
    Same,
    /// `service_tier: "batch"`, from three tenants in turn (the batch lane).
    Batch,
}

/// The job with index `i`: its prompt is `bench <i>` (the fake provider's timings are keyed by
/// it) and its events come back on `<reply_prefix>.<i>`.
pub fn job(i: usize, reply_prefix: &str, stream: bool, shape: Shape) -> (Uuid, Vec<u8>) {
    let job_id = Uuid::now_v7();
    let mut job = serde_json::json!({
        "job_id": job_id,
        "prompt": format!("bench {i}"),
        "reply_to": format!("{reply_prefix}.{i}"),
        "stream": stream,
    });
    match shape {
        Shape::Plain => {}
        Shape::Distinct => job["options"] = serde_json::json!({"temperature": 0}),
        Shape::Same => {
            job["prompt"] = "bench, the same question".into();
            job["options"] = serde_json::json!({"temperature": 0});
        }
        Shape::Batch => {
            job["service_tier"] = "batch".into();
            job["tenant"] = ["acme", "globex", "initech"][i % 3].into();
        }
    }
    (job_id, job.to_string().into_bytes())
}

/// Publish `n` jobs; returns each job's publish instant (index = job index).
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    reply_prefix: &str,
    n: usize,
    stream: bool,
    pace: Pace,
) -> anyhow::Result<Vec<Instant>> {
    publish_shaped(js, subject, reply_prefix, n, (stream, Shape::Plain), pace).await
}

/// [`publish`] with jobs of `shape`.
pub async fn publish_shaped(
    js: &jetstream::Context,
    subject: &str,
    reply_prefix: &str,
    n: usize,
    (stream, shape): (bool, Shape),
    pace: Pace,
) -> anyhow::Result<Vec<Instant>> {
    let mut sent = Vec::with_capacity(n);
    let mut pending = Vec::with_capacity(1000);
    let started = tokio::time::Instant::now();
    for i in 0..n {
        if let Pace::Rate(rate) = pace {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate.max(1)));
            tokio::time::sleep_until(due).await;
        }
        let (job_id, payload) = job(i, reply_prefix, stream, shape);
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(job_id.to_string());
        sent.push(Instant::now());
        pending.push(js.send_publish(subject.to_string(), message).await?);
        if pending.len() >= 1000 {
            for ack in pending.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in pending {
        ack.await?;
    }
    Ok(sent)
}

/// What came back for `n` jobs.
#[derive(Debug, Default)]
pub struct Received {
    pub result_at: Vec<Option<Instant>>,
    pub first_chunk_at: Vec<Option<Instant>>,
    pub chunks: usize,
    /// Error codes of the results that were not `ok`, with counts.
    pub failures: std::collections::BTreeMap<String, usize>,
    /// Second results for a job (a redelivered job answered again).
    pub duplicates: usize,
    /// Each job's first result payload, when the collector keeps them.
    pub payloads: Vec<Option<bytes::Bytes>>,
}

impl Received {
    pub fn results(&self) -> usize {
        self.result_at.iter().filter(|r| r.is_some()).count()
    }

    /// Results that were not `ok`.
    pub fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    /// When the last result arrived.
    pub fn last_result(&self) -> Option<Instant> {
        self.result_at.iter().flatten().max().copied()
    }
}

/// Live counters while a collection runs (for sampling concurrency).
#[derive(Debug, Default)]
pub struct Progress {
    pub started_streams: AtomicUsize,
    pub results: AtomicUsize,
}

impl Progress {
    /// Jobs whose first chunk arrived and whose result has not.
    pub fn open_streams(&self) -> usize {
        self.started_streams
            .load(Ordering::Relaxed)
            .saturating_sub(self.results.load(Ordering::Relaxed))
    }
}

/// Subscribe to `<reply_prefix>.>` before publishing; then [`Collector::collect`].
pub struct Collector {
    sub: async_nats::Subscriber,
    n: usize,
    keep_payloads: bool,
    pub progress: Arc<Progress>,
}

#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    status: Option<&'a str>,
    #[serde(default, borrow)]
    error: Option<ErrorHead<'a>>,
}

#[derive(serde::Deserialize)]
struct ErrorHead<'a> {
    #[serde(borrow)]
    code: &'a str,
}

impl Collector {
    pub async fn subscribe(
        client: &async_nats::Client,
        reply_prefix: &str,
        n: usize,
    ) -> anyhow::Result<Self> {
        let sub = client.subscribe(format!("{reply_prefix}.>")).await?;
        Ok(Self {
            sub,
            n,
            keep_payloads: false,
            progress: Arc::default(),
        })
    }

    /// Keep each job's result payload (for a per-stage breakdown of its timestamps).
    pub fn keep_payloads(mut self) -> Self {
        self.keep_payloads = true;
        self
    }

    /// Receive events until every job has a result or nothing arrives for `idle`.
    pub async fn collect(mut self, idle: Duration) -> Received {
        let mut r = Received {
            result_at: vec![None; self.n],
            first_chunk_at: vec![None; self.n],
            payloads: vec![None; if self.keep_payloads { self.n } else { 0 }],
            ..Default::default()
        };
        let mut results = 0;
        while results < self.n {
            let Ok(Some(msg)) = tokio::time::timeout(idle, self.sub.next()).await else {
                break;
            };
            let now = Instant::now();
            let Some(i) = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < self.n)
            else {
                continue;
            };
            let Ok(head) = serde_json::from_slice::<Head>(&msg.payload) else {
                continue;
            };
            if head.kind == "chunk" {
                r.chunks += 1;
                if r.first_chunk_at[i].is_none() {
                    r.first_chunk_at[i] = Some(now);
                    self.progress
                        .started_streams
                        .fetch_add(1, Ordering::Relaxed);
                }
            } else if head.kind == "result" {
                if r.result_at[i].is_some() {
                    r.duplicates += 1;
                    continue;
                }
                if head.status != Some("ok") {
                    let code = head.error.map_or("?", |e| e.code);
                    *r.failures.entry(code.to_string()).or_default() += 1;
                }
                r.result_at[i] = Some(now);
                if let Some(p) = r.payloads.get_mut(i) {
                    *p = Some(msg.payload.clone());
                }
                results += 1;
                self.progress.results.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

/// Nearest-rank percentile of sorted values (`q` in 0..=100).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
