//! Subjects in the contract (CONTRACT.md section 5): what a literal subject is, which
//! subjects a job may name as its `reply_to` ([`ReplyPolicy`]), a tenant as a subject token,
//! and how a job's values are quoted in error texts. No I/O, nothing from the rest of the
//! crate: configuration supplies the prefixes (`NatsConfig::reply_policy`).

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
    /// The policy of a deployment with this subject prefix, its worker's own inbox prefix and
    /// these reply prefixes; `Err` names what is wrong with a prefix.
    pub fn new(
        subject_prefix: &str,
        inbox_prefix: &str,
        prefixes: Vec<String>,
    ) -> Result<Self, String> {
        let p = subject_prefix;
        // Everything the worker consumes or serves, now or in a later feature (`cancel`,
        // `control`, `events`): a reply there would let one job act on others.
        let mut reserved: Vec<String> = ["jobs", "results", "status", "dead", "cancel"]
            .iter()
            .chain(&["control", "events"])
            .map(|s| format!("{p}.{s}"))
            .collect();
        reserved.push(inbox_prefix.to_string());
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

/// A job's value for an error text or a log line: at most [`QUOTE_CHARS`] characters,
/// escaped (no control characters reach a log), in quotes.
pub(crate) fn quote(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

/// A plain name: 1 to 64 of `A-Z a-z 0-9 _ -`. Such a tenant name is its own subject token,
/// and every provider accepts such a tool or schema name.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A tenant name as one NATS subject token (and KV key): letters, digits, `_` and `-` as they
/// are, every other byte as `=XX`, so distinct names stay distinct.
pub fn subject_token(tenant: &str) -> String {
    let mut out = String::with_capacity(tenant.len());
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('=');
    }
    out
}
