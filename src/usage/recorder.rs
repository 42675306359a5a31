//! The recorder: a durable consumer of `LLM_RESULTS` that projects results into `llm_calls`
//! (one row per attempt) and `llm_jobs` (one row per job) in batches.
//!
//! One transaction and two `INSERT ... SELECT FROM UNNEST(...)` statements per batch, whatever
//! its size; `ON CONFLICT DO NOTHING` on the primary keys makes redelivery harmless. Costs are
//! computed in SQL with the `llm_prices` row in force at each call's `started_at`. Messages are
//! acked only after the transaction commits; when Postgres is down they are handed back with a
//! delay and wait in JetStream.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{NatsConfig, RecorderConfig};
use crate::event::{ResultEvent, Status};
use crate::queue::QueueError;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Recorder {
    consumer: PullConsumer,
    pool: sqlx::PgPool,
    batch_size: usize,
    batch_wait: Duration,
}

impl Recorder {
    /// Create (idempotently) the shared recorder consumer.
    pub async fn start(
        js: &jetstream::Context,
        nats: &NatsConfig,
        pool: sqlx::PgPool,
        cfg: &RecorderConfig,
    ) -> Result<Self, QueueError> {
        let name = nats.recorder_consumer_name();
        let batch_size = cfg.batch_size.max(1);
        let config = pull::Config {
            durable_name: Some(name),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            filter_subject: format!("{}.results.>", nats.subject_prefix),
            max_ack_pending: (batch_size * 4) as i64,
            ..Default::default()
        };
        let consumer = crate::queue::durable_consumer(js, &nats.results_stream, config).await?;
        Ok(Self {
            consumer,
            pool,
            batch_size,
            batch_wait: Duration::from_millis(cfg.batch_wait_ms),
        })
    }

    /// Record until `stop` fires; the batch in progress is finished first.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        while !stop.is_cancelled() {
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(self.batch_size)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "recorder cannot pull results; retrying");
                    sleep_or_stop(Duration::from_secs(1), &stop).await;
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    m = messages.next() => m,
                    _ = stop.cancelled() => return,
                };
                let first = match first {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "recorder pull interrupted");
                        continue;
                    }
                    None => break,
                };
                // Take what else arrives within `batch_wait`, up to a batch: one commit
                // (and fsync) per interval at moderate rates, full batches under load.
                let mut batch = vec![first];
                let until = tokio::time::Instant::now() + self.batch_wait;
                // A timeout polls the stream before its deadline: a passed one (batch_wait 0)
                // still takes what is already buffered.
                while batch.len() < self.batch_size {
                    match tokio::time::timeout_at(until, messages.next()).await {
                        Ok(Some(Ok(m))) => batch.push(m),
                        _ => break,
                    }
                }
                if self.record(batch, backoff).await {
                    backoff = Duration::from_millis(500);
                } else {
                    sleep_or_stop(backoff, &stop).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Write one batch and ack it; on a database error hand it back. Returns success.
    async fn record(&self, batch: Vec<jetstream::Message>, retry_in: Duration) -> bool {
        let mut results = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for msg in batch {
            match serde_json::from_slice::<ResultEvent>(&msg.payload) {
                Ok(r) => {
                    results.push(r);
                    messages.push(msg);
                }
                Err(e) => {
                    // Not one of ours: keep it out of the ledger, and don't let it block.
                    tracing::error!(subject = %msg.subject, error = %e, "undecodable message in the results stream; skipped");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
            }
        }
        match write_batch(&self.pool, &results).await {
            Ok(()) => {
                for msg in &messages {
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(error = %e, "acking a recorded result failed (it will be re-recorded idempotently)");
                    }
                }
                tracing::debug!(results = results.len(), "recorded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, results = results.len(), "writing usage failed; results wait in JetStream");
                for msg in &messages {
                    let _ = msg.ack_with(AckKind::Nak(Some(retry_in))).await;
                }
                false
            }
        }
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.cancelled() => {}
    }
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Error => "error",
    }
}

