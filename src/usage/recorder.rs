//! The recorder: a durable consumer of `LLM_RESULTS` that projects results into `llm_calls`
//! (one row per attempt) and `llm_jobs` (one row per job) in batches.
//!
//! One transaction and two `INSERT ... SELECT FROM UNNEST(...)` statements per batch, whatever
//! its size, each adding the rows it wrote to the daily rollup (`llm_rollup_add_calls`,
//! `llm_rollup_add_jobs`: the one definition of every rollup figure);
//! `ON CONFLICT DO NOTHING` on the unique keys makes redelivery harmless (a stored result
//! never changes, so a result recorded twice carries the same times, part of the keys of the
//! monthly-partitioned tables). The partitions a batch needs are created before its
//! transaction, once per month and process ([`Months`]: a batch in a month already seen makes
//! no extra round trip; a "no partition" refusal, as after a prune, forgets them and retries
//! once). Costs are computed in SQL with the `llm_prices` row in force at each call's
//! `started_at`.
//!
//! It pulls exactly what it writes (one message with a long poll, then after `batch_wait` what
//! has arrived, without waiting): no message waits in a client buffer with its ack timer
//! running, so the consumer's ack wait can be short (`recorder.ack_wait_secs`) and a batch
//! whose recorder dies is written by another within seconds. A slow write keeps its batch
//! alive with progress acks. Messages are acked only after their transaction commits.
//!
//! Poison: a batch that fails with a data error (bad bytes, a violated constraint, a value
//! too large) is split in halves down to single results, so one bad row never blocks the
//! others; a result that still fails alone, or cannot be decoded, goes to the dead-letter
//! stream with the database's reason and is acked. An outage (no connection) is not a bad
//! row: the batch is handed back and waits in JetStream.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use chrono::{DateTime, Datelike, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{NatsConfig, RecorderConfig};
use crate::contract::{ResultEvent, Status, TokenClasses};
use crate::dead::DeadLetters;
use crate::nats::SetupError;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long one wait for the next result lasts before it is renewed.
const POLL: Duration = Duration::from_secs(5);
/// The longest a fetch of waiting results may take (the server answers at once when well).
const FETCH_LIMIT: Duration = Duration::from_secs(2);

pub struct Recorder {
    consumer: PullConsumer,
    pool: sqlx::PgPool,
    dead: DeadLetters,
    batch_size: usize,
    batch_wait: Duration,
    progress_every: Duration,
    months: Months,
}

/// The months (UTC year, month) whose partitions one recorder has created or found, so it
/// asks `llm_ensure_partitions` only when a batch reaches a new month.
#[derive(Debug, Default)]
pub struct Months(Mutex<HashSet<(i32, u32)>>);

impl Months {
    /// The months of `instants` not known to exist yet.
    fn missing(&self, instants: &[DateTime<Utc>]) -> Vec<DateTime<Utc>> {
        let known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<DateTime<Utc>> = instants
            .iter()
            .filter(|t| !known.contains(&(t.year(), t.month())))
            .copied()
            .collect();
        out.sort_unstable_by_key(|t| (t.year(), t.month()));
        out.dedup_by_key(|t| (t.year(), t.month()));
        out
    }

    fn add(&self, instants: &[DateTime<Utc>]) {
        let mut known = self.0.lock().unwrap_or_else(|e| e.into_inner());
        known.extend(instants.iter().map(|t| (t.year(), t.month())));
    }

