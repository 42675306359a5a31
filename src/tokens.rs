//! Token counting: what a prompt or an answer costs in tokens when no provider has said so.
//!
//! Real tokenizers where the model family publishes one we can embed: OpenAI's `o200k_base`
//! (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1/o3/o4) and `cl100k_base` (gpt-4, gpt-3.5-turbo,
//! text-embedding-3 and ada-002), both compiled into the binary by `tiktoken-rs` (nothing is
//! downloaded at run time). Every other model (Claude, Gemini, Llama 3, unknown names) gets a
//! documented **estimate**: the `cl100k_base` count plus 10 %. Llama 3's tokenizer extends
//! cl100k's vocabulary, so the estimate is close and slightly high there; Claude and Gemini
//! publish no offline tokenizer, and their counts for English text are within about 10-20 % of
//! cl100k's. The margin makes context fitting err on the safe side.
//!
//! Counting is not free (about 0.15 ms per 1,000 tokens; `llm-worker bench --only cache`
//! prints the figure), so callers count only when the answer can change something: context
//! fitting first checks a byte bound (a token is at least one byte), and usage is estimated
//! only for calls whose provider reported none. The encodings load on the first count that
//! needs them (~0.1 s of CPU and 25-45 MB each, off the async pool), not at start: a worker
//! whose providers report usage and whose prompts fit by their size never loads one.

use std::sync::atomic::{AtomicBool, Ordering};

use tiktoken_rs::CoreBPE;

use crate::contract::{GenerateRequest, Message, Tool};

/// Tokens a chat message costs beyond its text (role and separators; OpenAI's published
/// figure for its chat models, used for every provider).
pub const PER_MESSAGE: u64 = 3;
/// Tokens every chat prompt costs beyond its messages (the reply's priming).
pub const PER_PROMPT: u64 = 3;

/// The BPE encodings compiled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

/// Whether each encoding has been loaded (`Encoding as usize`).
static LOADED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

impl Encoding {
    /// The encoding's tables, loaded on first use (about 0.1 s of CPU): on a multi-threaded
    /// runtime the first use moves its thread out of the async pool for that time
    /// (`block_in_place`), so other jobs keep running.
    fn bpe(self) -> &'static CoreBPE {
        let load = move || match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        let loaded = &LOADED[self as usize];
        if loaded.load(Ordering::Acquire) {
            return load();
        }
        let on_pool = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let bpe = if on_pool {
            tokio::task::block_in_place(load)
        } else {
            load()
        };
        loaded.store(true, Ordering::Release);
        bpe
    }

    /// Whether this encoding's tables are in memory (loaded by a count).
    pub fn is_loaded(self) -> bool {
        LOADED[self as usize].load(Ordering::Acquire)
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

/// How tokens of one model are counted: an encoding, exactly or as an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub encoding: Encoding,
    /// The model's own tokenizer (`false`: an estimate, the count plus 10 %).
    pub exact: bool,
}

/// OpenAI's model families since GPT-4o (name prefixes): they count with `o200k_base`, and
/// `providers::capabilities` knows them as taking tools, images and JSON output.
pub const O200K_FAMILIES: &[&str] = &[
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
];

impl Counter {
    /// The counter for `model` (a `vendor/model` name counts as `model`).
    pub fn for_model(model: &str) -> Self {
        let name = model.rsplit('/').next().unwrap_or(model);
        let name = name.to_ascii_lowercase();
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
        if starts(O200K_FAMILIES) {
            Self {
                encoding: Encoding::O200kBase,
                exact: true,
            }
        } else if starts(&[
            "gpt-4",
            "gpt-3.5",
            "gpt-35",
            "text-embedding-3",
            "text-embedding-ada-002",
        ]) {
            Self {
                encoding: Encoding::Cl100kBase,
                exact: true,
            }
        } else {
            Self {
                encoding: Encoding::Cl100kBase,
                exact: false,
            }
        }
    }

    /// Tokens of `text` (an estimate is rounded up).
    pub fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let n = self.encoding.bpe().count_ordinary(text) as u64;
        self.margin(n)
    }

    /// The most [`Counter::count`] can say for `bytes` bytes of text, without counting: a
    /// token of a byte-level BPE is at least one byte.
    pub fn upper_bound(&self, bytes: usize) -> u64 {
        self.margin(bytes as u64)
    }

    fn margin(&self, n: u64) -> u64 {
        if self.exact { n } else { n + n.div_ceil(10) }
    }
}

/// Prompt tokens of `req` as sent (system text with its context block, then the messages),
/// with the chat overheads.
pub fn prompt_tokens(counter: &Counter, req: &GenerateRequest) -> u64 {
    let system = req
        .system_text()
        .map_or(0, |s| counter.count(&s) + PER_MESSAGE);
    let fixed = system + PER_PROMPT + tools_tokens(counter, &req.tools);
    req.messages
        .iter()
        .fold(fixed, |n, m| n + message_tokens(counter, m))
}

