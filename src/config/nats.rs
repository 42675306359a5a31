//! The `[nats]` section: where the server is, how to authenticate, and the names of the
//! deployment's subjects, streams, buckets and consumers (derived from the subject prefix
//! by `super::names`), with the start-up deadline.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. May carry `user:password@`; never printed.
    pub url: String,
    /// Path to a `.creds` file (NGS / decentralised auth).
    pub credentials_file: Option<PathBuf>,
    /// User name and password (set the password with `LLM_WORKER__NATS__PASSWORD`).
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// Path to a file holding an NKey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs the server's certificate; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub require_tls: bool,
    /// Subject prefixes a job's `reply_to` (and a status request's reply) must start with.
    /// Default `["<subject_prefix>.replies.", "_INBOX."]`. A `{tenant}` token is replaced by
    /// the job's tenant (`llm.replies.{tenant}.`), binding reply subjects to tenants.
    pub reply_prefixes: Option<Vec<String>>,
    /// Take the tenant from the job's subject (`<prefix>.jobs.generate.<tenant>`) instead of
    /// its body: with one NATS user per tenant, NATS itself vouches for it.
    pub tenant_from_subject: bool,
    /// Inbox prefix of the worker's own NATS connection (JetStream API answers). Never a valid
    /// reply subject for a job, so no job can inject a message into the worker's requests.
    pub inbox_prefix: String,
    /// Inbox prefix of client connections (`submit`, `status`): `_INBOX.<tenant>` for a
    /// tenant's NATS user, whose permissions cover only its own inboxes.
    pub client_inbox_prefix: String,
    /// Subject prefix: jobs on `<prefix>.jobs.*`, results on `<prefix>.results.<job_id>`.
    pub subject_prefix: String,
    pub jobs_stream: String,
    pub results_stream: String,
    /// Dead letters: jobs delivered `worker.max_deliver` times, results the recorder cannot
    /// write (`<prefix>.dead.>`).
    pub dead_stream: String,
    /// How long dead letters are kept.
    pub dead_max_age_secs: u64,
    /// Cancel requests (`<prefix>.cancel.<tenant>.<job_id>`), kept so a queued job is
    /// cancelled when a worker picks it up, and by workers started after the request.
    pub cancel_stream: String,
    /// How long a cancel request is remembered.
    pub cancel_max_age_secs: u64,
    /// JetStream KV bucket of the fleet's shared tenant counters (spend per day and month).
    pub tenant_bucket: String,
    /// JetStream KV bucket of the fleet's response cache (`[cache]`).
    pub cache_bucket: String,
    /// JetStream object store bucket of image jobs' pictures, kept as long as results
    /// (`results_max_age_secs`).
    pub images_bucket: String,
    /// JetStream stream of jobs handed to the batch lane (`crate::batch`), subjects
    /// `<prefix>.batch.jobs`, kept until their batch is answered.
    pub batch_stream: String,
    /// JetStream KV bucket of the open provider batches (`crate::batch`).
    pub batch_bucket: String,
    /// Durable consumer names are `<consumer_prefix>-generate` and `<consumer_prefix>-embed`.
    pub consumer_prefix: String,
    /// How long stored results are kept.
    pub results_max_age_secs: u64,
    /// JetStream dedup window of both streams (the contract asks for at least 2 minutes).
    pub duplicate_window_secs: u64,
    /// Consumer ack wait; in-flight jobs send progress acks at a third of it.
    pub ack_wait_secs: u64,
    /// Copies of every stream and KV bucket the worker creates (1, or 3 on a 3-node
    /// cluster). Existing streams are not changed; a warning names settings that differ.
    pub replicas: usize,
    /// How long start-up may wait for JetStream (a cluster electing its leaders, a server
    /// not up yet) before the process exits with the step it was waiting for; every request
    /// at start is retried with backoff until then (`crate::startup`).
    pub start_timeout_secs: u64,
    /// Which of the names above were derived from `subject_prefix` (not set by the
    /// configuration): `crate::nats::keep_earlier_names` may put the `llm` names back.
    #[serde(skip)]
    pub derived_names: Vec<&'static str>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            user: None,
            password: None,
            nkey_seed_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            reply_prefixes: None,
            tenant_from_subject: false,
            inbox_prefix: "_LLMW_INBOX".into(),
            client_inbox_prefix: "_INBOX".into(),
            subject_prefix: "llm".into(),
            jobs_stream: "LLM_JOBS".into(),
            results_stream: "LLM_RESULTS".into(),
            dead_stream: "LLM_DEAD".into(),
            dead_max_age_secs: 30 * 24 * 3600,
            cancel_stream: "LLM_CANCEL".into(),
            cancel_max_age_secs: 24 * 3600,
            tenant_bucket: "LLM_TENANTS".into(),
            cache_bucket: "LLM_CACHE".into(),
            images_bucket: crate::contract::IMAGES_BUCKET.into(),
            batch_stream: "LLM_BATCH".into(),
            batch_bucket: "LLM_BATCHES".into(),
            consumer_prefix: "llm-worker".into(),
            results_max_age_secs: 24 * 3600,
            duplicate_window_secs: 120,
            ack_wait_secs: 30,
            replicas: 1,
            start_timeout_secs: 120,
            derived_names: Vec::new(),
        }
    }
}

