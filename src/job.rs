//! The contract's job messages: wire types, decoding and validation into domain types.
//!
//! "Parse, don't validate": a [`Job`] only exists when every field is valid, so everything after
//! [`decode`] works with valid values. A message that fails gets an [`InvalidJob`] that still
//! carries whatever identity could be read (job id, trace id, reply subject), so it can be
//! answered and recorded. This module does no I/O.

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

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

/// Identity for a message whose job id cannot be read: the `Nats-Msg-Id` header when it is a
/// UUID, else a UUID derived from the message's stream position, stable across redeliveries.
#[derive(Debug, Clone)]
pub struct Fallback<'a> {
    pub msg_id: Option<&'a str>,
    pub stream: &'a str,
    pub stream_sequence: u64,
}

impl Fallback<'_> {
    fn job_id(&self) -> Uuid {
        if let Some(id) = self.msg_id.and_then(|s| Uuid::parse_str(s).ok()) {
            return id;
        }
        let name = format!("{}:{}", self.stream, self.stream_sequence);
        Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())
    }
}

/// Decode and validate one job message.
pub fn decode(
    kind: JobKind,
    payload: &[u8],
    fallback: &Fallback<'_>,
    limits: &Limits,
    provider_exists: &dyn Fn(&str) -> bool,
) -> Result<Job, Box<InvalidJob>> {
    // Read the envelope leniently: wrong types in it are reported, not fatal to answering.
    let value: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let wire_env: WireEnvelope = value
        .as_ref()
        .and_then(|v| WireEnvelope::deserialize(v).ok())
        .unwrap_or_default();
    let (envelope, envelope_problem) = read_envelope(wire_env, fallback);
    let fail = |reason: String| {
        Box::new(InvalidJob {
            envelope: envelope.clone(),
            reason,
        })
    };

    if payload.len() > limits.max_job_bytes {
        return Err(fail(format!(
            "job is {} bytes, more than the limit of {} bytes",
            payload.len(),
            limits.max_job_bytes
        )));
    }
    let value = match value {
        Some(v @ serde_json::Value::Object(_)) => v,
        Some(_) => return Err(fail("job must be a JSON object".into())),
        None => {
            let err = serde_json::from_slice::<serde_json::Value>(payload).err();
            let detail = err.map(|e| e.to_string()).unwrap_or_default();
            return Err(fail(format!("job is not valid JSON: {detail}")));
        }
    };
    if let Some(problem) = envelope_problem {
        return Err(fail(problem));
    }

    let (provider, model, timeout_ms, body) = match kind {
        JobKind::Generate => {
            let w: WireGenerate = serde_path_to_error::deserialize(&value)
                .map_err(|e| fail(format!("{}: {}", e.path(), e.inner())))?;
            let body = JobBody::Generate(generate_request(&w).map_err(&fail)?);
            (w.provider, w.model, w.timeout_ms, body)
        }
        JobKind::Embed => {
            let w: WireEmbed = serde_path_to_error::deserialize(&value)
                .map_err(|e| fail(format!("{}: {}", e.path(), e.inner())))?;
            let body = JobBody::Embed(embed_request(&w).map_err(&fail)?);
            (w.provider, w.model, w.timeout_ms, body)
        }
    };
    if let Some(p) = &provider
        && !provider_exists(p)
    {
        return Err(fail(format!("provider: unknown provider '{p}'")));
    }
    if model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err(fail("model: must not be empty".into()));
    }
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

