//! A job as a Messages API request: the system prompt at the top level, images as `image`
//! blocks, tool calls as `tool_use` blocks and their results as `tool_result` blocks of a user
//! turn (consecutive turns of one role merged, as the API wants them alternating).
//!
//! The Messages API has no JSON response format. A job that asks for JSON gets an *answer
//! tool*: one more tool whose input schema is the job's schema (any object for
//! `json_object`), which the model is made to call; its input is the answer. The decoder turns
//! that call back into answer text ([`AnswerTool`]).

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Value, json};

use crate::contract::{
    CacheTtl, GenerateRequest, ImageSource, Message, ResponseFormat, Role, ToolChoice,
};

#[derive(Serialize)]
pub(super) struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<MessageIn<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<SystemIn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolIn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
}

#[derive(Serialize)]
struct MessageIn<'a> {
    role: &'static str,
    content: ContentIn<'a>,
}

/// The system prompt: text, or (with a cache breakpoint) the prompt as a marked block and the
/// retrieval context after it, unmarked.
#[derive(Serialize)]
#[serde(untagged)]
enum SystemIn<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<SystemBlock<'a>>),
}

#[derive(Serialize)]
struct SystemBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<CacheControl>,
}

/// `cache_control`: a breakpoint after this block (5 minutes unless `ttl` says `1h`).
#[derive(Serialize, Clone, Copy)]
struct CacheControl {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'static str>,
}

impl CacheControl {
    fn of(ttl: Option<CacheTtl>) -> Option<Self> {
        ttl.map(|ttl| CacheControl {
            kind: "ephemeral",
            ttl: (ttl == CacheTtl::OneHour).then_some("1h"),
        })
    }
}

/// A turn's content: plain text, or blocks.
#[derive(Serialize)]
#[serde(untagged)]
enum ContentIn<'a> {
    Text(&'a str),
    Blocks(Vec<Marked<'a>>),
}

/// A content block, and the cache breakpoint after it if any.
#[derive(Serialize)]
struct Marked<'a> {
    #[serde(flatten)]
    block: BlockIn<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<CacheControl>,
}

