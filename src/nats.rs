//! NATS connections and the JetStream set-up that several layers share: connecting with the
//! configured credentials and TLS, the deployment's streams (jobs, results, dead letters,
//! cancels), any stream or KV bucket's stream created idempotently with a
//! warning for settings that differ, durable pull consumers, and how a message this process
//! will not handle is handed back. `queue`, `cache`, `policy`, `usage` and the client build on
//! it; it knows nothing of jobs beyond subject names.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{PullConsumer, pull},
    stream::{self, RetentionPolicy, StorageType},
};

use crate::config::NatsConfig;
use crate::trust::UrlCredentials;
use secrecy::ExposeSecret;

/// Connect to NATS as a client (`submit`, `status`): the configured credentials and TLS. Fails
/// at once when the server cannot be reached (a command should say so, not wait).
pub async fn connect(nats: &NatsConfig) -> anyhow::Result<async_nats::Client> {
    connect_with(nats, &nats.client_inbox_prefix, false).await
}

/// Connect to NATS as a worker: like a client, but with the worker's own inbox prefix, which
/// no job may name as its reply subject, and retrying until the server is there.
pub(crate) async fn connect_worker(nats: &NatsConfig) -> anyhow::Result<async_nats::Client> {
    connect_with(nats, &nats.inbox_prefix, true).await
}

async fn connect_with(
    nats: &NatsConfig,
    inbox: &str,
    retry: bool,
) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new()
        .name("llm-worker")
        .connection_timeout(Duration::from_secs(5))
        .custom_inbox_prefix(inbox);
    if retry {
        options = options.retry_on_initial_connect();
    }
    // Credentials written into the URL are passed as options instead: async-nats logs server
    // URLs (at debug level, password included).
    let (urls, url_credentials) = crate::trust::split_url_credentials(&nats.url);
    match url_credentials {
        Some(UrlCredentials::UserPassword(user, password)) => {
            options = options.user_and_password(user, password);
        }
        Some(UrlCredentials::Token(token)) => options = options.token(token),
        None => {}
    }
    if let Some(path) = &nats.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_string());
    }
    if let Some(path) = &nats.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("reading the NATS nkey seed {}", path.display()))?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(ca) = &nats.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if nats.require_tls {
        options = options.require_tls(true);
    }
    // async-nats parses a string as one URL: a cluster's URLs are passed as a list (the
    // client then reconnects to whichever is up).
    let servers: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    // Don't block forever when the server is down at start: fail with a clear message instead.
    let client = tokio::time::timeout(Duration::from_secs(15), options.connect(servers))
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach NATS at {urls} within 15 s"))?
        .with_context(|| format!("connecting to NATS at {urls}"))?;
    Ok(client)
}

/// The most cancel requests the cancel stream keeps (and each worker remembers).
pub const MAX_CANCELS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("creating stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("creating consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
}

/// Keep the streams a deployment already has: one with its own subject prefix that ran before
/// names were derived from the prefix has them under the `llm` names (`LLM_DEAD` taking
/// `<prefix>.dead.>`, and so on). When a stream whose name was derived does not exist and the
/// `llm`-named one takes this prefix's subjects, every derived name goes back to the `llm`
/// name (`crate::config` names). Nothing changes for names the configuration sets, or when
/// NATS cannot say (a client; a worker asks `earlier_names` until NATS answers).
pub async fn keep_earlier_names(js: &jetstream::Context, nats: &mut NatsConfig) {
    if let Ok(true) = earlier_names(js, nats).await {
        use_earlier_names(nats);
    }
}

/// Switch `nats` to the `llm` names, saying so.
pub(crate) fn use_earlier_names(nats: &mut NatsConfig) {
    tracing::info!(
        prefix = %nats.subject_prefix,
        "this deployment's streams predate names derived from the subject prefix: keeping the llm names (set them in [nats] to silence this)"
    );
    nats.use_llm_names();
}

