//! Checks that need the whole configuration, made once at load.

use super::{Api, Config, ConfigError, RouteEntry, invalid};

impl Config {
    /// Checks that need the whole picture; fills the implicit default route.
    pub(crate) fn validate(&mut self) -> Result<(), ConfigError> {
        if self.worker.max_in_flight == 0 {
            return Err(invalid("worker.max_in_flight", "must be at least 1"));
        }
        if self.nats.duplicate_window_secs < 120 {
            return Err(invalid(
                "nats.duplicate_window_secs",
                "must be at least 120 (the contract's dedup window)",
            ));
        }
        if self.nats.ack_wait_secs < 3 {
            return Err(invalid("nats.ack_wait_secs", "must be at least 3"));
        }
        if self.nats.results_max_age_secs == 0 {
            return Err(invalid("nats.results_max_age_secs", "must be positive"));
        }
        if self.nats.cancel_max_age_secs == 0 {
            return Err(invalid("nats.cancel_max_age_secs", "must be positive"));
        }
        if self.nats.dead_max_age_secs == 0 {
            return Err(invalid("nats.dead_max_age_secs", "must be positive"));
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return Err(invalid(
                "nats.replicas",
                "must be 1 to 5 (JetStream's limit; 3 on a 3-node cluster)",
            ));
        }
        if self.nats.start_timeout_secs == 0 {
            return Err(invalid("nats.start_timeout_secs", "must be positive"));
        }
        if self.health.probe_timeout_ms == 0 {
            return Err(invalid("health.probe_timeout_ms", "must be positive"));
        }
        if self.health.probe_max_tokens == 0 {
            return Err(invalid("health.probe_max_tokens", "must be at least 1"));
        }
        if self.health.probe_tenant.trim().is_empty() {
            return Err(invalid("health.probe_tenant", "must not be empty"));
        }
        if self.gateway.max_concurrent == 0 {
            return Err(invalid("gateway.max_concurrent", "must be at least 1"));
        }
        for (key, value) in [
            ("gateway.header_timeout_ms", self.gateway.header_timeout_ms),
            ("gateway.body_timeout_ms", self.gateway.body_timeout_ms),
            ("gateway.write_timeout_ms", self.gateway.write_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.gateway.max_connections == 0 {
            return Err(invalid("gateway.max_connections", "must be at least 1"));
        }
        if self.gateway.max_concurrent_per_tenant == Some(0) {
            return Err(invalid(
                "gateway.max_concurrent_per_tenant",
                "must be at least 1",
            ));
        }
        if self.gateway.request_timeout_ms == 0 {
            return Err(invalid("gateway.request_timeout_ms", "must be positive"));
        }
        if self.worker.max_deliver < 2 {
            return Err(invalid("worker.max_deliver", "must be at least 2"));
        }
        if self.worker.fair_window > self.worker.max_in_flight
            && self.worker.fair_window_bytes < self.worker.max_job_bytes
        {
            return Err(invalid(
                "worker.fair_window_bytes",
                "must hold at least one job (worker.max_job_bytes)",
            ));
        }
        if self.cache.ttl_secs == 0 || self.cache.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "cache",
                "ttl_secs must be positive and max_bytes at least 1 MiB",
            ));
        }
        let b = &self.batch;
        if !(1..=crate::config::MAX_BATCH_JOBS).contains(&b.max_jobs) {
            return Err(invalid(
                "batch.max_jobs",
                format!("must be 1 to {}", crate::config::MAX_BATCH_JOBS),
            ));
        }
        if b.max_wait_secs == 0 || b.poll_ms < 50 || b.lease_secs < 2 {
            return Err(invalid(
                "batch",
                "max_wait_secs must be positive, poll_ms at least 50 and lease_secs at least 2",
            ));
        }
        if b.default_deadline_secs <= b.online_margin_secs {
            return Err(invalid(
                "batch.default_deadline_secs",
                "must be longer than batch.online_margin_secs",
            ));
        }
        if self.recorder.ack_wait_secs < 2 {
            return Err(invalid("recorder.ack_wait_secs", "must be at least 2"));
        }
        for (key, value) in [
            ("nats.subject_prefix", &self.nats.subject_prefix),
            ("nats.jobs_stream", &self.nats.jobs_stream),
            ("nats.results_stream", &self.nats.results_stream),
            ("nats.dead_stream", &self.nats.dead_stream),
            ("nats.cancel_stream", &self.nats.cancel_stream),
            ("nats.tenant_bucket", &self.nats.tenant_bucket),
            ("nats.cache_bucket", &self.nats.cache_bucket),
            ("nats.images_bucket", &self.nats.images_bucket),
            ("nats.batch_stream", &self.nats.batch_stream),
            ("nats.batch_bucket", &self.nats.batch_bucket),
            ("nats.consumer_prefix", &self.nats.consumer_prefix),
        ] {
            if value.is_empty() || value.contains([' ', '*', '>', '\t']) {
                return Err(invalid(key, "must be a non-empty NATS token"));
            }
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_prompt_bytes", l.max_prompt_bytes),
            ("limits.max_messages", l.max_messages),
            ("limits.max_context_items", l.max_context_items),
            ("limits.max_metadata_bytes", l.max_metadata_bytes),
            ("limits.max_metadata_depth", l.max_metadata_depth),
            ("limits.max_name_bytes", l.max_name_bytes),
            ("limits.max_model_bytes", l.max_model_bytes),
            ("limits.max_output_tokens", l.max_output_tokens as usize),
            ("limits.max_embed_inputs", l.max_embed_inputs),
            ("limits.max_embed_input_bytes", l.max_embed_input_bytes),
            ("limits.max_output_bytes", l.max_output_bytes),
            ("limits.max_image_bytes", l.max_image_bytes),
            ("limits.max_generated_images", l.max_generated_images),
            (
                "limits.max_generated_image_bytes",
                l.max_generated_image_bytes,
            ),
            ("limits.max_schema_bytes", l.max_schema_bytes),
            ("limits.max_schema_depth", l.max_schema_depth),
            ("limits.max_response_bytes", l.max_response_bytes),
            ("limits.max_error_body_bytes", l.max_error_body_bytes),
            ("limits.max_line_bytes", l.max_line_bytes),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if let Some(bad) = l
            .image_url_hosts
            .iter()
            .find(|e| super::ImageHost::parse(e).is_none())
        {
            return Err(invalid(
                "limits.image_url_hosts",
                format!("{bad:?} is neither a host name (HTTPS) nor an http(s)://host:port origin"),
            ));
        }
        if self.nats.inbox_prefix.is_empty()
            || self.nats.inbox_prefix.starts_with('$')
            || !crate::contract::is_literal_subject(&self.nats.inbox_prefix)
        {
            return Err(invalid(
                "nats.inbox_prefix",
                "must be a literal subject not under $",
            ));
        }
        self.nats
            .reply_policy()
            .map_err(|e| invalid("nats.reply_prefixes", e))?;
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            return Err(invalid(
                "nats.tls_cert",
                "nats.tls_cert and nats.tls_key must be set together",
            ));
        }
        if self.nats.password.is_some() && self.nats.user.is_none() {
            return Err(invalid("nats.password", "needs nats.user"));
        }
        if self.worker.default_timeout_ms == 0
            || self.worker.default_timeout_ms > self.worker.max_timeout_ms
        {
            return Err(invalid(
                "worker.default_timeout_ms",
                "must be positive and at most worker.max_timeout_ms",
            ));
        }
        for (name, p) in &self.providers {
            if name.is_empty() || name.contains(':') {
                return Err(invalid(
                    format!("providers.{name}"),
                    "a provider name must be non-empty and contain no ':'",
                ));
            }
            if let Some((model, _)) = p.context_windows.iter().find(|(_, w)| **w == 0) {
                return Err(invalid(
                    format!("providers.{name}.context_windows.{model}"),
                    "a context window is a positive number of tokens",
                ));
            }
            if matches!(p.api, Api::Openai { .. }) {
                let base = p.base_url.as_deref().ok_or_else(|| {
                    invalid(
                        format!("providers.{name}.base_url"),
                        "required for type openai",
                    )
                })?;
                reqwest::Url::parse(base).map_err(|e| {
                    invalid(
                        format!("providers.{name}.base_url"),
                        format!("not a URL: {e}"),
                    )
                })?;
            }
        }
        if self.providers.is_empty() {
            // Clients (`submit`, `usage`, `migrate`) need no providers; `run` checks with
            // [`Config::require_providers`].
            return Ok(());
        }
        if !self.routes.contains_key("default") {
            if self.providers.len() == 1 {
                let only = self
                    .providers
                    .keys()
                    .map(|p| RouteEntry::parse(p))
                    .collect();
                self.routes.insert("default".into(), only);
            } else {
                return Err(invalid(
                    "routes.default",
                    "required when more than one provider is configured",
                ));
            }
        }
        for task in &self.pin_any_provider {
            if !self.routes.contains_key(task)
                && !self.embed_routes.contains_key(task)
                && !self.image_routes.contains_key(task)
            {
                return Err(invalid(
                    "pin_any_provider",
                    format!("names route '{task}', which does not exist"),
                ));
            }
        }
        for (tenant, policy) in &self.tenants {
            let budgets = [
                ("daily_budget_usd", policy.daily_budget_usd),
                ("monthly_budget_usd", policy.monthly_budget_usd),
            ];
            for (key, usd) in budgets {
                if usd.is_some_and(|b| !(b.is_finite() && b >= 0.0)) {
                    return Err(invalid(
                        format!("tenants.{tenant}.{key}"),
                        "must be a number of USD, 0 or more",
                    ));
                }
            }
            if policy.budget_max_tokens == 0 {
                return Err(invalid(
                    format!("tenants.{tenant}.budget_max_tokens"),
                    "must be 1 or more",
                ));
            }
            if !(1..=1000).contains(&policy.weight) {
                return Err(invalid(
                    format!("tenants.{tenant}.weight"),
                    "must be between 1 and 1000",
                ));
            }
            if policy.max_in_flight == Some(0) {
                return Err(invalid(
                    format!("tenants.{tenant}.max_in_flight"),
                    "must be at least 1 (use refuse = true to refuse every job)",
                ));
            }
            if let Some(pct) = policy
                .budget_warnings
                .iter()
                .find(|p| **p == 0 || **p > 100)
            {
                return Err(invalid(
                    format!("tenants.{tenant}.budget_warnings"),
                    format!("{pct} is not a percentage of the budget between 1 and 100"),
                ));
            }
            for task in policy.task_types.iter().flatten() {
                if !self.routes.contains_key(task)
                    && !self.embed_routes.contains_key(task)
                    && !self.image_routes.contains_key(task)
                    && task != "default"
                {
                    return Err(invalid(
                        format!("tenants.{tenant}.task_types"),
                        format!("names route '{task}', which does not exist"),
                    ));
                }
            }
        }
        for task in self.strategies.keys() {
            if !self.routes.contains_key(task) {
                return Err(invalid(
                    format!("strategies.{task}"),
                    "names a route that does not exist",
                ));
            }
        }
        type Check = fn(&Config, &[RouteEntry]) -> Result<(), String>;
        let kinds = [
            (
                "image_routes",
                &self.image_routes,
                Config::check_image_makers as Check,
            ),
            (
                "embed_routes",
                &self.embed_routes,
                Config::check_embedders as Check,
            ),
        ];
        for (table, routes, check) in kinds {
            for (task, entries) in routes {
                check(self, entries).map_err(|e| invalid(format!("{table}.{task}"), e))?;
                if entries.is_empty() {
                    return Err(invalid(
                        format!("{table}.{task}"),
                        "must list at least one provider",
                    ));
                }
            }
        }
        for (task, entries) in &self.routes {
            if entries.is_empty() {
                return Err(invalid(
                    format!("routes.{task}"),
                    "must list at least one provider",
                ));
            }
            for entry in entries {
                let provider = &entry.provider;
                let Some(p) = self.providers.get(provider) else {
                    return Err(invalid(
                        format!("routes.{task}"),
                        format!("unknown provider '{provider}'"),
                    ));
                };
                if entry.model.is_none() && p.default_model.is_none() {
                    return Err(invalid(
                        format!("routes.{task}"),
                        format!(
                            "'{entry}' names no model and provider '{provider}' has no default_model"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
