//! One name for a deployment (#28): two deployments on one NATS, each configured with its own
//! `subject_prefix` and nothing else of `[nats]`, get their own streams, buckets and
//! consumers, and each answers its own jobs.

use llm_worker::app;
use llm_worker::config::Config;
use llm_worker_testkit::{FakeLlmServer, Reply, ScratchDatabase};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{ALL_ROLES, Services, collect_reply, openai_provider};

#[tokio::test]
async fn two_deployments_with_different_prefixes_share_one_nats_with_one_setting_each() {
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["hi"], (1, 1)));
    let client = async_nats::connect(&services.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let id = Uuid::new_v4().simple().to_string()[..10].to_string();
    let mut running = Vec::new();
    let mut configs = Vec::new();
    for name in ["blue", "green"] {
        let prefix = format!("{name}{id}");
        // The one setting: the subject prefix (the URLs only say where the servers are).
        let toml = format!(
            "[nats]\nurl = \"{}\"\nsubject_prefix = \"{prefix}\"\n[database]\nurl = \"{}\"\n\
             [worker]\nid = \"{name}\"\n{}[routes]\ndefault = [\"openai\"]\n",
            services.nats_url,
            database.url,
            openai_provider("openai", &fake.base_url(), "gpt-test"),
        );
        let config = Config::from_toml(&toml).unwrap();
        let upper = prefix.to_ascii_uppercase();
        assert_eq!(config.nats.jobs_stream, format!("{upper}_JOBS"));
        assert_eq!(config.nats.consumer_prefix, format!("{prefix}-worker"));
        running.push(app::start(config.clone(), ALL_ROLES).await.unwrap());
        configs.push(config);
    }
    for config in &configs {
        let nats = &config.nats;
        let reply_to = format!("{}.replies.{}", nats.subject_prefix, Uuid::new_v4());
        let mut sub = client.subscribe(reply_to.clone()).await.unwrap();
        let job_id = Uuid::now_v7();
        let job = json!({"job_id": job_id, "prompt": "hello", "reply_to": reply_to});
        js.publish(
            format!("{}.jobs.generate", nats.subject_prefix),
            serde_json::to_vec(&job).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let r = collect_reply(&mut sub).await.result;
        assert_eq!(r["status"], "ok", "{r}");
        let own = config.worker.id.as_deref().unwrap();
        assert_eq!(r["worker_id"], own, "answered by its own deployment");
        // The job went through this deployment's own streams.
        let mut results = js.get_stream(&nats.results_stream).await.unwrap();
        assert_eq!(results.info().await.unwrap().state.messages, 1);
        for stream in [&nats.jobs_stream, &nats.cancel_stream, &nats.dead_stream] {
            js.get_stream(stream).await.unwrap();
        }
    }
    for r in running {
        r.shutdown().await;
    }
    for config in &configs {
        let n = &config.nats;
        for stream in [
            &n.jobs_stream,
            &n.results_stream,
            &n.dead_stream,
            &n.cancel_stream,
        ] {
            let _ = js.delete_stream(stream).await;
        }
        for bucket in [&n.tenant_bucket, &n.cache_bucket] {
            let _ = js.delete_stream(format!("KV_{bucket}")).await;
        }
        let _ = js.delete_stream(format!("OBJ_{}", n.images_bucket)).await;
    }
    database.drop().await;
}

#[tokio::test]
async fn a_deployment_whose_streams_predate_derived_names_keeps_them() {
    earlier_deployment_keeps_its_streams("", "LLM_JOBS", "LLM_RESULTS").await;
}

#[tokio::test]
async fn a_deployment_that_named_some_streams_keeps_the_others_llm_names() {
    // As the docs suggested before: the jobs and results streams and the consumers named,
    // the dead-letter and cancel streams and the buckets left at their `llm` names.
    earlier_deployment_keeps_its_streams(
        "jobs_stream = \"ACME_OWN_JOBS\"\nresults_stream = \"ACME_OWN_RESULTS\"\nconsumer_prefix = \"acme-own\"\n",
        "ACME_OWN_JOBS",
        "ACME_OWN_RESULTS",
    )
    .await;
}

async fn earlier_deployment_keeps_its_streams(explicit: &str, jobs: &str, results: &str) {
    // Its own NATS: the `llm` names must be free for the old deployment's streams.
    let server = llm_worker_testkit::nats::NatsServer::start("")
        .await
        .unwrap()
        .expect("nats-server is not installed (/usr/sbin/nats-server): this test needs it");
    let services = Services::get().await;
    let database = ScratchDatabase::create(&services.database_url, "llmw")
        .await
        .unwrap();
    let fake = FakeLlmServer::start().await.unwrap();
    fake.set_default(Reply::answer(&["kept"], (1, 1)));
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // What an earlier version made for prefix `acme` with no names set: `LLM_*` streams
    // taking `acme.*` subjects, with a job waiting in the jobs stream.
    let named: toml::Table = explicit.parse().unwrap();
    let name = |key: &str, default: String| {
        named
            .get(key)
            .and_then(|v| v.as_str())
            .map_or(default, String::from)
    };
    let d = llm_worker::config::NatsConfig::default();
    let earlier = llm_worker::config::NatsConfig {
        url: server.url(),
        subject_prefix: "acme".into(),
        jobs_stream: name("jobs_stream", d.jobs_stream.clone()),
        results_stream: name("results_stream", d.results_stream.clone()),
        consumer_prefix: name("consumer_prefix", d.consumer_prefix.clone()),
        ..Default::default()
    };
    llm_worker::nats::ensure_streams(&js, &earlier)
        .await
        .unwrap();
    let reply_to = format!("acme.replies.{}", Uuid::new_v4());
    let mut sub = client.subscribe(reply_to.clone()).await.unwrap();
    let job = json!({"job_id": Uuid::now_v7(), "prompt": "still there?", "reply_to": reply_to});
    js.publish(
        "acme.jobs.generate",
        serde_json::to_vec(&job).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let toml = format!(
        "[nats]\nurl = \"{}\"\nsubject_prefix = \"acme\"\n{explicit}[database]\nurl = \"{}\"\n{}[routes]\ndefault = [\"openai\"]\n",
        server.url(),
        database.url,
        openai_provider("openai", &fake.base_url(), "gpt-test"),
    );
    let config = Config::from_toml(&toml).unwrap();
    assert_eq!(config.nats.dead_stream, "ACME_DEAD", "derived before start");
    let running = app::start(config, ALL_ROLES).await.unwrap();
    let r = collect_reply(&mut sub).await.result;
    assert_eq!(r["status"], "ok", "{r}");
    for derived in ["ACME_JOBS", "ACME_DEAD", "ACME_CANCEL"] {
        assert!(
            js.get_stream(derived).await.is_err(),
            "{derived}: no second stream was made"
        );
    }
    js.get_stream(jobs).await.unwrap();
    let mut results = js.get_stream(results).await.unwrap();
    assert_eq!(results.info().await.unwrap().state.messages, 1);
    running.shutdown().await;
    database.drop().await;
}
