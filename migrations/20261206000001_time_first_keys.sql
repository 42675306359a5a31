-- Time-first keys for the history (docs/usage-sql.md, "Partitions and rollups";
-- docs/benchmarks.md, "Usage history at scale").
--
-- The unique keys of llm_calls and llm_jobs now start with their time column:
-- (started_at, job_id, attempt) and (finished_at, job_id). The same columns, so the same
-- uniqueness, and the recorder's ON CONFLICT targets (a set of columns) still name them. A
-- new row now lands at the right edge of its month's key, where the rows written just before
-- it are; keyed by job id first, every row landed on a random page of a month-sized index
-- when job ids are random (UUIDv4, an orchestrator's), and the recorder wrote a fraction of
-- its rate on a full month. Look-ups by job id use a narrower index on job_id alone, and the
-- time indexes the keys now cover go.

ALTER TABLE llm_calls DROP CONSTRAINT llm_calls_pkey;
ALTER TABLE llm_calls ADD PRIMARY KEY (started_at, job_id, attempt);
DROP INDEX llm_calls_started_at;
CREATE INDEX llm_calls_job_id ON llm_calls (job_id);

ALTER TABLE llm_jobs DROP CONSTRAINT llm_jobs_pkey;
ALTER TABLE llm_jobs ADD PRIMARY KEY (finished_at, job_id);
DROP INDEX llm_jobs_finished_at;
CREATE INDEX llm_jobs_job_id ON llm_jobs (job_id);
