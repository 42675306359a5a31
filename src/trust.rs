//! Trust boundaries (CONTRACT.md section 5): job publishers are not trusted, so a job's fields
//! are data, never authority. This module owns the rules that keep them so:
//!
//! - [`ReplyPolicy`]: the only subjects the worker publishes a job's events (or a status
//!   answer) to: literal subjects under the configured reply prefixes; never under `$`
//!   (JetStream, KV, object store, system API), the worker's own jobs, results, status,
//!   dead-letter and control subjects, or the worker's own inbox.
//! - `same_job`: a stored result is re-sent only to the job that produced it (same job id,
//!   tenant and kind); anyone else re-using the id is refused.
//! - `check_model_name`: a model name a job pins is safe to put in a URL path.
//! - `quote` / [`redact_url`]: job values in error texts are short, escaped prefixes, and
//!   server URLs are printed without passwords.
//!
//! No I/O.

use serde::Deserialize;

use crate::config::NatsConfig;
use crate::job::JobKind;

/// Longest reply subject accepted, in bytes.
pub(crate) const MAX_SUBJECT_BYTES: usize = 255;

/// How many characters of a job's value an error text quotes.
pub(crate) const QUOTE_CHARS: usize = 40;

/// The placeholder a reply prefix may hold for the job's tenant.
const TENANT_TOKEN: &str = "{tenant}";

/// A subject one can publish to literally: non-empty dot-separated tokens of printable ASCII,
/// without the wildcards `*` and `>` (and so without whitespace or control characters).
pub(crate) fn is_literal_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

/// One allowed reply prefix, split around its `{tenant}` token if it has one.
#[derive(Debug, Clone)]
struct Prefix {
    before: String,
    /// What follows `{tenant}`; `None` when the prefix has no tenant token.
    after: Option<String>,
}

impl Prefix {
    fn matches(&self, subject: &str, tenant: &str) -> bool {
        let Some(rest) = subject.strip_prefix(self.before.as_str()) else {
            return false;
        };
        match &self.after {
            None => true,
            Some(after) => rest
                .strip_prefix(tenant)
                .is_some_and(|r| r.starts_with(after.as_str())),
        }
    }
}

/// Which subjects a job may name as its `reply_to` (and a status request as its reply).
#[derive(Debug, Clone)]
pub struct ReplyPolicy {
    allowed: Vec<Prefix>,
    /// Subjects (and everything under them) never published to, whatever the prefixes say.
    reserved: Vec<String>,
    /// For error texts: the allowed prefixes as configured.
    listed: String,
}

impl ReplyPolicy {
    /// The policy of a deployment; `Err` names what is wrong with a configured prefix.
    pub fn new(nats: &NatsConfig) -> Result<Self, String> {
        let p = &nats.subject_prefix;
        // Everything the worker consumes or serves, now or in a later feature (`cancel`,
        // `control`, `events`): a reply there would let one job act on others.
        let mut reserved: Vec<String> = ["jobs", "results", "status", "dead", "cancel"]
            .iter()
            .chain(&["control", "events"])
            .map(|s| format!("{p}.{s}"))
            .collect();
        reserved.push(nats.inbox_prefix.clone());
        let prefixes = nats.reply_prefixes();
        if prefixes.is_empty() {
            return Err("at least one reply prefix is needed".into());
        }
        let mut allowed = Vec::new();
        for prefix in &prefixes {
            let Some(body) = prefix.strip_suffix('.') else {
                return Err(format!("'{prefix}' must end with '.'"));
            };
            let plain = body.replace(TENANT_TOKEN, "tenant");
            if body.matches(TENANT_TOKEN).count() > 1
                || !is_literal_subject(&plain)
                || plain.starts_with('$')
            {
                return Err(format!(
                    "'{prefix}' must be literal subject tokens (at most one {TENANT_TOKEN} token), not under $"
                ));
            }
            if reserved
                .iter()
                .any(|r| is_under(&plain, r) || is_under(r, &plain))
            {
                return Err(format!(
                    "'{prefix}' overlaps the worker's own subjects ({})",
                    reserved.join(", ")
                ));
            }
            let entry = match prefix.split_once(TENANT_TOKEN) {
                None => Prefix {
                    before: prefix.clone(),
                    after: None,
                },
                Some((before, after)) => {
                    if !(before.is_empty() || before.ends_with('.')) || !after.starts_with('.') {
                        return Err(format!("'{prefix}': {TENANT_TOKEN} must be a whole token"));
                    }
                    Prefix {
                        before: before.to_string(),
                        after: Some(after.to_string()),
                    }
                }
            };
            allowed.push(entry);
        }
        Ok(Self {
            allowed,
            reserved,
            listed: prefixes.join(", "),
        })
    }

