//! Rich generation jobs (CONTRACT section 6), decoded and checked: messages with content parts
//! (text and images), assistant tool calls and tool results; the tools a model may call,
//! `tool_choice`, and `response_format`. Every refusal names its field and its bound.
//!
//! Schemas (a tool's `parameters`, a JSON response format's `schema`) are bounded in size and
//! depth and must compile as JSON Schema; remote `$ref`s are never fetched (the validator is
//! built without network or file access), so a schema that needs one is refused here.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::config::LimitsConfig;
use crate::contract::{
    CacheTtl, Image, ImageSource, Message, ResponseFormat, Role, Tool, ToolCall, ToolChoice, quote,
};

/// A message as published.
#[derive(Deserialize)]
pub(super) struct WireMessage {
    pub(super) role: Role,
    #[serde(default)]
    pub(super) content: Option<WireContent>,
    #[serde(default)]
    pub(super) tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    pub(super) tool_call_id: Option<String>,
    /// A prompt-cache breakpoint after this message (`5m` or `1h`).
    #[serde(default)]
    pub(super) cache: Option<CacheTtl>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum WirePart {
    Text {
        text: String,
    },
    Image {
        url: Option<String>,
        data: Option<String>,
        media_type: Option<String>,
        detail: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireToolCall {
    id: String,
    name: String,
    arguments: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WireTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    cache: Option<CacheTtl>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum WireResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: Value,
        #[serde(default)]
        strict: bool,
    },
}

/// Media types of images every provider with image input takes.
pub(crate) const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];
/// The longest image URL taken.
const MAX_URL_BYTES: usize = 2048;
/// A tool's description, at most.
const MAX_DESCRIPTION_BYTES: usize = 4096;

/// A tool or tool-call name, or a schema name: what every provider accepts (`^[A-Za-z0-9_-]{1,64}$`).
fn check_identifier(field: &str, name: &str) -> Result<(), String> {
    if crate::contract::subject::is_plain_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{field}: {} must be 1 to 64 letters, digits, _ or -",
            quote(name)
        ))
    }
}

/// The system text of a job's system messages, and the longest cache breakpoint they mark.
#[derive(Default)]
pub(super) struct ListedSystem {
    pub(super) text: Option<String>,
    pub(super) cache: Option<CacheTtl>,
}

/// The messages of a job, decoded: roles, text, images, tool calls and results.
pub(super) fn messages(
    wire: &[WireMessage],
    bounds: &LimitsConfig,
) -> Result<(ListedSystem, Vec<Message>), String> {
    let mut system: Option<String> = None;
    let mut system_cache: Option<CacheTtl> = None;
    let mut out = Vec::with_capacity(wire.len());
    let mut images = 0usize;
    for (i, m) in wire.iter().enumerate() {
        let field = |name: &str| format!("messages[{i}].{name}");
        let (text, parts_images) = match &m.content {
            None => (String::new(), Vec::new()),
            Some(WireContent::Text(t)) => (t.clone(), Vec::new()),
            Some(WireContent::Parts(parts)) => {
                let mut text = String::new();
                let mut found = Vec::new();
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        WirePart::Text { text: t } => text.push_str(t),
                        WirePart::Image {
                            url,
                            data,
                            media_type,
                            detail,
                        } => {
                            let at = format!("messages[{i}].content[{j}]");
                            found.push(image(&at, url, data, media_type, detail, bounds)?);
                        }
                    }
                }
                (text, found)
            }
        };
        if !parts_images.is_empty() && m.role != Role::User {
            return Err(format!(
                "{}: only user messages may hold images",
                field("content")
            ));
        }
        images += parts_images.len();
        if images > bounds.max_images {
            return Err(format!(
                "{}: more than {} images in the job (limits.max_images)",
                field("content"),
                bounds.max_images
            ));
        }
        let tool_calls = match &m.tool_calls {
            None => Vec::new(),
            Some(_) if m.role != Role::Assistant => {
                return Err(format!(
                    "{}: only assistant messages make tool calls",
                    field("tool_calls")
                ));
            }
            Some(calls) => calls
                .iter()
                .enumerate()
                .map(|(j, c)| tool_call(&format!("messages[{i}].tool_calls[{j}]"), c, bounds))
                .collect::<Result<_, _>>()?,
        };
        let tool_call_id = match (m.role, &m.tool_call_id) {
            (Role::Tool, Some(id)) if !id.is_empty() && id.len() <= bounds.max_name_bytes => {
                Some(id.clone())
            }
            (Role::Tool, _) => {
                return Err(format!(
                    "{}: a tool message needs the id of the call it answers (1 to {} bytes)",
                    field("tool_call_id"),
                    bounds.max_name_bytes
                ));
            }
            (_, Some(_)) => {
                return Err(format!(
                    "{}: only tool messages answer a tool call",
                    field("tool_call_id")
                ));
            }
            (_, None) => None,
        };
        match m.role {
            // System messages in the list join the system prompt, in order.
            Role::System => {
                let s = system.get_or_insert_with(String::new);
                if !s.is_empty() {
                    s.push_str("\n\n");
                }
                s.push_str(&text);
                system_cache = system_cache.max(m.cache);
                continue;
            }
            _ if text.is_empty() && parts_images.is_empty() && tool_calls.is_empty() => {
                return Err(format!("{}: must not be empty", field("content")));
            }
            _ => {}
        }
        out.push(Message {
            role: m.role,
            content: text,
            images: parts_images,
            tool_calls,
            tool_call_id,
            cache: m.cache,
        });
    }
    let listed = ListedSystem {
        text: system,
        cache: system_cache,
    };
    Ok((listed, out))
}

