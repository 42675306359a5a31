//! Requests the protocol modules' tests translate (unit tests only).

use serde_json::json;

use crate::contract::{GenerateRequest, Image, ImageSource, Message, Role, Tool, ToolCall};

/// The JSON Schema of `get_weather`'s arguments.
pub(crate) fn weather_schema() -> serde_json::Value {
    json!({"type": "object", "properties": {"city": {"type": "string"}}})
}

/// A user message with a PNG (bytes), the assistant's `get_weather` call `call_0` for Paris,
/// the tool's result (`result`), and the `get_weather` tool.
pub(crate) fn tool_turn(result: &str) -> GenerateRequest {
    let mut user = Message::text(Role::User, "Weather where this is?");
    user.images = vec![Image {
        source: ImageSource::Data {
            media_type: "image/png".into(),
            data: "iVBORw0KGgo=".into(),
        },
        detail: None,
    }];
    let mut assistant = Message::text(Role::Assistant, "");
    assistant.tool_calls = vec![ToolCall {
        id: "call_0".into(),
        name: "get_weather".into(),
        arguments: json!({"city": "Paris"}),
    }];
    let mut answer = Message::text(Role::Tool, result);
    answer.tool_call_id = Some("call_0".into());
    GenerateRequest {
        messages: vec![user, assistant, answer],
        tools: vec![Tool {
            name: "get_weather".into(),
            description: Some("Current weather".into()),
            parameters: weather_schema(),
            cache: None,
        }],
        ..Default::default()
    }
}

/// The event of a tool call that arrived whole (Gemini, Ollama).
pub(crate) fn whole_call(
    index: u32,
    id: &str,
    name: &str,
    arguments: &str,
) -> super::ProviderEvent {
    super::ProviderEvent::ToolCall(crate::contract::ToolCallChunk {
        index,
        id: Some(id.into()),
        name: Some(name.into()),
        arguments: arguments.into(),
    })
}
