//! The provider fallback chain: routing, retries, fallback and deadlines for one job.
//!
//! A plain loop over the planned targets (`provider:model`). Each target first gets the
//! request fitted to its model's context window (`crate::context`; one that cannot take it
//! is skipped without a call, and if none can the job is `context_too_long`). It is tried, and a
//! transient failure retried with backoff (backon's exponential policy with jitter; the
//! provider's Retry-After wins when longer, capped, and never past the job's deadline). A
//! non-retryable failure moves to the next target at once; a final one (content filter) ends
//! the job. Every call becomes an [`AttemptRecord`]; text is handed to a [`DeltaSink`] tagged
//! with its attempt number as it arrives. The chain knows nothing about NATS.
//!
//! Per attempt (`attempt`: one call, consumed to its end) it enforces: the first-token limit (first *text*, not first byte), the stall
//! limit (silence between texts), and the job deadline. A cancellation (the job's
//! `CancellationToken`) ends any wait at once: a call in flight is dropped (its connection
//! closed) and recorded with estimated usage, and the job ends `cancelled`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RouteEntry, Strategy};
use crate::context::{self, Fit, TooLong};
use crate::contract::ErrorCode;
use crate::contract::GenerateRequest;
use crate::contract::Trimmed;
use crate::contract::quote;
use crate::contract::{AttemptRecord, ErrorBody};
use crate::health::Health;
use crate::job::{Catalog, Job};
use crate::pricing::PriceBook;
use crate::providers::{Provider, Registry, Usage};
use tracing::Instrument as _;

/// Who produced a piece of text.
#[derive(Debug, Clone, Copy)]
pub struct AttemptMeta<'a> {
    pub attempt: u32,
    pub provider: &'a str,
    pub model: &'a str,
}

