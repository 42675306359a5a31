//! Trust boundaries (CONTRACT.md section 5): job publishers are not trusted, so a job's fields
//! are data, never authority. This module owns the rules that keep them so:
//!
//! - `crate::contract::ReplyPolicy` (the contract's rule, with the prefixes configured): the
//!   only subjects the worker publishes a job's events (or a status answer) to.
//! - `same_job`: a stored result is re-sent only to the job that produced it (same job id,
//!   tenant and kind); anyone else re-using the id is refused.
//! - `check_model_name`: a model name a job pins is safe to put in a URL path.
//! - [`redact_url`]: server URLs are printed without passwords.
//!
//! No I/O.

use serde::Deserialize;

use crate::contract::{JobKind, quote};

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
    use crate::config::NatsConfig;
    use crate::contract::{QUOTE_CHARS, ReplyPolicy};

    fn policy(prefixes: Option<&[&str]>) -> ReplyPolicy {
        let nats = NatsConfig {
            reply_prefixes: prefixes.map(|p| p.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        nats.reply_policy().unwrap()
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
            assert!(nats.reply_policy().is_err(), "{bad:?}");
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
