//! Decoding and validating one job message: identity first (so even a refused job can be
//! answered and recorded), then the body, the bounds and the pinning rules.

use std::time::Duration;

use chrono::{DateTime, Utc};

use serde::Deserialize;
use uuid::Uuid;

use super::bounds::{
    MAX_STOP_BYTES, check_metadata, check_name, check_prompt_bounds, clip_reason, no_nul, safe_name,
};
use super::wire::{StopWire, WireEmbed, WireEnvelope, WireGenerate, WireImage};
use super::{Delivery, InvalidJob, Job, JobBody, Rules};
use crate::config::LimitsConfig;
use crate::contract::{
    EmbedRequest, Envelope, GenerateOptions, GenerateRequest, ImageRequest, JobKind, Message,
    QUOTE_CHARS, Role, ServiceTier, quote,
};
use crate::trust::check_model_name;

/// Decode and validate one job message.
pub fn decode(
    kind: JobKind,
    payload: &[u8],
    delivery: &Delivery<'_>,
    rules: &Rules<'_>,
) -> Result<Job, Box<InvalidJob>> {
    let limits = rules.limits;
    // Checked before parsing: the size of a message bounds what parsing it costs. Its identity
    // then comes from the transport alone (header, subject), and no reply subject is known.
    if payload.len() > limits.max_job_bytes {
        let (envelope, _) = read_envelope(WireEnvelope::default(), delivery, rules);
        return Err(Box::new(InvalidJob {
            envelope,
            reason: format!(
                "job is {} bytes, more than the limit of {} bytes",
                payload.len(),
                limits.max_job_bytes
            ),
        }));
    }
    // Read the envelope leniently: wrong types in it are reported, not fatal to answering.
    let value: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let wire_env: WireEnvelope = value
        .as_ref()
        .and_then(|v| WireEnvelope::deserialize(v).ok())
        .unwrap_or_default();
    let (envelope, envelope_problem) = read_envelope(wire_env, delivery, rules);
    let fail = |reason: String| {
        Box::new(InvalidJob {
            envelope: envelope.clone(),
            reason,
        })
    };

    let value = match value {
        Some(v @ serde_json::Value::Object(_)) => v,
        Some(_) => return Err(fail("job must be a JSON object".into())),
        None => {
            let err = serde_json::from_slice::<serde_json::Value>(payload).err();
            let detail = err.map(|e| e.to_string()).unwrap_or_default();
            return Err(fail(format!(
                "job is not valid JSON: {}",
                clip_reason(&detail)
            )));
        }
    };
    if let Some(problem) = envelope_problem {
        return Err(fail(problem));
    }
    check_tenant(
        &limits.tenants,
        &envelope.tenant,
        envelope.task_type.as_deref(),
    )
    .map_err(&fail)?;

    // The path names job keys, which can be anything (an unknown `options` key): clipped too.
    let serde_fail = |path: String, e: &serde_json::Error| {
        let mut short: String = path.chars().take(QUOTE_CHARS).collect();
        if short.len() < path.len() {
            short.push('…');
        }
        let short = short.escape_debug();
        fail(format!("{short}: {}", clip_reason(&e.to_string())))
    };
    let (provider, model, timeout_ms, expiry, cache, body) = match kind {
        JobKind::Generate => {
            let w: WireGenerate = serde_path_to_error::deserialize(&value)
                .map_err(|e| serde_fail(e.path().to_string(), e.inner()))?;
            let mut req = generate_request(&w, &limits.bounds).map_err(&fail)?;
            // Under a budget every call's worst case must be known: a job that sets no
            // max_tokens is sent with the tenant's `budget_max_tokens`.
            if req.options.max_tokens.is_none()
                && let Some(policy) = limits.policy(&envelope.tenant)
                && policy.has_budget()
            {
                req.options.max_tokens = Some(policy.budget_max_tokens);
            }
            if req.prompt_cache_key.is_none() && req.cache_breakpoints() > 0 {
                req.prompt_cache_key = Some(prompt_cache_key(
                    &envelope.tenant,
                    envelope.task_type.as_deref(),
                ));
            }
            req.service_tier = w.service_tier.unwrap_or_else(|| {
                let task = envelope.task_type.as_deref().unwrap_or("default");
                limits
                    .tier_task_types
                    .get(task)
                    .copied()
                    .unwrap_or_default()
            });
            // A job that can wait a batch is answered whole, also when it goes online.
            if req.service_tier == ServiceTier::Batch {
                req.stream = false;
            }
            let body = JobBody::Generate(req);
            (
                w.provider,
                w.model,
                w.timeout_ms,
                (w.deadline, w.expires_in_ms),
                w.cache,
                body,
            )
        }
        JobKind::Embed => {
            let w: WireEmbed = serde_path_to_error::deserialize(&value)
                .map_err(|e| serde_fail(e.path().to_string(), e.inner()))?;
            let body = JobBody::Embed(embed_request(&w, &limits.bounds).map_err(&fail)?);
            (
                w.provider,
                w.model,
                w.timeout_ms,
                (w.deadline, w.expires_in_ms),
                w.cache,
                body,
            )
        }
        JobKind::Image => {
            let w: WireImage = serde_path_to_error::deserialize(&value)
                .map_err(|e| serde_fail(e.path().to_string(), e.inner()))?;
            let body = JobBody::Image(image_request(&w, &limits.bounds).map_err(&fail)?);
            (
                w.provider,
                w.model,
                w.timeout_ms,
                (w.deadline, w.expires_in_ms),
                None,
                body,
            )
        }
    };
    let mut expires_at = expires_at(expiry, delivery.published).map_err(&fail)?;
    // A job that can wait a batch still has a deadline: the deployment's default.
    if let JobBody::Generate(req) = &body
        && req.service_tier == ServiceTier::Batch
        && expires_at.is_none()
    {
        let from = delivery.published.unwrap_or_else(Utc::now);
        expires_at = chrono::TimeDelta::from_std(limits.batch_deadline)
            .ok()
            .and_then(|d| from.checked_add_signed(d));
    }
    if let Some(m) = &model {
        check_model_name(m, limits.bounds.max_model_bytes).map_err(&fail)?;
    }
    rules
        .catalog
        .check_pin(
            envelope.task_type.as_deref(),
            provider.as_deref(),
            model.as_deref(),
        )
        .map_err(&fail)?;
    let timeout = match timeout_ms {
        None => limits.default_timeout,
        Some(0) => return Err(fail("timeout_ms: must be positive".into())),
        Some(ms) => {
            let t = Duration::from_millis(ms);
            if t > limits.max_timeout {
                return Err(fail(format!(
                    "timeout_ms: {ms} is above the limit of {}",
                    limits.max_timeout.as_millis()
                )));
            }
            t
        }
    };
    Ok(Job {
        envelope,
        kind,
        provider,
        model,
        timeout,
        expires_at,
        cache,
        body,
    })
}

