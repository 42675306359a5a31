//! Providers: one module per wire protocol, each turning a [`GenerateRequest`] into a stream of
//! [`ProviderEvent`]s (text deltas, usage, finish reason) and classifying its own errors into
//! [`ProviderError`]s. Providers publish nothing and know nothing of retries or fallback.
//!
//! The [`Provider`] enum is chosen by the config's `type`; [`Registry`] holds them by name.
//!
//! Contract every provider stream keeps: it ends `Ok` only after a finish signal; a body that
//! ends before one yields a `truncated` error as its last item.

pub(crate) mod anthropic;
pub mod batch;
pub mod capabilities;
#[cfg(test)]
pub(crate) mod fixtures;
pub(crate) mod gemini;
mod helpers;
pub(crate) mod ollama;
pub(crate) mod openai;
pub(crate) mod openai_batch;
mod openai_images;
pub mod pictures;
pub mod quality;
#[cfg(test)]
pub(crate) mod scripted;
pub(crate) mod sse;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

use crate::config::{Api, Config, EmbedBatching, LimitsConfig, ProviderConfig};
use crate::contract::GenerateRequest;
use crate::contract::{ErrorCode, TokenClasses};
use crate::error::ProviderError;

/// What a provider stream yields, in order: deltas, then `Finish`, possibly `Usage` anywhere.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    Delta(String),
    /// A piece of a tool call: its id and name first, then fragments of its arguments text.
    ToolCall(crate::contract::ToolCallChunk),
    Usage(Usage),
    Finish(FinishReason),
}

/// Why an answer ended, each provider's own reason mapped onto the contract's `finish_reason`
/// (a refusal is not a reason but a `content_filtered` error). Reasons a provider adds later
/// pass through by name, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished (or hit a stop sequence).
    Stop,
    /// The output-token limit (or the context window) cut the answer.
    Length,
    /// The model asked for a tool.
    ToolCalls,
    Other(String),
}

impl FinishReason {
    /// The contract's name: `stop`, `length`, `tool_calls`, or the provider's own.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Other(name) => name,
        }
    }

    /// A reason no mapping knows, kept by name.
    pub(crate) fn other(name: &str) -> Self {
        FinishReason::Other(name.to_ascii_lowercase())
    }
}

/// Token counts as the provider reported them: every prompt token in `input_tokens`, every
/// completion token in `output_tokens`, and the billed classes as parts of those.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub classes: TokenClasses,
}

/// The most tokens one call is believed to have used: a provider reporting more is clamped,
/// so absurd counts cannot overflow sums (or Postgres' bigint) downstream.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000;

impl Usage {
    /// These counts, each clamped to [`MAX_REPORTED_TOKENS`].
    pub fn clamped(self) -> Self {
        let input_tokens = self.input_tokens.min(MAX_REPORTED_TOKENS);
        let output_tokens = self.output_tokens.min(MAX_REPORTED_TOKENS);
        Self {
            input_tokens,
            output_tokens,
            classes: self.classes.within(input_tokens, output_tokens),
        }
    }

    /// Plain counts, no classes.
    pub fn plain(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            classes: TokenClasses::default(),
        }
    }
}

/// Longest retry hint kept from a provider (the chain falls back above a minute anyway); the
/// clamp keeps absurd values (`Retry-After: 1e20`) from overflowing a duration or an instant.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(24 * 3600);

/// A provider's number of seconds as a duration: `None` when negative or not a number,
/// clamped to [`MAX_RETRY_HINT`]. Never panics.
pub fn hint_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    let d = Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_HINT);
    Some(d.min(MAX_RETRY_HINT))
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ProviderEvent, ProviderError>> + Send>>;

/// The answer to one embedding call: one vector per input, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// As reported; `None` when the provider reports no usage (Gemini).
    pub input_tokens: Option<u64>,
    pub http_status: Option<u16>,
}

