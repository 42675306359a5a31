//! Replaying a dead letter after its cause is fixed (`llm-worker dead replay`): a job is
//! published again to its subject as a new job (its id derived from the old one and the
//! letter's sequence, so replaying twice runs it once); a result is written to Postgres
//! directly. Above both `dead` (which keeps the letters) and `usage` (which writes rows).

use async_nats::jetstream::{self, message::PublishMessage};
use uuid::Uuid;

use crate::config::NatsConfig;
use crate::contract::ResultEvent;
use crate::dead::{DeadError, Kind, show};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// The job was published again under this new id.
    Job(Uuid),
    /// The result was written to Postgres (idempotently).
    Usage,
}

/// Replay the dead letter `sequence`.
pub async fn replay(
    js: &jetstream::Context,
    nats: &NatsConfig,
    pool: Option<&sqlx::PgPool>,
    sequence: u64,
) -> Result<Replayed, DeadError> {
    let letter = show(js, nats, sequence).await?;
    let refuse = |why: &str| DeadError::Unreplayable(sequence, why.to_string());
    if letter.payload.is_empty() {
        return Err(refuse("its message was too large to keep"));
    }
    match letter.kind {
        Kind::Jobs => {
            let subject = letter
                .subject
                .clone()
                .ok_or_else(|| refuse("it does not say which subject the job came from"))?;
            let mut job: serde_json::Value = serde_json::from_slice(&letter.payload)
                .map_err(|_| refuse("the job is not JSON (it would only be refused again)"))?;
            let old = Uuid::parse_str(&letter.job_id).unwrap_or_default();
            let id = Uuid::new_v5(&old, &sequence.to_be_bytes());
            let obj = job
                .as_object_mut()
                .ok_or_else(|| refuse("the job is not a JSON object"))?;
            obj.insert("job_id".into(), id.to_string().into());
            let body = serde_json::to_vec(&job).map_err(|e| refuse(&e.to_string()))?;
            let publish = PublishMessage::build()
                .payload(body.into())
                .message_id(id.to_string());
            js.send_publish(subject, publish)
                .await
                .map_err(|e| DeadError::Write(e.to_string()))?
                .await
                .map_err(|e| DeadError::Write(e.to_string()))?;
            Ok(Replayed::Job(id))
        }
        Kind::Usage => {
            let pool = pool.ok_or_else(|| refuse("no database is configured (DATABASE_URL)"))?;
            let result: ResultEvent = serde_json::from_slice(&letter.payload)
                .map_err(|e| refuse(&format!("the result is not readable: {e}")))?;
            crate::usage::write_batch(pool, &[result])
                .await
                .map_err(|e| DeadError::Write(e.to_string()))?;
            Ok(Replayed::Usage)
        }
    }
}
