//! Prices per (provider, model) and the cost of a call, as the worker sees them.
//!
//! The source of truth is the `llm_prices` table (editable with SQL); the recorder computes the
//! stored costs there with the price in force at each call. The worker keeps a copy refreshed
//! periodically so the live `result` event can carry `cost_usd` too. An unknown price gives
//! `None` (never a made-up zero) and is logged once per (provider, model).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

/// One price row: USD per million tokens, valid from `effective_from`.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub effective_from: DateTime<Utc>,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// Prices by (provider, model), each list sorted by `effective_from`.
type PriceTable = HashMap<(String, String), Vec<Price>>;

/// A shared, refreshable price table. Cheap to clone.
#[derive(Clone, Default)]
pub struct PriceBook {
    prices: Arc<RwLock<PriceTable>>,
    warned: Arc<Mutex<HashSet<(String, String)>>>,
}

impl PriceBook {
    /// Replace the whole table (rows in any order).
    pub fn replace(&self, rows: Vec<(String, String, Price)>) {
        let mut map: HashMap<(String, String), Vec<Price>> = HashMap::new();
        for (provider, model, price) in rows {
            map.entry((provider, model)).or_default().push(price);
        }
        for list in map.values_mut() {
            list.sort_by_key(|p| p.effective_from);
        }
        if let Ok(mut guard) = self.prices.write() {
            *guard = map;
        }
    }

    /// Input + output USD per million tokens in force now (for the `cheapest` strategy).
    pub(crate) fn current_rate(&self, provider: &str, model: &str) -> Option<f64> {
        let now = Utc::now();
        let map = self.prices.read().ok()?;
        let list = map.get(&(provider.to_string(), model.to_string()))?;
        let p = list.iter().rev().find(|p| p.effective_from <= now)?;
        Some(p.input_per_mtok + p.output_per_mtok)
    }

    /// Cost of a call with the price in force at `at`; `None` when no price is known.
    pub(crate) fn cost(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Option<f64> {
        if input_tokens + output_tokens == 0 {
            return Some(0.0);
        }
        let key = (provider.to_string(), model.to_string());
        let price = self.prices.read().ok().and_then(|map| {
            map.get(&key)
                .and_then(|list| list.iter().rev().find(|p| p.effective_from <= at).cloned())
        });
        match price {
            Some(p) => Some(
                (input_tokens as f64 * p.input_per_mtok + output_tokens as f64 * p.output_per_mtok)
                    / 1_000_000.0,
            ),
            None => {
                if let Ok(mut warned) = self.warned.lock()
                    && warned.insert(key)
                {
                    tracing::warn!(
                        provider,
                        model,
                        "no price known for this model: its cost is recorded as NULL (add a row to llm_prices)"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_price_in_force_at_the_call_is_used() {
        let book = PriceBook::default();
        let t = |h| Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap();
        book.replace(vec![
            (
                "p".into(),
                "m".into(),
                Price {
                    effective_from: t(10),
                    input_per_mtok: 2.0,
                    output_per_mtok: 4.0,
                },
            ),
            (
                "p".into(),
                "m".into(),
                Price {
                    effective_from: t(0),
                    input_per_mtok: 1.0,
                    output_per_mtok: 2.0,
                },
            ),
        ]);
        assert_eq!(book.cost("p", "m", t(5), 1_000_000, 1_000_000), Some(3.0));
        assert_eq!(book.cost("p", "m", t(11), 1_000_000, 0), Some(2.0));
        assert_eq!(book.cost("p", "other", t(11), 10, 0), None);
        assert_eq!(
            book.cost(
                "p",
                "m",
                Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
                10,
                0
            ),
            None
        );
    }
}
