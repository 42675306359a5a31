//! `llm-worker submit`: publish one job through [`crate::client`], print the streamed text as
//! it arrives, and return the result (read back from `LLM_RESULTS` if the live event was
//! missed).

use std::io::Write;

use anyhow::Context as _;

use crate::client::{Client, Event};
use crate::config::NatsConfig;
use crate::contract::JobKind;
use crate::contract::{ResultEvent, Status};

/// Publish `job` (a JSON object; `job_id` is filled in when absent, `reply_to` is always
/// this connection's own inbox), stream chunk text to `out`, and return the result event.
/// With the deployment taking tenants from subjects, a body `tenant` picks the subject.
pub async fn submit(
    nats: &NatsConfig,
    kind: JobKind,
    job: serde_json::Value,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ResultEvent> {
    let client = Client::connect(nats).await?;
    let tenant = job
        .get("tenant")
        .and_then(|t| t.as_str())
        .map(str::to_string);
    let mut handle = client.submit(kind, job, tenant.as_deref(), &[]).await?;
    let job_id = handle.job_id();
    let tenant = tenant.unwrap_or_else(|| "default".into());
    // Say at once (and once) when nobody will answer soon.
    let no_worker = client
        .workers(kind, NO_WORKER_WAIT)
        .await
        .is_ok_and(|n| n == 0);
    if no_worker {
        eprintln!(
            "no worker of this deployment is running (none answered within {} s): job {job_id} \
             stays queued and is answered when one starts; waiting for it here until its \
             deadline (cancel it with: llm-worker cancel {job_id} --tenant {tenant})",
            NO_WORKER_WAIT.as_secs()
        );
    }
    let mut attempt = 0u32;
    while let Some(event) = handle.next().await {
        let event = event.with_context(|| {
            if no_worker {
                format!("job {job_id} is still queued")
            } else {
                format!("job {job_id}: no result arrived and none is stored yet")
            }
        })?;
        match event {
            Event::Chunk(c) => {
                attempt = c.attempt;
                write!(out, "{}", c.delta)?;
                out.flush()?;
            }
            Event::Restart { attempt } => {
                writeln!(out, "\n[attempt {attempt} restarts the answer]")?;
            }
            Event::Result(result) => return Ok(finish_output(*result, attempt != 0, out)?),
        }
    }
    anyhow::bail!("job {job_id}: no result arrived and none is stored yet")
}

/// How long `submit` waits for a worker to say it consumes the jobs.
const NO_WORKER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn finish_output(
    result: ResultEvent,
    streamed: bool,
    out: &mut (dyn Write + Send),
) -> std::io::Result<ResultEvent> {
    if !streamed && let Some(text) = &result.output {
        write!(out, "{text}")?;
    }
    for call in result.tool_calls.iter().flatten() {
        writeln!(
            out,
            "[tool call {} {}({})]",
            call.id, call.name, call.arguments
        )?;
    }
    if (result.status == Status::Ok && result.embeddings.is_none()) || streamed {
        writeln!(out)?;
    }
    out.flush()?;
    Ok(result)
}

/// The options of `llm-worker submit` that become job fields.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub model: Option<String>,
    pub provider: Option<String>,
    pub task_type: Option<String>,
    pub tenant: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Generation only.
    pub system: Option<String>,
    pub max_tokens: Option<u32>,
    pub stream: bool,
    /// Images shown with the prompt: (media type, base64 bytes).
    pub images: Vec<(String, String)>,
    /// A JSON Schema the answer must match (`response_format: json_schema`).
    pub json_schema: Option<serde_json::Value>,
    /// Embedding only.
    pub dimensions: Option<u32>,
    /// Image jobs only: `options.size` (`1024x1024`).
    pub image_size: Option<String>,
}

