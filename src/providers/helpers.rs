//! Helpers every provider module shares: the endpoint URL under a base URL, the clipping of
//! provider error texts, and the removal of API keys from them. Nothing protocol-specific.

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::contract::ErrorCode;
use crate::error::ProviderError;

/// Longest provider error text we keep (bodies can be HTML pages).
const MAX_ERROR_CHARS: usize = 500;

/// `{base}/{path}`; a base URL with no path gets `/v1` (the SDKs' `OPENAI_BASE_URL` includes it).
pub(crate) fn endpoint(base: &str, path: &str) -> Result<Url, ProviderError> {
    let mut url = Url::parse(base)
        .map_err(|e| ProviderError::new(ErrorCode::BadRequest, format!("base_url: {e}")))?;
    if url.path() == "/" || url.path().is_empty() {
        url.set_path("/v1");
    }
    let joined = format!("{}/{}", url.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    Ok(url)
}

/// A token count as a provider wrote it: any JSON number or null. Negative, fractional and
/// null counts are 0 (a provider's nonsense is not a reason to lose the answer); the chain
/// clamps absurdly large ones.
pub(crate) fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Count;
    impl serde::de::Visitor<'_> for Count {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E>(self, v: i64) -> Result<u64, E> {
            Ok(u64::try_from(v).unwrap_or(0))
        }
        fn visit_f64<E>(self, _: f64) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_unit<E>(self) -> Result<u64, E> {
            Ok(0)
        }
    }
    d.deserialize_any(Count)
}

/// A provider text cut to [`MAX_ERROR_CHARS`] characters.
pub(crate) fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_ERROR_CHARS {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_ERROR_CHARS).collect();
        t.push('…');
        t
    }
}

/// Remove the key (and anything shaped like an OpenAI key) from a provider's message: OpenAI's
/// 401 text quotes a masked key, which is still part of a secret.
pub(crate) fn redact(message: &str, key: Option<&SecretString>) -> String {
    let mut out = message.to_string();
    if let Some(key) = key {
        let k = key.expose_secret();
        if !k.is_empty() {
            out = out.replace(k, "[REDACTED]");
        }
    }
    out.split(' ')
        .map(|w| {
            if w.starts_with("sk-") {
                "[REDACTED]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The name of the tool whose call `id` is, from the assistant messages of `messages` (for
/// protocols whose tool results name the tool rather than the call).
pub(crate) fn tool_name_of<'a>(
    messages: &'a [crate::contract::Message],
    id: &str,
) -> Option<&'a str> {
    messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .find(|c| c.id == id)
        .map(|c| c.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_redacted_from_provider_messages() {
        let key = SecretString::from("sk-live-123456");
        let m = redact(
            "Incorrect API key provided: sk-live-123456 and sk-abc***xyz.",
            Some(&key),
        );
        assert!(!m.contains("sk-"), "{m}");
    }

    #[test]
    fn base_urls_with_and_without_v1_reach_the_same_endpoint() {
        let a = endpoint("http://h:1", "chat/completions").unwrap();
        let b = endpoint("http://h:1/v1/", "chat/completions").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "http://h:1/v1/chat/completions");
        let c = endpoint("https://openrouter.ai/api/v1", "chat/completions").unwrap();
        assert_eq!(c.path(), "/api/v1/chat/completions");
    }
}
