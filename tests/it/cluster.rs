//! Beyond one server: a 3-node NATS cluster the test starts itself (child processes on free
//! loopback ports), R3 streams, and a node killed with SIGKILL under a steady load of jobs.
//! Every job whose publish was acknowledged must get exactly one stored result, one
//! `llm_jobs` row, `llm_calls` rows equal to its attempts, and nothing may stay pending in
//! the consumer.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use llm_worker::config::Config;
use llm_worker::job::JobKind;
use llm_worker_testkit::{FakeLlmServer, Reply, ScratchDatabase};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{ALL_ROLES, Services, openai_provider, test_config_toml};
use crate::servers::{NatsServer, free_port};

/// Three nats-servers routed to each other, JetStream on each.
async fn cluster() -> Option<Vec<NatsServer>> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut nodes = Vec::new();
    for (i, port) in routes.iter().enumerate() {
        let config = format!(
            "server_name: n{i}\ncluster {{ name: llmw, listen: 127.0.0.1:{port}, routes: [{all}] }}\n"
        );
        nodes.push(NatsServer::start(&config).await?);
    }
    Some(nodes)
}

/// Publish one job per tick at `per_sec` for `secs`; the ids whose publish was acknowledged,
/// and those that were not (each with its own ack wait, so a stalled one stalls nothing).
async fn steady_load(
    js: &jetstream::Context,
    subject: &str,
    per_sec: u32,
    secs: u64,
) -> (Vec<Uuid>, Vec<Uuid>) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec)));
    let mut pending = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let id = Uuid::now_v7();
        let job = json!({"job_id": id, "prompt": "steady", "stream": false});
        let publish = PublishMessage::build()
            .payload(serde_json::to_vec(&job).unwrap().into())
            .message_id(id.to_string());
        let js = js.clone();
        let subject = subject.to_string();
        let second = (Duration::from_secs(secs) - (end - tokio::time::Instant::now())).as_secs();
        pending.push(tokio::spawn(async move {
            let acked = match js.send_publish(subject, publish).await {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (id, acked, second)
        }));
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut timeline = std::collections::BTreeMap::new();
    for p in pending {
        let (id, ok, second) = p.await.unwrap();
        let e: &mut (u32, u32, String) = timeline.entry(second).or_default();
        match ok {
            Ok(_) => {
                e.0 += 1;
                acked.push(id)
            }
            Err(err) => {
                e.1 += 1;
                e.2 = err;
                refused.push(id)
            }
        }
    }
    eprintln!("cluster: publishes per second (acked, not, last error): {timeline:?}");
    (acked, refused)
}

#[tokio::test]
async fn a_cluster_node_killed_under_load_loses_no_acknowledged_job() {
    let Some(mut nodes) = cluster().await else {
        return;
    };
    let fake = FakeLlmServer::start().await.unwrap();
    fake.bench_mode(false);
    fake.set_default(Reply::answer(&["ok"], (2, 1)));
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let urls = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    let toml = test_config_toml(
        &services,
        &database.url,
        &openai_provider("openai", &fake.base_url(), "gpt-test"),
    )
    .replace(
        &format!("url = \"{}\"", services.nats_url),
        &format!("url = \"{urls}\"\nreplicas = 3"),
    );
    let config = Config::from_toml(&toml).unwrap();
    assert_eq!(config.nats.replicas, 3);

    // The cluster elects its JetStream leader in a few seconds: creating R3 streams works then.
    let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = llm_worker::queue::ensure_streams(&js, &config.nats).await {
        assert!(tokio::time::Instant::now() < deadline, "no R3 streams: {e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worker = llm_worker::app::start(config.clone(), ALL_ROLES)
        .await
        .unwrap();
    let mut jobs = js.get_stream(&config.nats.jobs_stream).await.unwrap();
    let info = jobs.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);

    // Load for 20 s; 5 s in, the jobs stream's leader is killed; 12 s in, it comes back.
    let subject = config.nats.job_subject(JobKind::Generate);
    let load = tokio::spawn({
        let js = js.clone();
        async move { steady_load(&js, &subject, 300, 20).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .expect("the jobs stream has a leader");
    let victim: usize = leader.trim_start_matches('n').parse().unwrap();
    nodes[victim].kill().await;
    let killed_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    nodes[victim].restart().await;
    let (acked, refused) = load.await.unwrap();
    eprintln!(
        "cluster: {} jobs acknowledged, {} publishes not, leader n{victim} killed",
        acked.len(),
        refused.len()
    );
    // NATS 2.9 answers publishes "no stream found" while the stream elects a new leader
    // (about 5 s after a SIGKILL here); once it has one, every publish is acknowledged.
    assert!(
        acked.len() >= 3_000,
        "only {} publishes acknowledged: the stream was without a leader for over 10 s",
        acked.len()
    );

    // Every acknowledged job gets exactly one stored result.
    let results = js.get_stream(&config.nats.results_stream).await.unwrap();
    let wanted: HashSet<String> = acked
        .iter()
        .map(|id| config.nats.result_subject(id))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let mut counts = std::collections::HashMap::new();
        let mut subjects = results
            .info_with_subjects(format!("{}.results.>", config.nats.subject_prefix))
            .await
            .unwrap();
        while let Some(s) = subjects.next().await {
            let (subject, n) = s.unwrap();
            counts.insert(subject, n);
        }
        if wanted.iter().all(|s| counts.contains_key(s)) {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} acknowledged jobs without a result",
            wanted.iter().filter(|s| !counts.contains_key(*s)).count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "results stored more than once: {twice:?}");

    // One llm_jobs row each, llm_calls matching attempts, nothing pending in the consumer.
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM llm_jobs WHERE job_id = ANY($1)")
            .bind(&acked)
            .fetch_one(&db)
            .await
            .unwrap();
        if rows == acked.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{rows} of {} usage rows",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM llm_jobs j \
         WHERE j.attempts <> (SELECT count(*) FROM llm_calls c WHERE c.job_id = j.job_id)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        mismatched, 0,
        "jobs whose llm_calls differ from their attempts"
    );
    let consumer = jobs
        .consumer_info(config.nats.consumer_name(JobKind::Generate))
        .await
        .unwrap();
    assert_eq!(
        (consumer.num_pending, consumer.num_ack_pending),
        (0, 0),
        "work left in the consumer"
    );
    // Recovery: from the kill to the first answer of a job published after it (job ids are
    // UUID v7: they carry their publish time).
    let after_kill: Vec<Uuid> = acked
        .iter()
        .filter(|id| {
            id.get_timestamp().is_some_and(|t| {
                let (secs, nanos) = t.to_unix();
                secs as f64 + f64::from(nanos) / 1e9 > killed_at.timestamp_micros() as f64 / 1e6
            })
        })
        .copied()
        .collect();
    let first: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT min(finished_at) FROM llm_jobs WHERE job_id = ANY($1)")
            .bind(&after_kill)
            .fetch_one(&db)
            .await
            .unwrap();
    let recovery = first.map(|f| (f - killed_at).num_milliseconds() as f64 / 1e3);
    eprintln!(
        "cluster: {} jobs, {} publishes refused while the stream had no leader; \
         first answer to a job published after the kill {recovery:?} s after it",
        acked.len(),
        refused.len()
    );
    assert!(
        recovery.is_some(),
        "no job published after the kill was answered"
    );

    worker.shutdown().await;
    db.close().await;
    database.drop().await;
}
