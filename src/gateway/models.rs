//! What a request's `model` names, from the configured routes: a route (task type), a
//! `provider:model` entry, or a bare model name some route entry sends to. `GET /v1/models`
//! lists them all. A `provider:model` outside the provider's `models` allow-list (where one
//! is configured) is refused here, before any job exists.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::config::{Config, RouteEntry};
use crate::contract::JobKind;
use crate::health::State;
use crate::status::WorkerStatus;

/// The job fields a model name sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub task_type: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
}

/// The model names of one job kind.
#[derive(Debug, Default)]
struct Names(BTreeMap<String, Target>);

impl Names {
    fn of(config: &Config, routes: &BTreeMap<String, Vec<RouteEntry>>) -> Names {
        let mut names = BTreeMap::new();
        for task in routes.keys() {
            names.insert(
                task.clone(),
                Target {
                    task_type: (task != "default").then(|| task.clone()),
                    provider: None,
                    model: None,
                },
            );
        }
        for (task, entries) in routes {
            for entry in entries {
                let model = entry.model.clone().or_else(|| {
                    config
                        .providers
                        .get(&entry.provider)
                        .and_then(|p| p.default_model.clone())
                });
                let Some(model) = model else { continue };
                let target = Target {
                    task_type: (task != "default").then(|| task.clone()),
                    provider: Some(entry.provider.clone()),
                    model: Some(model.clone()),
                };
                // The first route listing an entry (the default route sorts where it sorts)
                // gives it its task type; route names win over model names.
                names
                    .entry(format!("{}:{model}", entry.provider))
                    .or_insert_with(|| target.clone());
                names.entry(model).or_insert(target);
            }
        }
        Names(names)
    }
}

/// Model names for generation and embedding requests.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    generate: Names,
    embed: Names,
    image: Names,
    /// Configured providers and their `models` allow-lists (`None`: any model):
    /// `provider:model` with an allowed model is passed on to the worker (which decides
    /// whether the route lets a job pin it).
    providers: BTreeMap<String, Option<Vec<String>>>,
    /// The routes' (provider, model) pairs: what a tenant's status shows.
    entries: BTreeSet<(String, String)>,
}

/// One configured route entry's state in a tenant's status view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct EntryState {
    pub provider: String,
    pub model: String,
    /// The worst state any worker reports; `unknown` when no worker has called it yet.
    pub state: &'static str,
}

impl Catalog {
    pub fn new(config: &Config) -> Catalog {
        Catalog {
            generate: Names::of(config, &config.routes),
            embed: config
                .embedding_routes()
                .map(|r| Names::of(config, r))
                .unwrap_or_default(),
            image: config
                .generation_image_routes()
                .map(|r| Names::of(config, &r))
                .unwrap_or_default(),
            providers: config
                .providers
                .iter()
                .map(|(name, p)| {
                    // Models the routes name are always allowed (as the worker does).
                    let list = p.models.clone().map(|mut list| {
                        list.extend(
                            config
                                .route_entries()
                                .into_iter()
                                .filter(|(provider, _)| provider == name)
                                .map(|(_, m)| m),
                        );
                        list
                    });
                    (name.clone(), list)
                })
                .collect(),
            entries: config.route_entries().into_iter().collect(),
        }
    }

    /// The configured route entries' states across `workers` (never a name a job chose).
    pub fn entry_states(&self, workers: &[WorkerStatus]) -> Vec<EntryState> {
        self.entries
            .iter()
            .map(|(provider, model)| {
                let worst = workers
                    .iter()
                    .flat_map(|w| &w.providers)
                    .filter(|r| &r.provider == provider && &r.model == model)
                    .map(|r| r.state)
                    .max_by_key(|s| match s {
                        State::Healthy => 0,
                        State::Degraded => 1,
                        State::Unavailable => 2,
                        State::Unknown => -1,
                    });
                EntryState {
                    provider: provider.clone(),
                    model: model.clone(),
                    state: match worst {
                        None => "unknown",
                        Some(State::Healthy) => "healthy",
                        Some(State::Degraded) => "degraded",
                        Some(State::Unavailable) => "unavailable",
                        Some(State::Unknown) => "unknown",
                    },
                }
            })
            .collect()
    }

    /// What `model` means for a job of `kind`; `None`: unknown here (404).
    pub fn resolve(&self, kind: JobKind, model: &str) -> Option<Target> {
        let names = match kind {
            JobKind::Generate => &self.generate,
            JobKind::Embed => &self.embed,
            JobKind::Image => &self.image,
        };
        if let Some(t) = names.0.get(model) {
            return Some(t.clone());
        }
        let (provider, m) = model.split_once(':')?;
        let allowed = self.providers.get(provider)?;
        (!m.is_empty() && crate::config::model_allowed(allowed.as_deref(), m)).then(|| Target {
            task_type: None,
            provider: Some(provider.to_string()),
            model: Some(m.to_string()),
        })
    }

    /// Every name, generation and embedding, sorted, without repeats.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .generate
            .0
            .keys()
            .chain(self.embed.0.keys())
            .cloned()
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let config = Config::from_toml(
            r#"
[providers.fast]
type = "openai"
base_url = "http://127.0.0.1:1/v1"
default_model = "small"
[providers.big]
type = "openai"
base_url = "http://127.0.0.1:1/v1"
models = ["gpt-4o*"]
[routes]
default = ["fast", "big:large"]
code = ["big:large"]
"#,
        )
        .unwrap();
        Catalog::new(&config)
    }

    #[test]
    fn a_model_names_a_route_an_entry_or_a_model_of_an_entry() {
        let c = catalog();
        let t = |task: Option<&str>, p: Option<&str>, m: Option<&str>| Target {
            task_type: task.map(Into::into),
            provider: p.map(Into::into),
            model: m.map(Into::into),
        };
        assert_eq!(
            c.resolve(JobKind::Generate, "default"),
            Some(t(None, None, None))
        );
        assert_eq!(
            c.resolve(JobKind::Generate, "code"),
            Some(t(Some("code"), None, None))
        );
        // "big:large" is in both routes: the first route in name order ("code") gives it.
        assert_eq!(
            c.resolve(JobKind::Generate, "large"),
            Some(t(Some("code"), Some("big"), Some("large")))
        );
        assert_eq!(
            c.resolve(JobKind::Generate, "fast:small"),
            Some(t(None, Some("fast"), Some("small")))
        );
        assert_eq!(
            c.resolve(JobKind::Generate, "fast:other"),
            Some(t(None, Some("fast"), Some("other")))
        );
        // big allows gpt-4o* and its route models, nothing else.
        assert_eq!(
            c.resolve(JobKind::Generate, "big:gpt-4o-mini"),
            Some(t(None, Some("big"), Some("gpt-4o-mini")))
        );
        assert!(c.resolve(JobKind::Generate, "big:large").is_some());
        assert_eq!(c.resolve(JobKind::Generate, "big:made-up"), None);
        assert_eq!(c.resolve(JobKind::Generate, "nope"), None);
        assert_eq!(c.resolve(JobKind::Generate, "nope:x"), None);
        assert_eq!(
            c.ids(),
            [
                "big:large",
                "code",
                "default",
                "fast:small",
                "large",
                "small"
            ]
        );
    }
}
