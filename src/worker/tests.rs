//! The worker's decisions without JetStream: an in-memory outbox and message, scripted
//! providers, and tokio's paused clock. What is asserted is what the queue would be told
//! (ack, nak with its delay, in progress, term), what is stored, and what is sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::chain::NoSink;
use crate::providers::Registry;
use crate::providers::scripted::{Play, Scripted};
use crate::reply::ReplyError;

#[derive(Default)]
struct State {
    stored: HashMap<Uuid, Bytes>,
    live: Vec<(String, Bytes)>,
    dead: Vec<(Uuid, i64)>,
    fail_store: bool,
    fail_lookup: bool,
    fail_dead: bool,
}

/// Results, live sends and dead letters in memory; failures on demand.
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<State>>);

impl Memory {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn stored(&self, id: Uuid) -> Option<Value> {
        let state = self.state();
        state
            .stored
            .get(&id)
            .map(|b| serde_json::from_slice(b).unwrap())
    }

    fn live(&self) -> Vec<(String, Value)> {
        self.state()
            .live
            .iter()
            .map(|(s, b)| (s.clone(), serde_json::from_slice(b).unwrap()))
            .collect()
    }
}

impl Outbox for Memory {
    type Chunks = NoSink;

    fn chunks(&self, _: Uuid, _: &str, _: Option<&str>) -> NoSink {
        NoSink
    }

    fn max_payload(&self) -> usize {
        1 << 20
    }

    async fn store(&self, job_id: Uuid, payload: Bytes) -> Result<Stored, ReplyError> {
        let mut state = self.state();
        if state.fail_store {
            return Err(ReplyError::Store("the store is down".into()));
        }
        Ok(match state.stored.get(&job_id) {
            Some(existing) => Stored::Existing(existing.clone()),
            None => {
                state.stored.insert(job_id, payload);
                Stored::New
            }
        })
    }

    async fn stored(&self, job_id: Uuid) -> Result<Option<Bytes>, ReplyError> {
        let state = self.state();
        if state.fail_lookup {
            return Err(ReplyError::Lookup("the store is down".into()));
        }
        Ok(state.stored.get(&job_id).cloned())
    }

    async fn publish_live(&self, reply_to: &str, payload: Bytes) {
        self.state().live.push((reply_to.to_string(), payload));
    }

    async fn dead_letter(
        &self,
        job_id: Uuid,
        _: &str,
        _: Bytes,
        delivered: i64,
        _: &str,
    ) -> Result<(), String> {
        let mut state = self.state();
        if state.fail_dead {
            return Err("the dead-letter stream is down".into());
        }
        state.dead.push((job_id, delivered));
        Ok(())
    }
}

/// A job message that records how it was settled.
struct Msg {
    payload: Bytes,
    msg_id: Option<String>,
    delivered: i64,
    settled: Arc<Mutex<Vec<String>>>,
}

impl Msg {
    fn new(job: &Value, delivered: i64) -> (Self, Arc<Mutex<Vec<String>>>) {
        let settled = Arc::new(Mutex::new(Vec::new()));
        let msg = Msg {
            payload: Bytes::from(job.to_string()),
            msg_id: job["job_id"].as_str().map(str::to_string),
            delivered,
            settled: settled.clone(),
        };
        (msg, settled)
    }
}

impl JobMessage for Msg {
    fn subject(&self) -> &str {
        "llm.jobs.generate"
    }

    fn payload(&self) -> &Bytes {
        &self.payload
    }

    fn msg_id(&self) -> Option<&str> {
        self.msg_id.as_deref()
    }

    fn delivered(&self) -> i64 {
        self.delivered
    }

    fn published(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(chrono::Utc::now())
    }

    async fn settle(&self, kind: AckKind) -> Result<(), String> {
        self.settled.lock().unwrap().push(format!("{kind:?}"));
        Ok(())
    }
}

/// A worker whose only provider plays `script`; `extra` is added to the config.
fn worker(script: &Arc<Scripted>, extra: &str) -> (Worker<Memory>, Memory) {
    let config = Config::from_toml(&format!(
        "{extra}\n[providers.a]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\ndefault_model = \"m\"\nmax_retries = 0\n"
    ))
    .unwrap();
    let registry = Registry::scripted(&config, &[("a", script.clone())]).unwrap();
    let health = crate::health::Health::new(&config.circuit_breaker);
    let chain = Chain::new(&config, registry, PriceBook::default(), health);
    let outbox = Memory::default();
    let routing = Routing::new(&config, chain, None);
    let worker = Worker::new(&config, routing, outbox.clone(), PriceBook::default()).unwrap();
    (worker, outbox)
}

