-- What cache hits saved: the usage and cost of the call whose answer was served again (zero
-- on jobs that were not cache hits; a hit's own input_tokens, output_tokens and cost_usd are
-- zero: it made no call).
ALTER TABLE llm_jobs
    ADD COLUMN cache_saved_input_tokens  bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_saved_output_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_saved_cost_usd      numeric(20, 10);

-- Cache hits and savings per UTC day and tenant.
CREATE VIEW llm_cache_savings_daily AS
SELECT (j.finished_at AT TIME ZONE 'UTC')::date                AS day,
       j.tenant,
       count(*) FILTER (WHERE j.kind = 'generate')               AS generate_jobs,
       count(*) FILTER (WHERE j.cache_hit)                       AS cache_hits,
       sum(j.cache_saved_input_tokens + j.cache_saved_output_tokens)::bigint AS tokens_saved,
       sum(j.cache_saved_cost_usd)                               AS cost_saved_usd
FROM llm_jobs j
GROUP BY 1, 2;
