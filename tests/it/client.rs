//! `llm_worker::client`, the orchestrator side, against real NATS (the shared server, or one
//! of the test's own that it kills and restarts) and a worker with a fake provider.

use std::time::Duration;

use llm_worker::client::{Client, Event};
use llm_worker::config::Config;
use llm_worker::contract::JobKind;
use llm_worker_testkit::{FakeLlmServer, Reply, ScratchDatabase};
use serde_json::json;

use crate::helpers::{ALL_ROLES, Services, TestApp, openai_provider, test_config_toml};
use crate::servers::NatsServer;

#[tokio::test]
async fn chunks_of_a_failed_attempt_are_superseded_by_a_restart_and_the_text_is_the_final_answer() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker().await;
    fake.push(Reply::Cut {
        deltas: vec!["half an ".into(), "answer".into()],
    });
    fake.push(Reply::answer(&["the whole", " answer"], (4, 3)));
    let client = Client::connect(&app.config.nats).await.unwrap();
    let mut handle = client
        .submit(JobKind::Generate, json!({"prompt": "x"}), None, &[])
        .await
        .unwrap();
    let (mut restarts, mut after_last_restart, mut result) = (Vec::new(), String::new(), None);
    while let Some(event) = handle.next().await {
        match event.unwrap() {
            Event::Chunk(c) => after_last_restart.push_str(&c.delta),
            Event::Restart { attempt } => {
                restarts.push(attempt);
                after_last_restart.clear();
            }
            Event::Result(r) => result = Some(*r),
        }
    }
    let result = result.expect("no result");
    assert_eq!(result.attempt, Some(2), "{result:?}");
    assert_eq!(restarts, [2], "one restart, announcing attempt 2");
    assert_eq!(after_last_restart, "the whole answer");
    assert_eq!(handle.text(), "the whole answer");
    assert_eq!(result.output.as_deref(), Some("the whole answer"));
    app.teardown().await;
}

#[tokio::test]
async fn a_result_missed_live_is_read_back_from_the_results_stream() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&openai_provider("openai", &fake.base_url(), "gpt-test")).await;
    app.start_worker().await;
    fake.push(Reply::answer(&["a", "b", "c", "d"], (4, 4)));
    // A subscriber that holds one message: while the first chunk waits unread, NATS drops
    // the rest of the job's events, the result among them (a slow consumer).
    let nats = async_nats::ConnectOptions::new()
        .subscription_capacity(1)
        .connect(&app.services.nats_url)
        .await
        .unwrap();
    let client = Client::with_connection(nats, &app.config.nats);
    let handle = client
        .submit(
            JobKind::Generate,
            json!({"prompt": "x", "stream": true, "timeout_ms": 60000}),
            None,
            &[],
        )
        .await
        .unwrap();
    let stored = app.wait_stored_result(handle.job_id()).await;
    assert_eq!(stored["status"], "ok");
    // Far less than the job's deadline: only reading the stored result can answer in time.
    let result = handle.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(result.output.as_deref(), Some("abcd"));
    // A handle on a job submitted earlier (an orchestrator that restarted) gets it too.
    let attached = client
        .attach(
            JobKind::Generate,
            result.job_id,
            None,
            Duration::from_secs(10),
        )
        .result()
        .await
        .unwrap();
    assert_eq!(attached.job_id, result.job_id);
    app.teardown().await;
}

#[tokio::test]
async fn a_publish_is_retried_across_a_nats_restart_without_a_duplicate_job() {
    let mut server = NatsServer::start("").await;
    let fake = FakeLlmServer::start().await.unwrap();
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let toml = test_config_toml(
        &services,
        &database.url,
        &openai_provider("openai", &fake.base_url(), "gpt-test"),
    )
    .replace(&services.nats_url, &server.url());
    let config = Config::from_toml(&toml).unwrap();
    let worker = llm_worker::app::start(config.clone(), ALL_ROLES)
        .await
        .unwrap();
    let client = Client::connect(&config.nats).await.unwrap();
    fake.set_default(Reply::answer(&["after the restart"], (3, 3)));

    // NATS dies; the job is submitted while it is down and comes back only after the
    // client's first publish has timed out (JetStream's 5 s), so the publish is retried.
    server.kill().await;
    let submitting = tokio::spawn({
        let client = client.clone();
        async move {
            let handle = client
                .submit(JobKind::Generate, json!({"prompt": "x"}), None, &[])
                .await?;
            handle.wait(Duration::from_secs(60)).await
        }
    });
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.restart().await;
    let result = tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .expect("no result within a minute of the restart")
        .unwrap()
        .unwrap();
    assert_eq!(result.output.as_deref(), Some("after the restart"));

    // One job: one message ever stored in the jobs stream, one provider call, one row.
    let js = async_nats::jetstream::new(client.nats().clone());
    let mut jobs = js.get_stream(&config.nats.jobs_stream).await.unwrap();
    assert_eq!(jobs.info().await.unwrap().state.last_sequence, 1);
    assert_eq!(fake.request_count(), 1);
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs")
            .fetch_one(&db)
            .await
            .unwrap();
        if rows == 1 {
            break;
        }
        assert!(rows < 2, "{rows} usage rows for one job");
        assert!(tokio::time::Instant::now() < deadline, "no usage row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await;
    db.close().await;
    database.drop().await;
}

#[tokio::test]
async fn submit_says_at_once_when_no_worker_runs_and_once_a_worker_answers_it_does_not() {
    let fake = FakeLlmServer::start().await.unwrap();
    let mut app = TestApp::new(&format!(
        "{}[routes]\ndefault = [\"openai\"]\n",
        openai_provider("openai", &fake.base_url(), "gpt-test")
    ))
    .await;
    llm_worker::nats::ensure_streams(&app.js, &app.config.nats)
        .await
        .unwrap();
    let client = Client::with_connection(app.client.clone(), &app.config.nats);
    assert_eq!(
        client
            .workers(JobKind::Generate, Duration::from_millis(500))
            .await
            .unwrap(),
        0
    );

    // `llm-worker submit` with nobody consuming: it says so within 5 s, and only once.
    let dir = std::env::temp_dir().join(format!("llmw-submit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, &app.toml).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-worker"))
        .arg("--config")
        .arg(&config)
        .args(["submit", "--timeout-ms", "60000", "hello"])
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("LLM_WORKER_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let said = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("submit said nothing within 5 s")
        .unwrap()
        .unwrap_or_default();
    assert!(
        said.contains("no worker of this deployment is running") && said.contains("stays queued"),
        "{said}"
    );
    // A worker starts: the queued job is answered, and submit ends with its summary.
    fake.push(Reply::answer(&["hi"], (1, 1)));
    app.start_worker().await;
    assert_eq!(
        client
            .workers(JobKind::Generate, Duration::from_secs(2))
            .await
            .unwrap(),
        1
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("submit did not end once a worker answered")
        .unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push(line);
    }
    assert!(
        !rest.iter().any(|l| l.contains("no worker")),
        "said more than once: {rest:?}"
    );
    assert!(rest.iter().any(|l| l.starts_with("ok ·")), "{rest:?}");
    let _ = std::fs::remove_dir_all(dir);
    app.teardown().await;
}