/// Whether the tenant's policy (its own, else `default`) lets this job in.
fn check_tenant(
    policies: &std::collections::BTreeMap<String, crate::config::TenantPolicy>,
    tenant: &str,
    task_type: Option<&str>,
) -> Result<(), String> {
    let (policy, own) = match policies.get(tenant) {
        Some(p) => (p, true),
        None => match policies.get("default") {
            Some(p) => (p, false),
            None => return Ok(()),
        },
    };
    if policy.refuse {
        return Err(if own {
            format!("tenant: {} is refused by this deployment", quote(tenant))
        } else {
            format!(
                "tenant: {} has no policy here, and tenants without one are refused",
                quote(tenant)
            )
        });
    }
    let task = task_type.unwrap_or("default");
    match &policy.task_types {
        Some(allowed) if !allowed.iter().any(|t| t == task) => Err(format!(
            "task_type: {} is not allowed for tenant {} (allowed: {})",
            quote(task),
            quote(tenant),
            allowed.join(", ")
        )),
        _ => Ok(()),
    }
}

/// The longest `expires_in_ms` taken (30 days): further out is no deadline worth keeping, and
/// the bound keeps time arithmetic from overflowing.
const MAX_EXPIRES_IN_MS: u64 = 30 * 24 * 3600 * 1000;

