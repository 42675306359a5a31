//! Loading, overriding and validating configuration.

use super::*;

fn load(file: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = std::env::temp_dir().join(format!("llmw-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).map_err(|source| ConfigError::Read {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("c.toml");
    std::fs::write(&path, file).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Config::load_with(Some(&path), &vars, &lookup)
}

#[test]
fn the_shipped_example_configs_load() {
    for (name, text) in [
        (
            "config.example.toml",
            include_str!("../../examples/config.example.toml"),
        ),
        ("fake.toml", include_str!("../../examples/demo.toml")),
    ] {
        let keys = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"].map(|k| (k, "x"));
        let config = load(text, &keys);
        assert!(config.is_ok(), "{name}: {:?}", config.err());
    }
}

#[test]
fn openai_env_vars_alone_make_a_working_config() {
    let c = load(
        "",
        &[
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
            ("OPENAI_API_KEY", "sk-x"),
        ],
    )
    .unwrap();
    assert_eq!(c.routes["default"], vec!["openai".to_string()]);
    assert!(c.providers["openai"].api_key.is_some());
}

#[test]
fn errors_name_the_bad_key() {
    let e = load(
        "[worker]\nmax_in_flight = \"many\"\n[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("worker.max_in_flight"), "{e}");
    let e = load("[worker]\nmax_in_flite = 3\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_in_flite"), "{e}");
}

#[test]
fn env_overrides_reach_nested_keys_with_typed_values() {
    let c = load(
        "[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n",
        &[
            ("LLM_WORKER__WORKER__MAX_IN_FLIGHT", "7"),
            ("LLM_WORKER__NATS__SUBJECT_PREFIX", "t1"),
        ],
    )
    .unwrap();
    assert_eq!(c.worker.max_in_flight, 7);
    assert_eq!(c.nats.subject_prefix, "t1");
}

#[test]
fn a_route_to_an_unknown_provider_is_rejected() {
    let e = load(
        "[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n[routes]\ndefault = [\"nope:m\"]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("routes.default") && e.contains("nope"), "{e}");
}

#[test]
fn a_missing_api_key_variable_is_reported_without_a_value() {
    let e = load(
        "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\napi_key_env = \"MY_KEY\"\ndefault_model = \"m\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("MY_KEY is not set"), "{e}");
}

#[test]
fn secrets_do_not_appear_in_debug_output() {
    let c = load(
        "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\napi_key_env = \"K\"\ndefault_model = \"m\"\n",
        &[("K", "sk-supersecret"), ("DATABASE_URL", "postgres://u:pw-secret@h/db")],
    )
    .unwrap();
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("sk-supersecret") && !dbg.contains("pw-secret"),
        "{dbg}"
    );
}

#[test]
fn trust_settings_are_checked_at_load() {
    let base = "[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n";
    let e = load(
        &format!("[nats]\nreply_prefixes = [\"llm.jobs.\"]\n{base}"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("nats.reply_prefixes") && e.contains("own subjects"),
        "{e}"
    );
    let e = load(&format!("pin_any_provider = [\"nope\"]\n{base}"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("pin_any_provider"), "{e}");
    let e = load(&format!("[nats]\ntls_cert = \"c.pem\"\n{base}"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("nats.tls_cert"), "{e}");
    let c = load(
        &format!("[nats]\nuser = \"w\"\n{base}"),
        &[("LLM_WORKER__NATS__PASSWORD", "pw-secret")],
    )
    .unwrap();
    assert!(!format!("{c:?}").contains("pw-secret"));
}
