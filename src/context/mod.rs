//! Context-window fitting: making a generation request fit the model it is about to be sent
//! to, before the call, or saying that it cannot.
//!
//! A request fits when its prompt tokens ([`crate::tokens::prompt_tokens`]) plus the output it
//! reserves (`options.max_tokens`, else the provider's default, Anthropic's
//! `default_max_tokens`; nothing when neither is set) are within the model's window
//! ([`Window`]: the provider's `context_windows`, else the built-in table; a model with no
//! known window is sent as it is). When it does not, in this order:
//!
//! 1. retrieval `context` chunks are dropped from the least relevant (the last) first;
//! 2. then the oldest conversation messages; the system prompt, the last user message and
//!    anything after it are always kept, and a conversation is never left starting with an
//!    assistant message;
//! 3. then, with `options.fit: "trim"` (the default), `max_tokens` is lowered to the room
//!    left, if that is at least [`MIN_OUTPUT`] tokens (or the job's own smaller
//!    `max_tokens`); `"strict"` keeps it.
//!
//! What still does not fit is [`Fit::TooLong`]: the chain tries the route's next entry (a
//! larger window), and answers `context_too_long` with these counts when none fits, without
//! calling a provider. Counting costs CPU, so a request whose size in bytes already proves it
//! fits (a token is at least one byte) is not counted at all.

mod windows;

use crate::contract::{CONTEXT_HEADER, FitMode, GenerateRequest, Role, Trimmed, context_line};
use crate::tokens::{self, Counter};

pub(crate) use windows::builtin;

/// The least output `max_tokens` is lowered to; a job with less room does not fit.
pub const MIN_OUTPUT: u32 = 16;

/// Why a request cannot be sent to a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// Prompt tokens as the job asked.
    pub prompt_tokens: u64,
    /// Prompt tokens once every droppable chunk and message is gone.
    pub least_tokens: u64,
    /// Output tokens the request reserves.
    pub reserve: u32,
    pub window: u32,
}

impl TooLong {
    /// The counts, for the `context_too_long` error message.
    pub fn describe(&self) -> String {
        format!(
            "the prompt is {} tokens ({} after dropping every context chunk and old message) and reserves {} output tokens; the window is {}",
            self.prompt_tokens, self.least_tokens, self.reserve, self.window
        )
    }
}

/// The outcome of fitting a request to one model.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// Send the request as it is.
    AsIs,
    /// Send this smaller request instead.
    Trimmed(Box<GenerateRequest>, Trimmed),
    /// No trimming makes it fit.
    TooLong(TooLong),
}

/// How one model takes prompts: its window and how its tokens are counted.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub tokens: u32,
    pub counter: Counter,
    /// Output reserved when the job sets no `max_tokens`.
    pub default_reserve: Option<u32>,
}

/// Prompt pieces in tokens, so that dropping one is a subtraction.
struct Counts {
    /// System prompt (with its message overhead) and the prompt overhead.
    fixed: u64,
    /// The context block's header and its separator from the system prompt.
    header: u64,
    chunks: Vec<u64>,
    messages: Vec<u64>,
}

impl Counts {
    fn of(req: &GenerateRequest, counter: &Counter) -> Self {
        let system = req.system.as_deref().map_or(0, |s| counter.count(s));
        let has_system = req.system.is_some() || !req.context.is_empty();
        Self {
            fixed: system
                + tokens::PER_PROMPT
                + if has_system { tokens::PER_MESSAGE } else { 0 }
                + tokens::tools_tokens(counter, &req.tools),
            header: counter.count(CONTEXT_HEADER) + 1,
            chunks: req
                .context
                .iter()
                .enumerate()
                .map(|(i, c)| counter.count(&context_line(i, c)))
                .collect(),
            messages: req
                .messages
                .iter()
                .map(|m| tokens::message_tokens(counter, m))
                .collect(),
        }
    }

    /// Tokens with the first `chunks` chunks and the messages from `first_message` on.
    fn total(&self, chunks: usize, first_message: usize) -> u64 {
        let context = match chunks {
            0 => 0,
            n => self.header + self.chunks[..n].iter().sum::<u64>(),
        };
        self.fixed + context + self.messages[first_message..].iter().sum::<u64>()
    }
}

