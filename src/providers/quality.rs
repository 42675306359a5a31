//! Quality ranks for the `best_quality` strategy: how good a model's answers are, 0 to 100,
//! higher first. A provider's `quality` setting wins (exact name, `prefix*`, `*`); else this
//! built-in table of well-known models; a model neither ranks is tried after every ranked one.
//!
//! The table is a coarse, documented default (docs/configuration.md), ordered so that within
//! a vendor the larger model ranks higher and across vendors models of one tier rank alike.
//! It is not a benchmark: operators who care rank their own models.

/// Name prefixes and their rank; the first prefix that matches wins, so more specific names
/// (`gpt-4o-mini`) come before the names they extend (`gpt-4o`).
const TABLE: &[(&str, u32)] = &[
    ("gpt-5-nano", 60),
    ("gpt-5-mini", 80),
    ("gpt-5", 95),
    ("o4-mini", 82),
    ("o3-mini", 80),
    ("o1-mini", 72),
    ("o3", 92),
    ("o1", 88),
    ("gpt-4.1-nano", 55),
    ("gpt-4.1-mini", 72),
    ("gpt-4.1", 85),
    ("gpt-4o-mini", 65),
    ("gpt-4o", 82),
    ("chatgpt-4o", 82),
    ("gpt-4-turbo", 75),
    ("gpt-4", 70),
    ("gpt-3.5", 40),
    ("claude-opus-4", 94),
    ("claude-sonnet-4", 90),
    ("claude-haiku-4", 75),
    ("claude-3-7-sonnet", 84),
    ("claude-3-5-sonnet", 82),
    ("claude-3-5-haiku", 65),
    ("claude-3-opus", 78),
    ("claude-3-sonnet", 60),
    ("claude-3-haiku", 50),
    ("gemini-3-pro", 94),
    ("gemini-3-flash", 85),
    ("gemini-2.5-pro", 90),
    ("gemini-2.5-flash-lite", 65),
    ("gemini-2.5-flash", 80),
    ("gemini-2.0-flash-lite", 55),
    ("gemini-2.0-flash", 68),
    ("gemini-1.5-pro", 70),
    ("gemini-1.5-flash", 55),
    ("llama3.3", 60),
    ("qwen3", 58),
    ("qwen2.5", 50),
    ("llama3.1", 45),
    ("mistral-nemo", 40),
    ("llama3.2", 35),
    ("gemma", 35),
    ("phi3", 30),
];

/// The built-in rank of `model` (a `vendor/model` name counts as `model`), if it knows it.
pub fn builtin(model: &str) -> Option<u32> {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    TABLE
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, rank)| *rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_names_win_over_the_names_they_extend_and_unknown_models_are_unranked() {
        assert_eq!(builtin("gpt-4o-mini"), Some(65));
        assert_eq!(builtin("gpt-4o-2024-08-06"), Some(82));
        assert_eq!(builtin("openai/gpt-4.1-mini"), Some(72));
        assert_eq!(builtin("claude-sonnet-4-20250514"), Some(90));
        assert!(builtin("claude-sonnet-4").unwrap() > builtin("gpt-4o-mini").unwrap());
        assert_eq!(builtin("my-finetune"), None);
        // Every prefix is reachable: none is shadowed by an earlier, shorter one.
        for (i, (prefix, _)) in TABLE.iter().enumerate() {
            assert!(
                !TABLE[..i].iter().any(|(p, _)| prefix.starts_with(p)),
                "{prefix} is shadowed"
            );
        }
    }
}