/// An image file as a job's image part: its media type (from its extension) and its bytes
/// in base64.
pub fn image_part(path: &std::path::Path) -> anyhow::Result<(String, String)> {
    use base64::Engine as _;
    let media_type = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => anyhow::bail!(
            "{}: an image must be .png, .jpg, .gif or .webp",
            path.display()
        ),
    };
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    Ok((
        media_type.to_string(),
        base64::engine::general_purpose::STANDARD.encode(bytes),
    ))
}

/// The job JSON for a prompt (generation) or for inputs (embeddings).
pub fn build_job(kind: JobKind, text: Vec<String>, f: &Fields) -> serde_json::Value {
    let mut job = match kind {
        JobKind::Generate if !f.images.is_empty() => {
            // The prompt and its images as one user message of parts.
            let mut parts = vec![serde_json::json!({"type": "text", "text": text.concat()})];
            parts.extend(f.images.iter().map(|(media_type, data)| {
                serde_json::json!({"type": "image", "data": data, "media_type": media_type})
            }));
            serde_json::json!({"messages": [{"role": "user", "content": parts}],
                               "stream": f.stream})
        }
        JobKind::Generate => serde_json::json!({"prompt": text.concat(), "stream": f.stream}),
        JobKind::Embed => serde_json::json!({"input": text}),
        JobKind::Image => serde_json::json!({"prompt": text.concat()}),
    };
    if kind == JobKind::Generate
        && let Some(schema) = &f.json_schema
    {
        job["response_format"] =
            serde_json::json!({"type": "json_schema", "name": "answer", "schema": schema});
    }
    let common = [
        ("model", f.model.clone().map(Into::into)),
        ("provider", f.provider.clone().map(Into::into)),
        ("task_type", f.task_type.clone().map(Into::into)),
        ("tenant", f.tenant.clone().map(Into::into)),
        ("timeout_ms", f.timeout_ms.map(Into::into)),
    ];
    let own = match kind {
        JobKind::Generate => [
            ("system_prompt", f.system.clone().map(Into::into)),
            (
                "options",
                f.max_tokens.map(|m| serde_json::json!({"max_tokens": m})),
            ),
        ],
        JobKind::Embed => [
            (
                "options",
                f.dimensions.map(|d| serde_json::json!({"dimensions": d})),
            ),
            ("", None),
        ],
        JobKind::Image => [
            (
                "options",
                f.image_size.clone().map(|s| serde_json::json!({"size": s})),
            ),
            ("", None),
        ],
    };
    for (k, v) in common.into_iter().chain(own) {
        if let Some(v) = v {
            job[k] = v;
        }
    }
    job
}

/// Each vector's size and first values, one line each.
pub fn describe_vectors(vectors: &[Vec<f32>]) -> String {
    let mut out = String::new();
    for (i, v) in vectors.iter().enumerate() {
        let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.4}")).collect();
        out.push_str(&format!(
            "[{i}] {} dims: [{}{}]\n",
            v.len(),
            head.join(", "),
            if v.len() > 4 { ", ..." } else { "" }
        ));
    }
    out
}

