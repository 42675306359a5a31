//! An embedding job: the vector cache around the embedding chain. Inputs whose vectors the
//! cache holds for the route's first entry are not sent again; a job whose every input is
//! cached makes no call (`cache_hit: true`). See `crate::cache` (`vectors`) for the key.

use chrono::{DateTime, Utc};

use super::{Answer, Outbox, PAYLOAD_HEADROOM, RESULT_MARGIN, Routing, Worker};
use crate::cache::{self, Cache, StoredVector, VectorScope};
use crate::chain::Chain;
use crate::contract::{CacheMode, EmbedRequest};
use crate::contract::{CacheSaving, ResultEvent};
use crate::embedding::{EmbedRules, EmbedSuccess};
use crate::job::Job;

/// The vector cache's view of one job.
struct Lookup {
    /// Provider and model of the route's first entry (the cached vectors' model).
    provider: String,
    model: String,
    keys: Vec<String>,
    /// Per input: its cached vector (`cache: use` only).
    hits: Vec<Option<StoredVector>>,
}

impl<O: Outbox> Worker<O> {
    /// Answer an embedding job from the vector cache and the chain (then store new vectors).
    pub(super) async fn embed(
        &self,
        routing: &Routing,
        job: &Job,
        req: &EmbedRequest,
        received_at: DateTime<Utc>,
        bounds: super::generate::Bounds<'_>,
    ) -> ResultEvent {
        let Some((chain, mixed)) = &routing.embed else {
            return self.result_of(job, Vec::new(), Err(super::no_embedding()), received_at);
        };
        let task = job.envelope.task_type.as_deref().unwrap_or("default");
        // Room for vectors: the payload limit less the rest of the result (its metadata at
        // most, and ids, attempts and timings within a margin).
        let rules = EmbedRules {
            mixed_dimensions: mixed.iter().any(|r| r == task),
            max_vector_bytes: self.outbox.max_payload().saturating_sub(
                PAYLOAD_HEADROOM + routing.limits.bounds.max_metadata_bytes + RESULT_MARGIN,
            ),
        };
        let cache = self.cache.as_ref().filter(|c| c.embeddings);
        let mode = cache::embed_mode(job, cache::Said::of(&routing.limits, &job.envelope));
        let lookup = match cache.filter(|_| mode != CacheMode::Off) {
            Some(c) => lookup(c, chain, job, req, mode).await,
            None => None,
        };
        let Some((c, lookup)) = cache.zip(lookup) else {
            let o = chain.embed(job, req, None, rules, bounds.chain()).await;
            return self.result_of(job, o.attempts, o.result.map(Answer::Vectors), received_at);
        };
        let missing: Vec<usize> = (0..req.input.len())
            .filter(|i| lookup.hits[*i].is_none())
            .collect();
        if missing.is_empty() {
            return self.all_cached(job, lookup, received_at);
        }
        let cached = req.input.len() - missing.len();
        let first: Option<Vec<String>> =
            (cached > 0).then(|| missing.iter().map(|i| req.input[*i].clone()).collect());
        let o = chain
            .embed(job, req, first.as_deref(), rules, bounds.chain())
            .await;
        let mut success = match o.result {
            Ok(s) => s,
            Err(e) => return self.result_of(job, o.attempts, Err(e), received_at),
        };
        let stored = store(c, job, req, &lookup, &missing, &success).await;
        let mut saving = None;
        if success.partial {
            // Put the cached vectors back in their places.
            let mut fresh = std::mem::take(&mut success.vectors).into_iter();
            let mut saved = Vec::with_capacity(cached);
            let vectors = lookup
                .hits
                .into_iter()
                .map(|hit| match hit {
                    Some(hit) => {
                        saved.push((hit.input_tokens, hit.stored_at));
                        hit.vector
                    }
                    None => fresh.next().unwrap_or_default(),
                })
                .collect();
            success.vectors = vectors;
            saving = Some(self.saving(&lookup.provider, &lookup.model, &saved));
        }
        tracing::debug!(cached, stored, "embedding job done");
        let mut result = self.result_of(job, o.attempts, Ok(Answer::Vectors(success)), received_at);
        result.cache = saving;
        result
    }