/// The answer to one call: the HTTP status it got (if HTTP) and the event stream.
pub struct Call {
    pub http_status: Option<u16>,
    pub events: EventStream,
}

/// Per-provider timing limits the chain enforces around a call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_token: Duration,
    pub stall: Duration,
}

/// Retry policy knobs for one provider.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

pub(crate) enum ProviderImpl {
    OpenAi(openai::OpenAi),
    Anthropic(anthropic::Anthropic),
    Gemini(gemini::Gemini),
    Ollama(ollama::Ollama),
    #[cfg(test)]
    Scripted(std::sync::Arc<scripted::Scripted>),
}

/// One configured provider.
pub struct Provider {
    pub name: String,
    pub default_model: Option<String>,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    /// Per-process concurrency and request-rate limits: excess work waits here.
    pub limiter: Limiter,
    /// Kept only to scrub it from provider error messages.
    key: Option<secrecy::SecretString>,
    /// How embedding requests are batched; `None` for protocols without an embeddings API.
    pub embedding: Option<EmbedBatching>,
    /// Models a job may pin (exact, or `prefix*`); `None` allows any. Route models always go.
    models: Option<Vec<String>>,
    /// Configured context windows by model (exact, `prefix*`, `*`).
    context_windows: BTreeMap<String, u32>,
    /// The protocol, and what models take beyond text as configured (`capabilities`).
    api: Api,
    capabilities: BTreeMap<String, Vec<crate::config::Capability>>,
    /// Quality ranks as configured (`quality`).
    quality: BTreeMap<String, u32>,
    /// OpenAI's service tiers and Batch API (`providers.<name>.service_tiers`).
    service_tiers: bool,
    imp: ProviderImpl,
}

/// Queues calls beyond a provider's `max_concurrent` and `requests_per_minute`.
pub struct Limiter {
    concurrency: Option<Arc<tokio::sync::Semaphore>>,
    /// Minimum gap between call starts, and the earliest start of the next call.
    spacing: Option<(Duration, tokio::sync::Mutex<tokio::time::Instant>)>,
}

impl Limiter {
    pub fn new(max_concurrent: Option<usize>, requests_per_minute: Option<u32>) -> Self {
        Self {
            concurrency: max_concurrent
                .filter(|n| *n > 0)
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            spacing: requests_per_minute.filter(|n| *n > 0).map(|rpm| {
                let gap = Duration::from_secs_f64(60.0 / f64::from(rpm));
                (gap, tokio::sync::Mutex::new(tokio::time::Instant::now()))
            }),
        }
    }

    /// Wait for capacity; the permit (if any) is held for the call.
    pub async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = match &self.concurrency {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some((gap, next)) = &self.spacing {
            let at = {
                let mut next = next.lock().await;
                let at = (*next).max(tokio::time::Instant::now());
                *next = at + *gap;
                at
            };
            tokio::time::sleep_until(at).await;
        }
        permit
    }
}

impl Provider {
    pub fn from_config(
        name: &str,
        cfg: &ProviderConfig,
        http: &Http,
    ) -> Result<Self, ProviderError> {
        let imp = match &cfg.api {
            Api::Openai {
                max_tokens_field, ..
            } => ProviderImpl::OpenAi(openai::OpenAi::new(cfg, *max_tokens_field, http.clone())?),
            Api::Anthropic { default_max_tokens } => ProviderImpl::Anthropic(
                anthropic::Anthropic::new(cfg, *default_max_tokens, http.clone())?,
            ),
            Api::Gemini { .. } => ProviderImpl::Gemini(gemini::Gemini::new(cfg, http.clone())?),
            Api::Ollama { .. } => ProviderImpl::Ollama(ollama::Ollama::new(cfg, http.clone())?),
        };
        Ok(Self {
            name: name.to_string(),
            default_model: cfg.default_model.clone(),
            timeouts: Timeouts {
                first_token: Duration::from_millis(cfg.first_token_timeout_ms),
                stall: Duration::from_millis(cfg.stall_timeout_ms),
            },
            retry: RetryPolicy {
                max_retries: cfg.max_retries,
                min_delay: Duration::from_millis(cfg.retry_min_delay_ms),
                max_delay: Duration::from_millis(cfg.retry_max_delay_ms),
            },
            limiter: Limiter::new(cfg.max_concurrent, cfg.requests_per_minute),
            key: cfg.api_key.clone(),
            embedding: cfg.api.embedding(),
            models: cfg.models.clone(),
            context_windows: cfg.context_windows.clone(),
            api: cfg.api.clone(),
            capabilities: cfg.capabilities.clone(),
            quality: cfg.quality.clone(),
            service_tiers: cfg.service_tiers,
            imp,
        })
    }