/// Receives text as it arrives (the reply module publishes it as chunk events). A sink may
/// hold text back to send several deltas as one event: it then names the latest time the text
/// must go out ([`DeltaSink::flush_at`]), and the chain calls [`DeltaSink::flush`] by then and
/// at the end of every attempt.
pub trait DeltaSink: Send {
    fn delta(&mut self, meta: AttemptMeta<'_>, text: &str) -> impl Future<Output = ()> + Send;
    /// A piece of a streamed tool call (after any held-back text, which it flushes).
    fn tool_call(
        &mut self,
        meta: AttemptMeta<'_>,
        chunk: &crate::contract::ToolCallChunk,
    ) -> impl Future<Output = ()> + Send {
        let _ = (meta, chunk);
        async {}
    }
    /// When held-back text must be sent, if any is held.
    fn flush_at(&self) -> Option<Instant> {
        None
    }
    /// Send any held-back text now.
    fn flush(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A sink that drops text (health probes, tests).
pub(crate) struct NoSink;

impl DeltaSink for NoSink {
    async fn delta(&mut self, _: AttemptMeta<'_>, _: &str) {}
}

/// What a provider call sends: a generation request, or a batch of embedding inputs.
#[derive(Clone, Copy)]
pub enum Call<'a> {
    Generate(&'a GenerateRequest),
    Embed(&'a [String]),
    Image(&'a crate::contract::ImageRequest),
}

/// Asked before every provider call of a job (the worker reserves the tenant's budget for
/// the call's worst case there): an error ends the job with it, without the call; a
/// `max_tokens` sends the generation call with that lower limit (what the budget has room
/// for).
pub trait CallGate: Sync {
    /// `attempts`: the job's calls so far (what they cost is already spent).
    fn before_call(
        &self,
        target: &Target,
        call: Call<'_>,
        attempts: &[AttemptRecord],
    ) -> impl Future<Output = Result<Option<u32>, ErrorBody>> + Send;
}

/// A gate only when there is one.
impl<G: CallGate> CallGate for Option<&G> {
    async fn before_call(
        &self,
        target: &Target,
        call: Call<'_>,
        attempts: &[AttemptRecord],
    ) -> Result<Option<u32>, ErrorBody> {
        match self {
            Some(gate) => gate.before_call(target, call, attempts).await,
            None => Ok(None),
        }
    }
}

/// Every call may go ahead (no budgets).
pub struct Open;

impl CallGate for Open {
    async fn before_call(
        &self,
        _: &Target,
        _: Call<'_>,
        _: &[AttemptRecord],
    ) -> Result<Option<u32>, ErrorBody> {
        Ok(None)
    }
}

/// What bounds a job's calls: its deadline, its cancellation, the gate every call passes.
pub struct Bounds<'a, G> {
    pub deadline: Instant,
    pub cancel: &'a CancellationToken,
    pub gate: &'a G,
}

/// One planned call target.
#[derive(Clone)]
pub struct Target {
    pub provider: Arc<Provider>,
    pub model: String,
}

/// The output of the successful attempt.
#[derive(Debug, Clone)]
pub struct Success {
    pub attempt: u32,
    pub provider: String,
    pub model: String,
    pub output: String,
    /// The tool calls of the answer, validated against the job's tools.
    pub tool_calls: Vec<crate::contract::ToolCall>,
    /// With a JSON `response_format`: the answer parsed (and validated against its schema).
    pub json: Option<serde_json::Value>,
    pub finish_reason: String,
    pub usage: Usage,
    /// What context fitting removed to make the request fit this attempt's model.
    pub context_trimmed: Option<Trimmed>,
}

/// Everything the chain did for one job.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub attempts: Vec<AttemptRecord>,
    pub result: Result<Success, ErrorBody>,
}

/// An ordered route; an entry without a model means the provider's default model.
type Route = Vec<RouteEntry>;

/// Routes and providers, built once from configuration.
#[derive(Clone)]
pub struct Chain {
    registry: Registry,
    routes: Arc<BTreeMap<String, Route>>,
    strategies: Arc<BTreeMap<String, Strategy>>,
    /// Routes whose jobs may pin a provider the route does not list.
    pin_any: Arc<[String]>,
    /// Most text one attempt may produce (`limits.max_output_bytes`).
    max_output_bytes: usize,
    pub(crate) health: Health,
    prices: PriceBook,
    /// Image URLs the worker may fetch itself (`limits.image_url_hosts`).
    images: Arc<images::ImageFetcher>,
}

impl Chain {
    pub fn new(config: &Config, registry: Registry, prices: PriceBook, health: Health) -> Self {
        Self::with_routes(&config.routes, config, registry, prices, health)
    }

    /// A chain over other routes (embedding jobs use `embed_routes`).
    pub fn with_routes(
        routes: &BTreeMap<String, Route>,
        config: &Config,
        registry: Registry,
        prices: PriceBook,
        health: Health,
    ) -> Self {
        Self {
            registry,
            routes: Arc::new(routes.clone()),
            strategies: Arc::new(config.strategies.clone()),
            pin_any: config.pin_any_provider.clone().into(),
            max_output_bytes: config.limits.max_output_bytes,
            health,
            prices,
            images: Arc::new(images::ImageFetcher::new(&config.limits)),
        }
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The route a task type selects: its own, else `default`.
    fn route_name<'a>(&self, task_type: Option<&'a str>) -> &'a str {
        task_type
            .filter(|t| self.routes.contains_key(*t))
            .unwrap_or("default")
    }

    /// What decides which models may answer `job`: its route (name and entries, as
    /// configured) and its pins. Part of the response cache's key: a changed route is a new
    /// key.
    pub(crate) fn cache_scope(&self, job: &Job) -> String {
        let task = self.route_name(job.envelope.task_type.as_deref());
        let mut scope = format!("route={task};");
        for e in self.routes.get(task).map(Vec::as_slice).unwrap_or_default() {
            let default_model = self
                .registry
                .get(&e.provider)
                .and_then(|p| p.default_model.clone());
            scope.push_str(&e.provider);
            scope.push(':');
            scope.push_str(
                e.model
                    .as_deref()
                    .or(default_model.as_deref())
                    .unwrap_or("*"),
            );
            scope.push(',');
        }
        scope.push_str(&format!(
            ";pin={}:{}",
            job.provider.as_deref().unwrap_or("-"),
            job.model.as_deref().unwrap_or("-")
        ));
        scope
    }

    /// The ordered targets for a job: its route (by task type, else `default`), with the job's
    /// pinned provider/model first and the route's other entries as its fallbacks. A model
    /// given without a provider applies to the route's first entry.
    pub fn plan(&self, job: &Job) -> Vec<Target> {
        let task = self.route_name(job.envelope.task_type.as_deref());
        let strategy = self.strategies.get(task).copied().unwrap_or_default();
        let route = self.routes.get(task).map(Vec::as_slice).unwrap_or_default();
        let listed = route
            .iter()
            .map(|e| (e.provider.as_str(), e.model.as_deref()));
        let mut entries: Vec<(&str, Option<&str>)> = Vec::with_capacity(route.len() + 1);
        let pinned = job.provider.is_some() || job.model.is_some();
        match (job.provider.as_deref(), job.model.as_deref()) {
            (Some(p), model) => {
                let model = model.or_else(|| {
                    route
                        .iter()
                        .find(|e| e.provider == p)
                        .and_then(|e| e.model.as_deref())
                });
                entries.push((p, model));
                entries.extend(listed);
            }
            (None, Some(m)) => {
                let mut listed = listed;
                if let Some((p, _)) = listed.next() {
                    entries.push((p, Some(m)));
                }
                entries.extend(listed);
            }
            (None, None) => entries.extend(listed),
        }
        let mut targets: Vec<Target> = Vec::with_capacity(entries.len());
        for (p, m) in entries {
            let Some(provider) = self.registry.get(p) else {
                continue;
            };
            // Config validation and the job decoder make sure a model is known.
            let Some(model) = m.or(provider.default_model.as_deref()) else {
                continue;
            };
            if !targets
                .iter()
                .any(|t| t.provider.name == p && t.model == model)
            {
                targets.push(Target {
                    provider: provider.clone(),
                    model: model.to_string(),
                });
            }
        }
        // A pinned entry stays first; the strategy orders the rest (stable: ties keep order).
        let fixed = usize::from(pinned).min(targets.len());
        let rest = &mut targets[fixed..];
        match strategy {
            Strategy::Ordered => {}
            Strategy::Cheapest => rest.sort_by(|a, b| {
                let rate = |t: &Target| self.prices.current_rate(&t.provider.name, &t.model);
                match (rate(a), rate(b)) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                }
            }),
            Strategy::Fastest => rest.sort_by(|a, b| {
                // Untried entries first (0), so every entry gets measured.
                let ttft = |t: &Target| {
                    self.health
                        .ewma_ttft_ms(&t.provider.name, &t.model)
                        .unwrap_or(0.0)
                };
                ttft(a).total_cmp(&ttft(b))
            }),
            // Highest rank first; unranked last (sort_by_key is stable: ties keep order).
            Strategy::BestQuality => rest.sort_by_key(|t| {
                std::cmp::Reverse(t.provider.quality(&t.model).map_or(0, |q| u64::from(q) + 1))
            }),
        }
        targets
    }

    /// Run a generation job through its chain until one attempt succeeds, the chain is
    /// exhausted, or `deadline` passes.
    pub async fn generate<S: DeltaSink, G: CallGate>(
        &self,
        job: &Job,
        req: &GenerateRequest,
        sink: &mut S,
        bounds: Bounds<'_, G>,
    ) -> Outcome {
        let Bounds {
            deadline,
            cancel,
            gate,
        } = bounds;
        let targets = self.plan(job);
        let mut attempts = attempt_log();
        let mut skipped: Vec<String> = Vec::new();
        let mut too_long: Vec<(String, TooLong)> = Vec::new();
        // Entries whose model cannot take the job, and what they lack.
        let mut unable: Vec<String> = Vec::new();
        let mut timed_out = false;
        let needs = req.needs();
        // The job with its image URLs fetched, for entries that take only bytes; fetched the
        // first time such an entry comes up.
        let inlined = tokio::sync::OnceCell::new();
        'targets: for target in &targets {
            let mut source = req;
            if !needs.is_plain() {
                let caps = target.provider.capabilities(&target.model);
                let mut missing = caps.missing(needs);
                if missing == ["image URLs"] && self.images.may_fetch_all(req) {
                    match inlined
                        .get_or_init(|| self.images.inline(req, deadline))
                        .await
                    {
                        Ok(fetched) => {
                            source = fetched;
                            missing.clear();
                        }
                        Err(e) => missing = vec![e.as_str()],
                    }
                }
                if !missing.is_empty() {
                    unable.push(format!(
                        "{}:{} ({})",
                        target.provider.name,
                        target.model,
                        missing.join(", ")
                    ));
                    continue 'targets;
                }
            }
            let (sent, trimmed) = match fit(target, source).await {
                Ok(fitted) => fitted,
                Err(t) => {
                    too_long.push((format!("{}:{}", target.provider.name, target.model), t));
                    continue 'targets;
                }
            };
            let req = &*sent;
            let mut backoff = retry_delays(&target.provider);
            loop {
                // The budget may allow this call less output than the job asked for.
                let lowered;
                let req = match gate
                    .before_call(target, Call::Generate(req), &attempts)
                    .await
                {
                    Ok(None) => req,
                    Ok(Some(max_tokens)) => {
                        let mut r = req.clone();
                        r.options.max_tokens = Some(max_tokens);
                        lowered = r;
                        &lowered
                    }
                    Err(error) => {
                        return Outcome {
                            attempts,
                            result: Err(error),
                        };
                    }
                };
                let admitted = match self
                    .admit(target, deadline, cancel, &attempts, &mut skipped)
                    .await
                {
                    Ok(admitted) => admitted,
                    Err(Refused::NextTarget) => continue 'targets,
                    Err(Refused::TimedOut) => {
                        timed_out = true;
                        break 'targets;
                    }
                    Err(Refused::Cancelled) => {
                        return Outcome {
                            attempts,
                            result: Err(cancelled()),
                        };
                    }
                };
                let span = attempt_span(target, admitted.number);
                let (record, result) = attempt(
                    target,
                    admitted.number,
                    req,
                    deadline,
                    cancel,
                    self.max_output_bytes,
                    sink,
                )
                .instrument(span.clone())
                .await;
                end_attempt_span(&span, &record);
                match self.settle(
                    target,
                    record,
                    result,
                    &mut backoff,
                    deadline,
                    &mut attempts,
                ) {
                    Settled::Done(mut success) => {
                        success.context_trimmed = trimmed;
                        return Outcome {
                            attempts,
                            result: Ok(success),
                        };
                    }
                    Settled::RetryIn(delay) => {
                        if !wait_retry(delay, cancel).await {
                            return Outcome {
                                attempts,
                                result: Err(cancelled()),
                            };
                        }
                    }
                    Settled::NextTarget => continue 'targets,
                    Settled::TimedOut => {
                        timed_out = true;
                        break 'targets;
                    }
                    Settled::Fail(error) => {
                        return Outcome {
                            attempts,
                            result: Err(error),
                        };
                    }
                }
            }
        }
        let nothing_sent = attempts.is_empty() && skipped.is_empty() && !timed_out;
        let error = match too_long.iter().max_by_key(|(_, t)| t.window) {
            // No entry of the route takes what the job needs: nothing was sent.
            _ if nothing_sent && !unable.is_empty() && too_long.is_empty() => ErrorBody {
                code: ErrorCode::Unsupported,
                message: format!(
                    "no entry of the route can take the job: {}",
                    unable.join("; ")
                ),
                retryable: false,
            },
            // No model of the route can take the prompt: nothing was sent.
            Some((name, t)) if nothing_sent => ErrorBody {
                code: ErrorCode::ContextTooLong,
                message: format!(
                    "no model of the route can take it: {name} has the largest window: {}",
                    t.describe()
                ),
                retryable: false,
            },
            _ => {
                let mut error = chain_error(&attempts, &skipped, timed_out, targets.is_empty());
                if !too_long.is_empty() {
                    let names: Vec<&str> = too_long.iter().map(|(n, _)| n.as_str()).collect();
                    error.message.push_str(&format!(
                        "; not sent (context too long): {}",
                        names.join(", ")
                    ));
                }
                if !unable.is_empty() {
                    error.message.push_str(&format!(
                        "; not sent (cannot take the job): {}",
                        unable.join("; ")
                    ));
                }
                error
            }
        };
        Outcome {
            attempts,
            result: Err(error),
        }
    }
}

/// Prompts larger than this are fitted on a blocking thread (counting ~100k tokens takes
/// ~15 ms of CPU, which an async worker thread should not spend).
const FIT_INLINE_BYTES: usize = 64 * 1024;

/// `req` as it fits `target`'s model ([`crate::context`]), and what was removed; why not
/// when it cannot fit.
async fn fit<'r>(
    target: &Target,
    req: &'r GenerateRequest,
) -> Result<(std::borrow::Cow<'r, GenerateRequest>, Option<Trimmed>), TooLong> {
    use std::borrow::Cow;
    let Some(window) = target.provider.context_window(&target.model) else {
        return Ok((Cow::Borrowed(req), None));
    };
    let fitted = if context::prompt_bytes(req) > FIT_INLINE_BYTES {
        let owned = req.clone();
        tokio::task::spawn_blocking(move || context::fit(&owned, window))
            .await
            .unwrap_or(Fit::AsIs)
    } else {
        context::fit(req, window)
    };
    match fitted {
        Fit::AsIs => Ok((Cow::Borrowed(req), None)),
        Fit::Trimmed(sent, trimmed) => {
            tracing::debug!(?trimmed, model = %target.model, "context fitted to the window");
            Ok((Cow::Owned(*sent), Some(trimmed)))
        }
        Fit::TooLong(t) => Err(t),
    }
}

