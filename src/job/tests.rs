//! Decoding, identity and bounds of jobs.

use super::*;
use crate::config::{NatsConfig, TenantPolicy};
use crate::contract::{FitMode, Message, Role, ServiceTier};

fn limits() -> Limits {
    Limits {
        max_job_bytes: 10_000,
        default_timeout: Duration::from_secs(120),
        max_timeout: Duration::from_secs(600),
        bounds: LimitsConfig {
            max_model_bytes: 64,
            max_metadata_bytes: 200,
            max_messages: 3,
            max_embed_inputs: 4,
            ..Default::default()
        },
        tenants: [
            (
                "blocked",
                TenantPolicy {
                    refuse: true,
                    task_types: None,
                    ..Default::default()
                },
            ),
            (
                "acme",
                TenantPolicy {
                    refuse: false,
                    task_types: Some(vec!["default".into(), "summarize".into()]),
                    ..Default::default()
                },
            ),
            (
                "thrifty",
                TenantPolicy {
                    daily_budget_tokens: Some(1000),
                    budget_max_tokens: 77,
                    ..Default::default()
                },
            ),
        ]
        .into_iter()
        .map(|(t, p)| (t.to_string(), p))
        .collect(),
        cache_task_types: Default::default(),
        tier_task_types: [("nightly".to_string(), ServiceTier::Batch)]
            .into_iter()
            .collect(),
        batch_deadline: Duration::from_secs(86_400),
    }
}

/// Knows one provider, `openai`, and allows any pin of it.
const OPENAI: crate::fuzzing::OneProvider = crate::fuzzing::OneProvider("openai");

fn decode_with(kind: JobKind, json: &str, delivery: &Delivery<'_>) -> Result<Job, Box<InvalidJob>> {
    let replies = (NatsConfig {
        reply_prefixes: Some(vec!["r.".into(), "llm.replies.".into()]),
        ..Default::default()
    })
    .reply_policy()
    .unwrap();
    let rules = Rules {
        limits: &limits(),
        replies: &replies,
        catalog: &OPENAI,
    };
    decode(kind, json.as_bytes(), delivery, &rules)
}

fn gen_job(json: &str) -> Result<Job, Box<InvalidJob>> {
    decode_with(JobKind::Generate, json, &Delivery::default())
}

