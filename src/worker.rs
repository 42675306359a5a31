//! Handling one job message from start to acknowledgement: the public step the consume loop
//! calls, and which tests can drive directly.
//!
//! decode -> (invalid: `invalid_job` result, Term) -> answered before? (the same job: re-send
//! the stored result, Ack; another tenant's or kind's job under this id: `invalid_job`, Term)
//! -> chain -> result stored in LLM_RESULTS (never replacing one already there) -> result sent
//! live -> Ack.
//! While the job runs it sends in-progress acks so JetStream does not redeliver it, and if the
//! process must stop before the job ends, the message is handed back (Nak) to another worker.
//! A message is only acked or terminated after its result is durably stored.
//!
//! The message and where its events go are the [`JobMessage`] and [`Outbox`] traits
//! ([`outbox`]), so these decisions are unit-tested without JetStream.

mod batched;
mod budget;
mod embed;
mod generate;
mod image;
pub mod outbox;
pub(crate) mod probe;
#[cfg(test)]
mod tests;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cache::Cache;
use crate::cancel::Cancels;
use crate::chain::Chain;
use crate::config::Config;
use crate::contract::ErrorCode;
use crate::contract::ReplyPolicy;
use crate::contract::{AttemptRecord, ErrorBody, ResultEvent, Status, TokensUsed, elapsed_ms};
use crate::contract::{Envelope, JobKind};
use crate::health::Health;
use crate::job::{self, Delivery, Job, JobBody, Limits, Rules};
use crate::policy::Ledger;
use crate::pricing::PriceBook;
use crate::reply::{Stored, encode_result};
use crate::trust;
pub use outbox::{JobMessage, NatsOutbox, Outbox};

/// Room kept in a message for NATS headers.
const PAYLOAD_HEADROOM: usize = 1024;
/// Room kept in a result for everything but its output and metadata (ids, attempts, timings).
const RESULT_MARGIN: usize = 32 * 1024;

/// Delay before a message is redelivered when its result could not be stored, doubling with
/// each delivery up to [`MAX_REQUEUE_DELAY`]: a few tries span about half a minute before the
/// job reaches `worker.max_deliver`.
const REQUEUE_DELAY: Duration = Duration::from_secs(2);
const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(60);

fn requeue(delivered: i64) -> AckKind {
    let doublings = u32::try_from(delivered.clamp(1, 10) - 1).unwrap_or(0);
    AckKind::Nak(Some(
        (REQUEUE_DELAY * 2u32.pow(doublings)).min(MAX_REQUEUE_DELAY),
    ))
}

/// What a successful chain produced.
enum Answer {
    Text(crate::chain::Success),
    Vectors(crate::embedding::EmbedSuccess),
    /// The pictures' call (its bytes already taken out) and the objects they became.
    Pictures(
        crate::image_gen::ImageSuccess,
        Vec<crate::contract::ImageObject>,
    ),
}

/// The error of an embedding job on a worker that does not embed.
fn no_embedding() -> ErrorBody {
    ErrorBody {
        code: ErrorCode::AllProvidersFailed,
        message: "embedding is not configured on this worker".into(),
        retryable: false,
    }
}

/// How a decoded job came to start.
struct Start {
    /// Deliveries of its message so far.
    delivered: i64,
    received_at: DateTime<Utc>,
    /// Why it waited past its timeout, parked (its tenant's rate limits).
    waited_out: Option<String>,
}

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    /// Answered (or answered before) and acked.
    Acked,
    /// Invalid: answered with `invalid_job` and terminated, never redelivered.
    Terminated,
    /// Handed back to JetStream for redelivery (shutdown, or the result could not be stored).
    Requeued,
}

/// What a configuration reload replaces: the chains (routes, strategies, providers with their
/// limits and keys) and the job bounds. A job keeps the one it started with.
pub struct Routing {
    chain: Chain,
    /// The embedding chain and the routes allowed to mix vector sizes; `None` when embedding
    /// is not configured (embedding jobs are then not consumed).
    embed: Option<(Chain, Arc<[String]>)>,
    /// The image chain; `None` when no route makes pictures (image jobs are then not
    /// consumed).
    image: Option<Chain>,
    limits: Limits,
}