/// Whether this deployment's streams are under the `llm` names (see [`keep_earlier_names`]);
/// `Err` when NATS cannot say (no answer, no leader).
pub(crate) async fn earlier_names(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<bool, String> {
    if !nats.names_derived() {
        return Ok(false);
    }
    let llm = NatsConfig::default();
    let p = &nats.subject_prefix;
    let streams = [
        (
            "jobs_stream",
            &nats.jobs_stream,
            &llm.jobs_stream,
            format!("{p}.jobs.>"),
        ),
        (
            "results_stream",
            &nats.results_stream,
            &llm.results_stream,
            format!("{p}.results.>"),
        ),
        (
            "dead_stream",
            &nats.dead_stream,
            &llm.dead_stream,
            format!("{p}.dead.>"),
        ),
        (
            "cancel_stream",
            &nats.cancel_stream,
            &llm.cancel_stream,
            format!("{p}.cancel."),
        ),
    ];
    for (key, name, llm_name, subjects) in streams {
        if !nats.derived_names.contains(&key) || stream_config(js, name).await?.is_some() {
            continue;
        }
        let Some(config) = stream_config(js, llm_name).await? else {
            continue;
        };
        // The cancel stream took `<prefix>.cancel.*` before `<prefix>.cancel.>`.
        if config
            .subjects
            .iter()
            .any(|s| s == &subjects || (key == "cancel_stream" && s.starts_with(&subjects)))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The configuration of stream `name`; `None` when there is no such stream.
async fn stream_config(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Config>, String> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(format!("reading stream {name}: {e}")),
        },
    }
}

/// Create the job, result and dead-letter streams if they are missing (idempotent; an existing stream's
/// configuration is left as it is).
pub async fn ensure_streams(js: &jetstream::Context, nats: &NatsConfig) -> Result<(), SetupError> {
    let dup = Duration::from_secs(nats.duplicate_window_secs);
    let jobs = stream::Config {
        name: nats.jobs_stream.clone(),
        subjects: vec![format!("{}.jobs.>", nats.subject_prefix)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: dup,
        ..Default::default()
    };
    let results = stream::Config {
        name: nats.results_stream.clone(),
        subjects: vec![format!("{}.results.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.results_max_age_secs),
        duplicate_window: dup,
        // Direct get lets any worker read a stored result cheaply (works on 2.9).
        allow_direct: true,
        ..Default::default()
    };
    let dead = stream::Config {
        name: nats.dead_stream.clone(),
        subjects: vec![format!("{}.dead.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.dead_max_age_secs),
        duplicate_window: dup,
        ..Default::default()
    };
    // One message per (tenant, job id): a request remembered until cancel_max_age_secs.
    let cancel = stream::Config {
        name: nats.cancel_stream.clone(),
        subjects: vec![format!("{}.cancel.>", nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(nats.cancel_max_age_secs),
        max_messages_per_subject: 1,
        // Requests carry nothing but their subject: bounded, whoever floods them.
        max_message_size: 1024,
        max_messages: MAX_CANCELS as i64,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: dup,
        ..Default::default()
    };
    let cancel_subjects = cancel.subjects.clone();
    for config in [jobs, results, dead, cancel] {
        let name = config.name.clone();
        let stream = ensure_stream(js, config, nats.replicas)
            .await
            .map_err(|message| SetupError::Stream {
                stream: name.clone(),
                message,
            })?;
        if name == nats.cancel_stream
            && let Err(e) = widen_cancel_subjects(js, stream, nats, cancel_subjects.clone()).await
        {
            tracing::warn!(
                stream = %name,
                error = %e,
                "cannot widen the cancel stream to <prefix>.cancel.>: cancel requests are not \
                 stored until it is (nats stream edit)"
            );
        }
    }
    Ok(())
}

/// A cancel stream created before cancels carried their tenant holds `<prefix>.cancel.*`
/// only; widen it to `<prefix>.cancel.>` (a superset: nothing stored is lost), so cancel
/// requests `<prefix>.cancel.<tenant>.<job_id>` are stored.
async fn widen_cancel_subjects(
    js: &jetstream::Context,
    stream: stream::Stream,
    nats: &NatsConfig,
    wanted: Vec<String>,
) -> Result<(), String> {
    let old = vec![format!("{}.cancel.*", nats.subject_prefix)];
    let mut config = stream.cached_info().config.clone();
    if config.subjects != old {
        return Ok(());
    }
    config.subjects = wanted;
    js.update_stream(config).await.map_err(|e| e.to_string())?;
    tracing::info!(stream = %nats.cancel_stream, "cancel stream widened to <prefix>.cancel.> (cancels carry their tenant)");
    Ok(())
}

/// Create a stream (or KV bucket's stream) with `replicas` copies if it is missing. An
/// existing one is left as it is (changing a stream is an operator's decision), with a
/// warning naming every setting that differs from what this configuration would create.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    mut wanted: stream::Config,
    replicas: usize,
) -> Result<stream::Stream, String> {
    wanted.num_replicas = replicas;
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| e.to_string())?;
    let differ = differences(&stream.cached_info().config, &wanted);
    if !differ.is_empty() {
        tracing::warn!(
            stream = %wanted.name,
            differences = %differ.join("; "),
            "an existing stream's settings differ from this configuration; it is used as it is \
             (change it with `nats stream edit`, or delete it to have it created again)"
        );
    }
    Ok(stream)
}

/// The settings this worker chooses where `existing` differs from `wanted`.
pub(crate) fn differences(existing: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut settings = vec![
        (
            "replicas",
            format!("{}", existing.num_replicas),
            format!("{}", wanted.num_replicas),
        ),
        (
            "subjects",
            format!("{:?}", existing.subjects),
            format!("{:?}", wanted.subjects),
        ),
        (
            "retention",
            format!("{:?}", existing.retention),
            format!("{:?}", wanted.retention),
        ),
        (
            "storage",
            format!("{:?}", existing.storage),
            format!("{:?}", wanted.storage),
        ),
        (
            "max_age",
            format!("{:?}", existing.max_age),
            format!("{:?}", wanted.max_age),
        ),
    ];
    // 0 means the server's default (2 minutes).
    if !wanted.duplicate_window.is_zero() {
        settings.push((
            "duplicate_window",
            format!("{:?}", existing.duplicate_window),
            format!("{:?}", wanted.duplicate_window),
        ));
    }
    settings
        .into_iter()
        .filter(|(_, has, wants)| has != wants)
        .map(|(name, has, wants)| format!("{name} is {has}, the configuration says {wants}"))
        .collect()
}

/// Get or create the durable pull consumer `config` names on `stream` (idempotent). An
/// existing consumer whose ack wait or delivery limit differ from `config` is updated (NATS
/// allows it); one whose filter differs is an error, as NATS 2.9 cannot change a filter.
pub(crate) async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> Result<PullConsumer, SetupError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let err = |e: &dyn std::fmt::Display| SetupError::Consumer {
        consumer: name.clone(),
        message: e.to_string(),
    };
    let stream = js.get_stream_no_info(stream).await.map_err(|e| err(&e))?;
    let mut consumer: PullConsumer = stream
        .get_or_create_consumer(&name, config.clone())
        .await
        .map_err(|e| err(&e))?;
    let found = consumer.info().await.map_err(|e| err(&e))?.config.clone();
    if found.filter_subject != config.filter_subject {
        return Err(err(&format!(
            "it exists with filter '{}' but this configuration needs '{}' \
             (nats.tenant_from_subject changed?): delete the consumer or use another \
             nats.consumer_prefix",
            found.filter_subject, config.filter_subject
        )));
    }
    if found.ack_wait != config.ack_wait || found.max_deliver != config.max_deliver {
        match stream.create_consumer(config).await {
            Ok(updated) => {
                tracing::info!(consumer = %name, "consumer settings updated (ack wait, delivery limit)");
                consumer = updated;
            }
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "cannot update the consumer's settings; keeping them")
            }
        }
    }
    Ok(consumer)
}

/// A Nak for a message this process will not handle. Delayed past the life of this process's
/// pull requests: an immediate Nak is redelivered at once to a pull request the server still
/// holds for the stopping process, again and again (each a delivery, until `max_deliver`
/// strands the job), instead of going to another worker.
pub(crate) fn hand_back(pull_expires: Duration) -> AckKind {
    AckKind::Nak(Some(pull_expires + Duration::from_millis(500)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_back_job_waits_out_the_pull_requests_in_flight() {
        let AckKind::Nak(Some(delay)) = hand_back(Duration::from_secs(5)) else {
            panic!("not a delayed nak")
        };
        assert_eq!(delay, Duration::from_millis(5500));
    }

    #[test]
    fn settings_that_differ_are_named_and_equal_ones_are_not() {
        let wanted = stream::Config {
            name: "S".into(),
            subjects: vec!["a.>".into()],
            num_replicas: 3,
            max_age: Duration::from_secs(60),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        assert!(differences(&wanted, &wanted).is_empty());
        let existing = stream::Config {
            num_replicas: 1,
            max_age: Duration::from_secs(30),
            ..wanted.clone()
        };
        let d = differences(&existing, &wanted);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("replicas is 1, the configuration says 3"),
            "{d:?}"
        );
        assert!(d[1].starts_with("max_age is 30s"), "{d:?}");
    }
}
