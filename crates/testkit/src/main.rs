//! `fake-llm-server`: the fake LLM API (OpenAI, Anthropic, Gemini and Ollama routes) as its own
//! process, for demos (`scripts/demo`) and manual runs. Never a production provider.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llm_worker_testkit::{Demo, FakeLlmServer};

/// Serve a fake LLM API. The model name picks the behaviour: `error` in it answers HTTP 500,
/// `filter` a content-filter refusal, `cut` half an answer then a broken connection, `silent`
/// nothing at all; any other model gets `--words` words.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// Delay before the response headers (the provider's time to first byte).
    #[arg(long, default_value_t = 200)]
    latency_ms: u64,
    /// Streaming speed (0 = as fast as possible).
    #[arg(long, default_value_t = 20)]
    tokens_per_sec: u64,
    /// Answer length in words (one token each).
    #[arg(long, default_value_t = 40)]
    words: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let server = match FakeLlmServer::start_on(&args.listen).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    server.set_latency(Duration::from_millis(args.latency_ms));
    server.demo_mode(Demo {
        words: args.words,
        tokens_per_sec: args.tokens_per_sec,
    });
    eprintln!(
        "fake LLM API on {} (OpenAI base URL {}; demos only)",
        server.root_url(),
        server.base_url()
    );
    server.wait().await;
    ExitCode::SUCCESS
}