    /// Start one generation call. Errors before the first byte of the answer are returned here;
    /// errors after it arrive inside the stream. The protocol modules get the request with its
    /// context block joined to the system prompt (Anthropic joins it itself).
    pub async fn generate(
        &self,
        model: &str,
        req: &GenerateRequest,
    ) -> Result<Call, ProviderError> {
        let original = req;
        let req = &*req.as_sent();
        match &self.imp {
            ProviderImpl::OpenAi(p) => p.generate(model, req).await,
            // Anthropic sends the context apart from a system prompt marked for caching.
            ProviderImpl::Anthropic(p) => p.generate(model, original).await,
            ProviderImpl::Gemini(p) => p.generate(model, req).await,
            ProviderImpl::Ollama(p) => p.generate(model, req).await,
            #[cfg(test)]
            ProviderImpl::Scripted(p) => p.generate().await,
        }
    }

    /// One embedding call for a batch of inputs (already sized by the caller).
    pub async fn embed(
        &self,
        model: &str,
        inputs: &[String],
        dimensions: Option<u32>,
    ) -> Result<Embedded, ProviderError> {
        let embedded = match &self.imp {
            ProviderImpl::OpenAi(p) => p.embed(model, inputs, dimensions).await?,
            ProviderImpl::Gemini(p) => p.embed(model, inputs, dimensions).await?,
            ProviderImpl::Ollama(p) => p.embed(model, inputs, dimensions).await?,
            #[cfg(test)]
            ProviderImpl::Scripted(_) => {
                return Err(ProviderError::new(
                    ErrorCode::BadRequest,
                    "scripted providers do not embed",
                ));
            }
            ProviderImpl::Anthropic(_) => {
                return Err(ProviderError::new(
                    ErrorCode::BadRequest,
                    "Anthropic has no embeddings API",
                ));
            }
        };
        if embedded.vectors.len() != inputs.len() {
            return Err(ProviderError::new(
                ErrorCode::MalformedResponse,
                format!(
                    "{} vectors for {} inputs",
                    embedded.vectors.len(),
                    inputs.len()
                ),
            ));
        }
        Ok(embedded)
    }

    /// A provider message with this provider's key (and anything shaped like an API key)
    /// removed: some providers quote the key, masked or not, in auth errors.
    /// Make the pictures an image job asks for (OpenAI's Images API and compatible servers;
    /// Gemini's image output), checked to be at most `req.n` real pictures.
    pub async fn images(
        &self,
        model: &str,
        req: &crate::contract::ImageRequest,
    ) -> Result<pictures::Pictures, ProviderError> {
        let answer = match &self.imp {
            ProviderImpl::OpenAi(p) => p.images(model, req).await?,
            ProviderImpl::Gemini(p) => p.images(model, req).await?,
            ProviderImpl::Anthropic(_) | ProviderImpl::Ollama(_) => {
                return Err(ProviderError::new(
                    ErrorCode::Unsupported,
                    "this provider's protocol does not generate images",
                ));
            }
            #[cfg(test)]
            ProviderImpl::Scripted(_) => {
                return Err(ProviderError::new(
                    ErrorCode::BadRequest,
                    "scripted providers do not generate images",
                ));
            }
        };
        pictures::check(&answer, req.n)?;
        Ok(answer)
    }

