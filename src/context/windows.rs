//! The built-in context windows of well-known models (tokens, prompt and output together).
//!
//! Matched on the model name after its last `/` (`openai/gpt-4o` is `gpt-4o`), lower-cased,
//! by the longest prefix in the table, so dated and sized variants (`gpt-4o-2024-08-06`,
//! `llama3.1:70b`) get their family's window. A provider's `context_windows` table in the
//! configuration wins over this one. Figures are the vendors' published windows; an Ollama
//! server runs a model with its own `num_ctx` (often 2,048-8,192), which the configuration
//! should then state.

/// `(prefix, window)`: the longest matching prefix wins.
const TABLE: &[(&str, u32)] = &[
    // OpenAI
    ("gpt-4o", 128_000),
    ("chatgpt-4o", 128_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-4.5", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-1106", 128_000),
    ("gpt-4-0125", 128_000),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-3.5-turbo-instruct", 4_096),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o1-mini", 128_000),
    ("o3", 200_000),
    ("o4-mini", 200_000),
    // Anthropic: every Claude 3, 3.5, 3.7 and 4 model has 200k.
    ("claude-", 200_000),
    ("claude-2", 100_000),
    ("claude-instant", 100_000),
    // Google
    ("gemini-1.0-pro", 32_760),
    ("gemini-pro", 32_760),
    ("gemini-1.5-pro", 2_097_152),
    ("gemini-1.5-flash", 1_048_576),
    ("gemini-2", 1_048_576),
    // Meta Llama 3 (Ollama and Hugging Face names)
    ("llama3", 8_192),
    ("llama-3", 8_192),
    ("meta-llama-3", 8_192),
    ("llama3.1", 131_072),
    ("llama3.2", 131_072),
    ("llama3.3", 131_072),
    ("llama-3.1", 131_072),
    ("llama-3.2", 131_072),
    ("llama-3.3", 131_072),
    ("meta-llama-3.1", 131_072),
];

/// The published window of `model`, if the table knows its family.
pub(crate) fn builtin(model: &str) -> Option<u32> {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    TABLE
        .iter()
        .filter(|(prefix, _)| name.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, window)| *window)
}

#[cfg(test)]
mod tests {
    use super::builtin;

    #[test]
    fn families_get_their_window_and_the_longest_prefix_wins() {
        let cases = [
            ("gpt-4o", Some(128_000)),
            ("gpt-4o-mini-2024-07-18", Some(128_000)),
            ("gpt-4.1-nano", Some(1_047_576)),
            ("gpt-4", Some(8_192)),
            ("gpt-4-turbo-preview", Some(128_000)),
            ("gpt-3.5-turbo", Some(16_385)),
            ("gpt-3.5-turbo-instruct", Some(4_096)),
            ("claude-sonnet-4-5", Some(200_000)),
            ("claude-3-5-haiku-latest", Some(200_000)),
            ("gemini-1.5-pro-002", Some(2_097_152)),
            ("gemini-2.5-flash", Some(1_048_576)),
            ("llama3:8b", Some(8_192)),
            ("llama3.1:70b", Some(131_072)),
            ("meta-llama/Meta-Llama-3-8B-Instruct", Some(8_192)),
            ("meta-llama/Llama-3.1-8B-Instruct", Some(131_072)),
            ("mistral-large", None),
        ];
        for (model, window) in cases {
            assert_eq!(builtin(model), window, "{model}");
        }
    }
}
