//! The least-privilege NATS account (`llm-worker nats-account`) and TLS, on a nats-server of
//! the test's own (a child process on a free port, auth on): the worker answers and records
//! jobs with exactly those permissions, and neither a tenant's orchestrator nor the worker's own
//! user can purge or delete a stream.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{Event, ServerError};
use llm_worker::app;
use llm_worker::nats_account::{self, Password, Role, User};
use llm_worker_testkit::{FakeLlmServer, Reply, ScratchDatabase};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::helpers::{ALL_ROLES, Services, collect_reply, openai_provider, test_config};
use crate::servers::{NatsServer, TempDir};

/// A client and the permission violations the server reports to it.
async fn connect(
    url: &str,
    user: &str,
    password: &str,
    inbox: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(inbox)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(ServerError::Other(message)) = event {
                    let _ = tx.send(message);
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    (client, rx)
}

/// Publish to `subject` and wait for the server to refuse it.
async fn refused(
    client: &async_nats::Client,
    violations: &mut mpsc::UnboundedReceiver<String>,
    subject: &str,
) {
    client
        .publish(subject.to_string(), "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let wanted = format!("Permissions Violation for Publish to \"{subject}\"");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, violations.recv())
            .await
            .unwrap_or_else(|_| panic!("no permissions violation for {subject}"))
            .unwrap();
        if message.contains(&wanted) {
            return;
        }
    }
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_worker_with_least_privilege_runs_jobs_and_nobody_can_purge_a_stream() {
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["fine"], (3, 1)));
    let mut config = test_config(
        &services,
        &database.url,
        &openai_provider("openai", &fake.base_url(), "m"),
    );
    let p = config.nats.subject_prefix.clone();
    config.nats.tenant_from_subject = true;
    config.nats.reply_prefixes = Some(vec![
        format!("{p}.replies.{{tenant}}."),
        "_INBOX.{tenant}.".into(),
    ]);
    let users = [
        ("worker", Role::Worker),
        ("acme", Role::Orchestrator(Some("acme".into()))),
        ("admin", Role::Admin),
    ]
    .map(|(name, role)| User {
        name: name.into(),
        password: Password::Literal(format!("{name}-pw")),
        role,
    });
    let account = nats_account::render(&config.nats, "LLM", &users);
    let server = NatsServer::start(&account).await;
    config.nats.url = server.url();
    let (jobs, results) = (
        config.nats.jobs_stream.clone(),
        config.nats.results_stream.clone(),
    );

    let mut worker_config = config.clone();
    worker_config.nats.user = Some("worker".into());
    worker_config.nats.password = Some("worker-pw".into());
    worker_config.worker.id = Some("locked-down".into());
    let worker = app::start(worker_config, ALL_ROLES).await.unwrap();

    let (admin, _) = connect(&server.url(), "admin", "admin-pw", "_INBOX").await;
    let admin_js = jetstream::new(admin.clone());
    let (acme, mut acme_violations) =
        connect(&server.url(), "acme", "acme-pw", "_INBOX.acme").await;
    let acme_js = jetstream::new(acme.clone());

    // A job of acme's: answered live, stored, readable by acme, recorded under acme.
    let reply_to = format!("{p}.replies.acme.{}", Uuid::new_v4());
    let mut sub = acme.subscribe(reply_to.clone()).await.unwrap();
    let id = Uuid::now_v7();
    let job =
        json!({"job_id": id.to_string(), "prompt": "x", "tenant": "globex", "reply_to": reply_to});
    acme_js
        .send_publish(
            format!("{p}.jobs.generate.acme"),
            PublishMessage::build()
                .payload(serde_json::to_vec(&job).unwrap().into())
                .message_id(id.to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(
        (r["status"].as_str(), r["tenant"].as_str()),
        (Some("ok"), Some("acme")),
        "{r}"
    );
    assert_eq!(r["output"], "fine");
    let stored = acme_js
        .get_stream(&results)
        .await
        .unwrap()
        .direct_get_last_for_subject(format!("{p}.results.{id}"))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stored.payload).unwrap(),
        r
    );
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    let sql = format!("SELECT count(*) FROM llm_jobs WHERE job_id = '{id}' AND tenant = 'acme'");
    wait_until("the job's usage row", async || {
        sqlx::query_scalar::<_, i64>(&sql)
            .fetch_one(&db)
            .await
            .unwrap()
            == 1
    })
    .await;
    // Acked by the worker's user (nothing pending or redelivered).
    let mut consumer: jetstream::consumer::PullConsumer = admin_js
        .get_stream(&jobs)
        .await
        .unwrap()
        .get_consumer(
            &config
                .nats
                .consumer_name(llm_worker::contract::JobKind::Generate),
        )
        .await
        .unwrap();
    wait_until("the job's ack", async || {
        consumer.info().await.unwrap().num_ack_pending == 0
    })
    .await;
    assert_eq!(consumer.info().await.unwrap().num_redelivered, 0);

    // Someone else's message waiting in the jobs stream (the bare subject: no consumer takes
    // it when tenants come from subjects).
    admin_js
        .publish(format!("{p}.jobs.generate"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // A hostile job of acme's names the purge API as its reply subject: refused and stored.
    let hostile = Uuid::now_v7();
    let job = json!({"job_id": hostile.to_string(), "prompt": "x", "reply_to": format!("$JS.API.STREAM.PURGE.{jobs}")});
    acme_js
        .send_publish(
            format!("{p}.jobs.generate.acme"),
            PublishMessage::build()
                .payload(serde_json::to_vec(&job).unwrap().into())
                .message_id(hostile.to_string()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let results_stream = acme_js.get_stream(&results).await.unwrap();
    let subject = format!("{p}.results.{hostile}");
    wait_until("the refused job's stored result", async || {
        results_stream
            .direct_get_last_for_subject(subject.clone())
            .await
            .is_ok()
    })
    .await;

    // Neither acme nor the worker's own user may purge or delete, or publish for another tenant.
    refused(
        &acme,
        &mut acme_violations,
        &format!("$JS.API.STREAM.PURGE.{jobs}"),
    )
    .await;
    refused(
        &acme,
        &mut acme_violations,
        &format!("$JS.API.STREAM.DELETE.{results}"),
    )
    .await;
    refused(
        &acme,
        &mut acme_violations,
        &format!("{p}.jobs.generate.globex"),
    )
    .await;
    // Cancels: acme's own are allowed, another tenant's and the tenant-less form are not,
    // and reading a queued job (anyone's) is not.
    acme.publish(format!("{p}.cancel.acme.{}", Uuid::now_v7()), "".into())
        .await
        .unwrap();
    for subject in [
        format!("{p}.cancel.globex.{}", Uuid::now_v7()),
        format!("{p}.cancel.{}", Uuid::now_v7()),
        format!("$JS.API.STREAM.MSG.GET.{jobs}"),
    ] {
        refused(&acme, &mut acme_violations, &subject).await;
    }
    let (as_worker, mut worker_violations) = connect(
        &server.url(),
        "worker",
        "worker-pw",
        &config.nats.inbox_prefix,
    )
    .await;
    for subject in [
        format!("$JS.API.STREAM.PURGE.{jobs}"),
        format!("$JS.API.STREAM.DELETE.{results}"),
        format!("$JS.API.STREAM.MSG.DELETE.{results}"),
        format!("$JS.API.CONSUMER.DELETE.{jobs}.x"),
    ] {
        refused(&as_worker, &mut worker_violations, &subject).await;
    }

    // Credentials written into the URL work too (passed as options, so never logged).
    let mut in_url = config.nats.clone();
    in_url.url = format!("nats://admin:admin-pw@127.0.0.1:{}", server.port());
    llm_worker::nats::connect(&in_url)
        .await
        .unwrap()
        .flush()
        .await
        .unwrap();
    in_url.url = format!("nats://admin:wrong@127.0.0.1:{}", server.port());
    assert!(llm_worker::nats::connect(&in_url).await.is_err());

    let mut jobs_stream = admin_js.get_stream(&jobs).await.unwrap();
    assert_eq!(jobs_stream.info().await.unwrap().state.messages, 1);
    let mut results_stream = admin_js.get_stream(&results).await.unwrap();
    assert_eq!(results_stream.info().await.unwrap().state.messages, 2);

    worker.shutdown().await;
    db.close().await;
    database.drop().await;
}

/// `openssl` writes a CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_certificates(dir: &std::path::Path) -> bool {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let mut ok = run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=llmw-test-ca",
        ],
    ]
    .concat());
    for name in ["server", "client"] {
        ok = ok
            && run(&[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat())
            && run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
    }
    ok
}