    pub fn redact(&self, message: &str) -> String {
        helpers::redact(message, self.key.as_ref())
    }

    /// Whether the protocol streams about one token per text event (OpenAI-compatible
    /// servers and Ollama do; Anthropic and Gemini send larger pieces): then the events of a
    /// stream cut before its usage count its output tokens.
    pub fn one_token_per_event(&self) -> bool {
        match &self.imp {
            ProviderImpl::OpenAi(_) | ProviderImpl::Ollama(_) => true,
            ProviderImpl::Anthropic(_) | ProviderImpl::Gemini(_) => false,
            #[cfg(test)]
            ProviderImpl::Scripted(_) => true,
        }
    }

    /// How `model` takes prompts on this provider: the configured window (an exact name, else
    /// the longest `prefix*`, else `*`), else the built-in table; `None` when unknown (the
    /// request is then sent as it is).
    pub fn context_window(&self, model: &str) -> Option<crate::context::Window> {
        let configured = crate::config::by_model(&self.context_windows, model).copied();
        let tokens = configured.or_else(|| crate::context::builtin(model))?;
        Some(crate::context::Window {
            tokens,
            counter: crate::tokens::Counter::for_model(model),
            default_reserve: match &self.imp {
                ProviderImpl::Anthropic(a) => Some(a.default_max_tokens()),
                _ => None,
            },
        })
    }

    /// What `model` here takes beyond text (`capabilities`).
    pub fn capabilities(&self, model: &str) -> capabilities::Caps {
        capabilities::resolve(
            &self.api,
            crate::config::by_model(&self.capabilities, model),
            model,
        )
    }

    /// How good `model` here is (`quality`, else the built-in table; `None`: unranked).
    pub fn quality(&self, model: &str) -> Option<u32> {
        crate::config::by_model(&self.quality, model)
            .copied()
            .or_else(|| quality::builtin(model))
    }

    /// The tier a call for a job asking `asked` is made at: `flex` where the provider has
    /// service tiers, else standard (`batch` is not an online call's tier).
    pub fn tier_of(&self, asked: crate::contract::ServiceTier) -> crate::contract::ServiceTier {
        use crate::contract::ServiceTier;
        match asked {
            ServiceTier::Flex if self.service_tiers => ServiceTier::Flex,
            _ => ServiceTier::Standard,
        }
    }

    /// Whether a job may pin `model` on this provider.
    pub fn allows_model(&self, model: &str) -> bool {
        crate::config::model_allowed(self.models.as_deref(), model)
    }
}

/// All configured providers by name.
#[derive(Clone)]
pub struct Registry {
    providers: Arc<BTreeMap<String, Arc<Provider>>>,
}

#[cfg(test)]
impl Registry {
    /// The providers of `config`, those named in `scripts` answering from their script.
    pub(crate) fn scripted(
        config: &Config,
        scripts: &[(&str, std::sync::Arc<scripted::Scripted>)],
    ) -> Result<Self, ProviderError> {
        let mut providers = (*Self::from_config(config)?.providers).clone();
        for (name, script) in scripts {
            if let Some(p) = providers.get_mut(*name).and_then(Arc::get_mut) {
                p.imp = ProviderImpl::Scripted(script.clone());
            }
        }
        Ok(Self {
            providers: Arc::new(providers),
        })
    }
}