impl Routing {
    pub(crate) fn new(config: &Config, chain: Chain, embed: Option<Chain>) -> Self {
        Self {
            chain,
            embed: embed.map(|c| (c, config.embed_mixed_dimensions.clone().into())),
            image: None,
            limits: Limits::from_config(config),
        }
    }

    /// The chains `config` describes, sharing `health` (circuit state survives a reload) and
    /// `prices`. Embedding is off (with the reason) when its routes name a provider that
    /// cannot embed.
    pub(crate) fn from_config(
        config: &Config,
        health: &Health,
        prices: &PriceBook,
    ) -> Result<(Self, Option<String>), crate::error::ProviderError> {
        let registry = crate::providers::Registry::from_config(config)?;
        health.set_listed(config.route_entries());
        let chain = Chain::new(config, registry, prices.clone(), health.clone());
        let (embed, why_not) = match config.embedding_routes() {
            Ok(routes) => (
                Some(Chain::with_routes(
                    routes,
                    config,
                    chain.registry().clone(),
                    prices.clone(),
                    health.clone(),
                )),
                None,
            ),
            Err(why) => (None, Some(why)),
        };
        let mut routing = Self::new(config, chain, embed);
        routing.image = match config.generation_image_routes() {
            Ok(routes) => Some(Chain::with_routes(
                &routes,
                config,
                routing.chain.registry().clone(),
                prices.clone(),
                health.clone(),
            )),
            Err(why) => {
                tracing::info!(%why, "image jobs are not consumed");
                None
            }
        };
        Ok((routing, why_not))
    }

    /// Whether embedding jobs are answered.
    pub(crate) fn embeds(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether image jobs are answered.
    pub(crate) fn makes_images(&self) -> bool {
        self.image.is_some()
    }
}

/// Everything a job needs, shared by all in-flight jobs of a process.
#[derive(Clone)]
pub struct Worker<O: Outbox = NatsOutbox> {
    routing: Arc<RwLock<Arc<Routing>>>,
    outbox: O,
    /// Cancel requests known to this process, and its running jobs' tokens.
    cancels: Cancels,
    prices: PriceBook,
    /// Deliveries after which a job is dead-lettered.
    max_deliver: i64,
    /// Where a job may have its events published.
    reply_policy: Arc<ReplyPolicy>,
    /// Take the tenant from the job's subject, not its body.
    tenant_from_subject: bool,
    worker_id: Arc<str>,
    progress_every: Duration,
    /// Life of a pull request (a handed-back job waits it out, see [`crate::nats::hand_back`]).
    pull_expires: Duration,
    log_prompts: bool,
    /// The fleet's tenant spend counters; without them budgets are not enforced (tests).
    ledger: Option<Ledger>,
    /// The fleet's response cache; none when `cache.enabled` is off (and in unit tests).
    cache: Option<Cache>,
    /// Where image jobs' pictures are kept; none in unit tests (image jobs then fail).
    images: Option<crate::image_store::ImageStore>,
    /// Jobs answered, for the NATS service API's stats.
    stats: Arc<crate::service::JobStats>,
    /// Prometheus counters of answered jobs and their provider calls.
    metrics: crate::metrics::Metrics,
    /// Where batch jobs are handed over; none: they are answered online.
    lane: Option<crate::lane::Intake>,
}

impl<O: Outbox> Worker<O> {
    pub fn new(
        config: &Config,
        routing: Routing,
        outbox: O,
        prices: PriceBook,
    ) -> Result<Self, crate::config::ConfigError> {
        let reply_policy =
            config
                .nats
                .reply_policy()
                .map_err(|e| crate::config::ConfigError::Invalid {
                    key: "nats.reply_prefixes".into(),
                    message: e,
                })?;
        Ok(Self {
            routing: Arc::new(RwLock::new(Arc::new(routing))),
            outbox,
            cancels: Cancels::default(),
            prices,
            max_deliver: config.worker.max_deliver,
            reply_policy: Arc::new(reply_policy),
            tenant_from_subject: config.nats.tenant_from_subject,
            worker_id: config.worker_id().into(),
            progress_every: config.nats.ack_wait() / 3,
            pull_expires: Duration::from_millis(config.worker.pull_expires_ms),
            log_prompts: config.telemetry.log_prompts,
            ledger: None,
            cache: None,
            images: None,
            stats: Arc::default(),
            metrics: crate::metrics::Metrics::new(config.telemetry.metrics_tenant_label),
            lane: None,
        })
    }