#[tokio::test]
async fn a_worker_talks_to_nats_over_tls_with_a_client_certificate() {
    let certs = TempDir::new("llmw-tls");
    // A TLS test that cannot make its certificates must fail, not pass.
    assert!(
        make_certificates(certs.path()),
        "openssl could not make test certificates (apt install openssl)"
    );
    let path = |f: &str| certs.path().join(f);
    let tls = format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let server = NatsServer::start(&tls).await;
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["secure"], (1, 1)));
    let mut config = test_config(
        &services,
        &database.url,
        &openai_provider("openai", &fake.base_url(), "m"),
    );
    config.nats.url = server.url();
    config.nats.tls_ca = Some(path("ca.pem"));
    config.nats.tls_cert = Some(path("client.pem"));
    config.nats.tls_key = Some(path("client.key"));
    let worker = app::start(config.clone(), ALL_ROLES).await.unwrap();

    // The CLI's client connection takes the same settings.
    let client = llm_worker::nats::connect(&config.nats).await.unwrap();
    let reply_to = format!("{}.replies.{}", config.nats.subject_prefix, Uuid::new_v4());
    let mut sub = client.subscribe(reply_to.clone()).await.unwrap();
    jetstream::new(client.clone())
        .publish(
            config
                .nats
                .job_subject(llm_worker::contract::JobKind::Generate),
            serde_json::to_vec(&json!({"prompt": "x", "reply_to": reply_to}))
                .unwrap()
                .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(collect_reply(&mut sub).await.result["output"], "secure");

    // Without a client certificate the server refuses the connection.
    let mut no_cert = config.nats.clone();
    no_cert.tls_cert = None;
    no_cert.tls_key = None;
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        async_nats::ConnectOptions::new()
            .add_root_certificates(path("ca.pem"))
            .require_tls(true)
            .connect(server.url()),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "connected without a client certificate"
    );

    worker.shutdown().await;
    database.drop().await;
}
