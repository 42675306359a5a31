//! The least-privilege NATS account of a deployment: exactly the subjects a worker needs, and
//! what an orchestrator (or one tenant's orchestrator) needs, rendered as a nats-server
//! `accounts` block (`llm-worker nats-account`).
//!
//! A worker may create its own streams and consumers, pull and ack jobs, store and read results,
//! write dead letters, follow cancel requests, hold batch jobs and publish replies under the
//! reply prefixes, and nothing else: no `STREAM.DELETE`, `STREAM.PURGE`, `CONSUMER.DELETE`,
//! `MSG.DELETE` only on the batch stream (a held job, once answered), no other stream. An orchestrator publishes jobs and cancel requests, reads stored results and
//! subscribes to its replies; a tenant's orchestrator does so
//! only on its tenant's job subjects and reply subjects (with `nats.tenant_from_subject` the
//! worker then takes the tenant from the subject, so NATS vouches for it). This module does no
//! I/O; the integration tests run a nats-server with exactly this output.

use std::fmt::Write as _;

use crate::config::NatsConfig;
use crate::contract::JobKind;

/// The publish and subscribe allow-lists of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What a user is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Worker,
    /// An orchestrator for every tenant (`None`), or for one (`Some`): its own job subjects
    /// (`<prefix>.jobs.<kind>.<tenant>`), replies under `<prefix>.replies.<tenant>.` and
    /// inboxes under `_INBOX.<tenant>.` (its client's inbox prefix must be `_INBOX.<tenant>`).
    Orchestrator(Option<String>),
    /// Everything in the account (operators; not for services).
    Admin,
}

/// Where a user's password comes from in the rendered configuration.
#[derive(Debug, Clone)]
pub enum Password {
    /// nats-server reads `$VAR` from its environment when it starts.
    Env(String),
    /// Written into the file (tests).
    Literal(String),
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub password: Password,
    pub role: Role,
}