impl Registry {
    pub fn from_config(config: &Config) -> Result<Self, ProviderError> {
        let max_connect = config
            .providers
            .values()
            .map(|p| p.connect_timeout_ms)
            .max()
            .unwrap_or(5_000);
        let http = Http {
            client: http_client(Duration::from_millis(max_connect))?,
            bounds: Bounds::from_limits(&config.limits),
        };
        let mut providers = BTreeMap::new();
        for (name, cfg) in &config.providers {
            providers.insert(
                name.clone(),
                Arc::new(Provider::from_config(name, cfg, &http)?),
            );
        }
        Ok(Self {
            providers: Arc::new(providers),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }
}

/// The shared, pooled HTTP client. Only a connect timeout: a total timeout would cut long
/// streams; the chain enforces first-token, stall and job deadlines itself. Redirects are not
/// followed: provider APIs answer POSTs directly, following one would re-send a prompt to a
/// place nobody configured, and the redirect layer parsed two URLs per request (~2% of the
/// worker's CPU in `llm-worker bench`). A 3xx is a provider error carrying its status.
pub fn http_client(connect_timeout: Duration) -> Result<reqwest::Client, ProviderError> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ProviderError::new(ErrorCode::Network, format!("HTTP client: {e}")))
}

/// Bounds on what a provider may answer (`[limits]`); going over one fails the attempt with
/// `response_too_large`, and nothing beyond a bound is read into memory.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// A non-streamed body.
    pub max_response_bytes: usize,
    /// One generated picture, decoded (`limits.max_generated_image_bytes`).
    pub max_picture_bytes: usize,
    /// An error body: only this much is read.
    pub max_error_body_bytes: usize,
    /// One SSE event or NDJSON line.
    pub max_line_bytes: usize,
}

impl Bounds {
    pub fn from_limits(l: &LimitsConfig) -> Self {
        Self {
            max_response_bytes: l.max_response_bytes,
            max_picture_bytes: l.max_generated_image_bytes,
            max_error_body_bytes: l.max_error_body_bytes,
            max_line_bytes: l.max_line_bytes,
        }
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Self::from_limits(&LimitsConfig::default())
    }
}

/// The shared, pooled HTTP client and the bounds every provider reads answers with.
#[derive(Clone)]
pub struct Http {
    pub client: reqwest::Client,
    pub bounds: Bounds,
}

