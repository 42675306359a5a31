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
    assert_eq!(c.routes["default"], vec![RouteEntry::parse("openai")]);
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

#[test]
fn an_unknown_key_in_a_provider_table_is_an_error_naming_it() {
    // A typo, and a key that belongs to another protocol.
    for (table, key) in [
        (
            "type = \"openai\"\nbase_url = \"http://x/v1\"\nmax_retrys = 3\n",
            "max_retrys",
        ),
        (
            "type = \"anthropic\"\nembed_batch_size = 10\n",
            "embed_batch_size",
        ),
        (
            "type = \"gemini\"\nmax_tokens_field = \"max_tokens\"\n",
            "max_tokens_field",
        ),
        (
            "type = \"ollama\"\ndefault_max_tokens = 5\n",
            "default_max_tokens",
        ),
    ] {
        let e = load(
            &format!("[providers.p]\ndefault_model = \"m\"\n{table}"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("providers.p") && e.contains(key),
            "{table}: {e}"
        );
    }
    let e = load("[providers.p]\ntype = \"fake\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("providers.p") && e.contains("fake"), "{e}");
}

#[test]
fn each_protocol_gets_its_own_settings_and_defaults() {
    let c = load(
        "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\ndefault_model = \"m\"\nmax_tokens_field = \"max_completion_tokens\"\nembed_batch_size = 7\n\
         [providers.a]\ntype = \"anthropic\"\ndefault_model = \"c\"\ndefault_max_tokens = 99\nmax_retries = 0\n\
         [providers.g]\ntype = \"gemini\"\ndefault_model = \"g\"\n\
         [routes]\ndefault = [\"o\", \"a:claude-x\", \"g:models:odd\"]\n",
        &[],
    )
    .unwrap();
    let o = &c.providers["o"];
    assert_eq!(
        o.api,
        Api::Openai {
            max_tokens_field: MaxTokensField::MaxCompletionTokens,
            embed: EmbedBatching {
                batch_size: 7,
                batch_tokens: 250_000
            }
        }
    );
    assert_eq!(o.max_retries, 2);
    let a = &c.providers["a"];
    assert_eq!(
        a.api,
        Api::Anthropic {
            default_max_tokens: 99
        }
    );
    assert_eq!((a.max_retries, a.api.embedding()), (0, None));
    assert_eq!(
        c.providers["g"].api.embedding().map(|e| e.batch_size),
        Some(100)
    );
    // Route entries are parsed once: the model is everything after the first ':'.
    let route: Vec<String> = c.routes["default"].iter().map(|e| e.to_string()).collect();
    assert_eq!(route, ["o", "a:claude-x", "g:models:odd"]);
    assert_eq!(c.routes["default"][2].model.as_deref(), Some("models:odd"));
    assert_eq!(c.routes["default"][0].model, None);
}

#[test]
fn an_embedding_route_through_anthropic_is_refused_at_load() {
    let e = load(
        "[providers.claude]\ntype = \"anthropic\"\ndefault_model = \"c\"\n[embed_routes]\ndefault = [\"claude\"]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("embed_routes.default")
            && e.contains("anthropic, which has no embeddings API"),
        "{e}"
    );
}

#[test]
fn an_api_key_file_is_read_trimmed_and_cannot_be_combined_with_an_env_variable() {
    let dir = std::env::temp_dir().join(format!("llmw-key-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    std::fs::write(&key, "sk-from-a-file\n").unwrap();
    let table = format!(
        "[providers.o]\ntype = \"openai\"\nbase_url = \"http://x/v1\"\ndefault_model = \"m\"\napi_key_file = \"{}\"\n",
        key.display()
    );
    let c = load(&table, &[]).unwrap();
    let got = c.providers["o"].api_key.as_ref().unwrap();
    assert_eq!(secrecy::ExposeSecret::expose_secret(got), "sk-from-a-file");
    let e = load(&format!("{table}api_key_env = \"K\"\n"), &[("K", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("providers.o.api_key_file"), "{e}");
    std::fs::write(&key, "  \n").unwrap();
    let e = load(&table, &[]).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn a_tenant_policy_naming_a_missing_route_is_refused_at_load() {
    let base = "[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n";
    assert!(
        load(
            &format!("{base}[tenants.a]\ntask_types = [\"default\"]\n"),
            &[]
        )
        .is_ok()
    );
    let e = load(
        &format!("{base}[tenants.a]\ntask_types = [\"nope\"]\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("tenants.a.task_types") && e.contains("nope"),
        "{e}"
    );
    let e = load(
        &format!("{base}[tenants.a]\nrefuse = true\nbudget = 3\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("budget"), "{e}");
}

#[test]
fn tenant_budgets_limits_and_weights_out_of_range_are_refused_naming_the_key() {
    let base = "[providers.f]\ntype = \"ollama\"\ndefault_model = \"m\"\n[tenants.a]\n";
    let ok = load(
        &format!(
            "{base}daily_budget_usd = 5.0\nmonthly_budget_tokens = 100\nbudget_warnings = [50, 100]\n\
             requests_per_minute = 10\ntokens_per_minute = 1000\nmax_in_flight = 3\nweight = 7\n"
        ),
        &[],
    )
    .unwrap();
    let a = &ok.tenants["a"];
    assert_eq!(
        (a.weight, a.max_in_flight, a.daily_budget_usd),
        (7, Some(3), Some(5.0))
    );
    for (bad, key) in [
        ("weight = 0", "tenants.a.weight"),
        ("weight = 1001", "tenants.a.weight"),
        ("max_in_flight = 0", "tenants.a.max_in_flight"),
        ("daily_budget_usd = -1.0", "tenants.a.daily_budget_usd"),
        ("monthly_budget_usd = nan", "tenants.a.monthly_budget_usd"),
        ("budget_warnings = [0]", "tenants.a.budget_warnings"),
        ("budget_warnings = [101]", "tenants.a.budget_warnings"),
    ] {
        let e = load(&format!("{base}{bad}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(key), "{bad}: {e}");
    }
}