/// The earlier of `deadline` (RFC 3339) and `published + expires_in_ms`, if either is given.
fn expires_at(
    (deadline, expires_in_ms): (Option<String>, Option<u64>),
    published: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, String> {
    let deadline = match &deadline {
        None => None,
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    format!(
                        "deadline: {} is not an RFC 3339 time ({e})",
                        crate::contract::quote(text)
                    )
                })?
                .with_timezone(&Utc),
        ),
    };
    let relative = match expires_in_ms {
        None => None,
        Some(0) => return Err("expires_in_ms: must be positive".into()),
        Some(ms) if ms > MAX_EXPIRES_IN_MS => {
            return Err(format!(
                "expires_in_ms: {ms} is above the limit of {MAX_EXPIRES_IN_MS} (30 days)"
            ));
        }
        Some(ms) => {
            let from = published.unwrap_or_else(Utc::now);
            let ms = i64::try_from(ms).map_err(|_| "expires_in_ms: too large".to_string())?;
            from.checked_add_signed(chrono::TimeDelta::milliseconds(ms))
        }
    };
    Ok(match (deadline, relative) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// The job's identity from its body and transport. Problems are noted (the first one wins) but
/// an identity is always produced, so even a refused job can be answered and recorded.
fn read_envelope(
    w: WireEnvelope,
    delivery: &Delivery<'_>,
    rules: &Rules<'_>,
) -> (Envelope, Option<String>) {
    let bounds = &rules.limits.bounds;
    use serde_json::Value;
    let mut problem: Option<String> = None;
    let mut note = |p: String| {
        problem.get_or_insert(p);
    };
    let body_id = match w.job_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) => Some(id),
            Err(_) => {
                note(format!("job_id: {} is not a UUID", quote(&s)));
                None
            }
        },
        Some(_) => {
            note("job_id: must be a string (a UUID)".into());
            None
        }
    };
    let header_id = delivery.msg_id.map(|h| (h, Uuid::parse_str(h).ok()));
    // The header is JetStream's dedup key: it must be the job id, so the duplicate window
    // protects every id. Without either, the id is random (never derived from anything a
    // publisher could predict, such as the stream sequence).
    let job_id = match (body_id, header_id) {
        (Some(id), Some((_, Some(h)))) if h == id => id,
        (Some(id), Some((h, _))) => {
            note(format!(
                "job_id: does not match the Nats-Msg-Id header {}",
                quote(h)
            ));
            id
        }
        (Some(id), None) => id,
        (None, Some((_, Some(h)))) => h,
        (None, Some((h, None))) => {
            note(format!(
                "Nats-Msg-Id: {} is not a UUID (the header is the job id)",
                quote(h)
            ));
            Uuid::now_v7()
        }
        (None, None) => Uuid::now_v7(),
    };
    let mut string_field = |name: &str, v: Option<Value>| -> Option<String> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                note(format!("{name}: must be a string"));
                None
            }
        }
    };
    let trace_id = string_field("trace_id", w.trace_id);
    let body_tenant = string_field("tenant", w.tenant);
    let task_type = string_field("task_type", w.task_type);
    let reply_to = string_field("reply_to", w.reply_to);
    // Names are echoed into every event, log line and row: bounded, no control characters
    // (Postgres cannot store NUL). A refused one is still recorded, made safe.
    let mut name = |field: &str, value: String| match check_name(&value, bounds.max_name_bytes) {
        Ok(()) => value,
        Err(why) => {
            note(format!("{field}: {why}"));
            safe_name(&value, bounds.max_name_bytes)
        }
    };
    // A valid W3C traceparent names the trace the job continues; else the body's, else the id.
    let trace_id = match delivery.traceparent.and_then(crate::contract::w3c_trace_id) {
        Some(w3c) => w3c.to_string(),
        None => trace_id.map_or_else(|| job_id.to_string(), |t| name("trace_id", t)),
    };
    let tenant = match delivery.subject_tenant {
        Some(t) => name("tenant (from the subject)", t.to_string()),
        None => name("tenant", body_tenant.unwrap_or_else(|| "default".into())),
    };
    let task_type = task_type.map(|t| name("task_type", t));
    // A refused reply subject is never published to, not even the refusal.
    let reply_to = match reply_to.map(|s| rules.replies.check(&s, &tenant).map(|()| s)) {
        Some(Ok(s)) => Some(s),
        Some(Err(refused)) => {
            note(refused);
            None
        }
        None => None,
    };
    if tenant.is_empty() {
        note("tenant: must not be empty".into());
    }
    // Metadata is echoed into results and stored as jsonb: bounded as echoed, and never
    // echoed at all when refused.
    let metadata = match w.metadata {
        None | Some(Value::Null) => Value::Null,
        Some(m) => match check_metadata(&m, bounds) {
            Ok(()) => m,
            Err(why) => {
                note(format!("metadata: {why}"));
                Value::Null
            }
        },
    };
    (
        Envelope {
            job_id,
            trace_id,
            tenant,
            task_type,
            reply_to,
            metadata,
        },
        problem,
    )
}