/// Project results into `llm_calls` and `llm_jobs`: one transaction, idempotent.
pub async fn write_batch(pool: &sqlx::PgPool, results: &[ResultEvent]) -> Result<(), sqlx::Error> {
    let mut seen = HashSet::new();
    let results: Vec<&ResultEvent> = results.iter().filter(|r| seen.insert(r.job_id)).collect();
    if results.is_empty() {
        return Ok(());
    }

    let mut c = CallColumns::default();
    for r in &results {
        for a in &r.attempts {
            c.job_id.push(r.job_id);
            c.attempt.push(a.attempt as i32);
            c.trace_id.push(r.trace_id.clone());
            c.tenant.push(r.tenant.clone());
            c.provider.push(a.provider.clone());
            c.model.push(a.model.clone());
            let ok = a.error.is_none() && r.attempt == Some(a.attempt);
            c.status.push(if ok { "ok" } else { "error" }.to_string());
            c.input_tokens.push(a.input_tokens as i64);
            c.output_tokens.push(a.output_tokens as i64);
            c.tokens_estimated.push(a.tokens_estimated);
            c.latency_ms.push(a.latency_ms as i64);
            c.ttft_ms.push(a.ttft_ms.map(|v| v as i64));
            c.http_status.push(a.http_status.map(i32::from));
            c.error_code
                .push(a.error.as_ref().map(|e| e.code.as_str().to_string()));
            c.error_message
                .push(a.error.as_ref().map(|e| e.message.clone()));
            c.started_at.push(a.started_at);
            c.finished_at.push(a.finished_at);
        }
    }

    let mut tx = pool.begin().await?;
    if !c.job_id.is_empty() {
        sqlx::query(
            r#"
            INSERT INTO llm_calls (job_id, attempt, trace_id, tenant, provider, model, status,
                input_tokens, output_tokens, tokens_estimated, cost_usd, latency_ms, ttft_ms,
                http_status, error_code, error_message, started_at, finished_at)
            SELECT u.job_id, u.attempt, u.trace_id, u.tenant, u.provider, u.model, u.status,
                u.input_tokens, u.output_tokens, u.tokens_estimated,
                CASE WHEN u.input_tokens + u.output_tokens = 0 THEN 0
                     ELSE (p.input_usd_per_mtok * u.input_tokens
                           + p.output_usd_per_mtok * u.output_tokens) / 1000000 END,
                u.latency_ms, u.ttft_ms, u.http_status, u.error_code, u.error_message,
                u.started_at, u.finished_at
            FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[],
                        $7::text[], $8::int8[], $9::int8[], $10::bool[], $11::int8[], $12::int8[],
                        $13::int4[], $14::text[], $15::text[], $16::timestamptz[], $17::timestamptz[])
                AS u(job_id, attempt, trace_id, tenant, provider, model, status, input_tokens,
                     output_tokens, tokens_estimated, latency_ms, ttft_ms, http_status,
                     error_code, error_message, started_at, finished_at)
            LEFT JOIN LATERAL (
                SELECT input_usd_per_mtok, output_usd_per_mtok FROM llm_prices p
                WHERE p.provider = u.provider AND p.model = u.model
                  AND p.effective_from <= u.started_at
                ORDER BY p.effective_from DESC LIMIT 1
            ) p ON true
            ON CONFLICT (job_id, attempt) DO NOTHING
            "#,
        )
        .bind(&c.job_id)
        .bind(&c.attempt)
        .bind(&c.trace_id)
        .bind(&c.tenant)
        .bind(&c.provider)
        .bind(&c.model)
        .bind(&c.status)
        .bind(&c.input_tokens)
        .bind(&c.output_tokens)
        .bind(&c.tokens_estimated)
        .bind(&c.latency_ms)
        .bind(&c.ttft_ms)
        .bind(&c.http_status)
        .bind(&c.error_code)
        .bind(&c.error_message)
        .bind(&c.started_at)
        .bind(&c.finished_at)
        .execute(&mut *tx)
        .await?;
    }

    let mut j = JobColumns::default();
    for r in &results {
        j.job_id.push(r.job_id);
        j.trace_id.push(r.trace_id.clone());
        j.tenant.push(r.tenant.clone());
        j.kind.push(r.job_kind.as_str().to_string());
        j.task_type.push(r.task_type.clone());
        j.status.push(status_str(r.status).to_string());
        j.provider.push(r.provider.clone());
        j.model.push(r.model_used.clone());
        j.attempts.push(r.attempts.len() as i32);
        j.cache_hit.push(r.cache_hit);
        j.error_code
            .push(r.error.as_ref().map(|e| e.code.as_str().to_string()));
        j.error_message
            .push(r.error.as_ref().map(|e| e.message.clone()));
        j.metadata.push(r.metadata.clone());
        j.worker_id.push(r.worker_id.clone());
        j.received_at.push(r.received_at);
        j.finished_at.push(r.finished_at);
        j.processing_ms.push(r.processing_time_ms as i64);
    }
    // Job totals come from its calls, so job and call rows always agree.
    sqlx::query(
        r#"
        INSERT INTO llm_jobs (job_id, trace_id, tenant, kind, task_type, status, provider, model,
            input_tokens, output_tokens, cost_usd, attempts, cache_hit, error_code, error_message,
            metadata, worker_id, received_at, finished_at, processing_ms)
        SELECT u.job_id, u.trace_id, u.tenant, u.kind, u.task_type, u.status, u.provider, u.model,
            coalesce(c.input_tokens, 0), coalesce(c.output_tokens, 0),
            CASE WHEN c.unpriced THEN NULL ELSE coalesce(c.cost_usd, 0) END,
            u.attempts, u.cache_hit, u.error_code, u.error_message,
            CASE WHEN u.metadata = 'null'::jsonb THEN NULL ELSE u.metadata END,
            u.worker_id, u.received_at, u.finished_at, u.processing_ms
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::int4[], $10::bool[], $11::text[], $12::text[],
                    $13::jsonb[], $14::text[], $15::timestamptz[], $16::timestamptz[], $17::int8[])
            AS u(job_id, trace_id, tenant, kind, task_type, status, provider, model, attempts,
                 cache_hit, error_code, error_message, metadata, worker_id, received_at,
                 finished_at, processing_ms)
        LEFT JOIN LATERAL (
            SELECT sum(input_tokens)::bigint AS input_tokens,
                   sum(output_tokens)::bigint AS output_tokens,
                   sum(cost_usd) AS cost_usd,
                   bool_or(cost_usd IS NULL) AS unpriced
            FROM llm_calls WHERE job_id = u.job_id
        ) c ON true
        ON CONFLICT (job_id) DO NOTHING
        "#,
    )
    .bind(&j.job_id)
    .bind(&j.trace_id)
    .bind(&j.tenant)
    .bind(&j.kind)
    .bind(&j.task_type)
    .bind(&j.status)
    .bind(&j.provider)
    .bind(&j.model)
    .bind(&j.attempts)
    .bind(&j.cache_hit)
    .bind(&j.error_code)
    .bind(&j.error_message)
    .bind(&j.metadata)
    .bind(&j.worker_id)
    .bind(&j.received_at)
    .bind(&j.finished_at)
    .bind(&j.processing_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Column arrays for one `llm_calls` insert.
#[derive(Default)]
struct CallColumns {
    job_id: Vec<Uuid>,
    attempt: Vec<i32>,
    trace_id: Vec<String>,
    tenant: Vec<String>,
    provider: Vec<String>,
    model: Vec<String>,
    status: Vec<String>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    tokens_estimated: Vec<bool>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    http_status: Vec<Option<i32>>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    started_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
}

/// Column arrays for one `llm_jobs` insert.
#[derive(Default)]
struct JobColumns {
    job_id: Vec<Uuid>,
    trace_id: Vec<String>,
    tenant: Vec<String>,
    kind: Vec<String>,
    task_type: Vec<Option<String>>,
    status: Vec<String>,
    provider: Vec<Option<String>>,
    model: Vec<Option<String>>,
    attempts: Vec<i32>,
    cache_hit: Vec<bool>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    metadata: Vec<serde_json::Value>,
    worker_id: Vec<String>,
    received_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    processing_ms: Vec<i64>,
}