impl Catalog for Chain {
    /// A job may pin a provider of its route (any configured one where the route is listed in
    /// `pin_any_provider`), and a model the provider's `models` allow-list admits. A model
    /// without a provider applies to the route's first entry, so that entry's list decides.
    fn check_pin(
        &self,
        task_type: Option<&str>,
        provider: Option<&str>,
        model: Option<&str>,
    ) -> Result<(), String> {
        let task = self.route_name(task_type);
        let route = self.routes.get(task).map(Vec::as_slice).unwrap_or_default();
        let name = match provider {
            Some(p) => {
                if !self.registry.contains(p) {
                    return Err(format!("provider: unknown provider {}", quote(p)));
                }
                let in_route = route.iter().any(|e| e.provider == p);
                if !in_route && !self.pin_any.iter().any(|r| r == task) {
                    return Err(format!(
                        "provider: {} is not in route '{task}' (list the route in pin_any_provider to allow it)",
                        quote(p)
                    ));
                }
                p
            }
            None => match route.first() {
                Some(e) => e.provider.as_str(),
                None => return Ok(()),
            },
        };
        match (model, self.registry.get(name)) {
            (Some(m), Some(p)) if !p.allows_model(m) => Err(format!(
                "model: {} is not allowed for provider '{name}'",
                quote(m)
            )),
            (None, Some(p))
                if p.default_model.is_none()
                    && !route
                        .iter()
                        .any(|e| e.provider == name && e.model.is_some()) =>
            {
                Err(format!(
                    "model: provider '{name}' has no default model here; name one"
                ))
            }
            _ => Ok(()),
        }
    }
}

mod attempt;
mod batched;
mod call;
mod images;
mod output;
mod probe;
mod steps;
#[cfg(test)]
mod tests;

use attempt::attempt;
pub(crate) use call::{attempt_error, whole_answer};
pub(crate) use steps::{
    Refused, Settled, attempt_log, cancelled, cancelled_call, chain_error, retry_delays, wait_retry,
};

/// The span of one provider call (exported as a child of the job's span).
pub(crate) fn attempt_span(target: &Target, number: u32) -> tracing::Span {
    if !crate::telemetry::exporting() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "attempt",
        provider = %target.provider.name,
        model = %target.model,
        attempt = number,
        error_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Record a call's outcome on its span.
pub(crate) fn end_attempt_span(span: &tracing::Span, record: &AttemptRecord) {
    if let Some(e) = &record.error {
        span.record("error_code", e.code.as_str());
        span.record("otel.status_code", "ERROR");
    }
}
