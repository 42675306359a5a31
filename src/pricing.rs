//! Prices per (provider, model) and the cost of a call, as the worker sees them.
//!
//! The source of truth is the `llm_prices` table (editable with SQL); the recorder computes the
//! stored costs there with the price in force at each call. The worker keeps a copy refreshed
//! periodically so the live `result` event can carry `cost_usd` too. An unknown price gives
//! `None` (never a made-up zero) and is logged once per (provider, model).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

use crate::contract::{AttemptRecord, ImagesMade, ServiceTier, TokenClasses};

/// One price row: USD per million tokens, valid from `effective_from`. A class without a
/// price (`None`) is not priced: a call with tokens in it has no known cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub effective_from: DateTime<Utc>,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: Option<f64>,
    pub cache_write_per_mtok: Option<f64>,
    pub cache_write_1h_per_mtok: Option<f64>,
    pub reasoning_per_mtok: Option<f64>,
    pub image_input_per_mtok: Option<f64>,
    /// USD per picture, by `<size>/<quality>`, `<size>`, `*/<quality>` or `*` (image models
    /// billed per picture; `llm_prices.per_image_usd`).
    pub per_image: std::collections::BTreeMap<String, f64>,
    /// The fraction of these prices a batch call pays (`llm_prices.batch_price_factor`).
    pub batch_factor: f64,
    /// The fraction a call at OpenAI's flex tier pays (`llm_prices.flex_price_factor`).
    pub flex_factor: f64,
}

impl Default for Price {
    fn default() -> Self {
        Self {
            effective_from: DateTime::default(),
            input_per_mtok: 0.0,
            output_per_mtok: 0.0,
            cache_read_per_mtok: None,
            cache_write_per_mtok: None,
            cache_write_1h_per_mtok: None,
            reasoning_per_mtok: None,
            image_input_per_mtok: None,
            per_image: Default::default(),
            batch_factor: 0.5,
            flex_factor: 0.5,
        }
    }
}

impl Price {
    /// A call's cost at this price: each class at its own price, the rest of the input and
    /// output at theirs (the same sum as the recorder's SQL, CONTRACT.md section 7). `None`
    /// when a class with tokens has no price.
    pub fn cost(&self, input: u64, output: u64, c: &TokenClasses) -> Option<f64> {
        let class = |tokens: u64, price: Option<f64>| match tokens {
            0 => Some(0.0),
            n => price.map(|p| n as f64 * p),
        };
        let plain_input = input.saturating_sub(c.input_part());
        let plain_output = output.saturating_sub(c.reasoning_tokens);
        let total = plain_input as f64 * self.input_per_mtok
            + plain_output as f64 * self.output_per_mtok
            + class(c.cache_read_tokens, self.cache_read_per_mtok)?
            + class(c.cache_write_tokens, self.cache_write_per_mtok)?
            + class(c.cache_write_1h_tokens, self.cache_write_1h_per_mtok)?
            + class(c.reasoning_tokens, self.reasoning_per_mtok)?
            + class(c.image_input_tokens, self.image_input_per_mtok)?;
        Some(total / 1_000_000.0)
    }

    /// The price of one picture of `size` and `quality`: the most specific key that applies
    /// (the same lookup as the SQL function `llm_image_price`).
    pub fn image_price(&self, size: Option<&str>, quality: Option<&str>) -> Option<f64> {
        let (size, quality) = (size.unwrap_or("*"), quality.unwrap_or("*"));
        [
            format!("{size}/{quality}"),
            size.to_string(),
            format!("*/{quality}"),
            "*".to_string(),
        ]
        .iter()
        .find_map(|k| self.per_image.get(k).copied())
    }

    /// What the cache reads cost less than the same tokens at the input price (`None` when
    /// cache reads are not priced).
    pub fn cache_saving(&self, c: &TokenClasses) -> Option<f64> {
        let read = self.cache_read_per_mtok?;
        Some(c.cache_read_tokens as f64 * (self.input_per_mtok - read) / 1_000_000.0)
    }
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

    /// The price row in force at `at` (the one with the latest `effective_from` not after it).
    fn price_at(&self, provider: &str, model: &str, at: DateTime<Utc>) -> Option<Price> {
        let map = self.prices.read().ok()?;
        let list = map.get(&(provider.to_string(), model.to_string()))?;
        list.iter().rev().find(|p| p.effective_from <= at).cloned()
    }

    /// Input + output USD per million tokens in force now (for the `cheapest` strategy).
    pub(crate) fn current_rate(&self, provider: &str, model: &str) -> Option<f64> {
        let p = self.price_now(provider, model)?;
        Some(p.input_per_mtok + p.output_per_mtok)
    }

    /// The price in force now.
    pub(crate) fn price_now(&self, provider: &str, model: &str) -> Option<Price> {
        self.price_at(provider, model, Utc::now())
    }

    /// What a call's cache reads saved, with the price in force at `at` (`None` without
    /// cache reads, a price, or a price for cache reads).
    pub(crate) fn cache_saving(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        classes: &TokenClasses,
    ) -> Option<f64> {
        if classes.cache_read_tokens == 0 {
            return None;
        }
        self.price_at(provider, model, at)?.cache_saving(classes)
    }