/// The permissions of a worker process (job roles and recorder together).
pub(crate) fn worker(nats: &NatsConfig) -> Permissions {
    let (jobs, results) = (&nats.jobs_stream, &nats.results_stream);
    let api = "$JS.API";
    let mut publish = Vec::new();
    for stream in [
        jobs,
        results,
        &nats.dead_stream,
        &nats.cancel_stream,
        &nats.batch_stream,
    ] {
        publish.push(format!("{api}.STREAM.INFO.{stream}"));
        publish.push(format!("{api}.STREAM.CREATE.{stream}"));
    }
    let mut consumers: Vec<(&String, String)> = JobKind::ALL
        .iter()
        .map(|k| (jobs, nats.consumer_name(*k)))
        .collect();
    consumers.push((results, nats.recorder_consumer_name()));
    let batch_consumer = format!("{}-batch", nats.consumer_prefix);
    consumers.push((&nats.batch_stream, batch_consumer));
    for (stream, consumer) in &consumers {
        publish.push(format!("{api}.CONSUMER.INFO.{stream}.{consumer}"));
        // async-nats names the filter subject after the consumer (NATS 2.9 extended create).
        publish.push(format!("{api}.CONSUMER.CREATE.{stream}.{consumer}.>"));
        publish.push(format!("{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
        publish.push(format!("$JS.ACK.{stream}.{consumer}.>"));
    }
    publish.push(format!("{api}.DIRECT.GET.{results}.>"));
    publish.push(format!("{api}.STREAM.MSG.GET.{results}"));
    publish.push(format!("{}.results.>", nats.subject_prefix));
    publish.push(format!("{}.dead.>", nats.subject_prefix));
    // The batch lane (`crate::batch`): hand jobs over, read them back by sequence, delete
    // each once it is answered.
    let batch = &nats.batch_stream;
    publish.push(crate::lane::subject(nats));
    publish.push(format!("{api}.DIRECT.GET.{batch}.>"));
    publish.push(format!("{api}.STREAM.MSG.GET.{batch}"));
    publish.push(format!("{api}.STREAM.MSG.DELETE.{batch}"));
    // Following the cancel stream: an ordered (ephemeral) consumer and its flow control.
    let cancel = &nats.cancel_stream;
    publish.push(format!("{api}.CONSUMER.CREATE.{cancel}"));
    publish.push(format!("{api}.CONSUMER.CREATE.{cancel}.>"));
    publish.push(format!("$JS.FC.{cancel}.>"));
    // Widening a cancel stream of an older version to `<prefix>.cancel.>` (`crate::queue`).
    publish.push(format!("{api}.STREAM.UPDATE.{cancel}"));
    // The tenant counters and the response cache (KV buckets): their streams, reads, writes
    // (compare-and-set for counters), and the watch (an ordered consumer) that keeps every
    // worker's copy of the counters current.
    for bucket in [&nats.tenant_bucket, &nats.cache_bucket, &nats.batch_bucket] {
        let kv = format!("KV_{bucket}");
        publish.push(format!("{api}.STREAM.INFO.{kv}"));
        publish.push(format!("{api}.STREAM.CREATE.{kv}"));
        publish.push(format!("{api}.DIRECT.GET.{kv}.>"));
        publish.push(format!("{api}.STREAM.MSG.GET.{kv}"));
        publish.push(format!("$KV.{bucket}.>"));
    }
    // Image jobs' pictures (the object store): its stream, puts (chunks, then the object's
    // metadata), and finding an earlier run's pictures. No purge: a picture put again leaves
    // its older chunks to the bucket's max age (`crate::image_store`).
    let obj = format!("OBJ_{}", nats.images_bucket);
    publish.push(format!("{api}.STREAM.INFO.{obj}"));
    publish.push(format!("{api}.STREAM.CREATE.{obj}"));
    publish.push(format!("{api}.DIRECT.GET.{obj}.>"));
    publish.push(format!("{api}.STREAM.MSG.GET.{obj}"));
    publish.push(format!("$O.{}.>", nats.images_bucket));
    // Watches (ordered consumers): the tenant counters, and listing the open batches.
    for bucket in [&nats.tenant_bucket, &nats.batch_bucket] {
        let kv = format!("KV_{bucket}");
        publish.push(format!("{api}.CONSUMER.CREATE.{kv}"));
        publish.push(format!("{api}.CONSUMER.CREATE.{kv}.>"));
        publish.push(format!("$JS.FC.{kv}.>"));
    }
    publish.push(format!("{}.events.budget.>", nats.subject_prefix));
    publish.extend(reply_patterns(nats));
    Permissions {
        publish,
        subscribe: vec![
            format!("{}.>", nats.inbox_prefix),
            format!("{}.status", nats.subject_prefix),
            // The NATS service API (`crate::service`): $SRV.<verb>[.llm-worker[.<id>]].
            "$SRV.*".to_string(),
            format!("$SRV.*.{}", crate::service::NAME),
            format!("$SRV.*.{}.*", crate::service::NAME),
            // Reload requests: only the admin user may publish them.
            format!("{}.control.reload", nats.subject_prefix),
        ],
    }
}

/// The permissions of an orchestrator, for every tenant or for one.
pub(crate) fn orchestrator(nats: &NatsConfig, tenant: Option<&str>) -> Permissions {
    let p = &nats.subject_prefix;
    let (jobs, results) = (&nats.jobs_stream, &nats.results_stream);
    let (job_subjects, replies, inbox) = match tenant {
        None => (
            vec![format!("{p}.jobs.>")],
            format!("{p}.replies.>"),
            "_INBOX.>".to_string(),
        ),
        Some(t) => (
            JobKind::ALL
                .iter()
                .map(|k| format!("{}.{t}", nats.job_subject(*k)))
                .collect(),
            format!("{p}.replies.{t}.>"),
            format!("_INBOX.{t}.>"),
        ),
    };
    let mut publish = job_subjects;
    publish.extend([
        format!("$JS.API.STREAM.INFO.{jobs}"),
        format!("$JS.API.STREAM.INFO.{results}"),
        // Reading a stored result needs its job id (an unguessable UUID v7 when the worker or
        // the client chose it): results are not separated by tenant at the NATS level.
        format!("$JS.API.DIRECT.GET.{results}.>"),
        format!("$JS.API.STREAM.MSG.GET.{results}"),
        format!("{p}.status"),
        // Reading an image job's pictures (named by its job id, like its result): the
        // object's metadata, and its chunks through an ordered consumer.
        format!("$JS.API.STREAM.INFO.OBJ_{}", nats.images_bucket),
        format!("$JS.API.DIRECT.GET.OBJ_{}.>", nats.images_bucket),
        format!("$JS.API.STREAM.MSG.GET.OBJ_{}", nats.images_bucket),
        format!("$JS.API.CONSUMER.CREATE.OBJ_{}", nats.images_bucket),
        format!("$JS.API.CONSUMER.CREATE.OBJ_{}.>", nats.images_bucket),
        format!("$JS.FC.OBJ_{}.>", nats.images_bucket),
        // `submit` asks whether any worker consumes the jobs (the NATS service API).
        format!("$SRV.INFO.{}", crate::contract::SERVICE_NAME),
    ]);
    // Cancels carry their tenant (`<prefix>.cancel.<tenant>.<job_id>`): a tenant's user may
    // cancel only its own jobs.
    publish.push(match tenant {
        Some(t) => format!("{p}.cancel.{}.*", crate::contract::subject_token(t)),
        None => format!("{p}.cancel.>"),
    });
    if tenant.is_none() {
        // The client proves a duplicate job id is the caller's by reading the queued job
        // (`crate::client`); a tenant's user may not read other tenants' jobs.
        publish.push(format!("$JS.API.STREAM.MSG.GET.{jobs}"));
    }
    // Budget warnings: every tenant's, or the tenant's own.
    let budget_events = match tenant {
        Some(t) => format!("{p}.events.budget.{}", crate::contract::subject_token(t)),
        None => format!("{p}.events.budget.>"),
    };
    Permissions {
        publish,
        subscribe: vec![inbox, replies, budget_events],
    }
}

/// NATS subject patterns covering the reply prefixes (`{tenant}` becomes `*`).
fn reply_patterns(nats: &NatsConfig) -> Vec<String> {
    nats.reply_prefixes()
        .iter()
        .map(|p| format!("{}>", p.replace("{tenant}", "*")))
        .collect()
}

/// A nats-server `accounts` block with one account holding `users`.
pub fn render(nats: &NatsConfig, account: &str, users: &[User]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Least-privilege NATS account for llm-worker (subject prefix \"{}\", streams {}, {} and\n\
         # {}, consumers {}-*). Generated by `llm-worker nats-account`; include it in nats-server.conf.",
        nats.subject_prefix,
        nats.jobs_stream,
        nats.results_stream,
        nats.dead_stream,
        nats.consumer_prefix
    );
    let _ = writeln!(
        out,
        "accounts {{\n  {account} {{\n    jetstream: enabled\n    users: ["
    );
    for user in users {
        let password = match &user.password {
            Password::Env(var) => format!("${var}"),
            Password::Literal(p) => format!("{p:?}"),
        };
        let _ = write!(out, "      {{ user: {:?}, password: {password}", user.name);
        let perms = match &user.role {
            Role::Worker => Some(worker(nats)),
            Role::Orchestrator(t) => Some(orchestrator(nats, t.as_deref())),
            Role::Admin => None,
        };
        match perms {
            None => out.push_str(" }\n"),
            Some(p) => {
                out.push_str(",\n        permissions: {\n");
                let _ = writeln!(out, "          publish: {{ allow: {} }}", list(&p.publish));
                let _ = writeln!(
                    out,
                    "          subscribe: {{ allow: {} }}",
                    list(&p.subscribe)
                );
                out.push_str("        } }\n");
            }
        }
    }
    out.push_str("    ]\n  }\n}\n");
    out
}

/// A list, one subject per line (they are long).
fn list(items: &[String]) -> String {
    let mut out = String::from("[\n");
    for item in items {
        let _ = writeln!(out, "            {item:?},");
    }
    out.push_str("          ]");
    out
}

/// The environment variable holding a user's password in the rendered file.
pub(crate) fn password_var(user: &str) -> String {
    let upper: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("NATS_{upper}_PASSWORD")
}

/// The users `llm-worker nats-account` renders: a worker, an orchestrator (for all tenants, or
/// one per tenant given), and an admin, with passwords from the environment.
pub fn default_users(tenants: &[String]) -> Vec<User> {
    let user = |name: &str, role| User {
        name: name.to_string(),
        password: Password::Env(password_var(name)),
        role,
    };
    let mut users = vec![user("llm-worker", Role::Worker)];
    if tenants.is_empty() {
        users.push(user("orchestrator", Role::Orchestrator(None)));
    }
    for t in tenants {
        users.push(user(
            &format!("tenant-{t}"),
            Role::Orchestrator(Some(t.clone())),
        ));
    }
    users.push(user("admin", Role::Admin));
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_may_not_delete_or_purge_anything_but_answered_batch_jobs() {
        let p = worker(&NatsConfig::default());
        for s in &p.publish {
            // One update: widening an old cancel stream's subjects (`crate::queue`); one
            // delete: a held job once answered (`crate::batch`).
            if s == "$JS.API.STREAM.UPDATE.LLM_CANCEL" || s == "$JS.API.STREAM.MSG.DELETE.LLM_BATCH"
            {
                continue;
            }
            for forbidden in ["DELETE", "PURGE", "$JS.API.>", "UPDATE"] {
                assert!(!s.contains(forbidden), "{s}");
            }
            assert_ne!(s, ">");
        }
        assert!(p.publish.contains(&"llm.replies.>".to_string()));
        assert!(p.publish.contains(&"_INBOX.>".to_string()));
        assert!(p.subscribe.contains(&"_LLMW_INBOX.>".to_string()));
    }

    #[test]
    fn a_tenants_orchestrator_publishes_only_its_own_job_subjects() {
        let p = orchestrator(&NatsConfig::default(), Some("acme"));
        assert!(p.publish.contains(&"llm.jobs.generate.acme".to_string()));
        assert!(!p.publish.iter().any(|s| s == "llm.jobs.>"));
        // Its own cancels only, and no reading of queued jobs (other tenants' included).
        assert!(p.publish.contains(&"llm.cancel.acme.*".to_string()));
        assert!(
            !p.publish
                .iter()
                .any(|s| s.starts_with("llm.cancel.") && s != "llm.cancel.acme.*")
        );
        assert!(!p.publish.iter().any(|s| s.contains("MSG.GET.LLM_JOBS")));
        assert_eq!(
            p.subscribe,
            [
                "_INBOX.acme.>",
                "llm.replies.acme.>",
                "llm.events.budget.acme"
            ]
        );
    }

    #[test]
    fn the_shipped_account_file_is_what_the_generator_renders_for_the_defaults() {
        let rendered = render(&NatsConfig::default(), "LLM", &default_users(&[]));
        assert_eq!(
            include_str!("../deploy/nats/accounts.conf"),
            rendered,
            "regenerate with: cargo run -- nats-account > deploy/nats/accounts.conf"
        );
    }
}
