-- Jobs per day (UTC, by when they finished), tenant, kind and outcome: what operators ask
-- first of a shared fleet (how many of a tenant's jobs were refused, cancelled or expired,
-- and what they cost). error_code is NULL for answered jobs; refusals are invalid_job,
-- cancelled, timeout (expired deadlines say "expired:" in llm_jobs.error_message),
-- dead_lettered, and later budget_exceeded.
CREATE VIEW llm_jobs_daily AS
SELECT (j.finished_at AT TIME ZONE 'UTC')::date AS day,
       j.tenant,
       j.kind,
       j.status,
       j.error_code,
       count(*)                      AS jobs,
       sum(j.input_tokens)::bigint   AS input_tokens,
       sum(j.output_tokens)::bigint  AS output_tokens,
       sum(j.cost_usd)               AS cost_usd
FROM llm_jobs j
GROUP BY 1, 2, 3, 4, 5;