    /// Whether the worker may publish a job's events to `subject`; the reason when not.
    pub(crate) fn check(&self, subject: &str, tenant: &str) -> Result<(), String> {
        let refused = |why: String| Err(format!("reply_to: {} is refused: {why}", quote(subject)));
        if subject.len() > MAX_SUBJECT_BYTES {
            return refused(format!(
                "{} bytes, more than {MAX_SUBJECT_BYTES}",
                subject.len()
            ));
        }
        if !is_literal_subject(subject) {
            return refused(
                "not a literal subject (empty token, wildcard, whitespace or non-ASCII)".into(),
            );
        }
        if subject.starts_with('$') {
            return refused("subjects under $ are the JetStream and system API".into());
        }
        if let Some(root) = self.reserved.iter().find(|r| is_under(subject, r)) {
            return refused(format!("{root} is the worker's own subject"));
        }
        if !self.allowed.iter().any(|p| p.matches(subject, tenant)) {
            return refused(format!("not under a reply prefix ({})", self.listed));
        }
        Ok(())
    }
}

/// `subject` is `root` or lies under it (`root.` followed by more tokens).
fn is_under(subject: &str, root: &str) -> bool {
    let root = root.trim_end_matches('.');
    subject == root
        || subject
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Whether a stored result belongs to the job that asks for it: the same tenant and kind (the
/// job id is the subject it was found under). Anything unreadable is not the same job.
pub(crate) fn same_job(stored: &[u8], tenant: &str, kind: JobKind) -> bool {
    #[derive(Deserialize)]
    struct Owner<'a> {
        #[serde(borrow)]
        tenant: std::borrow::Cow<'a, str>,
        job_kind: JobKind,
    }
    serde_json::from_slice::<Owner<'_>>(stored)
        .is_ok_and(|o| o.tenant == tenant && o.job_kind == kind)
}

/// Whether a model name is safe to send: 1 to `max` bytes of letters, digits and `. _ - : / @ +`,
/// with no empty, `.` or `..` path segment (a Gemini model is part of the URL path).
pub(crate) fn check_model_name(model: &str, max: usize) -> Result<(), String> {
    if model.is_empty() || model.len() > max {
        return Err(format!(
            "model: must be 1 to {max} bytes (got {})",
            model.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/@+".contains(c);
    if !model.chars().all(allowed) {
        return Err(format!(
            "model: {} may hold only letters, digits and . _ - : / @ +",
            quote(model)
        ));
    }
    if model
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(format!(
            "model: {} has an empty, '.' or '..' path segment",
            quote(model)
        ));
    }
    Ok(())
}

/// A job's value for an error text or a log line: at most [`QUOTE_CHARS`] characters,
/// escaped (no control characters reach a log), in quotes.
pub(crate) fn quote(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

/// Credentials written into server URLs (`nats://user:pass@host`, `nats://token@host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// Split the credentials out of comma-separated server URLs: the URLs without them, and the
/// credentials of the first URL that has any. Libraries log server URLs (async-nats prints
/// them, password included, at debug level); URLs without secrets cannot leak them.
pub(crate) fn split_url_credentials(urls: &str) -> (String, Option<UrlCredentials>) {
    let mut found = None;
    let clean: Vec<String> = urls
        .split(',')
        .map(|u| {
            let trimmed = u.trim();
            let Some((scheme, rest)) = trimmed.split_once("://") else {
                return trimmed.to_string();
            };
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let Some((userinfo, host)) = authority.rsplit_once('@') else {
                return trimmed.to_string();
            };
            let creds = match userinfo.split_once(':') {
                Some((user, pass)) => UrlCredentials::UserPassword(user.into(), pass.into()),
                None => UrlCredentials::Token(userinfo.into()),
            };
            found.get_or_insert(creds);
            format!("{scheme}://{host}{path}")
        })
        .collect();
    (clean.join(","), found)
}

/// A URL (or comma-separated URLs) with any password replaced by `***`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let trimmed = u.trim();
            // `scheme://user:pass@host` -> `scheme://user:***@host`; anything else unchanged.
            let Some((scheme, rest)) = trimmed.split_once("://") else {
                return trimmed.to_string();
            };
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                // `user:password@` keeps the user; a bare `token@` is all secret.
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
                    None => format!("{scheme}://***@{host}{path}"),
                },
                None => trimmed.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(prefixes: Option<&[&str]>) -> ReplyPolicy {
        let nats = NatsConfig {
            reply_prefixes: prefixes.map(|p| p.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        ReplyPolicy::new(&nats).unwrap()
    }

    #[test]
    fn replies_under_the_default_prefixes_are_accepted() {
        let p = policy(None);
        for s in ["llm.replies.orch-1.abc", "_INBOX.x.y", "llm.replies.a"] {
            assert_eq!(p.check(s, "t"), Ok(()), "{s}");
        }
    }

    #[test]
    fn system_own_wildcard_long_and_foreign_subjects_are_refused() {
        let p = policy(None);
        let long = format!("llm.replies.{}", "x".repeat(250));
        for (s, why) in [
            ("$JS.API.STREAM.PURGE.LLM_JOBS", "under $"),
            ("$KV.bucket.key", "under $"),
            ("$SYS.REQ.SERVER.PING", "under $"),
            ("llm.jobs.generate", "own subject"),
            (
                "llm.results.0192f0c4-0000-7000-8000-000000000001",
                "own subject",
            ),
            ("llm.status", "own subject"),
            ("llm.dead.jobs.x", "own subject"),
            ("_LLMW_INBOX.abc.1", "own subject"),
            ("llm.replies.*", "not a literal"),
            ("llm.replies.>", "not a literal"),
            ("llm.replies.a b", "not a literal"),
            ("llm.replies..a", "not a literal"),
            ("llm.replies.\u{0}", "not a literal"),
            ("llm.replies.é", "not a literal"),
            (long.as_str(), "bytes, more than 255"),
            ("other.subject", "not under a reply prefix"),
            ("llm.repliesX.a", "not under a reply prefix"),
            ("_INBOX", "not under a reply prefix"),
        ] {
            let err = p.check(s, "t").unwrap_err();
            assert!(err.contains(why), "{s}: {err}");
            assert!(err.starts_with("reply_to: "), "{err}");
        }
    }

    #[test]
    fn a_tenant_token_binds_reply_subjects_to_the_jobs_tenant() {
        let p = policy(Some(&["llm.replies.{tenant}."]));
        assert_eq!(p.check("llm.replies.acme.1", "acme"), Ok(()));
        assert!(p.check("llm.replies.acme.1", "globex").is_err());
        assert!(p.check("llm.replies.acmex.1", "acme").is_err());
        assert!(p.check("_INBOX.1", "acme").is_err());
    }

    #[test]
    fn prefixes_that_reach_system_or_own_subjects_are_configuration_errors() {
        for bad in [
            vec!["$JS."],
            vec!["llm.jobs."],
            vec!["llm."],
            vec!["llm.replies"],
            vec!["a.*."],
            vec!["a.x{tenant}."],
            vec![],
        ] {
            let nats = NatsConfig {
                reply_prefixes: Some(bad.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            };
            assert!(ReplyPolicy::new(&nats).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stored_results_are_the_same_job_only_for_the_same_tenant_and_kind() {
        let stored =
            br#"{"type":"result","tenant":"acme","job_kind":"generate","output":"secret"}"#;
        assert!(same_job(stored, "acme", JobKind::Generate));
        assert!(!same_job(stored, "globex", JobKind::Generate));
        assert!(!same_job(stored, "acme", JobKind::Embed));
        assert!(!same_job(b"garbage", "acme", JobKind::Generate));
    }

    #[test]
    fn model_names_with_path_tricks_are_refused() {
        for ok in [
            "gpt-4o",
            "anthropic/claude-3.5-sonnet",
            "llama3.1:8b",
            "hf.co/u/r:Q4_K_M",
        ] {
            assert_eq!(check_model_name(ok, 128), Ok(()), "{ok}");
        }
        for bad in [
            "x/../../v1alpha/models/y",
            "./m",
            "a//b",
            "/abs",
            "m?key=1",
            "m#f",
            "a b",
            "m%2e%2e",
            "",
        ] {
            assert!(check_model_name(bad, 128).is_err(), "{bad}");
        }
        assert!(check_model_name(&"m".repeat(129), 128).is_err());
    }

    #[test]
    fn quotes_are_short_and_escaped() {
        assert_eq!(quote("ab"), "\"ab\"");
        let q = quote(&format!("line\n{}", "x".repeat(100)));
        assert!(q.starts_with("\"line\\n") && q.ends_with('…'), "{q}");
        assert!(q.chars().count() < QUOTE_CHARS + 10, "{q}");
    }

    #[test]
    fn credentials_are_split_out_of_server_urls() {
        assert_eq!(
            split_url_credentials("nats://u:p@h:4222,nats://h2:4222"),
            (
                "nats://h:4222,nats://h2:4222".to_string(),
                Some(UrlCredentials::UserPassword("u".into(), "p".into()))
            )
        );
        assert_eq!(
            split_url_credentials("tls://tok@h"),
            (
                "tls://h".to_string(),
                Some(UrlCredentials::Token("tok".into()))
            )
        );
        assert_eq!(
            split_url_credentials("h:4222"),
            ("h:4222".to_string(), None)
        );
    }

    #[test]
    fn passwords_in_urls_are_hidden() {
        assert_eq!(
            redact_url("nats://u:secret@h:4222, nats://h2:4222"),
            "nats://u:***@h:4222,nats://h2:4222"
        );
        assert_eq!(
            redact_url("postgres://pg:pw@db/x?sslmode=require"),
            "postgres://pg:***@db/x?sslmode=require"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("nats://s3cr3t@h:4222"), "nats://***@h:4222");
    }
}