/// The one-line summary printed after the answer.
pub fn summary(r: &ResultEvent) -> String {
    let cost = r
        .cost_usd
        .map_or_else(|| "cost unknown".to_string(), |c| format!("${c:.6}"));
    match (&r.status, &r.error) {
        (Status::Ok, _) if r.cache_hit => format!(
            "ok · {}/{} · from the cache{} (stored {}; saved {} in + {} out tokens) · {} ms · {cost}",
            r.provider.as_deref().unwrap_or("?"),
            r.model_used.as_deref().unwrap_or("?"),
            if r.stale {
                ", past its TTL: every provider failed"
            } else {
                ""
            },
            r.cache.as_ref().map_or_else(
                || "?".to_string(),
                |c| c
                    .stored_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            r.cache.as_ref().map_or(0, |c| c.saved_input_tokens),
            r.cache.as_ref().map_or(0, |c| c.saved_output_tokens),
            r.processing_time_ms,
        ),
        (Status::Ok, _) => format!(
            "ok · {}/{} · {} in + {} out tokens · {} ms · attempt {}/{} · {cost}",
            r.provider.as_deref().unwrap_or("?"),
            r.model_used.as_deref().unwrap_or("?"),
            r.tokens_used.input,
            r.tokens_used.output,
            r.processing_time_ms,
            r.attempt.unwrap_or(0),
            r.attempts.len(),
        ),
        (Status::Error, e) => format!(
            "error {} · {} · {} ms · {} attempt(s)",
            e.as_ref().map_or("unknown", |e| e.code.as_str()),
            e.as_ref().map_or("", |e| e.message.as_str()),
            r.processing_time_ms,
            r.attempts.len(),
        ),
    }
}

/// Write an image job's pictures: the first to `path`, the others beside it with `-2`, `-3`
/// ... before the extension. Each is checked against the result's SHA-256.
pub async fn save_images(
    nats: &NatsConfig,
    images: &[crate::contract::ImageObject],
    path: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let client = Client::connect(nats).await?;
    let mut written = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let target = numbered(path, i);
        let bytes = client.image_bytes(image).await?;
        std::fs::write(&target, bytes)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", target.display()))?;
        written.push(target);
    }
    Ok(written)
}

/// `fox.png` for the first picture, `fox-2.png` for the second, ...
fn numbered(path: &std::path::Path, index: usize) -> std::path::PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{}.{}", index + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", index + 1),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_the_fields_of_each_kind_of_job() {
        let f = Fields {
            model: Some("m".into()),
            system: Some("s".into()),
            max_tokens: Some(5),
            dimensions: Some(8),
            stream: true,
            ..Default::default()
        };
        assert_eq!(
            build_job(JobKind::Generate, vec!["hi".into()], &f),
            serde_json::json!({"prompt": "hi", "stream": true, "model": "m",
                "system_prompt": "s", "options": {"max_tokens": 5}})
        );
        assert_eq!(
            build_job(JobKind::Embed, vec!["a".into(), "b".into()], &f),
            serde_json::json!({"input": ["a", "b"], "model": "m", "options": {"dimensions": 8}})
        );
        // An image and a schema: one user message of parts, and a JSON response format.
        let rich = Fields {
            images: vec![("image/png".into(), "iVBO".into())],
            json_schema: Some(serde_json::json!({"type": "object"})),
            ..Default::default()
        };
        assert_eq!(
            build_job(JobKind::Generate, vec!["what?".into()], &rich),
            serde_json::json!({"stream": false, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what?"},
                {"type": "image", "data": "iVBO", "media_type": "image/png"}]}],
                "response_format": {"type": "json_schema", "name": "answer",
                                    "schema": {"type": "object"}}})
        );
    }

    #[test]
    fn a_cache_hit_says_so_in_the_summary() {
        let envelope = crate::contract::Envelope::for_test("default");
        let error = crate::contract::ErrorBody {
            code: crate::contract::ErrorCode::AllProvidersFailed,
            message: String::new(),
            retryable: false,
        };
        let mut r = ResultEvent::failure(
            &envelope,
            crate::contract::JobKind::Generate,
            error,
            "w",
            chrono::Utc::now(),
        );
        r.status = Status::Ok;
        r.error = None;
        r.cache_hit = true;
        r.cache = Some(crate::contract::CacheSaving {
            stored_at: "2026-11-30T12:00:00Z".parse().unwrap(),
            saved_input_tokens: 3,
            saved_output_tokens: 40,
            saved_cost_usd: None,
            cached_inputs: None,
        });
        let line = summary(&r);
        assert!(
            line.contains(
                "from the cache (stored 2026-11-30T12:00:00Z; saved 3 in + 40 out tokens)"
            ),
            "{line}"
        );
        r.stale = true;
        assert!(summary(&r).contains("past its TTL"), "{}", summary(&r));
    }
}
