//! Where configuration comes from: the TOML file, `LLM_WORKER__A__B` overrides, and the
//! conventional variables (`NATS_URL`, `DATABASE_URL`, `OPENAI_*`, `OLLAMA_HOST`), read here and
//! nowhere else.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::{Api, Config, ConfigError, MaxTokensField, ProviderConfig, invalid};

/// Environment variable prefix for generic overrides.
const ENV_PREFIX: &str = "LLM_WORKER__";

/// Where the process environment comes from; a trait object so tests can pass a map.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Load from the process environment and an optional file (`--config` wins over
    /// `LLM_WORKER_CONFIG`).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env_path = std::env::var_os("LLM_WORKER_CONFIG")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let lookup = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::load_with(path.as_deref(), &vars, &lookup)
    }

    /// Load with an explicit environment (for tests).
    pub(crate) fn load_with(
        path: Option<&Path>,
        vars: &[(String, String)],
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let mut tree = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env_overrides(&mut tree, vars)?;
        let given = super::names::given(&tree);
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        super::names::derive(&mut config.nats, &given);
        config.apply_conventional_env(env);
        config.resolve_secrets(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parse a TOML string as if it were the file (for tests and examples).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let tree: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: PathBuf::from("<string>"),
                message: e.to_string(),
            })?;
        let given = super::names::given(&tree);
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        super::names::derive(&mut config.nats, &given);
        config.validate()?;
        Ok(config)
    }

    pub(super) fn apply_conventional_env(&mut self, env: EnvLookup<'_>) {
        if let Some(url) = env("NATS_URL") {
            self.nats.url = url;
        }
        if let Some(url) = env("DATABASE_URL") {
            self.database.url = Some(SecretString::from(url));
        }
        if let Some(host) = env("OLLAMA_HOST") {
            let url = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            for p in self.providers.values_mut() {
                if matches!(p.api, Api::Ollama { .. }) && p.base_url.is_none() {
                    p.base_url = Some(url.clone());
                }
            }
        }
        let base = env("OPENAI_BASE_URL");
        let has_key = env("OPENAI_API_KEY").is_some();
        if self.providers.is_empty() && (base.is_some() || has_key) {
            let mut p = ProviderConfig::new(Api::openai(MaxTokensField::MaxCompletionTokens));
            p.base_url = Some(base.unwrap_or_else(|| "https://api.openai.com/v1".into()));
            p.api_key_env = has_key.then(|| "OPENAI_API_KEY".to_string());
            p.default_model = Some(env("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()));
            self.providers.insert("openai".into(), p);
        }
    }

    pub(super) fn resolve_secrets(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        for (name, p) in &mut self.providers {
            if p.api_key_env.is_some() && p.api_key_file.is_some() {
                return Err(invalid(
                    format!("providers.{name}.api_key_file"),
                    "set api_key_env or api_key_file, not both",
                ));
            }
            if let Some(path) = &p.api_key_file {
                let key = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        format!("providers.{name}.api_key_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let key = key.trim();
                if key.is_empty() {
                    return Err(invalid(
                        format!("providers.{name}.api_key_file"),
                        format!("{} is empty", path.display()),
                    ));
                }
                p.api_key = Some(SecretString::from(key.to_string()));
            }
            if let Some(var) = &p.api_key_env {
                let key = env(var).ok_or_else(|| {
                    invalid(
                        format!("providers.{name}.api_key_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?;
                p.api_key = Some(SecretString::from(key));
            }
        }
        Ok(())
    }
}

/// Applies `LLM_WORKER__A__B=value` as `a.b = value` onto the parsed file.
fn apply_env_overrides(
    tree: &mut toml::Table,
    vars: &[(String, String)],
) -> Result<(), ConfigError> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if segments.iter().any(String::is_empty) {
            return Err(invalid(name.clone(), "empty path segment"));
        }
        let value = parse_env_value(raw);
        let mut table = &mut *tree;
        for (i, seg) in segments.iter().enumerate() {
            if i + 1 == segments.len() {
                table.insert(seg.clone(), value.clone());
            } else {
                let entry = table
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table = entry.as_table_mut().ok_or_else(|| {
                    invalid(
                        segments[..=i].join("."),
                        format!("{name} overrides a non-table value"),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// `"42"` -> integer, `"true"` -> bool, `"[\"a\"]"` -> array, anything else -> string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}
