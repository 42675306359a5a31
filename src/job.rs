//! The contract's job messages: wire types, decoding and validation into domain types.
//!
//! "Parse, don't validate": a [`Job`] only exists when every field is valid, so everything after
//! [`decode`] works with valid values. A message that fails gets an [`InvalidJob`] that still
//! carries whatever identity could be read (job id, trace id, reply subject), so it can be
//! answered and recorded. This module does no I/O.

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use crate::config::{Config, LimitsConfig};
use crate::trust::{QUOTE_CHARS, ReplyPolicy, check_model_name, quote};

/// The two job kinds, one JetStream subject and one durable consumer each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Generate,
    Embed,
}

impl JobKind {
    pub const ALL: [JobKind; 2] = [JobKind::Generate, JobKind::Embed];
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Embed => "embed",
        }
    }
}

/// Limits that validation needs from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_job_bytes: usize,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// Bounds on the job's fields (`[limits]`).
    pub bounds: LimitsConfig,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_job_bytes: config.worker.max_job_bytes,
            default_timeout: Duration::from_millis(config.worker.default_timeout_ms),
            max_timeout: Duration::from_millis(config.worker.max_timeout_ms),
            bounds: config.limits.clone(),
        }
    }
}

/// Who a job is and where its answers go: known even for many invalid jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub job_id: Uuid,
    pub trace_id: String,
    pub tenant: String,
    pub task_type: Option<String>,
    pub reply_to: Option<String>,
    pub metadata: serde_json::Value,
}

/// A valid job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub envelope: Envelope,
    pub kind: JobKind,
    /// Pinned first provider and model, if the job names them.
    pub provider: Option<String>,
    pub model: Option<String>,
    pub timeout: Duration,
    pub body: JobBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobBody {
    Generate(GenerateRequest),
    Embed(EmbedRequest),
}

/// A chat conversation ready for any provider.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub system: Option<String>,
    /// Non-empty; roles are `user` / `assistant` (system text is in `system`).
    pub messages: Vec<Message>,
    pub options: GenerateOptions,
    /// Publish chunk events as text arrives.
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub input: Vec<String>,
    pub dimensions: Option<u32>,
}

/// Why a job was refused, with the identity needed to answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidJob {
    pub envelope: Envelope,
    pub reason: String,
}

// ---- wire types ----------------------------------------------------------------------------

