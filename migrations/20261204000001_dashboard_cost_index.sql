-- The usage dashboard's "most expensive jobs" of a period: an index on cost (priced jobs
-- only, so cache hits and failures before any call cost it nothing), so the ten largest are
-- read from the top of each month's index instead of scanning the period's rows.
CREATE INDEX llm_jobs_cost ON llm_jobs (cost_usd DESC) WHERE cost_usd > 0;