fn job(id: Uuid, tenant: &str) -> Value {
    json!({"job_id": id.to_string(), "prompt": "hi", "tenant": tenant, "reply_to": "_INBOX.r"})
}

fn answer() -> Play {
    Play::Answer(vec![(Duration::ZERO, "hello")])
}

async fn handle(worker: &Worker<Memory>, job: &Value, delivered: i64) -> (Disposal, Vec<String>) {
    let (msg, settled) = Msg::new(job, delivered);
    let disposal = worker
        .handle(JobKind::Generate, msg, &CancellationToken::new())
        .await;
    let settled = settled.lock().unwrap().clone();
    (disposal, settled)
}

#[tokio::test(start_paused = true)]
async fn a_job_is_answered_stored_sent_and_acked() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    let (disposal, settled) = handle(&worker, &job(id, "t"), 1).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Acked, &["Ack".to_string()][..])
    );
    let stored = outbox.stored(id).unwrap();
    assert_eq!(
        (stored["status"].as_str(), stored["output"].as_str()),
        (Some("ok"), Some("hello"))
    );
    assert_eq!(outbox.live(), [("_INBOX.r".to_string(), stored)]);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_job_is_answered_invalid_job_stored_and_terminated() {
    let script = Scripted::new([]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    let mut bad = job(id, "t");
    bad["prompt"] = json!(42);
    let (disposal, settled) = handle(&worker, &bad, 1).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Terminated, &["Term".to_string()][..])
    );
    assert_eq!(outbox.stored(id).unwrap()["error"]["code"], "invalid_job");
    assert_eq!(outbox.live()[0].1["error"]["code"], "invalid_job");
    assert!(script.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_job_answered_before_gets_the_stored_result_again_without_a_provider_call() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    handle(&worker, &job(id, "t"), 1).await;
    let (disposal, settled) = handle(&worker, &job(id, "t"), 2).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Acked, &["Ack".to_string()][..])
    );
    assert_eq!(script.calls().len(), 1, "the provider is called once");
    let live = outbox.live();
    assert_eq!(live.len(), 2);
    assert_eq!(live[1], live[0], "the very same result is sent again");
}

#[tokio::test(start_paused = true)]
async fn another_tenant_reusing_a_job_id_is_refused_and_never_sees_the_result() {
    let script = Scripted::new([answer(), answer()]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    handle(&worker, &job(id, "owner"), 1).await;
    let (disposal, settled) = handle(&worker, &job(id, "intruder"), 1).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Terminated, &["Term".to_string()][..])
    );
    let (_, refusal) = &outbox.live()[1];
    assert_eq!(refusal["error"]["code"], "invalid_job");
    assert!(refusal["output"].is_null() && !refusal.to_string().contains("hello"));
    assert_eq!(
        outbox.stored(id).unwrap()["tenant"],
        "owner",
        "the stored result stands"
    );
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_result_that_cannot_be_stored_is_requeued_with_a_growing_delay_never_acked() {
    let script = Scripted::new([answer(), answer()]);
    let (worker, outbox) = worker(&script, "");
    outbox.state().fail_store = true;
    let id = Uuid::now_v7();
    let (disposal, settled) = handle(&worker, &job(id, "t"), 1).await;
    assert_eq!(disposal, Disposal::Requeued);
    assert_eq!(settled, ["Nak(Some(2s))"]);
    let (_, settled) = handle(&worker, &job(id, "t"), 3).await;
    assert_eq!(settled, ["Nak(Some(8s))"]);
    assert!(
        outbox.live().is_empty(),
        "nothing is sent before it is stored"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_stored_result_lookup_requeues_before_any_provider_call() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "");
    outbox.state().fail_lookup = true;
    let (disposal, _) = handle(&worker, &job(Uuid::now_v7(), "t"), 1).await;
    assert_eq!(disposal, Disposal::Requeued);
    assert!(script.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_job_delivered_max_deliver_times_is_dead_lettered_answered_and_terminated() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "[worker]\nmax_deliver = 3");
    let id = Uuid::now_v7();
    let (disposal, settled) = handle(&worker, &job(id, "t"), 3).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Terminated, &["Term".to_string()][..])
    );
    assert_eq!(outbox.state().dead, [(id, 3)]);
    assert_eq!(outbox.stored(id).unwrap()["error"]["code"], "dead_lettered");
    assert!(script.calls().is_empty(), "a poison job is not run again");
    // If the dead letter cannot be written, the job goes back rather than being lost.
    outbox.state().fail_dead = true;
    let (disposal, _) = handle(&worker, &job(Uuid::now_v7(), "t"), 3).await;
    assert_eq!(disposal, Disposal::Requeued);
}

