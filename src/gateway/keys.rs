//! API keys of the gateway: bearer tokens mapped to tenants, kept in Postgres
//! (`llm_api_keys`) as SHA-256 hashes, managed with `llm-worker keys create|list|revoke`.
//!
//! A key is `llmw_` and 32 random bytes (base64url): a fast hash is enough, since there is
//! nothing to guess. Looked-up keys are trusted for `gateway.key_cache_secs` without asking
//! Postgres again, so a revoked key stops working after at most that long; unknown keys are
//! never cached (a new key works at once).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Every key starts with this, so a leaked one is recognisable (secret scanners).
pub const KEY_PREFIX: &str = "llmw_";
/// Characters of a key shown in lists (the prefix and 7 more).
const SHOWN: usize = 12;
/// Cached lookups at most; the cache starts over beyond it.
const MAX_CACHED: usize = 100_000;

/// One key, without its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    /// The key's first characters.
    pub prefix: String,
    pub tenant: String,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A tenant name a key may carry: a NATS subject token (1 to 64 of `A-Z a-z 0-9 _ -`), so
/// it is valid both in a job body and as the tenant token of a job subject.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant {tenant:?}: use 1 to 64 characters of A-Z, a-z, 0-9, _ and -"
        ))
    }
}

fn hash(key: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .to_vec()
}

/// Create a key for `tenant`; returns it with its secret, which is shown only this once.
pub async fn create(
    pool: &PgPool,
    tenant: &str,
    name: Option<&str>,
) -> anyhow::Result<(ApiKey, String)> {
    check_tenant(tenant).map_err(anyhow::Error::msg)?;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    let secret = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let key: ApiKey = sqlx::query_as(
        "INSERT INTO llm_api_keys (id, key_hash, prefix, tenant, name) VALUES ($1, $2, $3, $4, $5) \
         RETURNING id, prefix, tenant, name, created_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(hash(&secret))
    .bind(&secret[..SHOWN])
    .bind(tenant)
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok((key, secret))
}

/// Every key, oldest first.
pub async fn list(pool: &PgPool) -> anyhow::Result<Vec<ApiKey>> {
    Ok(sqlx::query_as(
        "SELECT id, prefix, tenant, name, created_at, revoked_at FROM llm_api_keys \
         ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await?)
}

/// Revoke the key with this id (or this shown prefix); returns how many keys were revoked.
pub async fn revoke(pool: &PgPool, id_or_prefix: &str) -> anyhow::Result<u64> {
    let done =
        match Uuid::parse_str(id_or_prefix) {
            Ok(id) => sqlx::query(
                "UPDATE llm_api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .execute(pool)
            .await?,
            Err(_) => {
                sqlx::query(
                    "UPDATE llm_api_keys SET revoked_at = now() \
                 WHERE prefix = $1 AND revoked_at IS NULL",
                )
                .bind(id_or_prefix)
                .execute(pool)
                .await?
            }
        };
    Ok(done.rows_affected())
}

/// The keys table as text, one key per line.
pub fn render(keys: &[ApiKey]) -> String {
    let mut out = format!(
        "{:<38} {:<14} {:<20} {:<20} {:<22} {}\n",
        "id", "key", "tenant", "name", "created", "revoked"
    );
    for k in keys {
        let at = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
        out.push_str(&format!(
            "{:<38} {:<14} {:<20} {:<20} {:<22} {}\n",
            k.id.to_string(),
            format!("{}...", k.prefix),
            k.tenant,
            k.name.as_deref().unwrap_or("-"),
            at(&k.created_at),
            k.revoked_at.as_ref().map_or("-".to_string(), at),
        ));
    }
    out
}

/// Looks keys up, with a short-lived cache.
pub(crate) struct Keys {
    pool: PgPool,
    ttl: Duration,
    cache: Mutex<HashMap<Vec<u8>, (String, Instant)>>,
}

impl Keys {
    pub(crate) fn new(pool: PgPool, ttl: Duration) -> Keys {
        Keys {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant of a valid, unrevoked key; `None` for any other string.
    pub(crate) async fn tenant_of(&self, key: &str) -> Result<Option<String>, sqlx::Error> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return Ok(None);
        }
        let h = hash(key);
        if let Ok(cache) = self.cache.lock()
            && let Some((tenant, at)) = cache.get(&h)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(tenant.clone()));
        }
        let tenant: Option<String> = sqlx::query_scalar(
            "SELECT tenant FROM llm_api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&h)
        .fetch_optional(&self.pool)
        .await?;
        if let Ok(mut cache) = self.cache.lock() {
            match &tenant {
                Some(t) if !self.ttl.is_zero() => {
                    if cache.len() >= MAX_CACHED {
                        cache.clear();
                    }
                    cache.insert(h, (t.clone(), Instant::now()));
                }
                _ => {
                    cache.remove(&h);
                }
            }
        }
        Ok(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_of_keys_are_subject_tokens() {
        assert!(check_tenant("acme-1_b").is_ok());
        for bad in ["", "a.b", "a b", "a*", "ä", &"x".repeat(65)] {
            assert!(check_tenant(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_key_is_stored_as_its_sha256() {
        let h = hash("llmw_abc");
        assert_eq!(h.len(), 32);
        assert_ne!(h, hash("llmw_abd"));
    }
}