impl Http {
    /// Send a request: a transport failure, or an HTTP error status (whose body, up to
    /// `max_error_body_bytes`, the provider's `classify` reads), becomes a [`ProviderError`].
    /// Returns the successful response and status.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
        classify: fn(u16, &str) -> ProviderError,
    ) -> Result<(reqwest::Response, u16), ProviderError> {
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            return Err(http_error(response, classify, self.bounds.max_error_body_bytes).await);
        }
        Ok((response, status))
    }

    /// A whole (non-streamed) body of at most `max_response_bytes`; a larger one is
    /// `response_too_large` (and is not read further), one that breaks off is truncated.
    pub(crate) async fn read_body(
        &self,
        response: reqwest::Response,
    ) -> Result<String, ProviderError> {
        self.read_body_within(response, self.bounds.max_response_bytes)
            .await
    }

    /// The body of an answer carrying `n` pictures as base64: room for `n` of the largest
    /// picture allowed, and for the rest of the JSON.
    pub(crate) async fn read_pictures_body(
        &self,
        response: reqwest::Response,
        n: u32,
    ) -> Result<String, ProviderError> {
        let pictures = self.bounds.max_picture_bytes.saturating_mul(n as usize) / 3 * 4;
        let max = pictures.saturating_add(self.bounds.max_response_bytes);
        self.read_body_within(response, max).await
    }

    pub(crate) async fn read_body_within(
        &self,
        response: reqwest::Response,
        max: usize,
    ) -> Result<String, ProviderError> {
        let too_large = || {
            ProviderError::new(
                ErrorCode::ResponseTooLarge,
                format!("the response body is larger than {max} bytes (limits.max_response_bytes)"),
            )
        };
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let (bytes, more) = read_at_most(response, max).await.map_err(|e| {
            let e = e.without_url();
            ProviderError::new(ErrorCode::Truncated, format!("reading body: {e}"))
        })?;
        if more {
            return Err(too_large());
        }
        Ok(String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// A streamed SSE answer through `decoder`, events bounded by `max_line_bytes`.
    pub(crate) fn sse<D: sse::SseDecoder>(
        &self,
        response: reqwest::Response,
        decoder: D,
    ) -> EventStream {
        sse::decode(response, decoder, self.bounds.max_line_bytes)
    }

    /// The longest line a line-framed answer may have: one event of a stream, or the whole
    /// body of a non-streamed answer.
    pub(crate) fn line_or_body(&self, stream: bool) -> usize {
        if stream {
            self.bounds.max_line_bytes
        } else {
            self.bounds.max_response_bytes
        }
    }
}

/// Up to `max` bytes of a body, and whether it had more (then the rest is not read).
async fn read_at_most(
    mut response: reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = max - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

/// A request that got no HTTP response (connect failure, reset, timeout).
fn transport_error(e: reqwest::Error) -> ProviderError {
    let code = if e.is_connect() && e.is_timeout() {
        ErrorCode::ConnectTimeout
    } else {
        ErrorCode::Network
    };
    // Without the URL: it may carry credentials (`https://user:pass@host`, `?key=`), and the
    // attempt already names the provider. The causes say what actually went wrong.
    let e = e.without_url();
    let mut message = format!("request failed: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    ProviderError::new(code, message)
}

/// An HTTP error response as a [`ProviderError`]: the provider's own `classify` reads the body
/// (its first `max_body` bytes: error pages can be huge); the status is attached, and the retry
/// hint from the body (Gemini's `RetryInfo`) or else from the headers.
pub(crate) async fn http_error(
    response: reqwest::Response,
    classify: fn(u16, &str) -> ProviderError,
    max_body: usize,
) -> ProviderError {
    let status = response.status().as_u16();
    let header_delay = retry_after(response.headers());
    let body = read_at_most(response, max_body)
        .await
        .map(|(bytes, _)| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let err = classify(status, &body).with_status(status);
    let delay = err.retry_after.or(header_delay);
    err.with_retry_after(delay)
}

/// A response body as a byte stream whose errors carry no URL (see [`transport_error`]).
pub(crate) fn body_stream(
    response: reqwest::Response,
) -> std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>> {
    use futures::StreamExt;
    response
        .bytes_stream()
        .map(|r| r.map_err(reqwest::Error::without_url))
        .boxed()
}

/// Parse `retry-after-ms`, then `retry-after` (seconds or an HTTP date).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(hint) = get("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| hint_secs(ms / 1000.0))
    {
        return Some(hint);
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return hint_secs(secs);
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO).min(MAX_RETRY_HINT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn absurd_retry_hints_are_clamped_or_ignored_never_a_panic() {
        for (header, value, expected) in [
            ("retry-after", "1e20", Some(MAX_RETRY_HINT)),
            ("retry-after", "inf", Some(MAX_RETRY_HINT)),
            ("retry-after", "NaN", None),
            ("retry-after", "-5", None),
            (
                "retry-after",
                "Fri, 31 Dec 9999 23:59:59 GMT",
                Some(MAX_RETRY_HINT),
            ),
            ("retry-after-ms", "1e300", Some(MAX_RETRY_HINT)),
            ("retry-after-ms", "-1", None),
            ("retry-after", "18446744073709551616", Some(MAX_RETRY_HINT)),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header, HeaderValue::from_static(value));
            assert_eq!(retry_after(&h), expected, "{header}: {value}");
        }
    }

    #[test]
    fn absurd_token_counts_are_clamped() {
        let u = Usage {
            input_tokens: u64::MAX,
            output_tokens: 7,
            classes: TokenClasses {
                cache_read_tokens: u64::MAX,
                reasoning_tokens: 9,
                ..TokenClasses::default()
            },
        }
        .clamped();
        assert_eq!((u.input_tokens, u.output_tokens), (MAX_REPORTED_TOKENS, 7));
        // A class is never larger than the count it is a part of.
        assert_eq!(u.classes.cache_read_tokens, MAX_REPORTED_TOKENS);
        assert_eq!(u.classes.reasoning_tokens, 7);
    }
}