/// The envelope fields, read leniently first so that an invalid job can still be answered.
#[derive(Deserialize, Default)]
struct WireEnvelope {
    job_id: Option<serde_json::Value>,
    trace_id: Option<serde_json::Value>,
    tenant: Option<serde_json::Value>,
    task_type: Option<serde_json::Value>,
    reply_to: Option<serde_json::Value>,
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireGenerate {
    provider: Option<String>,
    model: Option<String>,
    system_prompt: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    context: Option<Vec<String>>,
    #[serde(default)]
    options: WireGenerateOptions,
    stream: Option<bool>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireGenerateOptions {
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    top_p: Option<f64>,
    stop: Option<StopWire>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopWire {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct WireEmbed {
    provider: Option<String>,
    model: Option<String>,
    input: Vec<String>,
    #[serde(default)]
    options: WireEmbedOptions,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireEmbedOptions {
    dimensions: Option<u32>,
}

/// What the transport says about a message beyond its body.
#[derive(Debug, Clone, Default)]
pub struct Delivery<'a> {
    /// The `Nats-Msg-Id` header: JetStream's dedup key, and the job id.
    pub msg_id: Option<&'a str>,
    /// The tenant NATS vouches for (the last token of the job's subject), when the deployment
    /// takes tenants from subjects; the body's `tenant` is then ignored.
    pub subject_tenant: Option<&'a str>,
}

/// What the deployment's configuration decides about pinning (the chain implements it; this
/// module knows no routes).
pub trait Catalog: Send + Sync {
    /// Whether a job of `task_type` may pin `provider` and/or `model`; the reason (naming the
    /// field) when not: an unknown provider, one outside the job's route, a model outside the
    /// provider's allow-list.
    fn check_pin(
        &self,
        task_type: Option<&str>,
        provider: Option<&str>,
        model: Option<&str>,
    ) -> Result<(), String>;
}

/// Everything a job is checked against.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub limits: &'a Limits,
    pub replies: &'a ReplyPolicy,
    pub catalog: &'a dyn Catalog,
}

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

    // The path names job keys, which can be anything (an unknown `options` key): clipped too.
    let serde_fail = |path: String, e: &serde_json::Error| {
        let mut short: String = path.chars().take(QUOTE_CHARS).collect();
        if short.len() < path.len() {
            short.push('…');
        }
        let short = short.escape_debug();
        fail(format!("{short}: {}", clip_reason(&e.to_string())))
    };
    let (provider, model, timeout_ms, body) = match kind {
        JobKind::Generate => {
            let w: WireGenerate = serde_path_to_error::deserialize(&value)
                .map_err(|e| serde_fail(e.path().to_string(), e.inner()))?;
            let body = JobBody::Generate(generate_request(&w, &limits.bounds).map_err(&fail)?);
            (w.provider, w.model, w.timeout_ms, body)
        }
        JobKind::Embed => {
            let w: WireEmbed = serde_path_to_error::deserialize(&value)
                .map_err(|e| serde_fail(e.path().to_string(), e.inner()))?;
            let body = JobBody::Embed(embed_request(&w, &limits.bounds).map_err(&fail)?);
            (w.provider, w.model, w.timeout_ms, body)
        }
    };
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
        body,
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
    let trace_id = trace_id.map_or_else(|| job_id.to_string(), |t| name("trace_id", t));
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
    check_prompt_bounds(w, bounds)?;
    let mut system = w.system_prompt.clone().filter(|s| !s.is_empty());
    let mut messages = Vec::new();
    for (i, m) in w.messages.iter().flatten().enumerate() {
        match m.role {
            // System messages in the list join the system prompt, in order.
            Role::System => {
                let s = system.get_or_insert_with(String::new);
                if !s.is_empty() {
                    s.push_str("\n\n");
                }
                s.push_str(&m.content);
            }
            _ if m.content.is_empty() => {
                return Err(format!("messages[{i}].content: must not be empty"));
            }
            _ => messages.push(m.clone()),
        }
    }
    if let Some(p) = w.prompt.as_deref().filter(|p| !p.is_empty()) {
        messages.push(Message {
            role: Role::User,
            content: p.to_string(),
        });
    }
    if messages.is_empty() {
        return Err("prompt: a job needs a non-empty prompt or messages".into());
    }
    if let Some(context) = w.context.as_ref().filter(|c| !c.is_empty()) {
        // Retrieval context goes into the system prompt, most relevant first, numbered.
        let mut block = String::from("Context:\n");
        for (i, c) in context.iter().enumerate() {
            block.push_str(&format!("[{}] {}\n", i + 1, c));
        }
        system = Some(match system {
            Some(s) => format!("{s}\n\n{block}"),
            None => block,
        });
    }
    let o = &w.options;
    if let Some(t) = o.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(format!("options.temperature: {t} is outside 0..=2"));
    }
    if let Some(p) = o.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(format!("options.top_p: {p} is outside 0..=1"));
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
    Ok(GenerateRequest {
        system,
        messages,
        options: GenerateOptions {
            temperature: o.temperature,
            max_tokens: o.max_tokens,
            top_p: o.top_p,
            stop,
        },
        stream: w.stream.unwrap_or(true),
    })
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

/// Longest stop sequence, in bytes (providers accept short ones only).
const MAX_STOP_BYTES: usize = 256;

/// Counts and total size of the prompt text; no NUL anywhere in it.
fn check_prompt_bounds(w: &WireGenerate, bounds: &LimitsConfig) -> Result<(), String> {
    let messages = w.messages.as_deref().unwrap_or_default();
    let context = w.context.as_deref().unwrap_or_default();
    if messages.len() > bounds.max_messages {
        return Err(format!(
            "messages: {} messages, more than the limit of {} (limits.max_messages)",
            messages.len(),
            bounds.max_messages
        ));
    }
    if context.len() > bounds.max_context_items {
        return Err(format!(
            "context: {} items, more than the limit of {} (limits.max_context_items)",
            context.len(),
            bounds.max_context_items
        ));
    }
    let mut total = 0usize;
    let texts = w
        .system_prompt
        .iter()
        .map(|t| ("system_prompt".to_string(), t))
        .chain(w.prompt.iter().map(|t| ("prompt".to_string(), t)))
        .chain(
            messages
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("messages[{i}].content"), &m.content)),
        )
        .chain(
            context
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("context[{i}]"), c)),
        );
    for (field, text) in texts {
        no_nul(&field, text)?;
        total += text.len();
    }
    if total > bounds.max_prompt_bytes {
        return Err(format!(
            "prompt: the prompt text (system_prompt, prompt, messages, context) is {total} bytes, more than the limit of {} (limits.max_prompt_bytes)",
            bounds.max_prompt_bytes
        ));
    }
    Ok(())
}

