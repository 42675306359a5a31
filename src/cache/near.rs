//! The near cache: entries this process read or wrote recently, kept in memory in front of the
//! fleet's bucket, so a repeated hit costs no NATS round trip (a KV read costs about as much
//! as a call to a fast local model server).
//!
//! Bounded by bytes (`cache.local_max_bytes`; the oldest entries go first) and by time
//! (`cache.local_ttl_secs`): an entry is served from memory for at most that long after it was
//! read or written here. Entries are keyed by content, so a near copy is the same answer the
//! bucket holds, except after a `refresh` on another worker: that new answer reaches this
//! process when its near copy expires. Freshness (`ttl_secs`) is still judged from when the
//! answer was stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub struct Near {
    ttl: Duration,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, (Bytes, Instant)>,
    /// Keys in insertion order (eviction order).
    order: VecDeque<String>,
    bytes: usize,
}

impl Near {
    /// `None` when off (`ttl` or `max_bytes` zero).
    pub fn new(ttl: Duration, max_bytes: usize) -> Option<Self> {
        (!ttl.is_zero() && max_bytes > 0).then(|| Self {
            ttl,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn get(&self, key: &str) -> Option<Bytes> {
        let inner = self.inner.lock().ok()?;
        let (value, at) = inner.entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    pub fn put(&self, key: &str, value: Bytes) {
        let size = key.len() + value.len();
        if size > self.max_bytes {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        match inner.entries.get_mut(key) {
            Some(slot) => {
                let (old, new) = (slot.0.len(), value.len());
                *slot = (value, now);
                inner.bytes = inner.bytes - old + new;
            }
            None => {
                inner.entries.insert(key.to_string(), (value, now));
                inner.order.push_back(key.to_string());
                inner.bytes += size;
            }
        }
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some((value, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= oldest.len() + value.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_served_until_their_time_and_the_oldest_make_room() {
        let near = Near::new(Duration::from_secs(60), 30).unwrap();
        near.put("a", Bytes::from_static(b"0123456789"));
        near.put("b", Bytes::from_static(b"0123456789"));
        assert_eq!(near.get("a").as_deref(), Some(&b"0123456789"[..]));
        // 11 + 11 + 11 bytes > 30: the oldest goes.
        near.put("c", Bytes::from_static(b"0123456789"));
        assert!(near.get("a").is_none());
        assert!(near.get("b").is_some() && near.get("c").is_some());
        // Replacing an entry keeps the count right.
        near.put("b", Bytes::from_static(b"x"));
        assert_eq!(near.get("b").as_deref(), Some(&b"x"[..]));
        assert_eq!(near.inner.lock().unwrap().bytes, 2 + 11);
        // Larger than the whole cache: not kept.
        near.put("d", Bytes::from(vec![0; 64]));
        assert!(near.get("d").is_none());
        assert!(Near::new(Duration::ZERO, 30).is_none());
        let short = Near::new(Duration::from_nanos(1), 30).unwrap();
        short.put("a", Bytes::from_static(b"1"));
        std::thread::sleep(Duration::from_millis(1));
        assert!(short.get("a").is_none(), "past its time");
    }
}