    /// Cost of one recorded call with the price in force when it started: its tokens, or
    /// (when it reported none and made pictures) its pictures at the per-image price. The
    /// same rule as the SQL function `llm_call_cost`.
    pub(crate) fn attempt_cost(&self, a: &AttemptRecord) -> Option<f64> {
        let standard = match &a.images {
            Some(made) if made.count > 0 && a.input_tokens + a.output_tokens == 0 => {
                self.images_cost(&a.provider, &a.model, a.started_at, made)
            }
            _ => self.cost(
                &a.provider,
                &a.model,
                a.started_at,
                a.input_tokens,
                a.output_tokens,
                &a.classes,
            ),
        }?;
        let factor = match a.service_tier {
            ServiceTier::Standard => 1.0,
            tier => {
                let price = self.price_at(&a.provider, &a.model, a.started_at);
                price.map_or(1.0, |p| match tier {
                    ServiceTier::Batch => p.batch_factor,
                    _ => p.flex_factor,
                })
            }
        };
        Some(standard * factor)
    }

    /// Pictures at the per-image price in force at `at`.
    pub(crate) fn images_cost(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        made: &ImagesMade,
    ) -> Option<f64> {
        let price = self.price_at(provider, model, at);
        let each = price.and_then(|p| p.image_price(made.size.as_deref(), made.quality.as_deref()));
        if each.is_none() {
            self.warn_unpriced(provider, model);
        }
        each.map(|usd| usd * f64::from(made.count))
    }

    fn warn_unpriced(&self, provider: &str, model: &str) {
        if let Ok(mut warned) = self.warned.lock()
            && warned.insert((provider.to_string(), model.to_string()))
        {
            tracing::warn!(
                provider,
                model,
                "no price known for this model: its cost is recorded as NULL (add a row to llm_prices)"
            );
        }
    }

    /// Cost of a call with the price in force at `at`; `None` when no price is known, or a
    /// class with tokens has none.
    pub(crate) fn cost(
        &self,
        provider: &str,
        model: &str,
        at: DateTime<Utc>,
        input_tokens: u64,
        output_tokens: u64,
        classes: &TokenClasses,
    ) -> Option<f64> {
        if input_tokens + output_tokens == 0 {
            return Some(0.0);
        }
        let price = self.price_at(provider, model, at);
        match price {
            Some(p) => p.cost(input_tokens, output_tokens, classes),
            None => {
                self.warn_unpriced(provider, model);
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
        let none = TokenClasses::default();
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
                    ..Price::default()
                },
            ),
            (
                "p".into(),
                "m".into(),
                Price {
                    effective_from: t(0),
                    input_per_mtok: 1.0,
                    output_per_mtok: 2.0,
                    ..Price::default()
                },
            ),
        ]);
        assert_eq!(
            book.cost("p", "m", t(5), 1_000_000, 1_000_000, &none),
            Some(3.0)
        );
        assert_eq!(book.cost("p", "m", t(11), 1_000_000, 0, &none), Some(2.0));
        assert_eq!(book.cost("p", "other", t(11), 10, 0, &none), None);
        assert_eq!(
            book.cost(
                "p",
                "m",
                Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
                10,
                0,
                &none
            ),
            None
        );
    }

    #[test]
    fn each_class_is_priced_apart_and_an_unpriced_class_with_tokens_has_no_cost() {
        let price = Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
            cache_read_per_mtok: Some(0.3),
            cache_write_per_mtok: Some(3.75),
            cache_write_1h_per_mtok: Some(6.0),
            reasoning_per_mtok: Some(15.0),
            image_input_per_mtok: None,
            ..Price::default()
        };
        let classes = TokenClasses {
            cache_read_tokens: 600_000,
            cache_write_tokens: 100_000,
            cache_write_1h_tokens: 100_000,
            reasoning_tokens: 200_000,
            image_input_tokens: 0,
        };
        // 200k plain input at 3, 600k reads at 0.3, 100k writes at 3.75, 100k 1h writes at 6,
        // 800k plain output at 15, 200k reasoning at 15.
        let cost = price.cost(1_000_000, 1_000_000, &classes).unwrap();
        let expected = 0.6 + 0.18 + 0.375 + 0.6 + 12.0 + 3.0;
        assert!((cost - expected).abs() < 1e-9, "{cost} != {expected}");
        let saving = price.cache_saving(&classes).unwrap();
        assert!((saving - 0.6 * 2.7).abs() < 1e-9);
        // Image tokens have no price here: no cost, never a guess.
        let with_images = TokenClasses {
            image_input_tokens: 1,
            ..classes
        };
        assert_eq!(price.cost(1_000_000, 1_000_000, &with_images), None);
        // Pictures: the most specific key applies.
        let per_image = Price {
            per_image: [("1024x1024/hd", 0.08), ("1024x1024", 0.04), ("*", 0.1)]
                .map(|(k, v)| (k.to_string(), v))
                .into(),
            ..Price::default()
        };
        assert_eq!(
            per_image.image_price(Some("1024x1024"), Some("hd")),
            Some(0.08)
        );
        assert_eq!(
            per_image.image_price(Some("1024x1024"), Some("standard")),
            Some(0.04)
        );
        assert_eq!(per_image.image_price(Some("1792x1024"), None), Some(0.1));
        assert_eq!(Price::default().image_price(Some("1024x1024"), None), None);
        // No classes: input and output at their prices.
        assert_eq!(
            Price::default().cost(10, 0, &TokenClasses::default()),
            Some(0.0)
        );
    }
}