fn no_nul(field: &str, text: &str) -> Result<(), String> {
    match text.find('\0') {
        None => Ok(()),
        Some(at) => Err(format!("{field}: holds a NUL character (at byte {at})")),
    }
}

/// A name (tenant, task type, trace id): at most `max` bytes, no control characters.
fn check_name(value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{} bytes, more than the limit of {max} (limits.max_name_bytes)",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{} holds control characters (NUL, newlines, ...)",
            quote(value)
        ));
    }
    Ok(())
}

/// A refused name made safe to record: control characters replaced, cut to `max` bytes.
fn safe_name(value: &str, max: usize) -> String {
    let mut out = String::new();
    for c in value
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
    {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Metadata within its depth and size as echoed, and storable as jsonb (no NUL in any
/// string or key).
fn check_metadata(value: &serde_json::Value, bounds: &LimitsConfig) -> Result<(), String> {
    fn walk(v: &serde_json::Value, depth: usize, max_depth: usize) -> Result<(), String> {
        use serde_json::Value;
        if depth > max_depth {
            return Err(format!(
                "nested deeper than {max_depth} levels (limits.max_metadata_depth)"
            ));
        }
        match v {
            Value::String(s) if s.contains('\0') => Err("a string holds a NUL character".into()),
            Value::Array(items) => items.iter().try_for_each(|i| walk(i, depth + 1, max_depth)),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                if k.contains('\0') {
                    return Err("a key holds a NUL character".into());
                }
                walk(v, depth + 1, max_depth)
            }),
            _ => Ok(()),
        }
    }
    walk(value, 1, bounds.max_metadata_depth)?;
    // Measured as it is echoed: numbers re-serialize longer (`1e15` -> `1000000000000000.0`).
    let echoed = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if echoed > bounds.max_metadata_bytes {
        return Err(format!(
            "{echoed} bytes as echoed, more than the limit of {} (limits.max_metadata_bytes)",
            bounds.max_metadata_bytes
        ));
    }
    Ok(())
}

/// A serde error text with any value it quotes cut short: serde quotes whole strings
/// (`invalid type: string "<the whole prompt>"`), and a reason may reach logs and rows.
fn clip_reason(text: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    let mut rest = text;
    // Shorten every quoted (`"..."` or `` `...` ``) span to a short prefix.
    while let Some(open) = rest.find(['"', '`']) {
        let q = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        let inner = &rest[open + 1..];
        // A quoted string may itself hold quotes (serde prints it raw): take the last one;
        // backticks enclose names, the first closing one ends them.
        let close = if q == '"' {
            inner.rfind(q)
        } else {
            inner.find(q)
        };
        let close = close.unwrap_or(inner.len());
        let quoted = &inner[..close];
        let short: String = quoted.chars().take(QUOTE_CHARS).collect();
        out.push_str(&short.escape_debug().to_string());
        if short.len() < quoted.len() {
            out.push('…');
        }
        rest = &inner[close..];
        if let Some(r) = rest.strip_prefix(q) {
            out.push(q);
            rest = r;
        }
    }
    out.push_str(rest);
    if out.chars().count() > MAX {
        out = out.chars().take(MAX).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NatsConfig;

    fn limits() -> Limits {
        Limits {
            max_job_bytes: 10_000,
            default_timeout: Duration::from_secs(120),
            max_timeout: Duration::from_secs(600),
            bounds: LimitsConfig {
                max_model_bytes: 64,
                max_metadata_bytes: 200,
                max_messages: 3,
                max_embed_inputs: 4,
                ..Default::default()
            },
        }
    }

    /// Knows one provider, `openai`, and allows any pin of it.
    struct OneProvider;
    impl Catalog for OneProvider {
        fn check_pin(
            &self,
            _: Option<&str>,
            provider: Option<&str>,
            _: Option<&str>,
        ) -> Result<(), String> {
            match provider {
                Some(p) if p != "openai" => Err(format!("provider: unknown provider {p:?}")),
                _ => Ok(()),
            }
        }
    }

    fn decode_with(
        kind: JobKind,
        json: &str,
        delivery: &Delivery<'_>,
    ) -> Result<Job, Box<InvalidJob>> {
        let replies = ReplyPolicy::new(&NatsConfig {
            reply_prefixes: Some(vec!["r.".into(), "llm.replies.".into()]),
            ..Default::default()
        })
        .unwrap();
        let rules = Rules {
            limits: &limits(),
            replies: &replies,
            catalog: &OneProvider,
        };
        decode(kind, json.as_bytes(), delivery, &rules)
    }

    fn gen_job(json: &str) -> Result<Job, Box<InvalidJob>> {
        decode_with(JobKind::Generate, json, &Delivery::default())
    }

    #[test]
    fn a_minimal_job_gets_defaults() {
        let job = gen_job(r#"{"prompt":"hi"}"#).unwrap();
        assert_eq!(job.envelope.tenant, "default");
        assert_eq!(job.envelope.trace_id, job.envelope.job_id.to_string());
        assert_eq!(job.envelope.job_id.get_version_num(), 7);
        assert_eq!(job.timeout, Duration::from_secs(120));
        let JobBody::Generate(g) = job.body else {
            panic!()
        };
        assert!(g.stream);
        assert_eq!(
            g.messages,
            vec![Message {
                role: Role::User,
                content: "hi".into()
            }]
        );
    }

    #[test]
    fn prompt_is_appended_after_messages_and_system_messages_join_the_system_prompt() {
        let job = gen_job(r#"{"system_prompt":"S","messages":[{"role":"system","content":"T"},{"role":"user","content":"a"},{"role":"assistant","content":"b"}],"prompt":"c","context":["k1"]}"#).unwrap();
        let JobBody::Generate(g) = job.body else {
            panic!()
        };
        let roles: Vec<_> = g.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(roles, ["a", "b", "c"]);
        let system = g.system.unwrap();
        assert!(
            system.starts_with("S\n\nT") && system.contains("[1] k1"),
            "{system}"
        );
    }

    #[test]
    fn invalid_jobs_keep_their_identity_for_the_answer() {
        let id = "0192f0c4-0000-7000-8000-000000000001";
        let err = gen_job(&format!(
            r#"{{"job_id":"{id}","reply_to":"r.1","stream":"yes","prompt":"x"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.envelope.job_id.to_string(), id);
        assert_eq!(err.envelope.reply_to.as_deref(), Some("r.1"));
        assert!(err.reason.starts_with("stream"), "{}", err.reason);
    }

    #[test]
    fn each_kind_of_invalid_job_is_refused_with_a_reason() {
        for (json, starts) in [
            ("not json", "job is not valid JSON"),
            ("[1]", "job must be a JSON object"),
            (r#"{"system_prompt":"x"}"#, "prompt"),
            (r#"{"prompt":"x","provider":"nope"}"#, "provider"),
            (
                r#"{"prompt":"x","options":{"temperature":9}}"#,
                "options.temperature",
            ),
            (r#"{"prompt":"x","options":{"bogus":1}}"#, "options"),
            (r#"{"prompt":"x","timeout_ms":0}"#, "timeout_ms"),
            (r#"{"prompt":"x","job_id":"abc"}"#, "job_id"),
            (r#"{"prompt":"x","reply_to":"r.*"}"#, "reply_to"),
            (r#"{"prompt":"x","model":"a/../b"}"#, "model"),
        ] {
            let err = gen_job(json).unwrap_err();
            assert!(err.reason.starts_with(starts), "{json}: {}", err.reason);
        }
    }

    #[test]
    fn a_refused_reply_subject_is_named_and_never_kept_for_publishing() {
        let err =
            gen_job(r#"{"prompt":"x","reply_to":"$JS.API.STREAM.PURGE.LLM_JOBS"}"#).unwrap_err();
        assert_eq!(err.envelope.reply_to, None);
        assert!(
            err.reason.contains("$JS.API.STREAM.PURGE.LLM_JOBS") && err.reason.contains("under $"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn the_body_id_and_the_dedup_header_must_agree() {
        let id = "0192f0c4-0000-7000-8000-000000000001";
        let other = "0192f0c4-0000-7000-8000-000000000002";
        let json = format!(r#"{{"job_id":"{id}","prompt":"x"}}"#);
        let same = Delivery {
            msg_id: Some(id),
            ..Default::default()
        };
        assert!(decode_with(JobKind::Generate, &json, &same).is_ok());
        let different = Delivery {
            msg_id: Some(other),
            ..Default::default()
        };
        let err = decode_with(JobKind::Generate, &json, &different).unwrap_err();
        assert!(err.reason.contains("Nats-Msg-Id"), "{}", err.reason);
        let not_uuid = Delivery {
            msg_id: Some("order-17"),
            ..Default::default()
        };
        let err = decode_with(JobKind::Generate, r#"{"prompt":"x"}"#, &not_uuid).unwrap_err();
        assert!(err.reason.starts_with("Nats-Msg-Id"), "{}", err.reason);
        // The header alone names the job.
        let job = decode_with(JobKind::Generate, r#"{"prompt":"x"}"#, &same).unwrap();
        assert_eq!(job.envelope.job_id.to_string(), id);
    }

    #[test]
    fn a_job_without_an_id_gets_a_fresh_random_one_not_a_predictable_one() {
        let a = gen_job("garbage").unwrap_err().envelope.job_id;
        let b = gen_job("garbage").unwrap_err().envelope.job_id;
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 7);
    }

    #[test]
    fn a_tenant_from_the_subject_overrides_the_bodys_claim() {
        let delivery = Delivery {
            subject_tenant: Some("acme"),
            ..Default::default()
        };
        let job = decode_with(
            JobKind::Generate,
            r#"{"prompt":"x","tenant":"globex"}"#,
            &delivery,
        )
        .unwrap();
        assert_eq!(job.envelope.tenant, "acme");
    }

    #[test]
    fn oversized_jobs_are_refused_before_parsing_with_both_sizes() {
        let big = format!(r#"{{"prompt":"{}","reply_to":"r.1"}}"#, "x".repeat(20_000));
        let err = gen_job(&big).unwrap_err();
        assert!(
            err.reason.contains(&big.len().to_string()) && err.reason.contains("10000"),
            "{}",
            err.reason
        );
        // Not parsed: the body's reply subject is unknown.
        assert_eq!(err.envelope.reply_to, None);
    }

    #[test]
    fn a_reason_quotes_only_a_short_prefix_of_a_value() {
        let secret = format!("PRIVATE {}", "y".repeat(500));
        let err = gen_job(&format!(r#"{{"prompt":"x","stream":"{secret}"}}"#)).unwrap_err();
        assert!(err.reason.starts_with("stream"), "{}", err.reason);
        assert!(err.reason.len() < 160, "{}", err.reason);
        assert!(!err.reason.contains(&"y".repeat(60)), "{}", err.reason);
        let err = gen_job(&format!(r#"{{"prompt":"x","options":{{"{secret}":1}}}}"#)).unwrap_err();
        assert!(err.reason.len() < 260, "{}", err.reason);
        assert!(!err.reason.contains(&"y".repeat(60)), "{}", err.reason);
    }

    #[test]
    fn embed_jobs_refuse_empty_input() {
        let e = |j: &str| decode_with(JobKind::Embed, j, &Delivery::default());
        assert!(e(r#"{"input":["a","b"],"options":{"dimensions":8}}"#).is_ok());
        assert!(
            e(r#"{"input":[]}"#)
                .unwrap_err()
                .reason
                .starts_with("input")
        );
        assert!(
            e(r#"{"input":["a",""]}"#)
                .unwrap_err()
                .reason
                .starts_with("input[1]")
        );
    }

    #[test]
    fn a_nul_in_any_text_field_is_refused_naming_the_field() {
        for (json, field) in [
            (r#"{"prompt":"a\u0000b"}"#, "prompt"),
            (
                r#"{"prompt":"x","system_prompt":"\u0000"}"#,
                "system_prompt",
            ),
            (
                r#"{"messages":[{"role":"user","content":"\u0000"}]}"#,
                "messages[0].content",
            ),
            (r#"{"prompt":"x","context":["ok","\u0000"]}"#, "context[1]"),
            (
                r#"{"prompt":"x","options":{"stop":["\u0000"]}}"#,
                "options.stop",
            ),
            (r#"{"prompt":"x","tenant":"a\u0000"}"#, "tenant"),
            (r#"{"prompt":"x","task_type":"t\n"}"#, "task_type"),
            (r#"{"prompt":"x","trace_id":"\u0000"}"#, "trace_id"),
            (r#"{"prompt":"x","metadata":{"k":"\u0000"}}"#, "metadata"),
            (r#"{"prompt":"x","metadata":{"\u0000":1}}"#, "metadata"),
        ] {
            let err = gen_job(json).unwrap_err();
            assert!(err.reason.starts_with(field), "{json}: {}", err.reason);
        }
        let e = decode_with(
            JobKind::Embed,
            r#"{"input":["a","\u0000"]}"#,
            &Delivery::default(),
        )
        .unwrap_err();
        assert!(e.reason.starts_with("input[1]"), "{}", e.reason);
    }

    #[test]
    fn a_refused_name_is_recorded_without_its_control_characters() {
        let err = gen_job(r#"{"prompt":"x","tenant":"ac\u0000me"}"#).unwrap_err();
        assert_eq!(err.envelope.tenant, "ac\u{fffd}me");
        let err = gen_job(&format!(
            r#"{{"prompt":"x","trace_id":"{}"}}"#,
            "t".repeat(500)
        ))
        .unwrap_err();
        assert!(
            err.reason.contains("limits.max_name_bytes"),
            "{}",
            err.reason
        );
        assert_eq!(err.envelope.trace_id.len(), 128);
    }

    #[test]
    fn metadata_is_bounded_as_echoed_and_in_depth_and_dropped_when_refused() {
        // 20 numbers written `1e15` are 100 bytes in the job but 380 as echoed.
        let numbers = vec!["1e15"; 20].join(",");
        let err = gen_job(&format!(r#"{{"prompt":"x","metadata":[{numbers}]}}"#)).unwrap_err();
        assert!(
            err.reason.starts_with("metadata: ") && err.reason.contains("as echoed"),
            "{}",
            err.reason
        );
        assert_eq!(err.envelope.metadata, serde_json::Value::Null);
        let deep = format!("{}1{}", "[".repeat(20), "]".repeat(20));
        let err = gen_job(&format!(r#"{{"prompt":"x","metadata":{deep}}}"#)).unwrap_err();
        assert!(err.reason.contains("max_metadata_depth"), "{}", err.reason);
        assert!(gen_job(r#"{"prompt":"x","metadata":{"a":[1,{"b":"c"}]}}"#).is_ok());
    }

    #[test]
    fn counts_sizes_and_the_output_ceiling_are_bounded_with_the_bound_named() {
        let four = r#"{"role":"user","content":"m"}"#.repeat(4).replace("}{", "},{");
        for (json, names) in [
            (format!(r#"{{"messages":[{four}]}}"#), "limits.max_messages"),
            (
                r#"{"prompt":"x","options":{"max_tokens":200000}}"#.to_string(),
                "limits.max_output_tokens",
            ),
            (
                format!(
                    r#"{{"prompt":"x","options":{{"stop":["{}"]}}}}"#,
                    "s".repeat(300)
                ),
                "256 bytes",
            ),
        ] {
            let err = gen_job(&json).unwrap_err();
            assert!(err.reason.contains(names), "{json}: {}", err.reason);
        }
        let e = decode_with(
            JobKind::Embed,
            r#"{"input":["a","b","c","d","e"]}"#,
            &Delivery::default(),
        )
        .unwrap_err();
        assert!(
            e.reason.contains("5 texts") && e.reason.contains("limits.max_embed_inputs"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn the_prompt_text_together_is_bounded() {
        let limits = Limits {
            bounds: LimitsConfig {
                max_prompt_bytes: 10,
                ..Default::default()
            },
            ..limits()
        };
        let replies = ReplyPolicy::new(&NatsConfig::default()).unwrap();
        let rules = Rules {
            limits: &limits,
            replies: &replies,
            catalog: &OneProvider,
        };
        let job = br#"{"system_prompt":"12345","prompt":"123","context":["123"]}"#;
        let err = decode(JobKind::Generate, job, &Delivery::default(), &rules).unwrap_err();
        assert!(
            err.reason.contains("11 bytes") && err.reason.contains("limits.max_prompt_bytes"),
            "{}",
            err.reason
        );
    }
}