fn generate_request(w: &WireGenerate, bounds: &LimitsConfig) -> Result<GenerateRequest, String> {
    let wire_messages = w.messages.as_deref().unwrap_or_default();
    if wire_messages.len() > bounds.max_messages {
        return Err(format!(
            "messages: {} messages, more than the limit of {} (limits.max_messages)",
            wire_messages.len(),
            bounds.max_messages
        ));
    }
    let (listed_system, mut messages) = super::rich::messages(wire_messages, bounds)?;
    let tools = super::rich::tools(w.tools.as_deref().unwrap_or_default(), bounds)?;
    check_prompt_bounds(w, &messages, &tools, bounds)?;
    let mut system = w.system_prompt.clone().filter(|s| !s.is_empty());
    let system_cache = listed_system.cache;
    if let Some(listed) = listed_system.text {
        // System messages in the list join the system prompt, in order.
        let s = system.get_or_insert_with(String::new);
        if !s.is_empty() {
            s.push_str("\n\n");
        }
        s.push_str(&listed);
    }
    let tool_choice = w
        .tool_choice
        .as_ref()
        .map(|c| super::rich::tool_choice(c, &tools))
        .transpose()?;
    let response_format = w
        .response_format
        .as_ref()
        .map(|f| super::rich::response_format(f, bounds))
        .transpose()?;
    if let Some(p) = w.prompt.as_deref().filter(|p| !p.is_empty()) {
        messages.push(Message::text(Role::User, p));
    }
    if messages.is_empty() {
        return Err("prompt: a job needs a non-empty prompt or messages".into());
    }
    // Retrieval context stays apart (most relevant first) until the request is sent: context
    // fitting may drop its last chunks (`GenerateRequest::system_text` joins it).
    let context = w.context.clone().unwrap_or_default();
    let o = &w.options;
    if let Some(t) = o.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("options.temperature: {t:?} is outside 0..=2"));
    }
    if let Some(p) = o.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(format!("options.top_p: {p:?} is outside 0..=1"));
    }
    if let Some(seed) = o.seed
        && seed > i32::MAX as u32
    {
        return Err(format!(
            "options.seed: {seed} is above 2147483647 (the largest seed every provider accepts)"
        ));
    }
    match o.max_tokens {
        Some(0) => return Err("options.max_tokens: must be positive".into()),
        Some(n) if n > bounds.max_output_tokens => {
            return Err(format!(
                "options.max_tokens: {n} is above the limit of {} (limits.max_output_tokens)",
                bounds.max_output_tokens
            ));
        }
        _ => {}
    }
    let stop = match &o.stop {
        None => Vec::new(),
        Some(StopWire::One(s)) => vec![s.clone()],
        Some(StopWire::Many(v)) => v.clone(),
    };
    if stop.len() > 4
        || stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES || s.contains('\0'))
    {
        return Err(format!(
            "options.stop: at most 4 non-empty sequences of at most {MAX_STOP_BYTES} bytes, without NUL"
        ));
    }
    let prompt_cache_key = match &w.prompt_cache_key {
        Some(k)
            if k.is_empty()
                || k.len() > MAX_PROMPT_CACHE_KEY_BYTES
                || k.chars().any(char::is_control) =>
        {
            return Err(format!(
                "prompt_cache_key: 1 to {MAX_PROMPT_CACHE_KEY_BYTES} bytes without control characters"
            ));
        }
        key => key.clone(),
    };
    let breakpoints = usize::from(system_cache.is_some())
        + messages.iter().filter(|m| m.cache.is_some()).count()
        + tools.iter().filter(|t| t.cache.is_some()).count();
    if breakpoints > MAX_CACHE_BREAKPOINTS {
        return Err(format!(
            "cache: {breakpoints} cache breakpoints (system messages, messages and tools together), \
             more than {MAX_CACHE_BREAKPOINTS} (Anthropic's limit per request)"
        ));
    }
    Ok(GenerateRequest {
        system,
        context,
        messages,
        options: GenerateOptions {
            temperature: o.temperature,
            max_tokens: o.max_tokens,
            top_p: o.top_p,
            seed: o.seed,
            stop,
            fit: o.fit.unwrap_or_default(),
        },
        tools,
        tool_choice,
        parallel_tool_calls: w.parallel_tool_calls,
        response_format,
        system_cache,
        prompt_cache_key,
        stream: w.stream.unwrap_or(true),
        service_tier: ServiceTier::Standard,
    })
}

