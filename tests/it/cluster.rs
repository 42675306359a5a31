//! Beyond one server: a 3-node NATS cluster the test starts itself (child processes on free
//! loopback ports), R3 streams, and a node killed with SIGKILL under a steady load of jobs.
//! Every job whose publish was acknowledged must get exactly one stored result, one
//! `llm_jobs` row, `llm_calls` rows equal to its attempts, and nothing may stay pending in
//! the consumer.

use std::time::Duration;

use async_nats::jetstream;
use llm_worker::contract::JobKind;

use crate::faults::{Load, every_acked_job_answered_once, first_answer_after, steady_load, world};
use crate::helpers::ALL_ROLES;
use crate::servers::NatsServer;

#[tokio::test]
async fn a_cluster_node_killed_under_load_loses_no_acknowledged_job() {
    let mut nodes = NatsServer::cluster().await;
    let urls = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    let (_fake, _services, database, mut config) = world(Some(&urls), Duration::ZERO).await;
    config.nats.replicas = 3;

    // The cluster elects its JetStream leader in a few seconds: creating R3 streams works then.
    let client = async_nats::connect(urls.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = llm_worker::nats::ensure_streams(&js, &config.nats).await {
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
    let Load {
        acked,
        refused,
        timeline,
    } = load.await.unwrap();
    eprintln!(
        "cluster: leader n{victim} killed; publishes per second (acked, refused, last error): {timeline:?}"
    );
    // NATS 2.9 answers publishes "no stream found" while the stream elects a new leader
    // (about 5 s after a SIGKILL here); once it has one, every publish is acknowledged.
    assert!(
        acked.len() >= 3_000,
        "only {} publishes acknowledged: the stream was without a leader for over 10 s",
        acked.len()
    );

    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    every_acked_job_answered_once(&js, &config.nats, &db, &acked).await;

    let recovery = first_answer_after(&db, &acked, killed_at).await;
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