impl<'a> From<BlockIn<'a>> for Marked<'a> {
    fn from(block: BlockIn<'a>) -> Self {
        Marked {
            block,
            cache_control: None,
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockIn<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: ImageIn<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: &'a Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageIn<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize)]
struct ToolIn<'a> {
    name: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<CacheControl>,
}

/// The tool a JSON answer comes through, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AnswerTool(pub String);

impl AnswerTool {
    /// The answer tool a job needs (it asks for JSON), named so that no tool of the job has
    /// its name: the schema's name, else `json_answer`, else `json_answer_2`, ...
    pub(super) fn of(req: &GenerateRequest) -> Option<AnswerTool> {
        let preferred = match req.response_format.as_ref()? {
            ResponseFormat::Text => return None,
            ResponseFormat::JsonObject => None,
            ResponseFormat::JsonSchema { name, .. } => Some(name.clone()),
        };
        let taken = |n: &str| req.tools.iter().any(|t| t.name == n);
        let name = preferred
            .into_iter()
            .chain(std::iter::once("json_answer".to_string()))
            .chain((2..).map(|n| format!("json_answer_{n}")))
            .find(|n| !taken(n))?;
        Some(AnswerTool(name))
    }
}

impl<'a> BlockIn<'a> {
    /// A message's blocks; a message marked `cache` has the breakpoint on its last block.
    fn of_message(m: &'a Message) -> Vec<Marked<'a>> {
        let mut blocks: Vec<Marked<'a>> = Self::blocks(m).into_iter().map(Marked::from).collect();
        if let Some(last) = blocks.last_mut() {
            last.cache_control = CacheControl::of(m.cache);
        }
        blocks
    }

    fn blocks(m: &'a Message) -> Vec<BlockIn<'a>> {
        let mut blocks = Vec::with_capacity(1 + m.images.len() + m.tool_calls.len());
        if let Some(id) = m.tool_call_id.as_deref().filter(|_| m.role == Role::Tool) {
            blocks.push(BlockIn::ToolResult {
                tool_use_id: id,
                content: &m.content,
            });
            return blocks;
        }
        // Images before the text that talks about them, as Anthropic recommends.
        blocks.extend(m.images.iter().map(|image| BlockIn::Image {
            source: match &image.source {
                ImageSource::Url(url) => ImageIn::Url { url },
                ImageSource::Data { media_type, data } => ImageIn::Base64 { media_type, data },
            },
        }));
        // Empty text blocks are refused.
        if !m.content.is_empty() {
            blocks.push(BlockIn::Text { text: &m.content });
        }
        blocks.extend(m.tool_calls.iter().map(|c| BlockIn::ToolUse {
            id: &c.id,
            name: &c.name,
            input: &c.arguments,
        }));
        blocks
    }
}

fn role(m: &Message) -> &'static str {
    if m.role == Role::Assistant {
        "assistant"
    } else {
        "user"
    }
}

/// The turns: tool results become user turns, and turns of one role in a row become one.
fn messages(req: &GenerateRequest) -> Vec<MessageIn<'_>> {
    let mut out: Vec<MessageIn<'_>> = Vec::with_capacity(req.messages.len());
    for m in req.messages.iter().filter(|m| m.role != Role::System) {
        let plain = m.images.is_empty()
            && m.tool_calls.is_empty()
            && m.role != Role::Tool
            && m.cache.is_none();
        match out.last_mut() {
            Some(last) if last.role == role(m) => {
                let mut blocks = match std::mem::replace(&mut last.content, ContentIn::Text("")) {
                    ContentIn::Text("") => Vec::new(),
                    ContentIn::Text(text) => vec![BlockIn::Text { text }.into()],
                    ContentIn::Blocks(b) => b,
                };
                blocks.extend(BlockIn::of_message(m));
                last.content = ContentIn::Blocks(blocks);
            }
            _ => out.push(MessageIn {
                role: role(m),
                content: if plain {
                    ContentIn::Text(&m.content)
                } else {
                    ContentIn::Blocks(BlockIn::of_message(m))
                },
            }),
        }
    }
    out
}

pub(super) fn request_body<'a>(
    model: &'a str,
    req: &'a GenerateRequest,
    default_max_tokens: u32,
    answer: Option<&AnswerTool>,
) -> WireRequest<'a> {
    let mut tools: Vec<ToolIn<'a>> = req
        .tools
        .iter()
        .map(|t| ToolIn {
            name: Cow::Borrowed(&t.name),
            description: t.description.as_deref(),
            input_schema: Cow::Borrowed(&t.parameters),
            cache_control: CacheControl::of(t.cache),
        })
        .collect();
    let mut tool_choice = req.tool_choice.as_ref().map(|c| match c {
        ToolChoice::Auto => json!({"type": "auto"}),
        ToolChoice::None => json!({"type": "none"}),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Named(name) => json!({"type": "tool", "name": name}),
    });
    if let Some(AnswerTool(name)) = answer {
        let schema = match &req.response_format {
            Some(ResponseFormat::JsonSchema { schema, .. }) => Cow::Borrowed(schema),
            _ => Cow::Owned(json!({"type": "object"})),
        };
        tools.push(ToolIn {
            name: Cow::Owned(name.clone()),
            description: Some("Give your answer by calling this tool: its input is the answer."),
            input_schema: schema,
            cache_control: None,
        });
        // The answer must come through a tool: the answer tool alone, or (when the job has
        // tools the model may call) any tool; a named tool stays named.
        tool_choice = Some(match &req.tool_choice {
            Some(ToolChoice::Named(n)) => json!({"type": "tool", "name": n}),
            Some(ToolChoice::None) => json!({"type": "tool", "name": name}),
            _ if req.tools.is_empty() => json!({"type": "tool", "name": name}),
            _ => json!({"type": "any"}),
        });
    }
    // One call at a time: Anthropic says it inside `tool_choice` (`auto` when none was set).
    if req.parallel_tool_calls == Some(false) && !tools.is_empty() {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
    }
    let o = &req.options;
    WireRequest {
        model,
        max_tokens: o.max_tokens.unwrap_or(default_max_tokens),
        messages: messages(req),
        stream: req.stream,
        system: system(req),
        // Anthropic's range is 0..=1; the contract's is 0..=2.
        temperature: o.temperature.map(|t| t.min(1.0)),
        top_p: o.top_p,
        stop_sequences: &o.stop,
        tools,
        tool_choice,
    }
}

/// The system prompt and retrieval context as sent: one text, or with a cache breakpoint on
/// the system prompt, a marked block for it and an unmarked one for the context (which
/// changes from job to job and is not worth caching).
fn system(req: &GenerateRequest) -> Option<SystemIn<'_>> {
    let prompt = req.system.as_deref().filter(|s| !s.is_empty());
    match (prompt, CacheControl::of(req.system_cache)) {
        (Some(prompt), Some(mark)) => {
            let mut blocks = vec![SystemBlock {
                kind: "text",
                text: Cow::Borrowed(prompt),
                cache_control: Some(mark),
            }];
            blocks.extend(req.context_block().map(|text| SystemBlock {
                kind: "text",
                text: Cow::Owned(text),
                cache_control: None,
            }));
            Some(SystemIn::Blocks(blocks))
        }
        _ => req.system_text().map(SystemIn::Text),
    }
}