impl NatsConfig {
    pub(crate) fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
    pub fn result_subject(&self, job_id: &uuid::Uuid) -> String {
        format!("{}.results.{job_id}", self.subject_prefix)
    }
    /// Where `tenant` publishes a cancel request for its job `job_id`:
    /// `<prefix>.cancel.<tenant token>.<job_id>` (see [`crate::contract::subject_token`]). A cancel takes effect
    /// only on a job of that tenant.
    pub fn cancel_subject(&self, tenant: &str, job_id: &uuid::Uuid) -> String {
        format!(
            "{}.cancel.{}.{job_id}",
            self.subject_prefix,
            crate::contract::subject_token(tenant)
        )
    }
    /// Where orchestrators publish jobs of `kind` (without the tenant token).
    pub fn job_subject(&self, kind: crate::contract::JobKind) -> String {
        format!("{}.jobs.{}", self.subject_prefix, kind.as_str())
    }
    /// What the consumer of `kind` takes: the job subject, or with `tenant_from_subject` every
    /// `<job subject>.<tenant>` (one token).
    pub(crate) fn job_filter(&self, kind: crate::contract::JobKind) -> String {
        if self.tenant_from_subject {
            format!("{}.*", self.job_subject(kind))
        } else {
            self.job_subject(kind)
        }
    }
    /// The rule for reply subjects of this deployment (CONTRACT.md section 5); `Err` names
    /// what is wrong with a configured prefix.
    pub fn reply_policy(&self) -> Result<crate::contract::ReplyPolicy, String> {
        crate::contract::ReplyPolicy::new(
            &self.subject_prefix,
            &self.inbox_prefix,
            self.reply_prefixes(),
        )
    }

    /// The reply prefixes in force (the configured ones, or the defaults).
    pub(crate) fn reply_prefixes(&self) -> Vec<String> {
        self.reply_prefixes.clone().unwrap_or_else(|| {
            vec![
                format!("{}.replies.", self.subject_prefix),
                "_INBOX.".to_string(),
            ]
        })
    }

    /// The usage recorder's durable consumer on the results stream.
    pub fn recorder_consumer_name(&self) -> String {
        format!("{}-recorder", self.consumer_prefix)
    }
    /// The durable consumer of one job kind, shared by every worker process of a deployment.
    pub fn consumer_name(&self, kind: crate::contract::JobKind) -> String {
        format!("{}-{}", self.consumer_prefix, kind.as_str())
    }
}
