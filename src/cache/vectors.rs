//! Embedding vectors in the response cache, one entry per input text.
//!
//! Key: `e.` and the SHA-256 of the tenant (unless `cache.share_across_tenants`), the provider
//! and model that embedded the text, the asked `dimensions` and the text. Value: a small
//! binary record (version, input tokens, storage time, the `f32` numbers little-endian), about
//! 4 bytes per dimension. A vector is only ever served for the model that made it, so a job's
//! vectors never mix models. Entries are served while fresh (`cache.ttl_secs`).

use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::Cache;

/// Lookups and writes in flight at once for one job.
const CONCURRENCY: usize = 64;
const VERSION: u8 = 1;
/// Version, tokens (u64), stored_at (i64 ms), dimensions (u32).
const HEADER: usize = 1 + 8 + 8 + 4;

/// One cached vector.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredVector {
    pub vector: Vec<f32>,
    /// This input's share of the tokens the call that made it was billed.
    pub input_tokens: u64,
    pub stored_at: DateTime<Utc>,
}

impl StoredVector {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 4 * self.vector.len());
        out.push(VERSION);
        out.extend_from_slice(&self.input_tokens.to_le_bytes());
        out.extend_from_slice(&self.stored_at.timestamp_millis().to_le_bytes());
        out.extend_from_slice(&(self.vector.len() as u32).to_le_bytes());
        for x in &self.vector {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// `None` for anything that is not a whole record of this version.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION || bytes.len() < HEADER {
            return None;
        }
        let u64_at = |i: usize| rest.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
        let input_tokens = u64_at(0)?;
        let millis = i64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
        let dims = u32::from_le_bytes(rest.get(16..20)?.try_into().ok()?) as usize;
        let numbers = rest.get(20..)?;
        if numbers.len() != dims.checked_mul(4)? {
            return None;
        }
        let vector = numbers
            .chunks_exact(4)
            .map(|c| <[u8; 4]>::try_from(c).map(f32::from_le_bytes))
            .collect::<Result<Vec<f32>, _>>()
            .ok()?;
        Some(Self {
            vector,
            input_tokens,
            stored_at: DateTime::from_timestamp_millis(millis)?,
        })
    }
}

/// Who asks and what decides a vector, for its key.
pub(crate) struct VectorScope<'a> {
    pub tenant: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub dimensions: Option<u32>,
}

impl Cache {
    /// The key of `text`'s vector under `scope`.
    pub(crate) fn vector_key(&self, scope: &VectorScope<'_>, text: &str) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // Length-prefixed fields: no two scopes and texts share their bytes.
        let tenant = if self.share_across_tenants {
            ""
        } else {
            scope.tenant
        };
        let dims = scope.dimensions.map_or(String::new(), |d| d.to_string());
        for field in ["v1", tenant, scope.provider, scope.model, &dims, text] {
            ctx.update(&(field.len() as u64).to_le_bytes());
            ctx.update(field.as_bytes());
        }
        super::hex_key("e.", ctx.finish().as_ref())
    }

    /// The fresh vectors stored under `keys`, in order (a miss, an old entry or a read error
    /// is `None`).
    pub(crate) async fn get_vectors(&self, keys: &[String]) -> Vec<Option<StoredVector>> {
        let now = Utc::now();
        // Futures made first, then polled: a stream combinator holding a closure over
        // borrowed keys is not `Send` for every lifetime (rustc's higher-ranked limitation).
        let gets: Vec<_> = keys.iter().map(|key| self.get_vector(key, now)).collect();
        futures::stream::iter(gets)
            .buffered(CONCURRENCY)
            .collect()
            .await
    }

    async fn get_vector(&self, key: &str, now: DateTime<Utc>) -> Option<StoredVector> {
        match self.get_raw(key).await {
            Ok(Some(bytes)) => {
                StoredVector::decode(&bytes).filter(|v| now - v.stored_at <= self.ttl)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the response cache; calling providers");
                None
            }
        }
    }

    /// Store vectors (failures are logged; the job is answered anyway).
    pub(crate) async fn put_vectors(&self, entries: Vec<(String, StoredVector)>) {
        let puts: Vec<_> = entries
            .into_iter()
            .map(|(key, v)| self.put_vector(key, v))
            .collect();
        futures::stream::iter(puts)
            .buffer_unordered(CONCURRENCY)
            .for_each(|()| async {})
            .await;
    }

    async fn put_vector(&self, key: String, v: StoredVector) {
        if let Err(e) = self.put_raw(&key, v.encode().into()).await {
            tracing::warn!(error = %e, "cannot store a vector in the response cache");
        }
    }
}

/// Split a call's `tokens` over its inputs in proportion to their length (the shares add up
/// to `tokens`).
pub(crate) fn shares(tokens: u64, inputs: &[&str]) -> Vec<u64> {
    let total: u64 = inputs.iter().map(|t| t.len() as u64).sum::<u64>().max(1);
    let mut given = 0;
    let mut out: Vec<u64> = inputs
        .iter()
        .map(|t| {
            let share = tokens.saturating_mul(t.len() as u64) / total;
            given += share;
            share
        })
        .collect();
    if let Some(last) = out.last_mut() {
        *last += tokens.saturating_sub(given);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_garbage_is_a_miss() {
        let v = StoredVector {
            vector: vec![0.5, -1.25, 3.0],
            input_tokens: 7,
            stored_at: DateTime::from_timestamp_millis(1_764_000_000_123).unwrap(),
        };
        let bytes = v.encode();
        assert_eq!(bytes.len(), HEADER + 12);
        assert_eq!(StoredVector::decode(&bytes), Some(v));
        assert_eq!(StoredVector::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(StoredVector::decode(b""), None);
        assert_eq!(StoredVector::decode(b"{\"output\":\"x\"}"), None);
        let mut huge = bytes.clone();
        huge[17..21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(StoredVector::decode(&huge), None);
    }

    #[test]
    fn token_shares_follow_length_and_add_up() {
        assert_eq!(shares(10, &["aaaa", "a"]), vec![8, 2]);
        assert_eq!(shares(7, &["ab", "ab", "ab"]).iter().sum::<u64>(), 7);
        assert_eq!(shares(0, &["x"]), vec![0]);
        assert!(shares(5, &[]).is_empty());
    }
}