    /// Every input's vector was cached: no call.
    fn all_cached(&self, job: &Job, lookup: Lookup, received_at: DateTime<Utc>) -> ResultEvent {
        let saved: Vec<(u64, DateTime<Utc>)> = lookup
            .hits
            .iter()
            .flatten()
            .map(|h| (h.input_tokens, h.stored_at))
            .collect();
        let saving = self.saving(&lookup.provider, &lookup.model, &saved);
        let success = EmbedSuccess {
            attempt: 0,
            provider: lookup.provider,
            model: lookup.model,
            vectors: lookup
                .hits
                .into_iter()
                .flatten()
                .map(|h| h.vector)
                .collect(),
            input_tokens: 0,
            partial: false,
        };
        let mut result = self.result_of(job, Vec::new(), Ok(Answer::Vectors(success)), received_at);
        result.cache_hit = true;
        result.cache = Some(saving);
        result
    }

    /// What cached vectors saved: their tokens, at today's price.
    fn saving(&self, provider: &str, model: &str, saved: &[(u64, DateTime<Utc>)]) -> CacheSaving {
        let tokens = saved.iter().map(|(t, _)| t).sum();
        CacheSaving {
            stored_at: saved
                .iter()
                .map(|(_, at)| *at)
                .min()
                .unwrap_or_else(Utc::now),
            saved_input_tokens: tokens,
            saved_output_tokens: 0,
            saved_cost_usd: self.prices.cost(
                provider,
                model,
                Utc::now(),
                tokens,
                0,
                &Default::default(),
            ),
            cached_inputs: Some(saved.len()),
        }
    }
}

/// The keys of `req`'s inputs under the route's first entry, and (for `use`) what the cache
/// holds; `None` when the route has no entry.
async fn lookup(
    c: &Cache,
    chain: &Chain,
    job: &Job,
    req: &EmbedRequest,
    mode: CacheMode,
) -> Option<Lookup> {
    let first = chain.plan(job).into_iter().next()?;
    let scope = VectorScope {
        tenant: &job.envelope.tenant,
        provider: &first.provider.name,
        model: &first.model,
        dimensions: req.dimensions,
    };
    let keys: Vec<String> = req.input.iter().map(|t| c.vector_key(&scope, t)).collect();
    let hits = match mode {
        CacheMode::Use => c.get_vectors(&keys).await,
        _ => vec![None; keys.len()],
    };
    Some(Lookup {
        provider: first.provider.name.clone(),
        model: first.model.clone(),
        keys,
        hits,
    })
}

/// Store the vectors `success` made, under the model that made them; how many.
async fn store(
    c: &Cache,
    job: &Job,
    req: &EmbedRequest,
    lookup: &Lookup,
    missing: &[usize],
    success: &EmbedSuccess,
) -> usize {
    // The inputs the answering entry embedded, in the order of its vectors.
    let embedded: Vec<usize> = if success.partial {
        missing.to_vec()
    } else {
        (0..req.input.len()).collect()
    };
    let same_model = success.provider == lookup.provider && success.model == lookup.model;
    let scope = VectorScope {
        tenant: &job.envelope.tenant,
        provider: &success.provider,
        model: &success.model,
        dimensions: req.dimensions,
    };
    let texts: Vec<&str> = embedded.iter().map(|i| req.input[*i].as_str()).collect();
    let tokens = cache::shares(success.input_tokens, &texts);
    let now = Utc::now();
    let entries: Vec<(String, StoredVector)> = embedded
        .iter()
        .zip(&success.vectors)
        .zip(tokens)
        .map(|((i, vector), input_tokens)| {
            let key = if same_model {
                lookup.keys[*i].clone()
            } else {
                c.vector_key(&scope, &req.input[*i])
            };
            let v = StoredVector {
                vector: vector.clone(),
                input_tokens,
                stored_at: now,
            };
            (key, v)
        })
        .collect();
    let n = entries.len();
    c.put_vectors(entries).await;
    n
}