/// Tokens an image costs, an estimate (the size of an image is not read): OpenAI's published
/// figures, 85 for `detail: "low"`, else 765 (a 1024x1024 image at `high` or `auto`). Anthropic
/// and Gemini count images of that size at about 1,400 and 258 tokens.
pub const IMAGE_TOKENS: u64 = 765;
pub const IMAGE_TOKENS_LOW: u64 = 85;
/// Tokens each tool definition costs beyond its text (its framing), an estimate.
pub const PER_TOOL: u64 = 8;

/// Tokens of one message: its text, its images (estimated), its tool calls (name, id and
/// arguments as JSON text) or the id of the call it answers, and the chat overhead.
pub fn message_tokens(counter: &Counter, m: &Message) -> u64 {
    let images: u64 = m
        .images
        .iter()
        .map(|i| match i.detail.as_deref() {
            Some("low") => IMAGE_TOKENS_LOW,
            _ => IMAGE_TOKENS,
        })
        .sum();
    let calls: u64 = m
        .tool_calls
        .iter()
        .map(|c| {
            counter.count(&c.name) + counter.count(&c.id) + counter.count(&c.arguments.to_string())
        })
        .sum();
    let answered = m.tool_call_id.as_deref().map_or(0, |id| counter.count(id));
    counter.count(&m.content) + PER_MESSAGE + images + calls + answered
}

/// Tokens of the tool definitions (name, description, parameters as JSON text).
pub fn tools_tokens(counter: &Counter, tools: &[Tool]) -> u64 {
    tools
        .iter()
        .map(|t| {
            PER_TOOL
                + counter.count(&t.name)
                + t.description.as_deref().map_or(0, |d| counter.count(d))
                + counter.count(&t.parameters.to_string())
        })
        .sum()
}

/// A rough count without a tokenizer (about four characters per token for English), for
/// sizing embedding batches, where counting every input would cost more than it saves.
pub fn rough(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_encodings_count_known_strings_as_tiktoken_does() {
        let o200k = Counter::for_model("gpt-4o");
        let cl100k = Counter::for_model("gpt-3.5-turbo");
        assert_eq!((o200k.encoding, o200k.exact), (Encoding::O200kBase, true));
        assert_eq!(
            (cl100k.encoding, cl100k.exact),
            (Encoding::Cl100kBase, true)
        );
        // Same count where the vocabularies agree ...
        assert_eq!(o200k.count("hello world"), 2);
        assert_eq!(cl100k.count("hello world"), 2);
        assert_eq!(
            o200k.count("The quick brown fox jumps over the lazy dog."),
            10
        );
        assert_eq!(
            cl100k.count("The quick brown fox jumps over the lazy dog."),
            10
        );
        // ... and o200k's larger vocabulary where they do not.
        assert_eq!(o200k.count("こんにちは世界"), 2);
        assert_eq!(cl100k.count("こんにちは世界"), 4);
        assert_eq!(o200k.count("Привет, мир!"), 5);
        assert_eq!(cl100k.count("Привет, мир!"), 7);
        assert_eq!(o200k.count(""), 0);
    }

    #[test]
    fn a_prompt_counts_its_system_text_context_and_messages_with_overheads() {
        use crate::contract::{Message, Role};
        let req = GenerateRequest {
            system: Some("hello world".into()),
            messages: vec![Message::text(Role::User, "hello world")],
            ..Default::default()
        };
        let c = Counter::for_model("gpt-4o");
        assert_eq!(prompt_tokens(&c, &req), 2 + 3 + 2 + 3 + 3);
        let with_context = GenerateRequest {
            context: vec!["hello world".into()],
            ..req.clone()
        };
        assert!(prompt_tokens(&c, &with_context) > prompt_tokens(&c, &req) + 2);
    }

    #[test]
    fn models_get_their_family_encoding_and_others_an_estimate() {
        for m in ["gpt-4o-mini", "gpt-4.1-nano", "o3-mini", "openai/gpt-4o"] {
            assert_eq!(Counter::for_model(m).encoding, Encoding::O200kBase, "{m}");
        }
        for m in [
            "gpt-4-turbo",
            "gpt-3.5-turbo-0125",
            "text-embedding-3-small",
        ] {
            let c = Counter::for_model(m);
            assert!(c.exact && c.encoding == Encoding::Cl100kBase, "{m}");
        }
        for m in [
            "claude-sonnet-4-5",
            "gemini-2.5-flash",
            "llama3.1:8b",
            "mystery",
        ] {
            assert!(!Counter::for_model(m).exact, "{m}");
        }
        // The estimate: the cl100k count plus 10 %, rounded up.
        let text = "The quick brown fox jumps over the lazy dog.";
        assert_eq!(Counter::for_model("claude-3-5-haiku").count(text), 11);
    }

    #[test]
    fn rough_counts_round_up() {
        assert_eq!(rough(""), 0);
        assert_eq!(rough("abcde"), 2);
    }

    #[test]
    fn bytes_bound_every_count() {
        for text in ["hello world", "こんにちは世界", "नमस्ते दुनिया", "a\u{0}b"]
        {
            for model in ["gpt-4o", "gpt-4", "claude-3-opus"] {
                let counter = Counter::for_model(model);
                let n = counter.count(text);
                assert!(
                    n <= counter.upper_bound(text.len()),
                    "{model} {text:?}: {n}"
                );
            }
        }
    }
}