fn read_envelope(w: WireEnvelope, fallback: &Fallback<'_>) -> (Envelope, Option<String>) {
    use serde_json::Value;
    let mut problem: Option<String> = None;
    let mut note = |p: String| {
        problem.get_or_insert(p);
    };
    let job_id = match w.job_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match Uuid::parse_str(&s) {
            Ok(id) => Some(id),
            Err(_) => {
                note(format!("job_id: '{}' is not a UUID", truncate(&s, 64)));
                None
            }
        },
        Some(_) => {
            note("job_id: must be a string (a UUID)".into());
            None
        }
    };
    // A job without an id gets a stable one: the dedup header or its stream position.
    let job_id = job_id.unwrap_or_else(|| fallback.job_id());
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
    let trace_id = string_field("trace_id", w.trace_id).unwrap_or_else(|| job_id.to_string());
    let tenant = string_field("tenant", w.tenant).unwrap_or_else(|| "default".into());
    let task_type = string_field("task_type", w.task_type);
    let reply_to = string_field("reply_to", w.reply_to);
    let reply_to = match reply_to {
        Some(s) if is_valid_publish_subject(&s) => Some(s),
        Some(s) => {
            note(format!(
                "reply_to: '{}' is not a valid NATS subject",
                truncate(&s, 64)
            ));
            None
        }
        None => None,
    };
    if tenant.is_empty() {
        note("tenant: must not be empty".into());
    }
    let metadata = w.metadata.unwrap_or(Value::Null);
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

fn generate_request(w: &WireGenerate) -> Result<GenerateRequest, String> {
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
    if o.max_tokens == Some(0) {
        return Err("options.max_tokens: must be positive".into());
    }
    let stop = match &o.stop {
        None => Vec::new(),
        Some(StopWire::One(s)) => vec![s.clone()],
        Some(StopWire::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err("options.stop: at most 4 non-empty sequences".into());
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

fn embed_request(w: &WireEmbed) -> Result<EmbedRequest, String> {
    if w.input.is_empty() {
        return Err("input: must hold at least one text".into());
    }
    if let Some(i) = w.input.iter().position(String::is_empty) {
        return Err(format!("input[{i}]: must not be empty"));
    }
    if w.options.dimensions == Some(0) {
        return Err("options.dimensions: must be positive".into());
    }
    Ok(EmbedRequest {
        input: w.input.clone(),
        dimensions: w.options.dimensions,
    })
}

/// A subject one can publish to: dot-separated non-empty tokens, no wildcards or whitespace.
pub fn is_valid_publish_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace()))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_job_bytes: 10_000,
            default_timeout: Duration::from_secs(120),
            max_timeout: Duration::from_secs(600),
        }
    }
    const FB: Fallback<'static> = Fallback {
        msg_id: None,
        stream: "S",
        stream_sequence: 7,
    };

    fn gen_job(json: &str) -> Result<Job, Box<InvalidJob>> {
        decode(JobKind::Generate, json.as_bytes(), &FB, &limits(), &|p| {
            p == "openai"
        })
    }

    #[test]
    fn a_minimal_job_gets_defaults() {
        let job = gen_job(r#"{"prompt":"hi"}"#).unwrap();
        assert_eq!(job.envelope.tenant, "default");
        assert_eq!(job.envelope.trace_id, job.envelope.job_id.to_string());
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
            (r#"{"prompt":"x","reply_to":"a.*"}"#, "reply_to"),
        ] {
            let err = gen_job(json).unwrap_err();
            assert!(err.reason.starts_with(starts), "{json}: {}", err.reason);
        }
    }

    #[test]
    fn an_unreadable_job_gets_a_stable_derived_id() {
        let a = gen_job("garbage").unwrap_err().envelope.job_id;
        let b = gen_job("garbage").unwrap_err().envelope.job_id;
        assert_eq!(a, b);
        let with_header = Fallback {
            msg_id: Some("0192f0c4-0000-7000-8000-000000000009"),
            ..FB
        };
        let c = decode(
            JobKind::Generate,
            b"garbage",
            &with_header,
            &limits(),
            &|_| true,
        )
        .unwrap_err()
        .envelope
        .job_id;
        assert_eq!(c.to_string(), "0192f0c4-0000-7000-8000-000000000009");
    }

    #[test]
    fn oversized_jobs_are_refused() {
        let big = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(20_000));
        assert!(gen_job(&big).unwrap_err().reason.contains("limit"));
    }

    #[test]
    fn embed_jobs_refuse_empty_input() {
        let e = |j: &str| decode(JobKind::Embed, j.as_bytes(), &FB, &limits(), &|_| true);
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
}