    /// Count into these metrics (the process's, served before the worker exists).
    pub(crate) fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Answer identical jobs from this response cache.
    pub(crate) fn with_cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Keep image jobs' pictures in this store.
    pub(crate) fn with_images(mut self, store: crate::image_store::ImageStore) -> Self {
        self.images = Some(store);
        self
    }

    /// Hand batch jobs to the batch lane here.
    pub(crate) fn with_lane(mut self, intake: crate::lane::Intake) -> Self {
        self.lane = Some(intake);
        self
    }

    /// Enforce tenant budgets with these shared counters.
    pub(crate) fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The routing jobs start with from now on.
    pub(crate) fn routing(&self) -> Arc<Routing> {
        match self.routing.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replace the routing (a configuration reload); jobs running keep theirs. Turning
    /// embedding on or off needs a restart (it decides which consumers exist): refused.
    pub(crate) fn reload(&self, routing: Routing) -> Result<(), String> {
        if routing.embeds() != self.routing().embeds() {
            return Err(
                "turning embedding jobs on or off needs a restart (embed_routes, or routes with a provider that cannot embed)"
                    .into(),
            );
        }
        if routing.makes_images() != self.routing().makes_images() {
            return Err(
                "turning image jobs on or off needs a restart (image_routes, or a routes.default without a provider that makes pictures)"
                    .into(),
            );
        }
        let mut current = match self.routing.write() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = Arc::new(routing);
        Ok(())
    }

    /// How a message not yet decoded is parked (`policy::fair`): its tenant, the tenant's
    /// weight, and how long it may wait for its tenant's rate limits (its timeout).
    pub(crate) fn parking_of(&self, msg: &impl JobMessage) -> (String, u32, Duration) {
        let subject_tenant = self
            .tenant_from_subject
            .then(|| msg.subject().rsplit_once('.').map(|(_, t)| t))
            .flatten();
        let routing = self.routing();
        let limits = &routing.limits;
        let peeked = crate::policy::fair::peek(msg.payload(), subject_tenant, limits.max_job_bytes);
        let weight = limits.policy(&peeked.tenant).map_or(1, |p| p.weight);
        let wait = peeked
            .timeout_ms
            .map_or(limits.default_timeout, Duration::from_millis)
            .min(limits.max_timeout);
        (peeked.tenant, weight, wait)
    }

    /// Whether a job of `tenant` may start now under its rate limits, from this worker's
    /// copy of the shared counters (the pull loop's filter).
    pub(crate) fn may_start(&self, tenant: &str) -> bool {
        match (self.routing().limits.policy(tenant), &self.ledger) {
            (Some(policy), Some(ledger)) => ledger.may_start(tenant, policy),
            _ => true,
        }
    }

    /// Take what a job of `tenant` needs to start, fleet-wide: one of its `max_in_flight`
    /// slots and one of its minute's `requests_per_minute`; `false` (nothing taken) when
    /// either is used up (the job goes back to wait). Give the slot back with
    /// [`Self::job_ended`].
    pub(crate) async fn take_start(&self, tenant: &str) -> bool {
        let routing = self.routing();
        let (Some(policy), Some(ledger)) = (routing.limits.policy(tenant), &self.ledger) else {
            return true;
        };
        if !ledger.acquire_slot(tenant, policy).await {
            return false;
        }
        if !ledger.reserve(tenant, policy).await {
            ledger.release_slot(tenant).await;
            return false;
        }
        true
    }

    /// A job started with [`Self::take_start`] has ended: its slot is free.
    pub(crate) async fn job_ended(&self, tenant: &str) {
        if let Some(ledger) = &self.ledger {
            ledger.release_slot(tenant).await;
        }
    }

    /// The cancel requests this worker follows (`cancel::follow` feeds them).
    pub(crate) fn cancels(&self) -> &Cancels {
        &self.cancels
    }

    /// The counts of jobs this worker answered.
    pub(crate) fn stats(&self) -> &Arc<crate::service::JobStats> {
        &self.stats
    }

    /// Handle one job message to its end. `abandon` fires when the process can wait no longer
    /// (shutdown grace exceeded): the job is then handed back for another worker.
    #[cfg(test)]
    pub async fn handle<M: JobMessage>(
        &self,
        kind: JobKind,
        msg: M,
        abandon: &CancellationToken,
    ) -> Disposal {
        self.handle_parked(kind, msg, abandon, None).await
    }

    /// [`Self::handle`] for a job that was parked; `waited_out` says why it waited past its
    /// timeout (its tenant's rate limits): it is then answered `timeout` without a call.
    pub(crate) async fn handle_parked<M: JobMessage>(
        &self,
        kind: JobKind,
        msg: M,
        abandon: &CancellationToken,
        waited_out: Option<String>,
    ) -> Disposal {
        let received_at = Utc::now();
        let delivered = msg.delivered();
        let routing = self.routing();
        match self.decode(kind, &msg, &routing) {
            Err(invalid) => {
                let span = job_span(&invalid.envelope, kind, delivered, msg.traceparent());
                async {
                    if delivered >= self.max_deliver {
                        return self
                            .dead_letter(&msg, kind, &invalid.envelope, delivered, received_at)
                            .await;
                    }
                    tracing::warn!(reason = %invalid.reason, "invalid job");
                    let error = ErrorBody {
                        code: ErrorCode::InvalidJob,
                        message: invalid.reason.clone(),
                        retryable: false,
                    };
                    let result = ResultEvent::failure(
                        &invalid.envelope,
                        kind,
                        error,
                        &self.worker_id,
                        received_at,
                    );
                    self.finish(&msg, kind, &invalid.envelope, &result, AckKind::Term)
                        .await
                }
                .instrument(span)
                .await
            }
            Ok(job) => {
                let span = job_span(&job.envelope, kind, delivered, msg.traceparent());
                let start = Start {
                    delivered,
                    received_at,
                    waited_out,
                };
                self.run(&msg, &routing, job, start, abandon)
                    .instrument(span)
                    .await
            }
        }
    }

    /// The configured provider `name`.
    pub(crate) fn provider(&self, name: &str) -> Option<Arc<crate::providers::Provider>> {
        self.routing().chain.registry().get(name).cloned()
    }

    /// Decode and validate the job `msg` carries under `routing`.
    pub(crate) fn decode(
        &self,
        kind: JobKind,
        msg: &impl JobMessage,
        routing: &Routing,
    ) -> Result<Job, Box<job::InvalidJob>> {
        // With tenants bound to subjects, the consumer's filter (`<jobs subject>.*`) makes the
        // last token the tenant: whoever NATS let publish there.
        let subject_tenant = self
            .tenant_from_subject
            .then(|| msg.subject().rsplit_once('.').map(|(_, t)| t))
            .flatten();
        let delivery = Delivery {
            msg_id: msg.msg_id(),
            subject_tenant,
            published: msg.published(),
            traceparent: msg.traceparent(),
        };
        let catalog = match (kind, &routing.embed, &routing.image) {
            (JobKind::Embed, Some((chain, _)), _) => chain,
            (JobKind::Image, _, Some(chain)) => chain,
            _ => &routing.chain,
        };
        let rules = Rules {
            limits: &routing.limits,
            replies: &self.reply_policy,
            catalog,
        };
        job::decode(kind, msg.payload(), &delivery, &rules)
    }

    async fn run(
        &self,
        msg: &impl JobMessage,
        routing: &Routing,
        job: Job,
        start: Start,
        abandon: &CancellationToken,
    ) -> Disposal {
        let Start {
            delivered,
            received_at,
            waited_out,
        } = start;
        // A job whose result is already stored is answered from it: no second provider call.
        match self.outbox.stored(job.envelope.job_id).await {
            // A batch job's answer was sent by the lane that stored it (`crate::batch`): a copy
            // of its message delivered again is not answered twice (a missed answer is read
            // back from the results stream).
            Ok(Some(payload))
                if self.lane.is_some()
                    && batched(&job)
                    && trust::same_job(&payload, &job.envelope.tenant, job.kind) =>
            {
                tracing::info!("batch job already answered; not sent again");
                return ack(msg, AckKind::Ack).await;
            }
            Ok(Some(payload)) => {
                return self
                    .answer_again(msg, job.kind, &job.envelope, payload, received_at)
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check for a stored result; requeueing");
                return ack(msg, requeue(delivered)).await;
            }
        }
        // Delivered again and again without an answer: whatever handles it fails. Keep it
        // aside instead of running it once more.
        if delivered >= self.max_deliver {
            return self
                .dead_letter(msg, job.kind, &job.envelope, delivered, received_at)
                .await;
        }
        // Nobody waits for the answer any more, or the tenant's budget is spent: say so,
        // without a provider call.
        let now = Utc::now();
        let tenant = &job.envelope.tenant;
        let policy = routing.limits.policy(tenant).zip(self.ledger.as_ref());
        let budget = policy.filter(|(p, _)| p.has_budget());
        let unwanted = if self.cancels.is_cancelled(tenant, job.envelope.job_id) {
            Some((
                ErrorCode::Cancelled,
                "cancelled: a cancel request for this job arrived before a worker started it"
                    .to_string(),
            ))
        } else if let Some(why) = waited_out {
            Some((ErrorCode::Timeout, format!("expired: {why}")))
        } else if let Some(why) = budget.and_then(|(policy, l)| l.refusal(tenant, policy)) {
            Some((ErrorCode::BudgetExceeded, format!("budget_exceeded: {why}")))
        } else {
            job.expires_at.filter(|at| *at <= now).map(|at| {
                let at = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let why =
                    format!("expired: the job's deadline ({at}) passed before a worker started it");
                (ErrorCode::Timeout, why)
            })
        };
        if let Some((code, message)) = unwanted {
            tracing::info!(%code, "job not started: {message}");
            let error = ErrorBody {
                code,
                message,
                retryable: false,
            };
            let result =
                ResultEvent::failure(&job.envelope, job.kind, error, &self.worker_id, received_at);
            return self
                .finish(msg, job.kind, &job.envelope, &result, AckKind::Ack)
                .await;
        }
        if let Some(disposal) = self.hand_over(msg, routing, &job, delivered).await {
            return disposal;
        }
        if self.log_prompts {
            tracing::debug!(job = ?job.body, "job body");
        }
        // The chain never runs past the job's timeout, nor past its deadline.
        let left = job
            .expires_at
            .map_or(job.timeout, |at| (at - now).to_std().unwrap_or_default());
        let deadline = Instant::now() + job.timeout.min(left);
        let running = self.cancels.run(tenant, job.envelope.job_id);
        // Budgets are reserved before each call of the job (`worker::budget`).
        let gate = budget.map(|(policy, ledger)| {
            budget::BudgetGate::new(
                ledger,
                tenant,
                policy,
                &self.prices,
                deadline,
                running.token(),
            )
        });
        let work = self.execute(
            routing,
            &job,
            (received_at, delivered),
            deadline,
            running.token(),
            gate.as_ref(),
        );
        tokio::pin!(work);
        let mut progress =
            tokio::time::interval_at(Instant::now() + self.progress_every, self.progress_every);
        let result = loop {
            tokio::select! {
                result = &mut work => break Some(result),
                _ = progress.tick() => {
                    if let Err(e) = msg.settle(AckKind::Progress).await {
                        tracing::warn!(error = %e, "in-progress ack failed");
                    }
                }
                _ = abandon.cancelled() => break None,
            }
        };
        let result = match result {
            Some(Err(image::NotKept(why))) => {
                if let (Some((policy, ledger)), Some(reserved)) =
                    (policy, gate.as_ref().and_then(budget::BudgetGate::reserved))
                {
                    ledger.charge(tenant, policy, 0.0, 0, Some(reserved)).await;
                }
                tracing::warn!(error = %why, "cannot keep the pictures; requeueing the job");
                return ack(msg, requeue(delivered)).await;
            }
            Some(Ok(result)) => Some(result),
            None => None,
        };
        match result {
            Some(result) => {
                // Spend and tokens are counted before the job is acked (`policy::ledger`).
                if let Some((policy, ledger)) = policy {
                    let (usd, tokens) = spend_of(&result.attempts);
                    let reserved = gate.as_ref().and_then(budget::BudgetGate::reserved);
                    ledger.charge(tenant, policy, usd, tokens, reserved).await;
                }
                self.finish(msg, job.kind, &job.envelope, &result, AckKind::Ack)
                    .await
            }
            None => {
                // What it reserved goes back (it is run, and charged, again elsewhere).
                if let (Some((policy, ledger)), Some(reserved)) =
                    (policy, gate.as_ref().and_then(budget::BudgetGate::reserved))
                {
                    ledger.charge(tenant, policy, 0.0, 0, Some(reserved)).await;
                }
                tracing::warn!("shutdown grace exceeded; handing the job back");
                ack(msg, crate::nats::hand_back(self.pull_expires)).await
            }
        }
    }

    /// Run the job's provider chain and build its result (`Err`: an image job's pictures
    /// could not be kept).
    async fn execute(
        &self,
        routing: &Routing,
        job: &Job,
        (received_at, delivered): (DateTime<Utc>, i64),
        deadline: Instant,
        cancel: &CancellationToken,
        gate: Option<&budget::BudgetGate<'_>>,
    ) -> Result<ResultEvent, image::NotKept> {
        let bounds = generate::Bounds {
            deadline,
            cancel,
            gate,
        };
        Ok(match &job.body {
            JobBody::Generate(req) => self.generate(routing, job, req, received_at, bounds).await,
            JobBody::Embed(req) => match &routing.embed {
                Some(_) => self.embed(routing, job, req, received_at, bounds).await,
                None => self.result_of(job, Vec::new(), Err(no_embedding()), received_at),
            },
            JobBody::Image(req) => {
                return self
                    .image(routing, job, req, received_at, delivered, bounds)
                    .await;
            }
        })
    }

    fn result_of(
        &self,
        job: &Job,
        mut attempts: Vec<AttemptRecord>,
        answer: Result<Answer, ErrorBody>,
        received_at: DateTime<Utc>,
    ) -> ResultEvent {
        let env = &job.envelope;
        for a in &mut attempts {
            a.cost_usd = self.prices.attempt_cost(a);
            a.cache_saved_usd =
                self.prices
                    .cache_saving(&a.provider, &a.model, a.started_at, &a.classes);
        }
        // The job's cost is every call's cost (failed calls can be billed); unknown if any is.
        let cost_usd = attempts
            .iter()
            .filter(|a| {
                a.input_tokens + a.output_tokens > 0
                    || a.images.as_ref().is_some_and(|i| i.count > 0)
            })
            .map(|a| a.cost_usd)
            .sum::<Option<f64>>()
            // An empty float sum is -0.0 (Rust >= 1.81); results say 0.
            .map(|c| c + 0.0);
        let mut result = ResultEvent::failure(
            env,
            job.kind,
            ErrorBody {
                code: ErrorCode::AllProvidersFailed,
                message: String::new(),
                retryable: false,
            },
            &self.worker_id,
            received_at,
        );
        match answer {
            Ok(answer) => {
                // What each kind answers with; who answered, in every kind's result.
                let (provider, model, attempt) = match answer {
                    Answer::Text(success) => {
                        result.output = Some(success.output);
                        result.tool_calls =
                            (!success.tool_calls.is_empty()).then_some(success.tool_calls);
                        result.json = success.json;
                        result.finish_reason = Some(success.finish_reason);
                        result.tokens_used = TokensUsed::with_classes(
                            success.usage.input_tokens,
                            success.usage.output_tokens,
                            success.usage.classes,
                        );
                        result.context_trimmed = success.context_trimmed;
                        (success.provider, success.model, success.attempt)
                    }
                    Answer::Vectors(success) => {
                        result.embeddings = Some(success.vectors);
                        result.tokens_used = TokensUsed::new(success.input_tokens, 0);
                        (success.provider, success.model, success.attempt)
                    }
                    Answer::Pictures(success, objects) => {
                        result.images = Some(objects);
                        result.tokens_used = TokensUsed::with_classes(
                            success.usage.input_tokens,
                            success.usage.output_tokens,
                            success.usage.classes,
                        );
                        (success.provider, success.model, success.attempt)
                    }
                };
                result.status = Status::Ok;
                result.error = None;
                result.provider = Some(provider);
                result.model_used = Some(model);
                result.attempt = Some(attempt);
                tracing::debug!(
                    attempts = attempts.len(),
                    kind = job.kind.as_str(),
                    "job done"
                );
            }
            Err(error) => {
                tracing::warn!(code = %error.code, message = %error.message, "job failed");
                result.error = Some(error);
            }
        }
        result.attempts = attempts;
        result.cost_usd = cost_usd;
        result.finished_at = Utc::now();
        result.processing_time_ms = elapsed_ms(received_at, result.finished_at);
        result
    }

    /// Store the result, send it live, then ack (or terminate) the message. A result already
    /// stored under the job id is never replaced: a refused job's result then goes to its own
    /// reply subject only, and a valid one is answered as [`Self::answer_again`] decides.
    async fn finish(
        &self,
        msg: &impl JobMessage,
        kind: JobKind,
        envelope: &Envelope,
        result: &ResultEvent,
        disposal: AckKind,
    ) -> Disposal {
        let payload = match encode_result(result, || self.outbox.max_payload()) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the result; requeueing");
                return ack(msg, requeue(msg.delivered())).await;
            }
        };
        let existing = match self
            .outbox
            .store(envelope.job_id, payload.clone())
            .instrument(if crate::telemetry::exporting() {
                tracing::info_span!("store_result")
            } else {
                tracing::Span::none()
            })
            .await
        {
            Ok(Stored::New) => None,
            Ok(Stored::Existing(existing)) => Some(existing),
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the result; requeueing the job");
                return ack(msg, requeue(msg.delivered())).await;
            }
        };
        match existing {
            None => {}
            Some(_) if matches!(disposal, AckKind::Term) => {
                tracing::info!("a result is already stored under this job id; kept as it is");
            }
            Some(existing) => {
                // Another delivery under this id stored first (a concurrent duplicate, or a
                // job id re-used by someone else): its result stands; ours is not recorded.
                tracing::warn!(
                    calls = result.attempts.len(),
                    "a result was stored under this job id meanwhile; this run's calls are not recorded"
                );
                return self
                    .answer_again(msg, kind, envelope, existing, result.received_at)
                    .await;
            }
        }
        self.stats.record(kind, result);
        self.metrics.observe(kind, result);
        if let Some(reply_to) = &envelope.reply_to {
            self.outbox.publish_live(reply_to, payload).await;
        }
        ack(msg, disposal).await
    }

    /// Copy a job delivered `delivered` times to the dead-letter stream, then answer it
    /// `dead_lettered` (stored and sent) and terminate it. If the copy cannot be written the
    /// job is handed back, to be dead-lettered on its next delivery.
    async fn dead_letter(
        &self,
        msg: &impl JobMessage,
        kind: JobKind,
        envelope: &Envelope,
        delivered: i64,
        received_at: DateTime<Utc>,
    ) -> Disposal {
        let reason = format!(
            "delivered {delivered} times without an answer (worker.max_deliver): the workers handling it failed each time"
        );
        let job_id = envelope.job_id;
        if let Err(e) = self
            .outbox
            .dead_letter(
                job_id,
                msg.subject(),
                msg.payload().clone(),
                delivered,
                &reason,
            )
            .await
        {
            tracing::warn!(error = %e, "cannot write the dead letter; requeueing");
            return ack(msg, requeue(delivered)).await;
        }
        tracing::error!(delivered, "job dead-lettered");
        let error = ErrorBody {
            code: ErrorCode::DeadLettered,
            message: format!("{reason}; kept in the dead-letter stream for inspection and replay"),
            retryable: false,
        };
        let result = ResultEvent::failure(envelope, kind, error, &self.worker_id, received_at);
        self.finish(msg, kind, envelope, &result, AckKind::Term)
            .await
    }

    /// Answer a job whose id already has a stored result: the same job (same tenant and kind)
    /// gets that result again; anyone else re-using the id gets `invalid_job` and never sees it.
    async fn answer_again(
        &self,
        msg: &impl JobMessage,
        kind: JobKind,
        envelope: &Envelope,
        stored: bytes::Bytes,
        received_at: DateTime<Utc>,
    ) -> Disposal {
        if trust::same_job(&stored, &envelope.tenant, kind) {
            tracing::info!("job already answered; re-sending the stored result");
            if let Some(reply_to) = &envelope.reply_to {
                self.outbox.publish_live(reply_to, stored).await;
            }
            return ack(msg, AckKind::Ack).await;
        }
        tracing::warn!("job_id already used by another job; refused");
        let error = ErrorBody {
            code: ErrorCode::InvalidJob,
            message: "job_id: already used by another job; publish this job with a new id".into(),
            retryable: false,
        };
        let refusal = ResultEvent::failure(envelope, kind, error, &self.worker_id, received_at);
        if let Some(reply_to) = &envelope.reply_to {
            match encode_result(&refusal, || self.outbox.max_payload()) {
                Ok(payload) => self.outbox.publish_live(reply_to, payload).await,
                Err(e) => tracing::error!(error = %e, "cannot encode the refusal"),
            }
        }
        ack(msg, AckKind::Term).await
    }
}

