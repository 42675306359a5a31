//! Bounds on a job's fields (`[limits]`): sizes, counts, depth, and no NUL or control
//! characters where they would reach logs or Postgres. Each refusal names the field and the
//! bound; values are quoted only as short, escaped prefixes.

use super::wire::WireGenerate;
use crate::config::LimitsConfig;
use crate::contract::{Message, QUOTE_CHARS, Tool, quote};

/// Longest stop sequence, in bytes (providers accept short ones only).
pub(super) const MAX_STOP_BYTES: usize = 256;

/// Counts and total size of the prompt text; no NUL anywhere in it.
pub(super) fn check_prompt_bounds(
    w: &WireGenerate,
    messages: &[Message],
    tools: &[Tool],
    bounds: &LimitsConfig,
) -> Result<(), String> {
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
    // Tool definitions and the calls in the conversation are prompt text as well.
    let json_len = |v: &serde_json::Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    for t in tools {
        total += t.name.len() + t.description.as_ref().map_or(0, String::len);
        total += json_len(&t.parameters);
    }
    for m in messages {
        for c in &m.tool_calls {
            total += c.id.len() + c.name.len() + json_len(&c.arguments);
        }
    }
    if total > bounds.max_prompt_bytes {
        return Err(format!(
            "prompt: the prompt text (system_prompt, prompt, messages, context) is {total} bytes, more than the limit of {} (limits.max_prompt_bytes)",
            bounds.max_prompt_bytes
        ));
    }
    Ok(())
}

pub(super) fn no_nul(field: &str, text: &str) -> Result<(), String> {
    match text.find('\0') {
        None => Ok(()),
        Some(at) => Err(format!("{field}: holds a NUL character (at byte {at})")),
    }
}

/// A name (tenant, task type, trace id): at most `max` bytes, no control characters.
pub(super) fn check_name(value: &str, max: usize) -> Result<(), String> {
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
pub(super) fn safe_name(value: &str, max: usize) -> String {
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
pub(super) fn check_metadata(
    value: &serde_json::Value,
    bounds: &LimitsConfig,
) -> Result<(), String> {
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
    let mut echoed = ByteCount(0);
    if serde_json::to_writer(&mut echoed, value).is_err() {
        echoed.0 = usize::MAX;
    }
    let echoed = echoed.0;
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
pub(crate) fn clip_reason(text: &str) -> String {
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

/// Counts what is written to it (the size of metadata as echoed, without building it).
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
