//! A job as a `generateContent` request: `contents` with `user` / `model` roles, the system
//! prompt as `systemInstruction`, options in `generationConfig`.
//!
//! Rich jobs: image bytes as `inlineData` parts (Gemini fetches no arbitrary URLs, so URL
//! images never reach this module: `providers::capabilities`), tools as
//! `functionDeclarations` with `parametersJsonSchema` (the schema as given, not Gemini's
//! OpenAPI subset), `tool_choice` as `toolConfig.functionCallingConfig`, assistant calls as
//! `functionCall` parts and tool results as `functionResponse` parts (named by the call they
//! answer, the response an object), consecutive turns of one role merged; JSON output as
//! `responseMimeType: application/json` with `responseJsonSchema`.

use serde::Serialize;
use serde_json::{Value, json};

use crate::contract::{GenerateRequest, ImageSource, Message, ResponseFormat, Role, ToolChoice};
use crate::providers::helpers::tool_name_of;

/// A `generateContent` request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WireRequest<'a> {
    contents: Vec<ContentIn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<SystemIn<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolsIn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize)]
struct ContentIn<'a> {
    role: &'static str,
    parts: Vec<RichPart<'a>>,
}

/// Parts without a role (the system instruction, an embedding's content).
#[derive(Serialize)]
pub(super) struct SystemIn<'a> {
    pub(super) parts: [PartIn<'a>; 1],
}

/// A text part.
#[derive(Serialize)]
pub(super) struct PartIn<'a> {
    pub(super) text: &'a str,
}

/// One part of a turn: text, image bytes, a call, or a call's result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum RichPart<'a> {
    Text(&'a str),
    InlineData(InlineData<'a>),
    FunctionCall(FunctionCall<'a>),
    FunctionResponse(FunctionResponse<'a>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InlineData<'a> {
    mime_type: &'a str,
    data: &'a str,
}

#[derive(Serialize)]
struct FunctionCall<'a> {
    id: &'a str,
    name: &'a str,
    args: &'a Value,
}

#[derive(Serialize)]
struct FunctionResponse<'a> {
    id: &'a str,
    name: &'a str,
    response: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolsIn<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters_json_schema: &'a Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a Value>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.max_output_tokens.is_none()
            && self.seed.is_none()
            && self.stop_sequences.is_empty()
            && self.response_mime_type.is_none()
    }
}

/// A tool result as Gemini wants it: an object (a result that is not a JSON object is
/// wrapped as `{"content": text}`).
fn response_object(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "content": text }),
    }
}

fn parts<'a>(m: &'a Message, all: &'a [Message]) -> Vec<RichPart<'a>> {
    if m.role == Role::Tool {
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        return vec![RichPart::FunctionResponse(FunctionResponse {
            id,
            name: tool_name_of(all, id).unwrap_or(id),
            response: response_object(&m.content),
        })];
    }
    let mut parts = Vec::with_capacity(1 + m.images.len() + m.tool_calls.len());
    if !m.content.is_empty() || (m.images.is_empty() && m.tool_calls.is_empty()) {
        parts.push(RichPart::Text(&m.content));
    }
    parts.extend(m.images.iter().filter_map(|i| match &i.source {
        ImageSource::Data { media_type, data } => Some(RichPart::InlineData(InlineData {
            mime_type: media_type,
            data,
        })),
        ImageSource::Url(_) => None,
    }));
    parts.extend(m.tool_calls.iter().map(|c| {
        RichPart::FunctionCall(FunctionCall {
            id: &c.id,
            name: &c.name,
            args: &c.arguments,
        })
    }));
    parts
}

fn contents(req: &GenerateRequest) -> Vec<ContentIn<'_>> {
    let mut out: Vec<ContentIn<'_>> = Vec::with_capacity(req.messages.len());
    for m in req.messages.iter().filter(|m| m.role != Role::System) {
        let role = if m.role == Role::Assistant {
            "model"
        } else {
            "user"
        };
        let p = parts(m, &req.messages);
        match out.last_mut() {
            Some(last) if last.role == role => last.parts.extend(p),
            _ => out.push(ContentIn { role, parts: p }),
        }
    }
    out
}

pub(super) fn request_body(req: &GenerateRequest) -> WireRequest<'_> {
    let o = &req.options;
    let tools = if req.tools.is_empty() {
        Vec::new()
    } else {
        vec![ToolsIn {
            function_declarations: req
                .tools
                .iter()
                .map(|t| FunctionDeclaration {
                    name: &t.name,
                    description: t.description.as_deref(),
                    parameters_json_schema: &t.parameters,
                })
                .collect(),
        }]
    };
    let tool_config = req.tool_choice.as_ref().map(|c| {
        let config = match c {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Named(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        };
        json!({ "functionCallingConfig": config })
    });
    let (response_mime_type, response_json_schema) = match &req.response_format {
        Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
        Some(ResponseFormat::JsonSchema { schema, .. }) => (Some("application/json"), Some(schema)),
        Some(ResponseFormat::Text) | None => (None, None),
    };
    WireRequest {
        contents: contents(req),
        system_instruction: req.system.as_deref().map(|text| SystemIn {
            parts: [PartIn { text }],
        }),
        tools,
        tool_config,
        generation_config: GenerationConfig {
            temperature: o.temperature,
            top_p: o.top_p,
            max_output_tokens: o.max_tokens,
            seed: o.seed,
            stop_sequences: &o.stop,
            response_mime_type,
            response_json_schema,
        },
    }
}
