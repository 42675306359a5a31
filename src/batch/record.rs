//! The record of one provider batch in the batch bucket (`nats.batch_bucket`), under a key of
//! its own (a UUIDv7): which provider and model, the provider's batch id once created, the
//! jobs in it (their sequence in the batch stream, id, tenant and deadline), and who follows
//! it until when (a lease, taken and renewed by compare-and-set on the key's revision, so one
//! worker at a time polls and answers a batch, and any worker takes over when it expires).

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    /// Written before the provider batch is created: its jobs are not acked yet (if its
    /// creator dies, they are delivered again and the record is dropped).
    Creating,
    /// The provider batch exists and its jobs are acked: the record is what holds them.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Held {
    /// The job's message in the batch stream.
    pub seq: u64,
    pub job_id: Uuid,
    pub tenant: String,
    pub deadline: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub provider: String,
    pub model: String,
    pub state: State,
    pub batch_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub holder: String,
    pub lease_until: DateTime<Utc>,
    pub jobs: Vec<Held>,
}

impl Record {
    /// Whether the record may be taken at `now`: its lease is over. Also when this process
    /// holds it: its collector and its follower are two holders under one name.
    pub(crate) fn takeable(&self, now: DateTime<Utc>) -> bool {
        self.lease_until <= now
    }
}

/// One record and the revision it was read or written at.
pub(crate) struct Lease {
    pub key: String,
    pub record: Record,
    pub revision: u64,
}

fn encode(record: &Record) -> Result<Bytes, String> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

impl Lease {
    /// Write a new record.
    pub(crate) async fn create(kv: &kv::Store, record: Record) -> Result<Self, String> {
        let key = Uuid::now_v7().to_string();
        let revision = kv
            .create(&key, encode(&record)?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            key,
            record,
            revision,
        })
    }

    /// Take the record under `key` for `me` until `until`, if its lease is over; `Ok(None)`
    /// when someone holds it (or took it first), or it is gone.
    pub(crate) async fn take(
        kv: &kv::Store,
        key: &str,
        me: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<Self>, String> {
        let Some(entry) = kv.entry(key).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if !matches!(entry.operation, kv::Operation::Put) {
            return Ok(None);
        }
        let mut record: Record = match serde_json::from_slice(&entry.value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key, error = %e, "an unreadable batch record; left as it is");
                return Ok(None);
            }
        };
        if !record.takeable(Utc::now()) {
            return Ok(None);
        }
        record.holder = me.to_string();
        record.lease_until = until;
        let mut lease = Self {
            key: key.to_string(),
            record,
            revision: entry.revision,
        };
        match lease.save(kv).await {
            Ok(()) => Ok(Some(lease)),
            Err(_) => Ok(None),
        }
    }

    /// Write the record back, if nobody wrote it since.
    pub(crate) async fn save(&mut self, kv: &kv::Store) -> Result<(), String> {
        self.revision = kv
            .update(&self.key, encode(&self.record)?, self.revision)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Remove the record, if nobody wrote it since.
    pub(crate) async fn remove(self, kv: &kv::Store) -> Result<(), String> {
        kv.purge_expect_revision(&self.key, Some(self.revision))
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_over() {
        let now = Utc::now();
        let record = Record {
            provider: "p".into(),
            model: "m".into(),
            state: State::Open,
            batch_id: None,
            created_at: now,
            holder: "a".into(),
            lease_until: now + chrono::TimeDelta::seconds(10),
            jobs: Vec::new(),
        };
        assert!(!record.takeable(now));
        assert!(record.takeable(now + chrono::TimeDelta::seconds(10)));
    }
}
