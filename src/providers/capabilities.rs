//! What a model takes beyond text: tools, images (as bytes, or by URL), JSON output (any
//! object, or matching a schema). A route entry that lacks what a job needs is skipped without
//! a call; a job no entry can take ends `unsupported` (CONTRACT section 6).
//!
//! Three sources, narrowest wins: what the protocol module translates (OpenAI, every
//! OpenAI-compatible server and Anthropic translate all of it, Anthropic's JSON output through
//! an answer tool; Gemini and Ollama all but image URLs, which neither API fetches); then the
//! provider's
//! `capabilities` setting for the model (exact name, `prefix*`, `*`), else the built-in table
//! below for well-known models; a model neither names takes everything its protocol does (a
//! local server's model: the server says no if it cannot).

use crate::config::{Api, Capability};
use crate::contract::Needs;

/// A set of capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub tools: bool,
    pub images: bool,
    pub image_urls: bool,
    pub json: bool,
    pub json_schema: bool,
}

impl Caps {
    pub const ALL: Caps = Caps {
        tools: true,
        images: true,
        image_urls: true,
        json: true,
        json_schema: true,
    };
    pub const NONE: Caps = Caps {
        tools: false,
        images: false,
        image_urls: false,
        json: false,
        json_schema: false,
    };

    pub fn from_list(list: &[Capability]) -> Caps {
        let has = |c| list.contains(&c);
        Caps {
            tools: has(Capability::Tools),
            images: has(Capability::Images),
            image_urls: has(Capability::ImageUrls),
            json: has(Capability::Json),
            json_schema: has(Capability::JsonSchema),
        }
    }

    fn and(self, o: Caps) -> Caps {
        Caps {
            tools: self.tools && o.tools,
            images: self.images && o.images,
            image_urls: self.image_urls && o.image_urls,
            json: self.json && o.json,
            json_schema: self.json_schema && o.json_schema,
        }
    }

    /// What of `needs` these capabilities lack, by name (empty: the model can take the job).
    pub fn missing(self, needs: Needs) -> Vec<&'static str> {
        [
            (needs.tools && !self.tools, "tools"),
            (needs.images && !self.images, "images"),
            (needs.image_urls && !self.image_urls, "image URLs"),
            (needs.json_schema && !self.json_schema, "JSON schema output"),
            (
                needs.json && !needs.json_schema && !self.json,
                "JSON output",
            ),
        ]
        .into_iter()
        .filter_map(|(lacks, name)| lacks.then_some(name))
        .collect()
    }
}

/// What a protocol module translates.
pub fn of_protocol(api: &Api) -> Caps {
    match api {
        Api::Openai { .. } | Api::Anthropic { .. } => Caps::ALL,
        Api::Gemini { .. } | Api::Ollama { .. } => Caps {
            image_urls: false,
            ..Caps::ALL
        },
    }
}

/// What the built-in table says of a well-known model, if it knows it.
pub fn builtin(model: &str) -> Option<Caps> {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
    let text_json = Caps {
        json: true,
        ..Caps::NONE
    };
    let tools_json = Caps {
        tools: true,
        json: true,
        ..Caps::NONE
    };
    Some(if starts(&["o1-mini", "o1-preview"]) {
        Caps::NONE
    } else if starts(crate::tokens::O200K_FAMILIES) {
        Caps::ALL
    } else if starts(&["gpt-4-turbo", "gpt-4-vision"]) {
        Caps {
            json_schema: false,
            ..Caps::ALL
        }
    } else if starts(&["gpt-4", "gpt-3.5", "gpt-35"]) {
        tools_json
    } else if starts(&[
        "claude-3",
        "claude-sonnet-4",
        "claude-opus-4",
        "claude-haiku-4",
    ]) {
        Caps::ALL
    } else if starts(&["gemini-1.5", "gemini-2", "gemini-3"]) {
        Caps {
            image_urls: false,
            ..Caps::ALL
        }
    // Open models: JSON output, with a schema too, is the server's constrained decoding
    // (Ollama's `format`), which works for any model.
    } else if starts(&["llama3.1", "llama3.3", "qwen2.5", "qwen3", "mistral-nemo"]) {
        Caps {
            json_schema: true,
            ..tools_json
        }
    } else if starts(&["llama3.2-vision", "llava"]) {
        Caps {
            images: true,
            json: true,
            json_schema: true,
            ..Caps::NONE
        }
    } else if starts(&["llama3", "llama2", "gemma", "phi3", "deepseek-r1"]) {
        Caps {
            json_schema: true,
            ..text_json
        }
    } else {
        return None;
    })
}

/// What `model` on a provider of `api` takes: the protocol's, narrowed by the configured
/// entry for the model, else by the built-in table.
pub fn resolve(api: &Api, configured: Option<&Vec<Capability>>, model: &str) -> Caps {
    let model_caps = match configured {
        Some(list) => Caps::from_list(list),
        None => builtin(model).unwrap_or(Caps::ALL),
    };
    of_protocol(api).and(model_caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_models_take_what_they_take_and_unknown_ones_take_everything() {
        let openai = Api::Openai {
            max_tokens_field: crate::config::MaxTokensField::MaxTokens,
            embed: crate::config::EmbedBatching {
                batch_size: 1,
                batch_tokens: 1,
            },
        };
        let needs_tools = Needs {
            tools: true,
            ..Needs::default()
        };
        let needs_images = Needs {
            images: true,
            ..Needs::default()
        };
        assert!(
            resolve(&openai, None, "gpt-4o-mini")
                .missing(needs_images)
                .is_empty()
        );
        assert_eq!(
            resolve(&openai, None, "gpt-3.5-turbo").missing(needs_images),
            ["images"]
        );
        assert_eq!(
            resolve(&openai, None, "o1-mini").missing(needs_tools),
            ["tools"]
        );
        assert!(
            resolve(&openai, None, "my-local-model")
                .missing(needs_tools)
                .is_empty()
        );
        // Configuration narrows a model the table does not know.
        let none = vec![];
        assert_eq!(
            resolve(&openai, Some(&none), "my-local-model").missing(needs_tools),
            ["tools"]
        );
        // A protocol that cannot take what the model could: Ollama fetches no image URLs.
        let ollama = Api::Ollama {
            embed: crate::config::EmbedBatching {
                batch_size: 1,
                batch_tokens: 1,
            },
        };
        let needs_url = Needs {
            images: true,
            image_urls: true,
            ..Needs::default()
        };
        assert!(
            resolve(&ollama, None, "llama3.1")
                .missing(needs_tools)
                .is_empty()
        );
        assert_eq!(
            resolve(&ollama, None, "my-vision-model").missing(needs_url),
            ["image URLs"]
        );
        let anthropic = Api::Anthropic {
            default_max_tokens: 1,
        };
        assert!(
            resolve(&anthropic, None, "claude-sonnet-4")
                .missing(needs_tools)
                .is_empty()
        );
    }
}
