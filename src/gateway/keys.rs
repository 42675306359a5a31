//! API keys of the gateway: bearer tokens mapped to tenants, kept in Postgres
//! (`llm_api_keys`) as SHA-256 hashes, managed with `llm-worker keys create|list|revoke`.
//!
//! A key is `llmw_` and 32 random bytes (base64url): a fast hash is enough, since there is
//! nothing to guess. Looked-up keys are trusted for `gateway.key_cache_secs` without asking
//! Postgres again, so a revoked key stops working after at most that long. Unknown keys are
//! remembered as long (a repeated bad key costs no query; a new key was never looked up
//! before it existed, so it works at once), in a cache of their own so a flood of bad keys
//! cannot push out good ones. `BadKeys` limits refused keys per client address.
//!
//! An admin key (`keys create --admin`) is an operator's: it sees the fleet's whole status.

use std::collections::HashMap;
use std::net::IpAddr;
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
/// Remembered unknown keys at most; that cache starts over beyond it.
const MAX_UNKNOWN: usize = 10_000;
/// Client addresses [`BadKeys`] follows at most; it starts over beyond it.
const MAX_ADDRESSES: usize = 100_000;

/// One key, without its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    /// The key's first characters.
    pub prefix: String,
    pub tenant: String,
    pub name: Option<String>,
    /// An operator's key: sees the whole fleet's status.
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a valid key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub tenant: String,
    pub admin: bool,
}

/// A tenant name a key may carry: a NATS subject token (1 to 64 of `A-Z a-z 0-9 _ -`), so
/// it is valid both in a job body and as the tenant token of a job subject.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    if crate::contract::subject::is_plain_name(tenant) {
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

/// Create a key for `tenant` (an operator's with `admin`); returns it with its secret, which
/// is shown only this once.
pub async fn create(
    pool: &PgPool,
    tenant: &str,
    name: Option<&str>,
    admin: bool,
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
        "INSERT INTO llm_api_keys (id, key_hash, prefix, tenant, name, admin) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, prefix, tenant, name, admin, created_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(hash(&secret))
    .bind(&secret[..SHOWN])
    .bind(tenant)
    .bind(name)
    .bind(admin)
    .fetch_one(pool)
    .await?;
    Ok((key, secret))
}

/// Every key, oldest first.
pub async fn list(pool: &PgPool) -> anyhow::Result<Vec<ApiKey>> {
    Ok(sqlx::query_as(
        "SELECT id, prefix, tenant, name, admin, created_at, revoked_at FROM llm_api_keys \
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
        "{:<38} {:<14} {:<20} {:<20} {:<6} {:<22} {}\n",
        "id", "key", "tenant", "name", "admin", "created", "revoked"
    );
    for k in keys {
        let at = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
        out.push_str(&format!(
            "{:<38} {:<14} {:<20} {:<20} {:<6} {:<22} {}\n",
            k.id.to_string(),
            format!("{}...", k.prefix),
            k.tenant,
            k.name.as_deref().unwrap_or("-"),
            if k.admin { "yes" } else { "-" },
            at(&k.created_at),
            k.revoked_at.as_ref().map_or("-".to_string(), at),
        ));
    }
    out
}

/// Looks keys up, with short-lived caches of known and unknown keys.
pub(crate) struct Keys {
    pool: PgPool,
    ttl: Duration,
    known: Mutex<HashMap<Vec<u8>, (Owner, Instant)>>,
    unknown: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl Keys {
    pub(crate) fn new(pool: PgPool, ttl: Duration) -> Keys {
        Keys {
            pool,
            ttl,
            known: Mutex::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
        }
    }

    /// Who a valid, unrevoked key speaks for; `None` for any other string.
    pub(crate) async fn owner_of(&self, key: &str) -> Result<Option<Owner>, sqlx::Error> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return Ok(None);
        }
        let h = hash(key);
        if let Ok(known) = self.known.lock()
            && let Some((owner, at)) = known.get(&h)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(owner.clone()));
        }
        if let Ok(unknown) = self.unknown.lock()
            && unknown.get(&h).is_some_and(|at| at.elapsed() < self.ttl)
        {
            return Ok(None);
        }
        let owner: Option<(String, bool)> = sqlx::query_as(
            "SELECT tenant, admin FROM llm_api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&h)
        .fetch_optional(&self.pool)
        .await?;
        let owner = owner.map(|(tenant, admin)| Owner { tenant, admin });
        if self.ttl.is_zero() {
            return Ok(owner);
        }
        match &owner {
            Some(o) => {
                if let Ok(mut known) = self.known.lock() {
                    if known.len() >= MAX_CACHED {
                        known.clear();
                    }
                    known.insert(h, (o.clone(), Instant::now()));
                }
            }
            None => {
                if let Ok(mut known) = self.known.lock() {
                    known.remove(&h);
                }
                if let Ok(mut unknown) = self.unknown.lock() {
                    if unknown.len() >= MAX_UNKNOWN {
                        unknown.clear();
                    }
                    unknown.insert(h, Instant::now());
                }
            }
        }
        Ok(owner)
    }
}

/// Refused keys per client address, counted in one-minute windows: an address over
/// `gateway.bad_keys_per_minute` is refused (429) without a lookup until its window ends.
pub(crate) struct BadKeys {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl BadKeys {
    pub(crate) fn new(per_minute: u32) -> BadKeys {
        BadKeys {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `addr` may try a key again; `None`: it may now.
    pub(crate) fn blocked(&self, addr: IpAddr) -> Option<u64> {
        if self.per_minute == 0 {
            return None;
        }
        let seen = self.seen.lock().ok()?;
        let (since, count) = seen.get(&addr)?;
        let left = WINDOW.checked_sub(since.elapsed())?;
        (*count >= self.per_minute).then(|| left.as_secs().max(1))
    }

    /// `addr` sent a key that was refused.
    pub(crate) fn refused(&self, addr: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() >= MAX_ADDRESSES && !seen.contains_key(&addr) {
            seen.retain(|_, (since, _)| since.elapsed() < WINDOW);
            if seen.len() >= MAX_ADDRESSES {
                seen.clear();
            }
        }
        let entry = seen.entry(addr).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
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
    fn an_address_over_its_refused_keys_is_blocked_and_others_are_not() {
        let bad = BadKeys::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            bad.refused(a);
        }
        assert_eq!(bad.blocked(a), None);
        bad.refused(a);
        assert!(bad.blocked(a).is_some_and(|s| (1..=60).contains(&s)));
        assert_eq!(bad.blocked(b), None);
        let off = BadKeys::new(0);
        for _ in 0..100 {
            off.refused(a);
        }
        assert_eq!(off.blocked(a), None);
    }

    #[test]
    fn a_key_is_stored_as_its_sha256() {
        let h = hash("llmw_abc");
        assert_eq!(h.len(), 32);
        assert_ne!(h, hash("llmw_abd"));
    }
}