fn image(
    at: &str,
    url: &Option<String>,
    data: &Option<String>,
    media_type: &Option<String>,
    detail: &Option<String>,
    bounds: &LimitsConfig,
) -> Result<Image, String> {
    let detail = match detail.as_deref() {
        None => None,
        Some(d @ ("low" | "high" | "auto")) => Some(d.to_string()),
        Some(other) => {
            return Err(format!("{at}.detail: {} (low, high or auto)", quote(other)));
        }
    };
    let source = match (url, data) {
        (Some(url), None) => {
            let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
            if !scheme_ok || url.len() > MAX_URL_BYTES || url.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{at}.url: {} must be an http(s) URL of at most {MAX_URL_BYTES} bytes",
                    quote(url)
                ));
            }
            ImageSource::Url(url.clone())
        }
        (None, Some(data)) => {
            let media_type = media_type.as_deref().unwrap_or_default();
            if !IMAGE_TYPES.contains(&media_type) {
                return Err(format!(
                    "{at}.media_type: {} (one of {})",
                    quote(media_type),
                    IMAGE_TYPES.join(", ")
                ));
            }
            // Decoded size, from the text's length: refused before decoding anything.
            let bytes = data.len() / 4 * 3;
            if bytes > bounds.max_image_bytes {
                return Err(format!(
                    "{at}.data: about {bytes} bytes, more than the limit of {} (limits.max_image_bytes)",
                    bounds.max_image_bytes
                ));
            }
            if base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .is_err()
            {
                return Err(format!("{at}.data: not base64 (standard alphabet, padded)"));
            }
            ImageSource::Data {
                media_type: media_type.to_string(),
                data: data.clone(),
            }
        }
        _ => return Err(format!("{at}: an image needs either url or data")),
    };
    Ok(Image { source, detail })
}

fn tool_call(at: &str, c: &WireToolCall, bounds: &LimitsConfig) -> Result<ToolCall, String> {
    if c.id.is_empty() || c.id.len() > bounds.max_name_bytes {
        return Err(format!(
            "{at}.id: 1 to {} bytes (limits.max_name_bytes)",
            bounds.max_name_bytes
        ));
    }
    check_identifier(&format!("{at}.name"), &c.name)?;
    if !c.arguments.is_object() {
        return Err(format!("{at}.arguments: must be a JSON object"));
    }
    Ok(ToolCall {
        id: c.id.clone(),
        name: c.name.clone(),
        arguments: c.arguments.clone(),
    })
}