    fn forget(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// How writing a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Every result is recorded or dead-lettered, and acked.
    Done,
    /// The database is unreachable: what was not written is handed back.
    Unavailable,
}

impl Recorder {
    /// Create (idempotently) the shared recorder consumer.
    pub async fn start(
        js: &jetstream::Context,
        nats: &NatsConfig,
        pool: sqlx::PgPool,
        dead: DeadLetters,
        cfg: &RecorderConfig,
    ) -> Result<Self, SetupError> {
        let batch_size = cfg.batch_size.max(1);
        let ack_wait = Duration::from_secs(cfg.ack_wait_secs);
        let config = pull::Config {
            durable_name: Some(nats.recorder_consumer_name()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            filter_subject: format!("{}.results.>", nats.subject_prefix),
            max_ack_pending: (batch_size * 4) as i64,
            ..Default::default()
        };
        let consumer = crate::nats::durable_consumer(js, &nats.results_stream, config).await?;
        Ok(Self {
            consumer,
            pool,
            dead,
            batch_size,
            batch_wait: Duration::from_millis(cfg.batch_wait_ms),
            progress_every: ack_wait / 3,
            months: Months::default(),
        })
    }

    /// Record until `stop` fires; the batch in progress is finished first.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        let mut full = false;
        while !stop.is_cancelled() {
            // Under a backlog (the last batch was full) there is no point waiting.
            let first = if full {
                None
            } else {
                let first = tokio::select! {
                    m = self.next_one() => m,
                    _ = stop.cancelled() => return,
                };
                let Some(first) = first else { continue };
                // Let a batch gather: one commit (and fsync) per interval at moderate rates.
                tokio::select! {
                    _ = tokio::time::sleep(self.batch_wait) => {}
                    _ = stop.cancelled() => {}
                }
                Some(first)
            };
            let want = self.batch_size - usize::from(first.is_some());
            let mut batch: Vec<jetstream::Message> = first.into_iter().collect();
            batch.extend(self.fetch_now(want).await);
            full = batch.len() >= self.batch_size;
            if batch.is_empty() {
                continue;
            }
            match self.record(batch, backoff).await {
                Written::Done => backoff = Duration::from_millis(500),
                Written::Unavailable => {
                    full = false;
                    sleep_or_stop(backoff, &stop).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Wait (up to [`POLL`]) for one result.
    async fn next_one(&self) -> Option<jetstream::Message> {
        let batch = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(POLL)
            .messages()
            .await;
        match batch {
            Ok(mut messages) => match messages.next().await {
                Some(Ok(m)) => Some(m),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "recorder pull interrupted");
                    None
                }
                None => None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "recorder cannot pull results; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                None
            }
        }
    }

    /// Up to `n` results that are already there, without waiting for more.
    async fn fetch_now(&self, n: usize) -> Vec<jetstream::Message> {
        if n == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        // async-nats' fetch (a no-wait pull) has no client-side deadline: a request the
        // server never answers (one that met a consumer leader change on a cluster) would
        // wait forever and stop the recorder. What arrived by the deadline is kept.
        let collect = async {
            match self.consumer.fetch().max_messages(n).messages().await {
                Ok(mut messages) => {
                    while let Some(Ok(m)) = messages.next().await {
                        out.push(m);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "recorder fetch failed"),
            }
        };
        if tokio::time::timeout(FETCH_LIMIT, collect).await.is_err() {
            tracing::warn!("a fetch of results got no answer within 2 s; going on");
        }
        out
    }

    /// Write one batch, keeping it alive with progress acks while it is written.
    async fn record(&self, batch: Vec<jetstream::Message>, retry_in: Duration) -> Written {
        let write = self.write_all(&batch, retry_in);
        tokio::pin!(write);
        let mut progress = tokio::time::interval_at(
            tokio::time::Instant::now() + self.progress_every,
            self.progress_every,
        );
        loop {
            tokio::select! {
                written = &mut write => return written,
                _ = progress.tick() => {
                    for msg in &batch {
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    /// Decode, write (splitting around bad rows), ack or hand back.
    async fn write_all(&self, batch: &[jetstream::Message], retry_in: Duration) -> Written {
        let mut results = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for msg in batch {
            match serde_json::from_slice::<ResultEvent>(&msg.payload) {
                Ok(r) => {
                    results.push(r);
                    messages.push(msg);
                }
                Err(e) => {
                    // Not a result of ours: keep it aside, and don't let it block.
                    let reason = format!("undecodable result ({}): {e}", msg.subject);
                    self.bury(msg, id_of_subject(&msg.subject), &reason).await;
                }
            }
        }
        // Halves of a failed batch wait on this stack; one result that fails alone is dead.
        let mut pending: Vec<(usize, usize)> = vec![(0, results.len())];
        while let Some((from, to)) = pending.pop() {
            if from == to {
                continue;
            }
            match write_batch_in(&self.pool, &results[from..to], &self.months).await {
                Ok(()) => {
                    for msg in &messages[from..to] {
                        if let Err(e) = msg.ack().await {
                            tracing::warn!(error = %e, "acking a recorded result failed (it will be re-recorded idempotently)");
                        }
                    }
                    tracing::debug!(results = to - from, "recorded");
                }
                Err(e) if is_bad_data(&e) && to - from == 1 => {
                    let reason = format!("the database refused the result: {e}");
                    self.bury(messages[from], Some(results[from].job_id), &reason)
                        .await;
                }
                Err(e) if is_bad_data(&e) => {
                    tracing::warn!(error = %e, results = to - from, "a batch holds a result the database refuses; splitting it");
                    let mid = from + (to - from) / 2;
                    pending.push((mid, to));
                    pending.push((from, mid));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "writing usage failed; results wait in JetStream");
                    let rest = std::iter::once((from, to)).chain(pending.drain(..));
                    for (a, b) in rest {
                        for msg in &messages[a..b] {
                            let _ = msg.ack_with(AckKind::Nak(Some(retry_in))).await;
                        }
                    }
                    return Written::Unavailable;
                }
            }
        }
        Written::Done
    }

    /// Dead-letter one message, then ack it; if the letter cannot be written, hand it back.
    async fn bury(&self, msg: &jetstream::Message, job_id: Option<Uuid>, reason: &str) {
        tracing::error!(subject = %msg.subject, reason, "result dead-lettered; the recorder moves on");
        let job_id = job_id.unwrap_or_else(Uuid::nil);
        match self.dead.usage(job_id, msg.payload.clone(), reason).await {
            Ok(()) => {
                let _ = msg.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the dead letter; the result is handed back");
                let _ = msg.ack_with(AckKind::Nak(Some(MAX_BACKOFF))).await;
            }
        }
    }
}

/// The job id in `<prefix>.results.<job_id>`.
fn id_of_subject(subject: &str) -> Option<Uuid> {
    subject
        .rsplit_once('.')
        .and_then(|(_, id)| Uuid::parse_str(id).ok())
}

/// Whether Postgres refused the data itself (so retrying the same rows cannot help), as
/// opposed to being unreachable. SQLSTATE classes: 22 data exception (NUL bytes, bad
/// encodings, out-of-range numbers), 23 integrity constraint, 54 program limit (a value too
/// large for an index).
fn is_bad_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
        sqlx::Error::Encode(_) => true,
        _ => false,
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
    write_batch_in(pool, results, &Months::default()).await
}

/// [`write_batch`], creating only the partitions of months not in `months`. When Postgres
/// finds no partition for a row (a month dropped by `usage prune` since), `months` is
/// forgotten and the batch written once more, ensuring every month it touches.
pub async fn write_batch_in(
    pool: &sqlx::PgPool,
    results: &[ResultEvent],
    months: &Months,
) -> Result<(), sqlx::Error> {
    match write_once(pool, results, months).await {
        Err(e) if is_missing_partition(&e) => {
            months.forget();
            write_once(pool, results, months).await
        }
        other => other,
    }
}

/// "no partition of relation ... found for row" (SQLSTATE 23514, a check violation).
fn is_missing_partition(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23514") && db.message().contains("no partition"))
}

async fn write_once(
    pool: &sqlx::PgPool,
    results: &[ResultEvent],
    months: &Months,
) -> Result<(), sqlx::Error> {
    let mut seen = HashSet::new();
    let results: Vec<&ResultEvent> = results.iter().filter(|r| seen.insert(r.job_id)).collect();
    if results.is_empty() {
        return Ok(());
    }

    let mut c = CallColumns::default();
    let mut j = JobColumns::default();
    for r in &results {
        let mut calls_from: Option<DateTime<Utc>> = None;
        let mut calls_to: Option<DateTime<Utc>> = None;
        for a in &r.attempts {
            calls_from = Some(calls_from.map_or(a.started_at, |t| t.min(a.started_at)));
            calls_to = Some(calls_to.map_or(a.started_at, |t| t.max(a.started_at)));
            c.kind.push(r.job_kind.as_str().to_string());
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
            c.classes.push(&a.classes);
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
            let made = a.images.as_ref();
            c.images
                .push(made.map_or(0, |m| i32::try_from(m.count).unwrap_or(i32::MAX)));
            c.image_size.push(made.and_then(|m| m.size.clone()));
            c.image_quality.push(made.and_then(|m| m.quality.clone()));
            c.service_tier.push(a.service_tier.as_str().to_string());
        }
        j.calls_from.push(calls_from);
        j.calls_to.push(calls_to);
    }

    // Every row's monthly partition exists before the transaction that writes it.
    let mut instants: Vec<DateTime<Utc>> = c.started_at.clone();
    instants.extend(results.iter().map(|r| r.finished_at));
    let missing = months.missing(&instants);
    if !missing.is_empty() {
        sqlx::query("SELECT llm_ensure_partitions($1)")
            .bind(&missing)
            .execute(pool)
            .await?;
        months.add(&missing);
    }

    let mut tx = pool.begin().await?;
    if !c.job_id.is_empty() {
        // The rollup grows by the calls this statement wrote (none on a redelivery), in the
        // same statement: it stays exact.
        sqlx::query(
            r#"
            WITH ins AS (
            INSERT INTO llm_calls (job_id, attempt, trace_id, tenant, provider, model, status,
                input_tokens, output_tokens, tokens_estimated, cost_usd, latency_ms, ttft_ms,
                http_status, error_code, error_message, started_at, finished_at,
                cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, reasoning_tokens,
                image_input_tokens, price_effective_from, images, image_size, image_quality,
                kind, service_tier)
            SELECT u.job_id, u.attempt, u.trace_id, u.tenant, u.provider, u.model, u.status,
                u.input_tokens, u.output_tokens, u.tokens_estimated,
                llm_call_cost(p, u.input_tokens, u.output_tokens, u.cache_read, u.cache_write,
                              u.cache_write_1h, u.reasoning, u.image_input, u.images,
                              u.image_size, u.image_quality)
                    * llm_tier_factor(p, u.service_tier),
                u.latency_ms, u.ttft_ms, u.http_status, u.error_code, u.error_message,
                u.started_at, u.finished_at,
                u.cache_read, u.cache_write, u.cache_write_1h, u.reasoning, u.image_input,
                CASE WHEN u.input_tokens + u.output_tokens + u.images > 0 THEN p.effective_from END,
                u.images, u.image_size, u.image_quality, u.kind, u.service_tier
            FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[],
                        $7::text[], $8::int8[], $9::int8[], $10::bool[], $11::int8[], $12::int8[],
                        $13::int4[], $14::text[], $15::text[], $16::timestamptz[], $17::timestamptz[],
                        $18::int8[], $19::int8[], $20::int8[], $21::int8[], $22::int8[],
                        $23::int4[], $24::text[], $25::text[], $26::text[], $27::text[])
                AS u(job_id, attempt, trace_id, tenant, provider, model, status, input_tokens,
                     output_tokens, tokens_estimated, latency_ms, ttft_ms, http_status,
                     error_code, error_message, started_at, finished_at,
                     cache_read, cache_write, cache_write_1h, reasoning, image_input,
                     images, image_size, image_quality, kind, service_tier)
            LEFT JOIN LATERAL llm_price_at(u.provider, u.model, u.started_at) p ON true
            ON CONFLICT (started_at, job_id, attempt) DO NOTHING
            RETURNING llm_calls
            )
            SELECT llm_rollup_add_calls(array_agg(ins.llm_calls)) FROM ins
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
        .bind(&c.classes.cache_read)
        .bind(&c.classes.cache_write)
        .bind(&c.classes.cache_write_1h)
        .bind(&c.classes.reasoning)
        .bind(&c.classes.image_input)
        .bind(&c.images)
        .bind(&c.image_size)
        .bind(&c.image_quality)
        .bind(&c.kind)
        .bind(&c.service_tier)
        .execute(&mut *tx)
        .await?;
    }

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
        let saved = r.cache.as_ref();
        j.saved_input
            .push(saved.map_or(0, |c| c.saved_input_tokens as i64));
        j.saved_output
            .push(saved.map_or(0, |c| c.saved_output_tokens as i64));
        j.saved_cost.push(saved.and_then(|c| c.saved_cost_usd));
        j.error_code
            .push(r.error.as_ref().map(|e| e.code.as_str().to_string()));
        j.error_message
            .push(r.error.as_ref().map(|e| e.message.clone()));
        j.metadata.push(r.metadata.clone());
        j.worker_id.push(r.worker_id.clone());
        j.received_at.push(r.received_at);
        j.finished_at.push(r.finished_at);
        j.processing_ms.push(r.processing_time_ms as i64);
        j.images.push(
            r.images
                .as_ref()
                .map_or(0, |i| i32::try_from(i.len()).unwrap_or(i32::MAX)),
        );
    }
    // Job totals come from its calls, so job and call rows always agree.
    sqlx::query(
        r#"
        WITH ins AS (
        INSERT INTO llm_jobs (job_id, trace_id, tenant, kind, task_type, status, provider, model,
            input_tokens, output_tokens, cost_usd, attempts, cache_hit, error_code, error_message,
            metadata, worker_id, received_at, finished_at, processing_ms,
            cache_saved_input_tokens, cache_saved_output_tokens, cache_saved_cost_usd,
            cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, reasoning_tokens,
            image_input_tokens, images)
        SELECT u.job_id, u.trace_id, u.tenant, u.kind, u.task_type, u.status, u.provider, u.model,
            coalesce(c.input_tokens, 0), coalesce(c.output_tokens, 0),
            CASE WHEN c.unpriced THEN NULL ELSE coalesce(c.cost_usd, 0) END,
            u.attempts, u.cache_hit, u.error_code, u.error_message,
            CASE WHEN u.metadata = 'null'::jsonb THEN NULL ELSE u.metadata END,
            u.worker_id, u.received_at, u.finished_at, u.processing_ms,
            u.saved_input, u.saved_output, u.saved_cost::numeric,
            coalesce(c.cache_read, 0), coalesce(c.cache_write, 0), coalesce(c.cache_write_1h, 0),
            coalesce(c.reasoning, 0), coalesce(c.image_input, 0), u.images
        FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::int4[], $10::bool[], $11::text[], $12::text[],
                    $13::jsonb[], $14::text[], $15::timestamptz[], $16::timestamptz[], $17::int8[],
                    $18::int8[], $19::int8[], $20::float8[], $21::int4[], $22::timestamptz[],
                    $23::timestamptz[])
            AS u(job_id, trace_id, tenant, kind, task_type, status, provider, model, attempts,
                 cache_hit, error_code, error_message, metadata, worker_id, received_at,
                 finished_at, processing_ms, saved_input, saved_output, saved_cost, images,
                 calls_from, calls_to)
        LEFT JOIN LATERAL (
            SELECT sum(input_tokens)::bigint AS input_tokens,
                   sum(output_tokens)::bigint AS output_tokens,
                   sum(cost_usd) AS cost_usd,
                   bool_or(cost_usd IS NULL) AS unpriced,
                   sum(cache_read_tokens)::bigint AS cache_read,
                   sum(cache_write_tokens)::bigint AS cache_write,
                   sum(cache_write_1h_tokens)::bigint AS cache_write_1h,
                   sum(reasoning_tokens)::bigint AS reasoning,
                   sum(image_input_tokens)::bigint AS image_input
            FROM llm_calls
            WHERE job_id = u.job_id AND started_at >= u.calls_from AND started_at <= u.calls_to
        ) c ON true
        ON CONFLICT (finished_at, job_id) DO NOTHING
        RETURNING llm_jobs
        )
        SELECT llm_rollup_add_jobs(array_agg(ins.llm_jobs)) FROM ins
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
    .bind(&j.saved_input)
    .bind(&j.saved_output)
    .bind(&j.saved_cost)
    .bind(&j.images)
    .bind(&j.calls_from)
    .bind(&j.calls_to)
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
    classes: ClassColumns,
    tokens_estimated: Vec<bool>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    http_status: Vec<Option<i32>>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    started_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    images: Vec<i32>,
    image_size: Vec<Option<String>>,
    image_quality: Vec<Option<String>>,
    /// The kind of the call's job.
    kind: Vec<String>,
    /// `standard`, `flex` or `batch`.
    service_tier: Vec<String>,
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
    saved_input: Vec<i64>,
    saved_output: Vec<i64>,
    saved_cost: Vec<Option<f64>>,
    error_code: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    metadata: Vec<serde_json::Value>,
    worker_id: Vec<String>,
    received_at: Vec<DateTime<Utc>>,
    finished_at: Vec<DateTime<Utc>>,
    processing_ms: Vec<i64>,
    images: Vec<i32>,
    /// The first and last start of the job's calls (to find them in their partitions).
    calls_from: Vec<Option<DateTime<Utc>>>,
    calls_to: Vec<Option<DateTime<Utc>>>,
}

/// The token classes of `llm_calls`, one array per class.
#[derive(Default)]
struct ClassColumns {
    cache_read: Vec<i64>,
    cache_write: Vec<i64>,
    cache_write_1h: Vec<i64>,
    reasoning: Vec<i64>,
    image_input: Vec<i64>,
}

impl ClassColumns {
    fn push(&mut self, c: &TokenClasses) {
        self.cache_read.push(c.cache_read_tokens as i64);
        self.cache_write.push(c.cache_write_tokens as i64);
        self.cache_write_1h.push(c.cache_write_1h_tokens as i64);
        self.reasoning.push(c.reasoning_tokens as i64);
        self.image_input.push(c.image_input_tokens as i64);
    }
}
