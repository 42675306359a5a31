//! The ceiling: a bare pipeline doing only the I/O every job needs and no worker logic. Per
//! job: pull it from JetStream, one HTTP round trip to the same fake provider, publish a
//! result to a JetStream stream and wait for its ack, publish the reply on core NATS, ack the
//! job. It runs inside the benchmark process with the same in-flight limit as the worker.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, pull},
    message::PublishMessage,
    stream::{self, RetentionPolicy, StorageType},
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// A running bare pipeline on its own streams; [`Pipeline::stop`] removes them.
pub struct Pipeline {
    pub job_subject: String,
    js: jetstream::Context,
    streams: [String; 2],
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[derive(serde::Deserialize)]
struct Job {
    reply_to: String,
    prompt: String,
}

impl Pipeline {
    /// Create the streams and consumer and start consuming.
    pub async fn start(
        client: async_nats::Client,
        completions_url: String,
        max_in_flight: usize,
    ) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let js = jetstream::new(client.clone());
        let job_subject = format!("pipe{id}.jobs");
        let jobs = js
            .create_stream(stream::Config {
                name: format!("PIPE_JOBS_{id}"),
                subjects: vec![job_subject.clone()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await?;
        js.create_stream(stream::Config {
            name: format!("PIPE_RESULTS_{id}"),
            subjects: vec![format!("pipe{id}.results.>")],
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        let consumer = jobs
            .create_consumer(pull::Config {
                durable_name: Some("pipe".into()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: -1,
                ..Default::default()
            })
            .await?;
        let stop = CancellationToken::new();
        crate::providers::install_crypto_provider();
        let http = reqwest::Client::new();
        let results_prefix = format!("pipe{id}.results");
        let task = {
            let js = js.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let permits = Arc::new(Semaphore::new(max_in_flight));
                let Ok(mut messages) = consumer
                    .stream()
                    .max_messages_per_batch(max_in_flight)
                    .messages()
                    .await
                else {
                    return;
                };
                loop {
                    let next = tokio::select! {
                        m = messages.next() => m,
                        _ = stop.cancelled() => return,
                    };
                    let Some(Ok(msg)) = next else { continue };
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let (client, js, http) = (client.clone(), js.clone(), http.clone());
                    let (url, results) = (completions_url.clone(), results_prefix.clone());
                    tokio::spawn(async move {
                        let _ = handle(&client, &js, &http, &url, &results, &msg).await;
                        drop(permit);
                    });
                }
            })
        };
        Ok(Self {
            job_subject,
            js,
            streams: [format!("PIPE_JOBS_{id}"), format!("PIPE_RESULTS_{id}")],
            stop,
            task,
        })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        for s in &self.streams {
            let _ = self.js.delete_stream(s).await;
        }
    }
}

async fn handle(
    client: &async_nats::Client,
    js: &jetstream::Context,
    http: &reqwest::Client,
    url: &str,
    results: &str,
    msg: &jetstream::Message,
) -> anyhow::Result<()> {
    let job: Job = serde_json::from_slice(&msg.payload)?;
    let prompt = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": job.prompt}],
        "stream": false,
    });
    let body = http.post(url).json(&prompt).send().await?.bytes().await?;
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    let store = PublishMessage::build()
        .payload(body.clone())
        .message_id(seq.to_string());
    js.send_publish(format!("{results}.{seq}"), store)
        .await?
        .await?;
    let reply = format!(r#"{{"type":"result","status":"ok","body":{}}}"#, body.len());
    client.publish(job.reply_to, reply.into()).await?;
    msg.ack_with(AckKind::Ack)
        .await
        .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    Ok(())
}