#[tokio::test(start_paused = true)]
async fn a_long_job_sends_in_progress_acks_every_third_of_ack_wait() {
    // 25 s of answer with ack_wait 30 s: progress at 10 s and 20 s, then the ack.
    let script = Scripted::new([Play::Answer(vec![(Duration::from_secs(25), "slow")])]);
    let (worker, _) = worker(&script, "[nats]\nack_wait_secs = 30");
    let (disposal, settled) = handle(&worker, &job(Uuid::now_v7(), "t"), 1).await;
    assert_eq!(disposal, Disposal::Acked);
    assert_eq!(settled, ["Progress", "Progress", "Ack"]);
}

#[tokio::test(start_paused = true)]
async fn a_job_abandoned_at_shutdown_is_handed_back_unanswered() {
    let script = Scripted::new([Play::Hang]);
    let (worker, outbox) = worker(&script, "[worker]\npull_expires_ms = 1000");
    let (msg, settled) = Msg::new(&job(Uuid::now_v7(), "t"), 1);
    let abandon = CancellationToken::new();
    let stop = abandon.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
    });
    let disposal = worker.handle(JobKind::Generate, msg, &abandon).await;
    assert_eq!(disposal, Disposal::Requeued);
    // Handed back after the pull requests in flight expire (see queue::hand_back).
    assert_eq!(*settled.lock().unwrap(), ["Nak(Some(1.5s))"]);
    assert!(outbox.state().stored.is_empty() && outbox.live().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_job_past_its_deadline_is_answered_expired_without_a_provider_call() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    let mut late = job(id, "t");
    late["deadline"] = json!((chrono::Utc::now() - chrono::TimeDelta::seconds(1)).to_rfc3339());
    let (disposal, settled) = handle(&worker, &late, 1).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Acked, &["Ack".to_string()][..])
    );
    let result = outbox.stored(id).unwrap();
    assert_eq!(result["error"]["code"], "timeout");
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("expired"),
        "{result}"
    );
    assert_eq!(outbox.live()[0].1, result);
    assert!(script.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_chain_stops_at_the_jobs_deadline_when_it_comes_before_its_timeout() {
    let script = Scripted::new([Play::Hang]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    let mut soon = job(id, "t");
    soon["timeout_ms"] = json!(20_000);
    soon["expires_in_ms"] = json!(3_000);
    let started = tokio::time::Instant::now();
    handle(&worker, &soon, 1).await;
    let took = started.elapsed();
    // The deadline is taken from the wall clock once: within a millisecond of 3 s.
    assert!(
        took <= Duration::from_secs(3) && took > Duration::from_millis(2990),
        "{took:?}"
    );
    assert_eq!(outbox.stored(id).unwrap()["error"]["code"], "timeout");
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_cancelled_before_it_starts_is_answered_cancelled_without_a_provider_call() {
    let script = Scripted::new([answer()]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    // Another tenant's cancel of the same id changes nothing; the job's own tenant's does.
    worker.cancels().cancel("someone-else", id);
    worker.cancels().cancel("t", id);
    let (disposal, settled) = handle(&worker, &job(id, "t"), 1).await;
    assert_eq!(
        (disposal, settled.as_slice()),
        (Disposal::Acked, &["Ack".to_string()][..])
    );
    let result = outbox.stored(id).unwrap();
    assert_eq!(result["error"]["code"], "cancelled");
    assert_eq!(result["attempts"], json!([]));
    assert!(script.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_running_job_cancelled_is_answered_cancelled_with_its_attempt() {
    let script = Scripted::new([Play::Stall(vec![(Duration::ZERO, "partial")])]);
    let (worker, outbox) = worker(&script, "");
    let id = Uuid::now_v7();
    let cancels = worker.cancels().clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cancels.cancel("t", id);
    });
    let (disposal, _) = handle(&worker, &job(id, "t"), 1).await;
    assert_eq!(disposal, Disposal::Acked);
    let result = outbox.stored(id).unwrap();
    assert_eq!(result["error"]["code"], "cancelled");
    assert_eq!(result["attempts"][0]["error"]["code"], "cancelled");
    assert_eq!(result["attempts"][0]["tokens_estimated"], true);
}

#[test]
fn a_cached_answer_is_sent_in_pieces_cut_at_character_boundaries() {
    let text = "aé€😀".repeat(3);
    for max in [1, 2, 3, 5, 7, 100] {
        let pieces: Vec<&str> = super::generate::pieces(&text, max).collect();
        assert_eq!(pieces.concat(), text, "max {max}");
        assert!(pieces.iter().all(|p| !p.is_empty()));
        if max >= 4 {
            assert!(
                pieces.iter().all(|p| p.len() <= max),
                "max {max}: {pieces:?}"
            );
        }
    }
    assert_eq!(super::generate::pieces("", 4).count(), 0);
}