/// Bytes of the prompt's text (system prompt, context chunks, messages, and the tools and
/// tool calls as JSON text; images are not text: see `bytes_bound`).
pub fn prompt_bytes(req: &GenerateRequest) -> usize {
    let json = |v: &serde_json::Value| v.to_string().len();
    req.system.as_deref().map_or(0, str::len)
        + req.context.iter().map(String::len).sum::<usize>()
        + req
            .messages
            .iter()
            .map(|m| {
                m.content.len()
                    + m.tool_call_id.as_deref().map_or(0, str::len)
                    + m.tool_calls
                        .iter()
                        .map(|c| c.id.len() + c.name.len() + json(&c.arguments))
                        .sum::<usize>()
            })
            .sum::<usize>()
        + req
            .tools
            .iter()
            .map(|t| {
                t.name.len() + t.description.as_ref().map_or(0, String::len) + json(&t.parameters)
            })
            .sum::<usize>()
}

/// A bound on the prompt's tokens from its bytes (a token is at least one byte), with the
/// context block's framing, the chat and tool overheads, and each image's estimate.
fn bytes_bound(req: &GenerateRequest, counter: &Counter) -> u64 {
    let framing = CONTEXT_HEADER.len() + 2 + 8 * req.context.len();
    let overheads = tokens::PER_PROMPT
        + tokens::PER_MESSAGE * (req.messages.len() as u64 + 1)
        + tokens::PER_TOOL * req.tools.len() as u64;
    let images = tokens::IMAGE_TOKENS
        * req
            .messages
            .iter()
            .map(|m| m.images.len() as u64)
            .sum::<u64>();
    counter.upper_bound(prompt_bytes(req) + framing) + overheads + images
}

/// Fit `req` into `window` (see the module documentation for the order of the steps).
pub fn fit(req: &GenerateRequest, window: Window) -> Fit {
    let asked = req.options.max_tokens.or(window.default_reserve);
    let reserve = u64::from(asked.unwrap_or(0));
    let limit = u64::from(window.tokens);
    if bytes_bound(req, &window.counter) + reserve <= limit {
        return Fit::AsIs;
    }
    let counts = Counts::of(req, &window.counter);
    let before = counts.total(req.context.len(), 0);
    if before + reserve <= limit {
        return Fit::AsIs;
    }
    // 1. Context chunks, the last (least relevant) first.
    let mut chunks = req.context.len();
    while chunks > 0 && counts.total(chunks, 0) + reserve > limit {
        chunks -= 1;
    }
    // 2. The oldest messages before the last user message; never leave an assistant first.
    let keep_from = req
        .messages
        .iter()
        .rposition(|m| m.role == Role::User)
        .unwrap_or(req.messages.len().saturating_sub(1));
    let mut first = 0;
    while first < keep_from && counts.total(chunks, first) + reserve > limit {
        first += 1;
    }
    // Nor a tool result without the call it answers.
    while first > 0
        && first < keep_from
        && matches!(req.messages[first].role, Role::Assistant | Role::Tool)
    {
        first += 1;
    }
    let after = counts.total(chunks, first);
    // 3. Less output, when the job allows it.
    let mut max_tokens = req.options.max_tokens;
    if after + reserve > limit && req.options.fit == FitMode::Trim && after < limit {
        let room = u32::try_from(limit - after).unwrap_or(u32::MAX);
        if room >= asked.map_or(MIN_OUTPUT, |a| a.min(MIN_OUTPUT)) {
            max_tokens = Some(room);
        }
    }
    let reserved = u64::from(max_tokens.or(window.default_reserve).unwrap_or(0));
    if after + reserved > limit {
        return Fit::TooLong(TooLong {
            prompt_tokens: before,
            least_tokens: counts.total(0, keep_from),
            reserve: asked.unwrap_or(0),
            window: window.tokens,
        });
    }
    let lowered = max_tokens != req.options.max_tokens;
    let mut fitted = GenerateRequest {
        system: req.system.clone(),
        context: req.context[..chunks].to_vec(),
        messages: req.messages[first..].to_vec(),
        options: req.options.clone(),
        tools: req.tools.clone(),
        tool_choice: req.tool_choice.clone(),
        parallel_tool_calls: req.parallel_tool_calls,
        response_format: req.response_format.clone(),
        stream: req.stream,
        system_cache: req.system_cache,
        prompt_cache_key: req.prompt_cache_key.clone(),
        service_tier: req.service_tier,
    };
    fitted.options.max_tokens = max_tokens;
    let trimmed = Trimmed {
        chunks_dropped: (req.context.len() - chunks) as u32,
        messages_dropped: first as u32,
        tokens_before: before,
        tokens_after: after,
        max_tokens_before: lowered.then_some(asked).flatten(),
        max_tokens_after: lowered.then_some(max_tokens).flatten(),
        window: window.tokens,
    };
    Fit::Trimmed(Box::new(fitted), trimmed)
}

#[cfg(test)]
mod tests;