/// The longest `prompt_cache_key` taken (OpenAI's own limit is 64 characters).
const MAX_PROMPT_CACHE_KEY_BYTES: usize = 64;
/// Cache breakpoints per request: Anthropic takes at most four.
const MAX_CACHE_BREAKPOINTS: usize = 4;

/// The `prompt_cache_key` of a job that marks a cache breakpoint and gives no key: one per
/// tenant and route, so the provider routes their prompts (which share prefixes) together.
/// A hash, so the tenant's name is not sent to the provider.
fn prompt_cache_key(tenant: &str, task_type: Option<&str>) -> String {
    let route = task_type.unwrap_or("default");
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{tenant}\n{route}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("llmw-{hex}")
}

fn embed_request(w: &WireEmbed, bounds: &LimitsConfig) -> Result<EmbedRequest, String> {
    if w.input.is_empty() {
        return Err("input: must hold at least one text".into());
    }
    if w.input.len() > bounds.max_embed_inputs {
        return Err(format!(
            "input: {} texts, more than the limit of {} (limits.max_embed_inputs)",
            w.input.len(),
            bounds.max_embed_inputs
        ));
    }
    let total: usize = w.input.iter().map(String::len).sum();
    if total > bounds.max_embed_input_bytes {
        return Err(format!(
            "input: {total} bytes, more than the limit of {} bytes (limits.max_embed_input_bytes)",
            bounds.max_embed_input_bytes
        ));
    }
    for (i, text) in w.input.iter().enumerate() {
        if text.is_empty() {
            return Err(format!("input[{i}]: must not be empty"));
        }
        no_nul(&format!("input[{i}]"), text)?;
    }
    if w.options.dimensions == Some(0) {
        return Err("options.dimensions: must be positive".into());
    }
    Ok(EmbedRequest {
        input: w.input.clone(),
        dimensions: w.options.dimensions,
    })
}

/// The longest size, quality or background value taken (they are short words).
const MAX_IMAGE_OPTION_BYTES: usize = 32;

fn image_request(w: &WireImage, bounds: &LimitsConfig) -> Result<ImageRequest, String> {
    if w.prompt.is_empty() {
        return Err("prompt: an image job needs a non-empty prompt".into());
    }
    if w.prompt.len() > bounds.max_prompt_bytes {
        return Err(format!(
            "prompt: {} bytes, more than the limit of {} bytes (limits.max_prompt_bytes)",
            w.prompt.len(),
            bounds.max_prompt_bytes
        ));
    }
    no_nul("prompt", &w.prompt)?;
    let o = &w.options;
    let n = o.n.unwrap_or(1);
    if n == 0 || n as usize > bounds.max_generated_images {
        return Err(format!(
            "options.n: {n} images; 1 to {} (limits.max_generated_images)",
            bounds.max_generated_images
        ));
    }
    let word = |field: &str, v: &Option<String>| -> Result<Option<String>, String> {
        match v {
            None => Ok(None),
            Some(v)
                if v.is_empty()
                    || v.len() > MAX_IMAGE_OPTION_BYTES
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Err(format!(
                    "options.{field}: {} is not a word of at most {MAX_IMAGE_OPTION_BYTES} letters, digits, '-' or '_'",
                    quote(v)
                ))
            }
            Some(v) => Ok(Some(v.to_ascii_lowercase())),
        }
    };
    let size = word("size", &o.size)?;
    if let Some(s) = size.as_deref().filter(|s| *s != "auto")
        && image_dimensions(s).is_none()
    {
        return Err(format!(
            "options.size: {} is not WIDTHxHEIGHT (1024x1024) or auto",
            quote(s)
        ));
    }
    Ok(ImageRequest {
        prompt: w.prompt.clone(),
        n,
        size,
        quality: word("quality", &o.quality)?,
        output_format: o.output_format.unwrap_or_default(),
        background: word("background", &o.background)?,
    })
}

/// `WIDTHxHEIGHT` as numbers, each 1 to 16384.
pub(crate) fn image_dimensions(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    let (w, h): (u32, u32) = (w.parse().ok()?, h.parse().ok()?);
    ((1..=16_384).contains(&w) && (1..=16_384).contains(&h)).then_some((w, h))
}
