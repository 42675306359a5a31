//! An answer checked against the job's rules before it counts (CONTRACT section 6): every
//! tool call names one of the job's tools and carries a JSON object valid against that tool's
//! `parameters`; a JSON `response_format` answer parses (an object for `json_object`) and,
//! with `json_schema`, matches the schema. A failure is `invalid_output`: the attempt was
//! billed and is recorded, and the chain moves on to its next entry, which is how a job
//! escalates to a stronger model.

use serde_json::Value;

use super::attempt::PendingCall;
use crate::contract::{ErrorCode, GenerateRequest, ResponseFormat, ToolCall};
use crate::error::ProviderError;

/// Most characters of a model's text quoted in an `invalid_output` message.
const QUOTED: usize = 80;

fn invalid(message: String) -> ProviderError {
    ProviderError::new(ErrorCode::InvalidOutput, message)
}

fn snippet(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTED).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

/// The answer's text, its tool calls (arguments parsed) and, for JSON answers, the parsed
/// value; or why it breaks the job's rules.
pub(super) fn checked(
    req: &GenerateRequest,
    output: String,
    calls: Vec<PendingCall>,
) -> Result<(String, Vec<ToolCall>, Option<Value>), ProviderError> {
    let mut tool_calls = Vec::with_capacity(calls.len());
    for (i, call) in calls.into_iter().enumerate() {
        let Some(tool) = req.tools.iter().find(|t| t.name == call.name) else {
            return Err(invalid(format!(
                "tool call {i} names {}, which is not one of the job's tools",
                snippet(&call.name)
            )));
        };
        let text = call.arguments.trim();
        let arguments: Value = if text.is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(text).map_err(|e| {
                invalid(format!(
                    "tool call {i} ({}): its arguments are not JSON ({e}): {}",
                    call.name,
                    snippet(text)
                ))
            })?
        };
        if !arguments.is_object() {
            return Err(invalid(format!(
                "tool call {i} ({}): its arguments are not a JSON object",
                call.name
            )));
        }
        validate(&tool.parameters, &arguments)
            .map_err(|why| invalid(format!("tool call {i} ({}): {why}", call.name)))?;
        let id = if call.id.is_empty() {
            format!("call_{i}")
        } else {
            call.id
        };
        tool_calls.push(ToolCall {
            id,
            name: call.name,
            arguments,
        });
    }
    let json = match &req.response_format {
        Some(format) if format.is_json() && tool_calls.is_empty() => {
            let value: Value = serde_json::from_str(output.trim()).map_err(|e| {
                invalid(format!(
                    "the answer is not JSON ({e}): {}",
                    snippet(output.trim())
                ))
            })?;
            match format {
                ResponseFormat::JsonObject if !value.is_object() => {
                    return Err(invalid("the answer is JSON but not an object".into()));
                }
                ResponseFormat::JsonSchema { name, schema, .. } => {
                    validate(schema, &value).map_err(|why| {
                        invalid(format!(
                            "the answer does not match the schema {name}: {why}"
                        ))
                    })?;
                }
                _ => {}
            }
            Some(value)
        }
        _ => None,
    };
    Ok((output, tool_calls, json))
}

/// `instance` against `schema` (already known to compile: the job was checked at decode).
fn validate(schema: &Value, instance: &Value) -> Result<(), String> {
    let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
    match validator.iter_errors(instance).next() {
        None => Ok(()),
        Some(e) => {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            let mut why = e.to_string();
            why.truncate(200);
            Err(format!("at {at}: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Message, Role, Tool};

    fn request(tools: Vec<Tool>, format: Option<ResponseFormat>) -> GenerateRequest {
        GenerateRequest {
            messages: vec![Message::text(Role::User, "x")],
            tools,
            response_format: format,
            ..Default::default()
        }
    }

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({"type": "object",
                "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            cache: None,
        }
    }

    fn call(name: &str, args: &str) -> PendingCall {
        PendingCall {
            id: "call_1".into(),
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn tool_calls_are_parsed_and_validated_against_their_tools() {
        let req = request(vec![weather()], None);
        let (_, calls, _) = checked(
            &req,
            String::new(),
            vec![call("get_weather", r#"{"city":"Paris"}"#)],
        )
        .unwrap();
        assert_eq!(calls[0].arguments["city"], "Paris");
        for (name, args, says) in [
            ("get_weather", r#"{"ci"#, "not JSON"),
            ("get_weather", "[1]", "not a JSON object"),
            ("get_weather", r#"{"town":"Paris"}"#, "city"),
            ("get_time", "{}", "not one of the job's tools"),
        ] {
            let e = checked(&req, String::new(), vec![call(name, args)]).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidOutput);
            assert!(e.message.contains(says), "{args}: {}", e.message);
        }
    }

    #[test]
    fn json_answers_parse_and_match_their_schema() {
        let schema = ResponseFormat::JsonSchema {
            name: "person".into(),
            schema: serde_json::json!({"type": "object", "properties": {"name": {"type": "string"}},
                "required": ["name"]}),
            strict: true,
        };
        let req = request(Vec::new(), Some(schema));
        let (_, _, json) = checked(&req, r#" {"name": "Ada"} "#.into(), Vec::new()).unwrap();
        assert_eq!(json.unwrap()["name"], "Ada");
        let e = checked(&req, r#"{"age": 3}"#.into(), Vec::new()).unwrap_err();
        assert!(
            e.message.contains("does not match the schema person"),
            "{}",
            e.message
        );
        let e = checked(&req, "Sure! Here it is".into(), Vec::new()).unwrap_err();
        assert!(e.message.contains("not JSON"), "{}", e.message);
        let object = request(Vec::new(), Some(ResponseFormat::JsonObject));
        assert!(checked(&object, "[1, 2]".into(), Vec::new()).is_err());
        let text = request(Vec::new(), None);
        assert_eq!(checked(&text, "hi".into(), Vec::new()).unwrap().2, None);
    }
}
