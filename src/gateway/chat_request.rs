//! An OpenAI chat completion request as a generation job of the contract (section 6):
//! `messages` (`developer` counts as `system`; user content as text or parts, `image_url`
//! parts as images, `data:` URLs as bytes; assistant `tool_calls` with their JSON-text
//! arguments parsed; `tool` messages), `tools` (functions), `tool_choice`,
//! `parallel_tool_calls`, `response_format` (`json_object`, `json_schema`), `temperature`, `top_p`,
//! `max_tokens` / `max_completion_tokens`, `stop`; `user` goes to the job's metadata,
//! `prompt_cache_key` to the job.
//! Fields a job cannot honour (`n` > 1, `functions`, audio or file parts) are refused with 400;
//! others (`logprobs`, ...) are ignored.

use serde::Deserialize;
use serde_json::{Value, json};

use super::Gateway;
use super::error::ApiError;
use crate::contract::JobKind;

#[derive(Deserialize)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<OneOrMany>,
    n: Option<u32>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<ResponseFormat>,
    functions: Option<Value>,
    user: Option<String>,
    /// Passed on to the job (OpenAI providers get it).
    prompt_cache_key: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<ToolCall>>,
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    image_url: Option<ImageUrl>,
}

#[derive(Deserialize)]
struct ImageUrl {
    url: String,
    detail: Option<String>,
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: FunctionCall,
}

#[derive(Deserialize)]
struct FunctionCall {
    name: String,
    /// JSON text, in OpenAI's format.
    arguments: String,
}

#[derive(Deserialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: String,
    function: Function,
}

#[derive(Deserialize)]
struct Function {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

#[derive(Deserialize)]
struct JsonSchema {
    name: String,
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

/// Whether and how the answer streams.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum StreamMode {
    Off,
    On,
    WithUsage,
}

impl ChatRequest {
    /// The generation job this request asks for (without tenant, reply subject or id).
    pub(crate) fn job(self, gw: &Gateway) -> Result<(Value, StreamMode), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n: only one choice per request is supported",
            ));
        }
        if self.functions.is_some() {
            return Err(ApiError::invalid(
                "functions: deprecated by OpenAI and not supported; send tools",
            ));
        }
        let target = gw
            .catalog
            .resolve(JobKind::Generate, &self.model)
            .ok_or_else(|| ApiError::unknown_model(&self.model))?;
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut options = serde_json::Map::new();
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        for (k, v) in [
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            ("max_tokens", max_tokens.map(Value::from)),
            (
                "stop",
                self.stop.map(|s| match s {
                    OneOrMany::One(s) => json!([s]),
                    OneOrMany::Many(v) => json!(v),
                }),
            ),
        ] {
            if let Some(v) = v {
                options.insert(k.into(), v);
            }
        }
        let mut job = json!({
            "messages": messages,
            "options": options,
            "stream": self.stream,
            "timeout_ms": gw.timeout_ms(None),
        });
        if let Some(key) = self.prompt_cache_key {
            job["prompt_cache_key"] = key.into();
        }
        if let Some(tools) = self.tools {
            job["tools"] = tools
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    if t.kind != "function" {
                        return Err(ApiError::invalid(format!(
                            "tools[{i}].type: {:?} (function only)",
                            t.kind
                        )));
                    }
                    let mut tool = json!({"name": t.function.name});
                    if let Some(d) = t.function.description {
                        tool["description"] = d.into();
                    }
                    if let Some(p) = t.function.parameters {
                        tool["parameters"] = p;
                    }
                    Ok(tool)
                })
                .collect::<Result<Vec<_>, _>>()?
                .into();
        }
        if let Some(choice) = self.tool_choice {
            job["tool_choice"] = match &choice {
                Value::String(_) => choice.clone(),
                Value::Object(o) => match o.get("function").and_then(|f| f.get("name")) {
                    Some(name) => json!({"name": name}),
                    None => {
                        return Err(ApiError::invalid(
                            "tool_choice: a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        ));
                    }
                },
                _ => return Err(ApiError::invalid("tool_choice: a string or an object")),
            };
        }
        if let Some(parallel) = self.parallel_tool_calls {
            job["parallel_tool_calls"] = json!(parallel);
        }
        match self.response_format {
            None | Some(ResponseFormat::Text) => {}
            Some(ResponseFormat::JsonObject) => {
                job["response_format"] = json!({"type": "json_object"})
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                job["response_format"] = json!({"type": "json_schema", "name": json_schema.name,
                    "schema": json_schema.schema.unwrap_or_else(|| json!({"type": "object"})),
                    "strict": json_schema.strict.unwrap_or(false)});
            }
        }
        target.apply(&mut job);
        if let Some(user) = self.user {
            job["metadata"] = json!({"user": user});
        }
        let mode = match (self.stream, self.stream_options) {
            (false, _) => StreamMode::Off,
            (true, Some(o)) if o.include_usage => StreamMode::WithUsage,
            (true, _) => StreamMode::On,
        };
        Ok((job, mode))
    }
}

/// One message in the contract's shape.
fn message(i: usize, m: Message) -> Result<Value, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
        other => {
            return Err(ApiError::invalid(format!(
                "messages[{i}].role: {other:?} is not supported (system, developer, user, assistant, tool)"
            )));
        }
    };
    let content: Value = match m.content {
        None => Value::from(""),
        Some(Content::Text(t)) => t.into(),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.into_iter().enumerate() {
                out.push(match (p.kind.as_str(), p.text, p.image_url) {
                    ("text", Some(t), _) => json!({"type": "text", "text": t}),
                    ("image_url", _, Some(image)) => image_part(&image),
                    (kind, _, _) => {
                        return Err(ApiError::invalid(format!(
                            "messages[{i}].content[{j}]: {kind:?} parts are not supported (text, image_url)"
                        )));
                    }
                });
            }
            out.into()
        }
    };
    let mut out = json!({"role": role, "content": content});
    if let Some(calls) = m.tool_calls {
        let calls = calls
            .into_iter()
            .enumerate()
            .map(|(j, c)| {
                let arguments: Value =
                    serde_json::from_str(&c.function.arguments).map_err(|e| {
                        ApiError::invalid(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments: not JSON ({e})"
                        ))
                    })?;
                Ok(json!({"id": c.id, "name": c.function.name, "arguments": arguments}))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        out["tool_calls"] = calls.into();
    }
    if let Some(id) = m.tool_call_id {
        out["tool_call_id"] = id.into();
    }
    Ok(out)
}

/// An `image_url` part: a `data:` URL becomes the image's bytes, any other URL stays a URL.
fn image_part(image: &ImageUrl) -> Value {
    let mut part = match image
        .url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    {
        Some((media_type, data)) => {
            json!({"type": "image", "data": data, "media_type": media_type})
        }
        None => json!({"type": "image", "url": image.url}),
    };
    if let Some(detail) = &image.detail {
        part["detail"] = detail.clone().into();
    }
    part
}

impl super::models::Target {
    /// Set the job fields this model name stands for.
    pub(super) fn apply(&self, job: &mut Value) {
        for (k, v) in [
            ("task_type", &self.task_type),
            ("provider", &self.provider),
            ("model", &self.model),
        ] {
            if let Some(v) = v {
                job[k] = v.clone().into();
            }
        }
    }
}
