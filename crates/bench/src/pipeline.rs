//! The ceiling: a bare pipeline doing only the I/O every job needs and no worker logic. Per
//! job: pull it from JetStream, one HTTP round trip to the same fake provider, publish a
//! result to a JetStream stream and wait for its ack, publish the reply on core NATS, ack the
//! job. It runs as its own process (this binary's hidden `pipeline` command), like a
//! worker: in the benchmark process it would share a runtime with the fake provider and the
//! client and skip the cross-process wake-ups every real worker pays. Same in-flight limit.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, pull},
    message::PublishMessage,
    stream::{self, RetentionPolicy, StorageType},
};
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;

/// The durable consumer the pipeline process pulls from.
const CONSUMER: &str = "pipe";

/// A running bare pipeline process on its own streams; [`Pipeline::stop`] removes them.
pub struct Pipeline {
    pub job_subject: String,
    js: jetstream::Context,
    streams: [String; 2],
    child: tokio::process::Child,
}

#[derive(serde::Deserialize)]
struct Job {
    reply_to: String,
    prompt: String,
}

/// What the pipeline process is told on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    #[arg(long)]
    pub nats_url: String,
    /// The job stream (its durable consumer is `pipe`).
    #[arg(long)]
    pub stream: String,
    /// Results are stored at `<results>.<stream sequence>`.
    #[arg(long)]
    pub results: String,
    /// The fake provider's chat completions URL.
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub max_in_flight: usize,
}

impl Pipeline {
    /// Create the streams and consumer, start the pipeline process (`exe pipeline`) and
    /// wait until it consumes.
    pub async fn start(
        js: &jetstream::Context,
        nats_url: &str,
        exe: &Path,
        completions_url: String,
        max_in_flight: usize,
    ) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let job_subject = format!("pipe{id}.jobs");
        let streams = [format!("PIPE_JOBS_{id}"), format!("PIPE_RESULTS_{id}")];
        let jobs = js
            .create_stream(stream::Config {
                name: streams[0].clone(),
                subjects: vec![job_subject.clone()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await?;
        js.create_stream(stream::Config {
            name: streams[1].clone(),
            subjects: vec![format!("pipe{id}.results.>")],
            storage: StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        jobs.create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;
        let mut child = tokio::process::Command::new(exe)
            .arg("pipeline")
            .args(["--nats-url", nats_url, "--stream", &streams[0]])
            .args(["--results", &format!("pipe{id}.results"), "--url"])
            .arg(&completions_url)
            .args(["--max-in-flight", &max_in_flight.to_string()])
            // Closed when this process ends, however it ends: the pipeline then exits.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} pipeline", exe.display()))?;
        let stdout = child.stdout.take().context("pipeline stdout")?;
        let mut line = String::new();
        let ready = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        anyhow::ensure!(
            matches!(ready, Ok(Ok(_))) && line.trim() == "ready",
            "the bare pipeline process did not start ({line:?})"
        );
        Ok(Self {
            job_subject,
            js: js.clone(),
            streams,
            child,
        })
    }

    /// CPU time (user + system) the pipeline process has used.
    pub fn cpu_time(&self) -> Option<Duration> {
        super::harness::process_cpu(&self.child.id()?.to_string())
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        for s in &self.streams {
            let _ = self.js.delete_stream(s).await;
        }
    }
}

/// The pipeline process: consume until stdin closes. Prints `ready` once it is consuming.
pub async fn serve(args: ProcessArgs) -> anyhow::Result<()> {
    let client = async_nats::connect(args.nats_url.as_str()).await?;
    let js = jetstream::new(client.clone());
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream_no_info(&args.stream)
        .await?
        .get_consumer(CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("the pipeline's consumer: {e}"))?;
    llm_worker::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(args.max_in_flight)
        .messages()
        .await?;
    println!("ready");
    // stdin closes when the benchmark ends, however it ends: then so does this process.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let permits = Arc::new(Semaphore::new(args.max_in_flight));
    while let Some(next) = messages.next().await {
        let Ok(msg) = next else { continue };
        let permit = permits.clone().acquire_owned().await?;
        let (client, js, http) = (client.clone(), js.clone(), http.clone());
        let (url, results) = (args.url.clone(), args.results.clone());
        tokio::spawn(async move {
            let _ = handle(&client, &js, &http, &url, &results, &msg).await;
            drop(permit);
        });
    }
    Ok(())
}

async fn handle(
    client: &async_nats::Client,
    js: &jetstream::Context,
    http: &reqwest::Client,
    url: &str,
    results: &str,
    msg: &jetstream::Message,
) -> anyhow::Result<()> {
    let received_at = chrono::Utc::now();
    let job: Job = serde_json::from_slice(&msg.payload)?;
    let prompt = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": job.prompt}],
        "stream": false,
    });
    let started_at = chrono::Utc::now();
    let body = http.post(url).json(&prompt).send().await?.bytes().await?;
    let finished_at = chrono::Utc::now();
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or_default();
    let store = PublishMessage::build()
        .payload(body.clone())
        .message_id(seq.to_string());
    js.send_publish(format!("{results}.{seq}"), store)
        .await?
        .await?;
    // The worker's result timestamps, so the benchmark can break the time down the same way.
    let reply = serde_json::json!({
        "type": "result",
        "status": "ok",
        "received_at": received_at,
        "finished_at": finished_at,
        "attempts": [{"started_at": started_at, "finished_at": finished_at}],
    });
    client
        .publish(job.reply_to, serde_json::to_vec(&reply)?.into())
        .await?;
    msg.ack_with(AckKind::Ack)
        .await
        .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    Ok(())
}
