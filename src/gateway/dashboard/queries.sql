-- The usage dashboard's queries (`/dashboard`), one per panel, in the order the page shows
-- them. A cost is NULL (shown as -) where no call had a price. Every one reads the daily rollups (through the views of docs/usage-sql.md), except
-- "top_jobs" and "top_job_calls", which read one index each. Parameters: $1 the first and $2
-- the last UTC day of the period (date), $3 the tenant (text; NULL for every tenant).
-- docs/dashboard.md shows this file; a test checks the two agree.

-- name: tenants
-- The tenant filter's choices: tenants with calls in the period.
SELECT DISTINCT tenant
FROM llm_rollup_calls
WHERE day BETWEEN $1 AND $2
ORDER BY tenant;

-- name: totals
SELECT coalesce(sum(calls), 0)::bigint                            AS calls,
       coalesce(sum(failed_calls), 0)::bigint                     AS failed_calls,
       round(coalesce(sum(failed_calls), 0)::numeric / nullif(sum(calls), 0), 4) AS failure_rate,
       coalesce(sum(input_tokens), 0)::bigint                     AS input_tokens,
       coalesce(sum(output_tokens), 0)::bigint                    AS output_tokens,
       round(coalesce(sum(cost_usd), 0), 4)                       AS cost_usd
FROM llm_usage_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3);

-- name: jobs
SELECT coalesce(sum(jobs), 0)::bigint                             AS jobs,
       coalesce(sum(jobs) FILTER (WHERE status <> 'ok'), 0)::bigint AS failed_jobs
FROM llm_jobs_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3);

-- name: spend_by_tenant_daily
SELECT day, tenant AS series,
       round(coalesce(sum(cost_usd), 0), 4)                       AS cost_usd,
       sum(input_tokens + output_tokens)::bigint                  AS tokens
FROM llm_usage_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: spend_by_model_daily
SELECT day, provider || '/' || model AS series,
       round(coalesce(sum(cost_usd), 0), 4)                       AS cost_usd,
       sum(input_tokens + output_tokens)::bigint                  AS tokens
FROM llm_usage_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: by_tenant
SELECT tenant,
       sum(calls)::bigint                                         AS calls,
       sum(failed_calls)::bigint                                  AS failed_calls,
       sum(input_tokens)::bigint                                  AS input_tokens,
       sum(output_tokens)::bigint                                 AS output_tokens,
       round(sum(cost_usd), 4)                                    AS cost_usd
FROM llm_usage_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY tenant
ORDER BY cost_usd DESC NULLS LAST, tenant;

-- name: by_model
SELECT provider, model,
       sum(calls)::bigint                                         AS calls,
       sum(failed_calls)::bigint                                  AS failed_calls,
       sum(input_tokens)::bigint                                  AS input_tokens,
       sum(output_tokens)::bigint                                 AS output_tokens,
       round(sum(cost_usd), 4)                                    AS cost_usd
FROM llm_usage_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY provider, model
ORDER BY cost_usd DESC NULLS LAST, provider, model;

-- name: providers
SELECT provider,
       sum(calls)::bigint                                         AS calls,
       coalesce(sum(calls) FILTER (WHERE status = 'error'), 0)::bigint AS failed_calls,
       round(coalesce(sum(calls) FILTER (WHERE status = 'error'), 0)::numeric / sum(calls), 4)
                                                                  AS failure_rate,
       round(sum(latency_ms_sum)::numeric / sum(calls))::bigint   AS latency_ms_avg,
       llm_hist_quantile(llm_hist_sum(latency_hist), 0.5, max(latency_ms_max))  AS latency_ms_p50,
       llm_hist_quantile(llm_hist_sum(latency_hist), 0.95, max(latency_ms_max)) AS latency_ms_p95,
       llm_hist_quantile(llm_hist_sum(latency_hist), 0.99, max(latency_ms_max)) AS latency_ms_p99
FROM llm_rollup_calls
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY provider
ORDER BY provider;

-- name: providers_daily
SELECT day, provider AS series,
       round(coalesce(sum(calls) FILTER (WHERE status = 'error'), 0)::numeric / sum(calls), 4)
                                                                  AS failure_rate,
       llm_hist_quantile(llm_hist_sum(latency_hist), 0.95, max(latency_ms_max)) AS latency_ms_p95
FROM llm_rollup_calls
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: response_cache_daily
SELECT day,
       sum(cache_hits)::bigint                                    AS cache_hits,
       sum(tokens_saved)::bigint                                  AS tokens_saved,
       round(coalesce(sum(cost_saved_usd), 0), 4)                 AS cost_saved_usd
FROM llm_cache_savings_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY day
ORDER BY day;

-- name: prompt_cache_daily
SELECT day,
       sum(cache_read_tokens)::bigint                             AS cache_read_tokens,
       round(coalesce(sum(cache_saved_usd), 0), 4)                AS cache_saved_usd
FROM llm_prompt_cache_daily
WHERE day BETWEEN $1 AND $2 AND ($3::text IS NULL OR tenant = $3)
GROUP BY day
ORDER BY day;

-- name: budgets
-- Today and this month (not the period): spend against each budget in force.
SELECT tenant,
       round(day_usd, 4) AS day_usd, daily_usd, day_usd_pct,
       round(month_usd, 4) AS month_usd, monthly_usd, month_usd_pct,
       month_tokens, monthly_tokens, month_tokens_pct
FROM llm_tenant_spend
WHERE $3::text IS NULL OR tenant = $3
ORDER BY month_usd DESC, tenant;

-- name: top_jobs
-- The 10 most expensive jobs that finished in the period (index llm_jobs_cost).
SELECT job_id, tenant, kind, status, provider, model, attempts,
       input_tokens, output_tokens, round(cost_usd, 6) AS cost_usd, finished_at
FROM llm_jobs
WHERE finished_at >= ($1::date)::timestamp AT TIME ZONE 'UTC'
  AND finished_at < ($2::date + 1)::timestamp AT TIME ZONE 'UTC'
  AND ($3::text IS NULL OR tenant = $3)
  AND cost_usd > 0
ORDER BY cost_usd DESC
LIMIT 10;

-- name: top_job_calls
-- The calls of those jobs ($1 their ids, $2 three days before the first of them finished,
-- $3 when the last finished: bounds for the partitions).
SELECT job_id, attempt, provider, model, status, error_code,
       input_tokens, output_tokens, round(cost_usd, 6) AS cost_usd, latency_ms
FROM llm_calls
WHERE job_id = ANY($1::uuid[]) AND started_at BETWEEN $2 AND $3
ORDER BY job_id, attempt;