#[test]
fn a_minimal_job_gets_defaults() {
    let job = gen_job(r#"{"prompt":"hi"}"#).unwrap();
    assert_eq!(job.envelope.tenant, "default");
    assert_eq!(job.envelope.trace_id, job.envelope.job_id.to_string());
    assert_eq!(job.envelope.job_id.get_version_num(), 7);
    assert_eq!(job.timeout, Duration::from_secs(120));
    let JobBody::Generate(g) = job.body else {
        panic!()
    };
    assert!(g.stream);
    assert_eq!(g.messages, vec![Message::text(Role::User, "hi")]);
}

#[test]
fn prompt_is_appended_after_messages_and_system_messages_join_the_system_prompt() {
    let job = gen_job(r#"{"system_prompt":"S","messages":[{"role":"system","content":"T"},{"role":"user","content":"a"},{"role":"assistant","content":"b"}],"prompt":"c","context":["k1"]}"#).unwrap();
    let JobBody::Generate(g) = job.body else {
        panic!()
    };
    let roles: Vec<_> = g.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(roles, ["a", "b", "c"]);
    assert_eq!(g.system.as_deref(), Some("S\n\nT"));
    assert_eq!(g.context, ["k1"]);
    // Providers get the context block after the system prompt.
    let sent = g.as_sent();
    assert_eq!(sent.system.as_deref(), Some("S\n\nT\n\nContext:\n[1] k1\n"));
    assert!(sent.context.is_empty());
}

#[test]
fn cache_breakpoints_are_read_bounded_and_bring_a_prompt_cache_key() {
    use crate::contract::CacheTtl;
    let job = gen_job(r#"{"tenant":"acme","messages":[{"role":"system","content":"S","cache":"1h"},{"role":"user","content":"doc","cache":"5m"},{"role":"user","content":"q"}],"tools":[{"name":"f","cache":"5m"}]}"#).unwrap();
    let JobBody::Generate(g) = job.body else {
        panic!()
    };
    assert_eq!(g.system_cache, Some(CacheTtl::OneHour));
    assert_eq!(g.messages[0].cache, Some(CacheTtl::FiveMinutes));
    assert_eq!(g.messages[1].cache, None);
    assert_eq!(g.tools[0].cache, Some(CacheTtl::FiveMinutes));
    assert_eq!(g.cache_breakpoints(), 3);
    // Derived from tenant and route: stable, and not the tenant's name.
    let key = g.prompt_cache_key.clone().unwrap();
    assert!(
        key.starts_with("llmw-") && key.len() == 21 && !key.contains("acme"),
        "{key}"
    );
    let again =
        gen_job(r#"{"tenant":"acme","messages":[{"role":"user","content":"x","cache":"5m"}]}"#)
            .unwrap();
    let JobBody::Generate(again) = again.body else {
        panic!()
    };
    assert_eq!(again.prompt_cache_key, Some(key.clone()));
    let other = gen_job(r#"{"tenant":"acme","task_type":"summarize","messages":[{"role":"user","content":"x","cache":"5m"}]}"#).unwrap();
    let JobBody::Generate(other) = other.body else {
        panic!()
    };
    assert_ne!(other.prompt_cache_key, Some(key));
    // The job's own key wins; no marks and no key: none sent.
    let own = gen_job(r#"{"prompt":"x","prompt_cache_key":"mine"}"#).unwrap();
    let JobBody::Generate(own) = own.body else {
        panic!()
    };
    assert_eq!(own.prompt_cache_key.as_deref(), Some("mine"));
    let plain = gen_job(r#"{"prompt":"x"}"#).unwrap();
    let JobBody::Generate(plain) = plain.body else {
        panic!()
    };
    assert_eq!(plain.prompt_cache_key, None);
    // Bounds: a lifetime other than 5m or 1h, more than four breakpoints, a bad key.
    for (json, says) in [
        (
            r#"{"messages":[{"role":"user","content":"x","cache":"1d"}]}"#,
            "messages[0].cache",
        ),
        (
            r#"{"messages":[{"role":"system","content":"s","cache":"5m"},{"role":"user","content":"x","cache":"5m"}],"tools":[{"name":"a","cache":"5m"},{"name":"b","cache":"5m"},{"name":"c","cache":"5m"}]}"#,
            "5 cache breakpoints",
        ),
        (
            r#"{"prompt":"x","prompt_cache_key":""}"#,
            "prompt_cache_key",
        ),
    ] {
        let e = gen_job(json).err().unwrap();
        assert!(e.reason.contains(says), "{json}: {}", e.reason);
    }
}

#[test]
fn under_a_budget_a_job_without_max_tokens_gets_the_tenants_cap() {
    let max = |json: &str| match gen_job(json).unwrap().body {
        JobBody::Generate(g) => g.options.max_tokens,
        JobBody::Embed(_) | JobBody::Image(_) => None,
    };
    assert_eq!(max(r#"{"tenant":"thrifty","prompt":"x"}"#), Some(77));
    assert_eq!(
        max(r#"{"tenant":"thrifty","prompt":"x","options":{"max_tokens":5}}"#),
        Some(5)
    );
    // No budget: nothing changes.
    assert_eq!(max(r#"{"tenant":"acme","prompt":"x"}"#), None);
}

#[test]
fn options_fit_is_trim_by_default_or_strict_and_nothing_else() {
    let g = |json: &str| match gen_job(json).map(|j| j.body) {
        Ok(JobBody::Generate(g)) => Ok(g.options.fit),
        Ok(_) => panic!(),
        Err(e) => Err(e.reason),
    };
    assert_eq!(g(r#"{"prompt":"p"}"#), Ok(FitMode::Trim));
    assert_eq!(
        g(r#"{"prompt":"p","options":{"fit":"strict"}}"#),
        Ok(FitMode::Strict)
    );
    assert!(g(r#"{"prompt":"p","options":{"fit":"squeeze"}}"#).is_err());
}

#[test]
fn invalid_jobs_keep_their_identity_for_the_answer() {
    let id = "0192f0c4-0000-7000-8000-000000000001";
    let err = gen_job(&format!(
        r#"{{"job_id":"{id}","reply_to":"r.1","stream":"yes","prompt":"x"}}"#
    ))
    .unwrap_err();
    assert_eq!(err.envelope.job_id.to_string(), id);
    assert_eq!(err.envelope.reply_to.as_deref(), Some("r.1"));
    assert!(err.reason.starts_with("stream"), "{}", err.reason);
}

#[test]
fn each_kind_of_invalid_job_is_refused_with_a_reason() {
    for (json, starts) in [
        ("not json", "job is not valid JSON"),
        ("[1]", "job must be a JSON object"),
        (r#"{"system_prompt":"x"}"#, "prompt"),
        (r#"{"prompt":"x","provider":"nope"}"#, "provider"),
        (
            r#"{"prompt":"x","options":{"temperature":9}}"#,
            "options.temperature",
        ),
        (r#"{"prompt":"x","options":{"bogus":1}}"#, "options"),
        (
            r#"{"prompt":"x","options":{"seed":2147483648}}"#,
            "options.seed",
        ),
        (r#"{"prompt":"x","options":{"seed":-1}}"#, "options.seed"),
        (r#"{"prompt":"x","cache":"maybe"}"#, "cache"),
        (r#"{"prompt":"x","timeout_ms":0}"#, "timeout_ms"),
        (r#"{"prompt":"x","job_id":"abc"}"#, "job_id"),
        (r#"{"prompt":"x","reply_to":"r.*"}"#, "reply_to"),
        (r#"{"prompt":"x","model":"a/../b"}"#, "model"),
    ] {
        let err = gen_job(json).unwrap_err();
        assert!(err.reason.starts_with(starts), "{json}: {}", err.reason);
    }
}

#[test]
fn a_huge_number_is_quoted_short_in_the_reason() {
    for json in [
        r#"{"prompt":"x","options":{"temperature":1e308}}"#,
        r#"{"prompt":"x","options":{"top_p":-1e300}}"#,
    ] {
        let err = gen_job(json).unwrap_err();
        assert!(err.reason.len() < 60, "{json}: {}", err.reason);
        assert!(
            err.reason.contains("e308") || err.reason.contains("e300"),
            "{}",
            err.reason
        );
    }
}

#[test]
fn a_refused_reply_subject_is_named_and_never_kept_for_publishing() {
    let err = gen_job(r#"{"prompt":"x","reply_to":"$JS.API.STREAM.PURGE.LLM_JOBS"}"#).unwrap_err();
    assert_eq!(err.envelope.reply_to, None);
    assert!(
        err.reason.contains("$JS.API.STREAM.PURGE.LLM_JOBS") && err.reason.contains("under $"),
        "{}",
        err.reason
    );
}

#[test]
fn the_body_id_and_the_dedup_header_must_agree() {
    let id = "0192f0c4-0000-7000-8000-000000000001";
    let other = "0192f0c4-0000-7000-8000-000000000002";
    let json = format!(r#"{{"job_id":"{id}","prompt":"x"}}"#);
    let same = Delivery {
        msg_id: Some(id),
        ..Default::default()
    };
    assert!(decode_with(JobKind::Generate, &json, &same).is_ok());
    let different = Delivery {
        msg_id: Some(other),
        ..Default::default()
    };
    let err = decode_with(JobKind::Generate, &json, &different).unwrap_err();
    assert!(err.reason.contains("Nats-Msg-Id"), "{}", err.reason);
    let not_uuid = Delivery {
        msg_id: Some("order-17"),
        ..Default::default()
    };
    let err = decode_with(JobKind::Generate, r#"{"prompt":"x"}"#, &not_uuid).unwrap_err();
    assert!(err.reason.starts_with("Nats-Msg-Id"), "{}", err.reason);
    // The header alone names the job.
    let job = decode_with(JobKind::Generate, r#"{"prompt":"x"}"#, &same).unwrap();
    assert_eq!(job.envelope.job_id.to_string(), id);
}

#[test]
fn a_job_without_an_id_gets_a_fresh_random_one_not_a_predictable_one() {
    let a = gen_job("garbage").unwrap_err().envelope.job_id;
    let b = gen_job("garbage").unwrap_err().envelope.job_id;
    assert_ne!(a, b);
    assert_eq!(a.get_version_num(), 7);
}

#[test]
fn a_tenant_from_the_subject_overrides_the_bodys_claim() {
    let delivery = Delivery {
        subject_tenant: Some("acme"),
        ..Default::default()
    };
    let job = decode_with(
        JobKind::Generate,
        r#"{"prompt":"x","tenant":"globex"}"#,
        &delivery,
    )
    .unwrap();
    assert_eq!(job.envelope.tenant, "acme");
}

#[test]
fn oversized_jobs_are_refused_before_parsing_with_both_sizes() {
    let big = format!(r#"{{"prompt":"{}","reply_to":"r.1"}}"#, "x".repeat(20_000));
    let err = gen_job(&big).unwrap_err();
    assert!(
        err.reason.contains(&big.len().to_string()) && err.reason.contains("10000"),
        "{}",
        err.reason
    );
    // Not parsed: the body's reply subject is unknown.
    assert_eq!(err.envelope.reply_to, None);
}

#[test]
fn a_reason_quotes_only_a_short_prefix_of_a_value() {
    let secret = format!("PRIVATE {}", "y".repeat(500));
    let err = gen_job(&format!(r#"{{"prompt":"x","stream":"{secret}"}}"#)).unwrap_err();
    assert!(err.reason.starts_with("stream"), "{}", err.reason);
    assert!(err.reason.len() < 160, "{}", err.reason);
    assert!(!err.reason.contains(&"y".repeat(60)), "{}", err.reason);
    let err = gen_job(&format!(r#"{{"prompt":"x","options":{{"{secret}":1}}}}"#)).unwrap_err();
    assert!(err.reason.len() < 260, "{}", err.reason);
    assert!(!err.reason.contains(&"y".repeat(60)), "{}", err.reason);
}

#[test]
fn embed_jobs_refuse_empty_input() {
    let e = |j: &str| decode_with(JobKind::Embed, j, &Delivery::default());
    assert!(e(r#"{"input":["a","b"],"options":{"dimensions":8}}"#).is_ok());
    assert!(
        e(r#"{"input":[]}"#)
            .unwrap_err()
            .reason
            .starts_with("input")
    );
    assert!(
        e(r#"{"input":["a",""]}"#)
            .unwrap_err()
            .reason
            .starts_with("input[1]")
    );
}

#[test]
fn a_nul_in_any_text_field_is_refused_naming_the_field() {
    for (json, field) in [
        (r#"{"prompt":"a\u0000b"}"#, "prompt"),
        (
            r#"{"prompt":"x","system_prompt":"\u0000"}"#,
            "system_prompt",
        ),
        (
            r#"{"messages":[{"role":"user","content":"\u0000"}]}"#,
            "messages[0].content",
        ),
        (r#"{"prompt":"x","context":["ok","\u0000"]}"#, "context[1]"),
        (
            r#"{"prompt":"x","options":{"stop":["\u0000"]}}"#,
            "options.stop",
        ),
        (r#"{"prompt":"x","tenant":"a\u0000"}"#, "tenant"),
        (r#"{"prompt":"x","task_type":"t\n"}"#, "task_type"),
        (r#"{"prompt":"x","trace_id":"\u0000"}"#, "trace_id"),
        (r#"{"prompt":"x","metadata":{"k":"\u0000"}}"#, "metadata"),
        (r#"{"prompt":"x","metadata":{"\u0000":1}}"#, "metadata"),
    ] {
        let err = gen_job(json).unwrap_err();
        assert!(err.reason.starts_with(field), "{json}: {}", err.reason);
    }
    let e = decode_with(
        JobKind::Embed,
        r#"{"input":["a","\u0000"]}"#,
        &Delivery::default(),
    )
    .unwrap_err();
    assert!(e.reason.starts_with("input[1]"), "{}", e.reason);
}

#[test]
fn a_refused_name_is_recorded_without_its_control_characters() {
    let err = gen_job(r#"{"prompt":"x","tenant":"ac\u0000me"}"#).unwrap_err();
    assert_eq!(err.envelope.tenant, "ac\u{fffd}me");
    let err = gen_job(&format!(
        r#"{{"prompt":"x","trace_id":"{}"}}"#,
        "t".repeat(500)
    ))
    .unwrap_err();
    assert!(
        err.reason.contains("limits.max_name_bytes"),
        "{}",
        err.reason
    );
    assert_eq!(err.envelope.trace_id.len(), 128);
}

#[test]
fn metadata_is_bounded_as_echoed_and_in_depth_and_dropped_when_refused() {
    // 20 numbers written `1e15` are 100 bytes in the job but 380 as echoed.
    let numbers = vec!["1e15"; 20].join(",");
    let err = gen_job(&format!(r#"{{"prompt":"x","metadata":[{numbers}]}}"#)).unwrap_err();
    assert!(
        err.reason.starts_with("metadata: ") && err.reason.contains("as echoed"),
        "{}",
        err.reason
    );
    assert_eq!(err.envelope.metadata, serde_json::Value::Null);
    let deep = format!("{}1{}", "[".repeat(20), "]".repeat(20));
    let err = gen_job(&format!(r#"{{"prompt":"x","metadata":{deep}}}"#)).unwrap_err();
    assert!(err.reason.contains("max_metadata_depth"), "{}", err.reason);
    assert!(gen_job(r#"{"prompt":"x","metadata":{"a":[1,{"b":"c"}]}}"#).is_ok());
}

#[test]
fn counts_sizes_and_the_output_ceiling_are_bounded_with_the_bound_named() {
    let four = r#"{"role":"user","content":"m"}"#.repeat(4).replace("}{", "},{");
    for (json, names) in [
        (format!(r#"{{"messages":[{four}]}}"#), "limits.max_messages"),
        (
            r#"{"prompt":"x","options":{"max_tokens":200000}}"#.to_string(),
            "limits.max_output_tokens",
        ),
        (
            format!(
                r#"{{"prompt":"x","options":{{"stop":["{}"]}}}}"#,
                "s".repeat(300)
            ),
            "256 bytes",
        ),
    ] {
        let err = gen_job(&json).unwrap_err();
        assert!(err.reason.contains(names), "{json}: {}", err.reason);
    }
    let e = decode_with(
        JobKind::Embed,
        r#"{"input":["a","b","c","d","e"]}"#,
        &Delivery::default(),
    )
    .unwrap_err();
    assert!(
        e.reason.contains("5 texts") && e.reason.contains("limits.max_embed_inputs"),
        "{}",
        e.reason
    );
}

#[test]
fn the_prompt_text_together_is_bounded() {
    let limits = Limits {
        bounds: LimitsConfig {
            max_prompt_bytes: 10,
            ..Default::default()
        },
        ..limits()
    };
    let replies = NatsConfig::default().reply_policy().unwrap();
    let rules = Rules {
        limits: &limits,
        replies: &replies,
        catalog: &OPENAI,
    };
    let job = br#"{"system_prompt":"12345","prompt":"123","context":["123"]}"#;
    let err = decode(JobKind::Generate, job, &Delivery::default(), &rules).unwrap_err();
    assert!(
        err.reason.contains("11 bytes") && err.reason.contains("limits.max_prompt_bytes"),
        "{}",
        err.reason
    );
}

#[test]
fn a_deadline_or_an_expiry_after_publication_sets_when_the_job_expires_the_earlier_winning() {
    let published: DateTime<Utc> = "2026-01-01T10:00:00Z".parse().unwrap();
    let delivery = Delivery {
        published: Some(published),
        ..Default::default()
    };
    let expiry = |json: &str| {
        decode_with(JobKind::Generate, json, &delivery)
            .map(|j| j.expires_at.map(|t| t.to_rfc3339()))
            .map_err(|e| e.reason)
    };
    assert_eq!(expiry(r#"{"prompt":"x"}"#), Ok(None));
    assert_eq!(
        expiry(r#"{"prompt":"x","deadline":"2026-01-01T12:00:00+02:00"}"#),
        Ok(Some("2026-01-01T10:00:00+00:00".into()))
    );
    assert_eq!(
        expiry(r#"{"prompt":"x","expires_in_ms":1500}"#),
        Ok(Some("2026-01-01T10:00:01.500+00:00".into()))
    );
    assert_eq!(
        expiry(r#"{"prompt":"x","expires_in_ms":1500,"deadline":"2026-01-01T10:00:01Z"}"#),
        Ok(Some("2026-01-01T10:00:01+00:00".into()))
    );
    let embed = decode_with(
        JobKind::Embed,
        r#"{"input":["a"],"expires_in_ms":1000}"#,
        &delivery,
    )
    .unwrap();
    assert_eq!(
        embed.expires_at,
        Some(published + chrono::TimeDelta::seconds(1))
    );
    for (json, field) in [
        (r#"{"prompt":"x","deadline":"tomorrow"}"#, "deadline"),
        (r#"{"prompt":"x","deadline":7}"#, "deadline"),
        (r#"{"prompt":"x","expires_in_ms":0}"#, "expires_in_ms"),
        (
            r#"{"prompt":"x","expires_in_ms":99999999999999}"#,
            "expires_in_ms",
        ),
    ] {
        let reason = expiry(json).unwrap_err();
        assert!(reason.starts_with(field), "{json}: {reason}");
    }
}

#[test]
fn tenant_policies_refuse_tenants_and_task_types_they_do_not_allow() {
    let reason = |json: &str| gen_job(json).err().map(|e| e.reason);
    assert_eq!(reason(r#"{"prompt":"x","tenant":"acme"}"#), None);
    assert_eq!(
        reason(r#"{"prompt":"x","tenant":"acme","task_type":"summarize"}"#),
        None
    );
    let r = reason(r#"{"prompt":"x","tenant":"acme","task_type":"code"}"#).unwrap();
    assert!(r.starts_with("task_type") && r.contains("summarize"), "{r}");
    let r = reason(r#"{"prompt":"x","tenant":"blocked"}"#).unwrap();
    assert!(r.starts_with("tenant") && r.contains("refused"), "{r}");
    // No `default` policy: other tenants go anywhere.
    assert_eq!(
        reason(r#"{"prompt":"x","tenant":"other","task_type":"code"}"#),
        None
    );
    // A `default` that refuses: only tenants with a table of their own get in.
    let mut strict = limits();
    strict.tenants.insert(
        "default".into(),
        TenantPolicy {
            refuse: true,
            task_types: None,
            ..Default::default()
        },
    );
    let replies = NatsConfig::default().reply_policy().unwrap();
    let rules = Rules {
        limits: &strict,
        replies: &replies,
        catalog: &OPENAI,
    };
    let decode_as = |tenant: &str| {
        let json = format!(r#"{{"prompt":"x","tenant":"{tenant}"}}"#);
        decode(
            JobKind::Generate,
            json.as_bytes(),
            &Delivery::default(),
            &rules,
        )
    };
    let r = decode_as("stranger").unwrap_err().reason;
    assert!(r.contains("no policy here"), "{r}");
    assert!(decode_as("acme").is_ok());
}

#[test]
fn a_valid_traceparent_names_the_jobs_trace() {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let delivery = Delivery {
        traceparent: Some(tp),
        ..Default::default()
    };
    let body = r#"{"prompt":"x","trace_id":"from-the-body"}"#;
    let job = decode_with(JobKind::Generate, body, &delivery).unwrap();
    assert_eq!(job.envelope.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    let garbage = Delivery {
        traceparent: Some("00-nope"),
        ..Default::default()
    };
    let job = decode_with(JobKind::Generate, body, &garbage).unwrap();
    assert_eq!(job.envelope.trace_id, "from-the-body");
}

#[test]
fn image_jobs_decode_with_their_options_and_bounds() {
    let image = |j: &str| decode_with(JobKind::Image, j, &Delivery::default());
    let job = image(
        r#"{"prompt":"a red fox","model":"gpt-image-1","options":{"size":"1024x1024","quality":"Medium","n":2,"output_format":"webp","background":"transparent"}}"#,
    )
    .unwrap();
    let JobBody::Image(req) = job.body else {
        panic!("not an image job")
    };
    assert_eq!(req.prompt, "a red fox");
    assert_eq!(req.n, 2);
    assert_eq!(req.size.as_deref(), Some("1024x1024"));
    assert_eq!(req.quality.as_deref(), Some("medium"));
    assert_eq!(req.output_format, crate::contract::ImageFormat::Webp);
    assert_eq!(req.background.as_deref(), Some("transparent"));
    let JobBody::Image(plain) = image(r#"{"prompt":"x"}"#).unwrap().body else {
        panic!("not an image job")
    };
    assert_eq!(
        (plain.n, plain.size, plain.output_format),
        (1, None, Default::default())
    );
    for (json, says) in [
        (r#"{"prompt":""}"#, "prompt"),
        (r#"{"input":["x"]}"#, "prompt"),
        (r#"{"prompt":"x","options":{"n":0}}"#, "options.n"),
        (
            r#"{"prompt":"x","options":{"n":5}}"#,
            "limits.max_generated_images",
        ),
        (
            r#"{"prompt":"x","options":{"size":"huge"}}"#,
            "options.size",
        ),
        (
            r#"{"prompt":"x","options":{"size":"0x10"}}"#,
            "options.size",
        ),
        (
            r#"{"prompt":"x","options":{"quality":"a b"}}"#,
            "options.quality",
        ),
        (
            r#"{"prompt":"x","options":{"output_format":"bmp"}}"#,
            "output_format",
        ),
        (r#"{"prompt":"x","options":{"style":"vivid"}}"#, "style"),
        (r#"{"prompt":"x\u0000"}"#, "prompt"),
    ] {
        let e = image(json)
            .err()
            .unwrap_or_else(|| panic!("{json} was accepted"));
        assert!(e.reason.contains(says), "{json}: {}", e.reason);
    }
}

#[test]
fn a_service_tier_is_read_or_comes_from_the_task_type_and_a_batch_job_has_a_deadline() {
    let tier = |job: &Job| match &job.body {
        JobBody::Generate(r) => (r.service_tier, r.stream),
        _ => unreachable!(),
    };
    let plain = gen_job(r#"{"prompt":"hi"}"#).unwrap();
    assert_eq!(tier(&plain), (ServiceTier::Standard, true));
    assert_eq!(plain.expires_at, None);
    let flex = gen_job(r#"{"prompt":"hi","service_tier":"flex"}"#).unwrap();
    assert_eq!(tier(&flex), (ServiceTier::Flex, true));
    // A batch job is answered whole, and without a deadline of its own gets the default.
    let published = Utc::now() - chrono::TimeDelta::hours(1);
    let delivery = Delivery {
        published: Some(published),
        ..Default::default()
    };
    let batch = decode_with(
        JobKind::Generate,
        r#"{"prompt":"hi","service_tier":"batch"}"#,
        &delivery,
    )
    .unwrap();
    assert_eq!(tier(&batch), (ServiceTier::Batch, false));
    assert_eq!(
        batch.expires_at,
        Some(published + chrono::TimeDelta::days(1))
    );
    let own = gen_job(r#"{"prompt":"hi","service_tier":"batch","expires_in_ms":60000}"#).unwrap();
    assert!(own.expires_at.unwrap() < Utc::now() + chrono::TimeDelta::seconds(61));
    // By task type, unless the job says.
    let nightly = gen_job(r#"{"prompt":"hi","task_type":"nightly"}"#).unwrap();
    assert_eq!(tier(&nightly).0, ServiceTier::Batch);
    let urgent =
        gen_job(r#"{"prompt":"hi","task_type":"nightly","service_tier":"standard"}"#).unwrap();
    assert_eq!(tier(&urgent).0, ServiceTier::Standard);
    let bad = gen_job(r#"{"prompt":"hi","service_tier":"cheap"}"#).unwrap_err();
    assert!(bad.reason.starts_with("service_tier:"), "{}", bad.reason);
}