/// The tools a job offers, each checked and its schema compiled.
pub(super) fn tools(wire: &[WireTool], bounds: &LimitsConfig) -> Result<Vec<Tool>, String> {
    if wire.len() > bounds.max_tools {
        return Err(format!(
            "tools: {} tools, more than the limit of {} (limits.max_tools)",
            wire.len(),
            bounds.max_tools
        ));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(wire.len());
    for (i, t) in wire.iter().enumerate() {
        let at = format!("tools[{i}]");
        check_identifier(&format!("{at}.name"), &t.name)?;
        if out.iter().any(|o| o.name == t.name) {
            return Err(format!("{at}.name: {} is offered twice", quote(&t.name)));
        }
        if t.description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION_BYTES || d.contains('\0'))
        {
            return Err(format!(
                "{at}.description: at most {MAX_DESCRIPTION_BYTES} bytes, without NUL"
            ));
        }
        let parameters = t
            .parameters
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        if !parameters.is_object() {
            return Err(format!("{at}.parameters: must be a JSON Schema object"));
        }
        check_schema(&format!("{at}.parameters"), &parameters, bounds)?;
        out.push(Tool {
            name: t.name.clone(),
            description: t.description.clone(),
            parameters,
            cache: t.cache,
        });
    }
    Ok(out)
}

/// `"auto" | "none" | "required" | {"name": "..."}`, naming one of `tools`.
pub(super) fn tool_choice(wire: &Value, tools: &[Tool]) -> Result<ToolChoice, String> {
    let choice = match wire {
        Value::String(s) if s == "auto" => ToolChoice::Auto,
        Value::String(s) if s == "none" => ToolChoice::None,
        Value::String(s) if s == "required" => ToolChoice::Required,
        Value::Object(o) if o.len() == 1 && o.get("name").is_some_and(Value::is_string) => {
            let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!(
                    "tool_choice: {} is not one of the job's tools",
                    quote(name)
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        _ => {
            return Err(
                "tool_choice: \"auto\", \"none\", \"required\" or {\"name\": \"<a tool>\"}".into(),
            );
        }
    };
    if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) && tools.is_empty() {
        return Err("tool_choice: the job offers no tools".into());
    }
    Ok(choice)
}

pub(super) fn response_format(
    wire: &WireResponseFormat,
    bounds: &LimitsConfig,
) -> Result<ResponseFormat, String> {
    Ok(match wire {
        WireResponseFormat::Text => ResponseFormat::Text,
        WireResponseFormat::JsonObject => ResponseFormat::JsonObject,
        WireResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => {
            check_identifier("response_format.name", name)?;
            if !schema.is_object() {
                return Err("response_format.schema: must be a JSON Schema object".into());
            }
            check_schema("response_format.schema", schema, bounds)?;
            ResponseFormat::JsonSchema {
                name: name.clone(),
                schema: schema.clone(),
                strict: *strict,
            }
        }
    })
}

/// A schema within its bounds that compiles (no remote references).
fn check_schema(at: &str, schema: &Value, bounds: &LimitsConfig) -> Result<(), String> {
    let size = serde_json::to_vec(schema)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > bounds.max_schema_bytes {
        return Err(format!(
            "{at}: {size} bytes, more than the limit of {} (limits.max_schema_bytes)",
            bounds.max_schema_bytes
        ));
    }
    let depth = depth_of(schema);
    if depth > bounds.max_schema_depth {
        return Err(format!(
            "{at}: nested {depth} levels deep, more than the limit of {} (limits.max_schema_depth)",
            bounds.max_schema_depth
        ));
    }
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|e| format!("{at}: not a usable JSON Schema: {}", clip(&e.to_string())))
}

/// How deeply a JSON value nests (a scalar is 0).
fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