/// Whether `job` asks for the batch lane.
fn batched(job: &Job) -> bool {
    matches!(&job.body, JobBody::Generate(req) if req.service_tier == crate::contract::ServiceTier::Batch)
}

/// What a job's calls cost (those with a known price) and their tokens, for its budgets.
fn spend_of(attempts: &[AttemptRecord]) -> (f64, u64) {
    attempts.iter().fold((0.0, 0), |(usd, tokens), a| {
        (
            usd + a.cost_usd.unwrap_or(0.0),
            tokens.saturating_add(a.input_tokens.saturating_add(a.output_tokens)),
        )
    })
}

async fn ack(msg: &impl JobMessage, kind: AckKind) -> Disposal {
    let disposal = match kind {
        AckKind::Term => Disposal::Terminated,
        AckKind::Nak(_) => Disposal::Requeued,
        _ => Disposal::Acked,
    };
    if let Err(e) = msg.settle(kind).await {
        // The message will be redelivered after ack_wait and answered from the stored result.
        tracing::warn!(error = %e, "acknowledging the job message failed");
    }
    disposal
}

/// The span of one delivery of a job: a child of the publisher's span when the message
/// carries a W3C `traceparent`.
fn job_span(
    env: &Envelope,
    kind: JobKind,
    delivered: i64,
    traceparent: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "job",
        job_id = %env.job_id,
        trace_id = %env.trace_id,
        tenant = %env.tenant,
        kind = kind.as_str(),
        delivered,
    );
    if let Some(parent) = traceparent {
        crate::telemetry::continue_trace(&span, parent);
    }
    span
}
