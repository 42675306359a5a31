//! An orchestrator in a few lines: submit a generation job with `llm_worker::client`, print
//! its text as it streams (starting over when a later attempt takes over), then the result.
//!
//! ```sh
//! scripts/demo &                                  # a worker with the fake LLM API
//! cargo run --example client -- "hello there"
//! ```
//!
//! `NATS_URL` (default `nats://127.0.0.1:4222`) says where; the rest of the deployment's
//! names are the defaults (`llm.jobs.generate`, `LLM_RESULTS`).

use std::io::Write as _;
use std::time::Duration;

use llm_worker::client::{Client, Event};
use llm_worker::config::NatsConfig;
use llm_worker::contract::JobKind;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let nats = NatsConfig {
        url: std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        ..NatsConfig::default()
    };
    let client = Client::connect(&nats).await?;
    // The publish is retried with the same job id across reconnects: never a second job.
    let mut job = client
        .submit(
            JobKind::Generate,
            serde_json::json!({"prompt": prompt, "tenant": "example"}),
            None,
            &[],
        )
        .await?;
    println!("job {}", job.job_id());
    let mut out = std::io::stdout();
    let result = loop {
        match tokio::time::timeout(Duration::from_secs(180), job.next()).await {
            Ok(Some(Ok(Event::Chunk(chunk)))) => {
                write!(out, "{}", chunk.delta)?;
                out.flush()?;
            }
            Ok(Some(Ok(Event::Restart { attempt }))) => {
                println!("\n[attempt {attempt} takes over; the text above is void]");
            }
            Ok(Some(Ok(Event::Result(result)))) => break *result,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => anyhow::bail!("no result"),
        }
    };
    println!();
    match result.error {
        None => println!(
            "ok: {} in + {} out tokens, attempt {:?} of {}",
            result.tokens_used.input,
            result.tokens_used.output,
            result.attempt,
            result.attempts.len()
        ),
        Some(e) => println!("error {:?}: {}", e.code, e.message),
    }
    Ok(())
}
