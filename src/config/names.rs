//! One name for a deployment: the stream, bucket and consumer names a configuration does not
//! set are derived from `nats.subject_prefix`, so a second deployment on one NATS account
//! needs one setting. Prefix `llm` gives today's names (`LLM_JOBS`, ..., `llm-worker`);
//! `acme.prod` gives `ACME_PROD_JOBS`, ..., `acme_prod-worker`. Names set in the file or
//! through `LLM_WORKER__NATS__...` are kept as they are.
//!
//! A deployment that ran with another prefix before names were derived has its streams under
//! the `llm` names: at start, `crate::nats::keep_earlier_names` finds them and the process
//! keeps using them ([`NatsConfig::use_llm_names`]).

use super::NatsConfig;

/// The derived names' keys in `[nats]` and their suffixes after the upper-case prefix;
/// `consumer_prefix` is the lower-case token and `-worker`.
const STREAMS: [(&str, &str); 9] = [
    ("jobs_stream", "JOBS"),
    ("results_stream", "RESULTS"),
    ("dead_stream", "DEAD"),
    ("cancel_stream", "CANCEL"),
    ("tenant_bucket", "TENANTS"),
    ("cache_bucket", "CACHE"),
    ("images_bucket", "IMAGES"),
    ("batch_stream", "BATCH"),
    ("batch_bucket", "BATCHES"),
];
const CONSUMER_PREFIX: &str = "consumer_prefix";

/// The name keys the `[nats]` table of `tree` sets itself.
pub(super) fn given(tree: &toml::Table) -> Vec<String> {
    let Some(toml::Value::Table(nats)) = tree.get("nats") else {
        return Vec::new();
    };
    STREAMS
        .iter()
        .map(|(key, _)| *key)
        .chain([CONSUMER_PREFIX])
        .filter(|key| nats.contains_key(*key))
        .map(String::from)
        .collect()
}

/// Derive every name not in `given` from the subject prefix.
pub(super) fn derive(nats: &mut NatsConfig, given: &[String]) {
    let token = name_token(&nats.subject_prefix);
    let upper = token.to_ascii_uppercase();
    let mut derived = Vec::new();
    for (key, suffix) in STREAMS {
        if !given.iter().any(|g| g == key) {
            *slot(nats, key) = format!("{upper}_{suffix}");
            derived.push(key);
        }
    }
    if !given.iter().any(|g| g == CONSUMER_PREFIX) {
        nats.consumer_prefix = format!("{token}-worker");
        derived.push(CONSUMER_PREFIX);
    }
    nats.derived_names = derived;
}

/// `text` as a NATS name token (a stream, bucket or consumer name, a subject token): letters,
/// digits, `_` and `-` kept, anything else `_`.
pub(crate) fn name_token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn slot<'a>(nats: &'a mut NatsConfig, key: &str) -> &'a mut String {
    match key {
        "jobs_stream" => &mut nats.jobs_stream,
        "results_stream" => &mut nats.results_stream,
        "dead_stream" => &mut nats.dead_stream,
        "cancel_stream" => &mut nats.cancel_stream,
        "tenant_bucket" => &mut nats.tenant_bucket,
        "cache_bucket" => &mut nats.cache_bucket,
        "images_bucket" => &mut nats.images_bucket,
        "batch_stream" => &mut nats.batch_stream,
        "batch_bucket" => &mut nats.batch_bucket,
        _ => &mut nats.consumer_prefix,
    }
}

impl NatsConfig {
    /// Use the `llm` prefix's names for every name that was derived (a deployment whose
    /// streams predate derived names).
    pub fn use_llm_names(&mut self) {
        let defaults = NatsConfig::default();
        for key in std::mem::take(&mut self.derived_names) {
            let default = slot(&mut defaults.clone(), key).clone();
            *slot(self, key) = default;
        }
    }

    /// Whether names were derived from a prefix other than `llm` (only then may the
    /// deployment's streams be under the `llm` names from before).
    pub fn names_derived(&self) -> bool {
        !self.derived_names.is_empty() && self.jobs_stream != NatsConfig::default().jobs_stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(toml: &str) -> NatsConfig {
        let tree: toml::Table = toml.parse().unwrap();
        let given = given(&tree);
        let mut nats: NatsConfig = tree["nats"].clone().try_into().unwrap();
        derive(&mut nats, &given);
        nats
    }

    #[test]
    fn names_follow_the_prefix_and_set_names_are_kept() {
        let defaults = NatsConfig::default();
        let n = derived("[nats]\nsubject_prefix = \"llm\"\n");
        assert_eq!(n.jobs_stream, defaults.jobs_stream);
        assert_eq!(n.results_stream, defaults.results_stream);
        assert_eq!(n.dead_stream, defaults.dead_stream);
        assert_eq!(n.cancel_stream, defaults.cancel_stream);
        assert_eq!(n.tenant_bucket, defaults.tenant_bucket);
        assert_eq!(n.cache_bucket, defaults.cache_bucket);
        assert_eq!(n.images_bucket, defaults.images_bucket);
        assert_eq!(n.consumer_prefix, defaults.consumer_prefix);
        assert!(!n.names_derived(), "llm's names are today's");
        let mut n = derived("[nats]\nsubject_prefix = \"acme.prod\"\ncache_bucket = \"MINE\"\n");
        assert_eq!(n.jobs_stream, "ACME_PROD_JOBS");
        assert_eq!(n.cancel_stream, "ACME_PROD_CANCEL");
        assert_eq!(n.tenant_bucket, "ACME_PROD_TENANTS");
        assert_eq!(n.images_bucket, "ACME_PROD_IMAGES");
        assert_eq!(n.cache_bucket, "MINE");
        assert_eq!(n.consumer_prefix, "acme_prod-worker");
        assert!(n.names_derived());
        n.use_llm_names();
        assert_eq!(n.jobs_stream, "LLM_JOBS");
        assert_eq!(n.consumer_prefix, "llm-worker");
        assert_eq!(n.cache_bucket, "MINE", "a name set stays set");
    }
}
