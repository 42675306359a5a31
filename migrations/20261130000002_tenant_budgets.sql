-- The budgets in force ([tenants.<name>] of the configuration), written by every worker with
-- a database when it starts and after each reload. 'default' holds the budgets of tenants
-- without a policy of their own (each such tenant has budgets of that size).
CREATE TABLE llm_tenant_budgets (
    tenant         text PRIMARY KEY,
    daily_usd      numeric(20, 10),
    monthly_usd    numeric(20, 10),
    daily_tokens   bigint,
    monthly_tokens bigint,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Spend today and this month (UTC, by when each call started) per tenant with calls this
-- month, next to its budgets and the share used. Spend is every call's, failed calls
-- included, and calls without a known price count no USD (as the workers count them).
-- The workers enforce budgets from their own counters (a JetStream KV bucket), which may be
-- ahead of this view by the rows the recorder has not written yet.
CREATE VIEW llm_tenant_spend AS
WITH spend AS (
    SELECT c.tenant,
           coalesce(sum(c.cost_usd) FILTER (WHERE c.started_at >= d.day), 0)      AS day_usd,
           coalesce(sum(c.input_tokens + c.output_tokens)
                    FILTER (WHERE c.started_at >= d.day), 0)::bigint              AS day_tokens,
           coalesce(sum(c.cost_usd), 0)                                            AS month_usd,
           coalesce(sum(c.input_tokens + c.output_tokens), 0)::bigint              AS month_tokens
    FROM llm_calls c,
         LATERAL (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS day,
                         date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month) d
    WHERE c.started_at >= d.month
    GROUP BY c.tenant
)
SELECT s.tenant,
       coalesce(b.tenant, 'default') = s.tenant AS own_policy,
       s.day_usd,
       b.daily_usd,
       round(100 * s.day_usd / nullif(b.daily_usd, 0), 1)                 AS day_usd_pct,
       s.day_tokens,
       b.daily_tokens,
       round(100.0 * s.day_tokens / nullif(b.daily_tokens, 0), 1)         AS day_tokens_pct,
       s.month_usd,
       b.monthly_usd,
       round(100 * s.month_usd / nullif(b.monthly_usd, 0), 1)             AS month_usd_pct,
       s.month_tokens,
       b.monthly_tokens,
       round(100.0 * s.month_tokens / nullif(b.monthly_tokens, 0), 1)     AS month_tokens_pct
FROM spend s
LEFT JOIN LATERAL (
    SELECT * FROM llm_tenant_budgets b
    WHERE b.tenant IN (s.tenant, 'default')
    ORDER BY b.tenant = s.tenant DESC
    LIMIT 1
) b ON true;