fn clip(text: &str) -> String {
    super::bounds::clip_reason(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<Vec<Message>, String> {
        let wire: Vec<WireMessage> = serde_json::from_str(json).map_err(|e| e.to_string())?;
        messages(&wire, &LimitsConfig::default()).map(|(_, m)| m)
    }

    #[test]
    fn parts_roles_tool_calls_and_results_decode() {
        let png = base64::engine::general_purpose::STANDARD.encode([137u8, 80, 78, 71]);
        let m = decode(&format!(
            r#"[{{"role":"system","content":"be brief"}},
               {{"role":"user","content":[{{"type":"text","text":"What is "}},{{"type":"text","text":"this?"}},
                 {{"type":"image","data":"{png}","media_type":"image/png","detail":"low"}},
                 {{"type":"image","url":"https://example.com/cat.png"}}]}},
               {{"role":"assistant","content":"","tool_calls":[{{"id":"call_1","name":"get_weather","arguments":{{"city":"Paris"}}}}]}},
               {{"role":"tool","tool_call_id":"call_1","content":"{{\"temp_c\": 21}}"}}]"#
        ))
        .unwrap();
        assert_eq!(m.len(), 3, "the system message joins the system prompt");
        assert_eq!(m[0].content, "What is this?");
        assert_eq!(m[0].images.len(), 2);
        assert_eq!(m[0].images[0].detail.as_deref(), Some("low"));
        assert_eq!(m[1].tool_calls[0].arguments["city"], "Paris");
        assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn each_broken_rich_message_is_refused_naming_its_field() {
        for (json, names) in [
            (
                r#"[{"role":"tool","content":"x"}]"#,
                "messages[0].tool_call_id",
            ),
            (
                r#"[{"role":"user","content":"x","tool_calls":[{"id":"a","name":"f","arguments":{}}]}]"#,
                "messages[0].tool_calls",
            ),
            (
                r#"[{"role":"assistant","content":"","tool_calls":[{"id":"a","name":"f","arguments":"{}"}]}]"#,
                "messages[0].tool_calls[0].arguments",
            ),
            (
                r#"[{"role":"user","content":[{"type":"image","url":"file:///etc/passwd"}]}]"#,
                "messages[0].content[0].url",
            ),
            (
                r#"[{"role":"user","content":[{"type":"image","data":"iVBO","media_type":"text/html"}]}]"#,
                "messages[0].content[0].media_type",
            ),
            (
                r#"[{"role":"user","content":[{"type":"image","data":"!!!!","media_type":"image/png"}]}]"#,
                "messages[0].content[0].data",
            ),
            (
                r#"[{"role":"assistant","content":[{"type":"image","url":"https://a.b/c.png"}]}]"#,
                "messages[0].content",
            ),
        ] {
            let err = decode(json).unwrap_err();
            assert!(err.starts_with(names), "{json}: {err}");
        }
    }

    #[test]
    fn tools_and_schemas_are_bounded_and_must_compile() {
        let bounds = LimitsConfig {
            max_tools: 2,
            max_schema_depth: 4,
            ..Default::default()
        };
        let tool = |name: &str, parameters: Value| WireTool {
            name: name.into(),
            description: None,
            parameters: Some(parameters),
            cache: None,
        };
        let ok = serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}});
        assert!(tools(&[tool("a", ok.clone())], &bounds).is_ok());
        let err = tools(
            &[
                tool("a", ok.clone()),
                tool("b", ok.clone()),
                tool("c", ok.clone()),
            ],
            &bounds,
        )
        .unwrap_err();
        assert!(err.contains("limits.max_tools"), "{err}");
        let deep = serde_json::json!({"type": "object", "properties": {"a": {"type": "object",
            "properties": {"b": {"type": "object", "properties": {"c": {"type": "string"}}}}}}});
        let err = tools(&[tool("a", deep)], &bounds).unwrap_err();
        assert!(err.contains("limits.max_schema_depth"), "{err}");
        let remote = serde_json::json!({"$ref": "https://example.com/schema.json"});
        let err = tools(&[tool("a", remote)], &bounds).unwrap_err();
        assert!(
            err.starts_with("tools[0].parameters: not a usable JSON Schema"),
            "{err}"
        );
        let err = tools(&[tool("bad name", ok.clone())], &bounds).unwrap_err();
        assert!(err.starts_with("tools[0].name"), "{err}");
        let err = tools(&[tool("a", ok.clone()), tool("a", ok)], &bounds).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn a_named_tool_choice_must_name_an_offered_tool() {
        let t = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
            cache: None,
        }];
        assert_eq!(
            tool_choice(&serde_json::json!({"name": "f"}), &t),
            Ok(ToolChoice::Named("f".into()))
        );
        assert!(tool_choice(&serde_json::json!({"name": "g"}), &t).is_err());
        assert!(tool_choice(&serde_json::json!("required"), &[]).is_err());
        assert!(tool_choice(&serde_json::json!("sometimes"), &t).is_err());
    }
}
