-- Usage history at scale (docs/usage-sql.md, "Partitions and rollups").
--
-- 1. llm_calls and llm_jobs are range-partitioned by month (UTC) on their time column
--    (llm_calls.started_at, llm_jobs.finished_at), one partition per month named
--    <table>_pYYYY_MM. The recorder creates the partition a row needs before writing it, and
--    `llm-worker migrate` (and every worker at start) creates this month's and the next two.
--    Old history goes with `llm-worker usage prune --older-than 13months`, a whole partition
--    at a time.
-- 2. The unique keys gain the partition column (Postgres requires it): llm_jobs is unique on
--    (job_id, finished_at), llm_calls on (job_id, attempt, started_at). They keep their
--    meaning: the recorder writes rows only from a job's stored result, which is never
--    replaced (JetStream refuses a second result under a job id), so a redelivered job or a
--    result recorded twice carries the same times and hits the same key.
-- 3. Daily rollups (llm_rollup_calls, llm_rollup_jobs) are kept exact by the recorder, in the
--    transaction that writes the rows; the daily views read them, so a question about a month
--    reads hundreds of rows, whatever the history's size. Pruning raw rows keeps the rollups.
--
-- The upgrade copies every existing row into the partitioned tables (one transaction) and
-- builds the rollups from them.

-- The first instant of the UTC month of `at`.
CREATE FUNCTION llm_month_start(at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
$$;

-- The first instant of the UTC month after the one of `at`.
CREATE FUNCTION llm_month_end(at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
$$;

-- Create the monthly partitions of llm_calls and llm_jobs that hold the given instants, where
-- missing. Safe to call concurrently (creators take turns on an advisory lock). Returns how
-- many partitions it created.
CREATE FUNCTION llm_ensure_partitions(instants timestamptz[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    at      timestamptz;
    m       timestamptz;
    parent  text;
    part    text;
    made    integer := 0;
BEGIN
    FOREACH at IN ARRAY coalesce(instants, '{}') LOOP
        CONTINUE WHEN at IS NULL;
        m := llm_month_start(at);
        FOREACH parent IN ARRAY ARRAY['llm_calls', 'llm_jobs'] LOOP
            part := parent || '_p' || to_char(m AT TIME ZONE 'UTC', 'YYYY_MM');
            CONTINUE WHEN to_regclass(part) IS NOT NULL;
            PERFORM pg_advisory_xact_lock(hashtext('llm_ensure_partitions'));
            CONTINUE WHEN to_regclass(part) IS NOT NULL;
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           part, parent, m, llm_month_end(m));
            made := made + 1;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

-- The views read the old tables: they are recreated over the rollups below.
DROP VIEW llm_usage_daily, llm_jobs_daily, llm_tenant_spend, llm_cache_savings_daily,
          llm_prompt_cache_daily;

ALTER TABLE llm_jobs RENAME TO llm_jobs_unpartitioned;
ALTER TABLE llm_calls RENAME TO llm_calls_unpartitioned;

CREATE TABLE llm_jobs (LIKE llm_jobs_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (finished_at);
CREATE TABLE llm_calls (LIKE llm_calls_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (started_at);
-- The kind of the call's job ('generate', 'embed', 'image'), so that calls can be summed by
-- kind without reading llm_jobs.
ALTER TABLE llm_calls ADD COLUMN kind text NOT NULL DEFAULT 'generate';

SELECT llm_ensure_partitions(ARRAY(
    SELECT DISTINCT llm_month_start(finished_at) FROM llm_jobs_unpartitioned
    UNION
    SELECT DISTINCT llm_month_start(started_at) FROM llm_calls_unpartitioned
    UNION
    SELECT now()
));

INSERT INTO llm_jobs SELECT * FROM llm_jobs_unpartitioned;
INSERT INTO llm_calls
SELECT c.*, coalesce(j.kind, 'generate')
FROM llm_calls_unpartitioned c
LEFT JOIN llm_jobs_unpartitioned j ON j.job_id = c.job_id;

DROP TABLE llm_jobs_unpartitioned;
DROP TABLE llm_calls_unpartitioned;

ALTER TABLE llm_jobs ADD PRIMARY KEY (job_id, finished_at);
CREATE INDEX llm_jobs_finished_at ON llm_jobs (finished_at);
CREATE INDEX llm_jobs_tenant_finished_at ON llm_jobs (tenant, finished_at);
CREATE INDEX llm_jobs_trace_id ON llm_jobs (trace_id);

ALTER TABLE llm_calls ADD PRIMARY KEY (job_id, attempt, started_at);
CREATE INDEX llm_calls_started_at ON llm_calls (started_at);
CREATE INDEX llm_calls_trace_id ON llm_calls (trace_id);
CREATE INDEX llm_calls_provider_model_started_at ON llm_calls (provider, model, started_at);
CREATE INDEX llm_calls_tenant_started_at ON llm_calls (tenant, started_at);

-- Latency histograms: 61 counts; bucket k (0-based) holds durations d with
-- 10^((k-1)/10) < d <= 10^(k/10) ms (about 26 % wide), bucket 0 up to 1 ms, bucket 60 from
-- 10^5.9 ms (13 minutes) up. Histograms add up, so percentiles of any sum of rollup rows are
-- read from them (llm_hist_quantile), to within one bucket.
CREATE FUNCTION llm_latency_bucket(ms bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(greatest(ceil(10 * log(greatest(ms, 1)::float8) - 1e-9)::integer, 0), 60)
$$;

CREATE FUNCTION llm_hist_add(h bigint[], bucket integer) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF h IS NULL THEN
        h := array_fill(0::bigint, ARRAY[61]);
    END IF;
    h[bucket + 1] := h[bucket + 1] + 1;
    RETURN h;
END
$$;

-- The histogram of the latency buckets aggregated (llm_hist(llm_latency_bucket(ms))).
CREATE AGGREGATE llm_hist(integer) (SFUNC = llm_hist_add, STYPE = bigint[]);

-- Two histograms added count by count (a NULL histogram is all zeros).
CREATE FUNCTION llm_hist_merge(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE (SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
              FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i))
    END
$$;

-- The sum of histograms (of rollup rows).
CREATE AGGREGATE llm_hist_sum(bigint[]) (SFUNC = llm_hist_merge, STYPE = bigint[]);

-- The q-quantile (0 < q <= 1) of a histogram in ms: the upper edge of the bucket holding it,
-- no more than `max_ms` (the largest duration seen). NULL for an empty histogram.
CREATE FUNCTION llm_hist_quantile(h bigint[], q float8, max_ms bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    total  bigint := 0;
    target float8;
    seen   bigint := 0;
    k      integer;
BEGIN
    IF h IS NULL THEN
        RETURN NULL;
    END IF;
    FOR k IN 1 .. array_length(h, 1) LOOP
        total := total + h[k];
    END LOOP;
    IF total = 0 THEN
        RETURN NULL;
    END IF;
    target := ceil(q * total);
    FOR k IN 1 .. array_length(h, 1) LOOP
        seen := seen + h[k];
        IF seen >= target THEN
            RETURN least(floor(power(10::float8, (k - 1) / 10.0) + 1e-9)::bigint, max_ms);
        END IF;
    END LOOP;
    RETURN max_ms;
END
$$;

-- Calls per UTC day (of started_at), tenant, job kind, provider, model and status. Every
-- figure is additive, so any sum of rows is exact; a cost column is the sum of the known
-- costs, and the count beside it says how many rows had one (NULL cost when none had).
CREATE TABLE llm_rollup_calls (
    day                   date    NOT NULL,
    tenant                text    NOT NULL,
    kind                  text    NOT NULL,
    provider              text    NOT NULL,
    model                 text    NOT NULL,
    status                text    NOT NULL,
    calls                 bigint  NOT NULL DEFAULT 0,
    -- Jobs with a call on (day, tenant, provider, model), each counted once: on the row of its
    -- first such call. sum(jobs) over statuses = count(DISTINCT job_id).
    jobs                  bigint  NOT NULL DEFAULT 0,
    input_tokens          bigint  NOT NULL DEFAULT 0,
    output_tokens         bigint  NOT NULL DEFAULT 0,
    cache_read_tokens     bigint  NOT NULL DEFAULT 0,
    cache_write_tokens    bigint  NOT NULL DEFAULT 0,
    cache_write_1h_tokens bigint  NOT NULL DEFAULT 0,
    reasoning_tokens      bigint  NOT NULL DEFAULT 0,
    image_input_tokens    bigint  NOT NULL DEFAULT 0,
    images                bigint  NOT NULL DEFAULT 0,
    estimated_calls       bigint  NOT NULL DEFAULT 0,
    cost_usd              numeric NOT NULL DEFAULT 0,
    priced_calls          bigint  NOT NULL DEFAULT 0,
    unpriced_calls        bigint  NOT NULL DEFAULT 0,   -- tokens but no known price
    calls_with_cache_reads bigint NOT NULL DEFAULT 0,
    -- What prompt-cache reads saved against the input price, times 10^6 (tokens x USD per
    -- million tokens, summed; divide by 10^6 after summing), over the calls whose price row
    -- prices cache reads (cache_saved_calls of them).
    cache_saved_usd_e6    numeric NOT NULL DEFAULT 0,
    cache_saved_calls     bigint  NOT NULL DEFAULT 0,
    latency_ms_sum        bigint  NOT NULL DEFAULT 0,
    latency_ms_max        bigint  NOT NULL DEFAULT 0,
    latency_hist          bigint[] NOT NULL,
    PRIMARY KEY (day, tenant, kind, provider, model, status)
);
CREATE INDEX llm_rollup_calls_tenant_day ON llm_rollup_calls (tenant, day);

-- Jobs per UTC day (of finished_at), tenant, kind, status, error code and final provider and
-- model ('' where the job has none).
CREATE TABLE llm_rollup_jobs (
    day                       date    NOT NULL,
    tenant                    text    NOT NULL,
    kind                      text    NOT NULL,
    status                    text    NOT NULL,
    error_code                text    NOT NULL,
    provider                  text    NOT NULL,
    model                     text    NOT NULL,
    jobs                      bigint  NOT NULL DEFAULT 0,
    attempts                  bigint  NOT NULL DEFAULT 0,
    cache_hits                bigint  NOT NULL DEFAULT 0,
    images                    bigint  NOT NULL DEFAULT 0,
    input_tokens              bigint  NOT NULL DEFAULT 0,
    output_tokens             bigint  NOT NULL DEFAULT 0,
    cache_read_tokens         bigint  NOT NULL DEFAULT 0,
    cache_write_tokens        bigint  NOT NULL DEFAULT 0,
    cache_write_1h_tokens     bigint  NOT NULL DEFAULT 0,
    reasoning_tokens          bigint  NOT NULL DEFAULT 0,
    image_input_tokens        bigint  NOT NULL DEFAULT 0,
    cost_usd                  numeric NOT NULL DEFAULT 0,
    priced_jobs               bigint  NOT NULL DEFAULT 0,
    cache_saved_input_tokens  bigint  NOT NULL DEFAULT 0,
    cache_saved_output_tokens bigint  NOT NULL DEFAULT 0,
    cache_saved_cost_usd      numeric NOT NULL DEFAULT 0,
    cache_saved_priced        bigint  NOT NULL DEFAULT 0,
    processing_ms_sum         bigint  NOT NULL DEFAULT 0,
    processing_ms_max         bigint  NOT NULL DEFAULT 0,
    processing_hist           bigint[] NOT NULL,
    PRIMARY KEY (day, tenant, kind, status, error_code, provider, model)
);
CREATE INDEX llm_rollup_jobs_tenant_day ON llm_rollup_jobs (tenant, day);

-- Add calls to llm_rollup_calls: the one definition of every rollup figure. The recorder
-- calls it with the rows each batch wrote (in the batch's transaction); llm_rollup_rebuild with
-- a day's rows, in parts holding whole jobs. Rollup rows are written in key order, so
-- concurrent recorders lock them in the same order and never deadlock.
CREATE FUNCTION llm_rollup_add_calls(batch llm_calls[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO llm_rollup_calls AS r
    SELECT c.day, c.tenant, c.kind, c.provider, c.model, c.status,
           count(*), count(*) FILTER (WHERE c.first_of_job),
           sum(c.input_tokens)::bigint, sum(c.output_tokens)::bigint,
           sum(c.cache_read_tokens)::bigint, sum(c.cache_write_tokens)::bigint,
           sum(c.cache_write_1h_tokens)::bigint, sum(c.reasoning_tokens)::bigint,
           sum(c.image_input_tokens)::bigint, sum(c.images)::bigint,
           count(*) FILTER (WHERE c.tokens_estimated),
           coalesce(sum(c.cost_usd), 0), count(c.cost_usd),
           count(*) FILTER (WHERE c.cost_usd IS NULL AND c.input_tokens + c.output_tokens > 0),
           count(*) FILTER (WHERE c.cache_read_tokens > 0),
           coalesce(sum(c.saved_e6), 0), count(c.saved_e6),
           sum(c.latency_ms)::bigint, max(c.latency_ms), llm_hist(llm_latency_bucket(c.latency_ms))
    FROM (
        SELECT c.*, (c.started_at AT TIME ZONE 'UTC')::date AS day,
               row_number() OVER (PARTITION BY c.job_id, (c.started_at AT TIME ZONE 'UTC')::date,
                                               c.provider, c.model
                                  ORDER BY c.attempt) = 1 AS first_of_job,
               c.cache_read_tokens * (p.input_usd_per_mtok - p.cache_read_usd_per_mtok) AS saved_e6
        FROM unnest(batch) c
        LEFT JOIN llm_prices p
               ON p.provider = c.provider AND p.model = c.model
              AND p.effective_from = c.price_effective_from
    ) c
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (day, tenant, kind, provider, model, status) DO UPDATE SET
        calls = r.calls + excluded.calls,
        jobs = r.jobs + excluded.jobs,
        input_tokens = r.input_tokens + excluded.input_tokens,
        output_tokens = r.output_tokens + excluded.output_tokens,
        cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
        cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
        cache_write_1h_tokens = r.cache_write_1h_tokens + excluded.cache_write_1h_tokens,
        reasoning_tokens = r.reasoning_tokens + excluded.reasoning_tokens,
        image_input_tokens = r.image_input_tokens + excluded.image_input_tokens,
        images = r.images + excluded.images,
        estimated_calls = r.estimated_calls + excluded.estimated_calls,
        cost_usd = r.cost_usd + excluded.cost_usd,
        priced_calls = r.priced_calls + excluded.priced_calls,
        unpriced_calls = r.unpriced_calls + excluded.unpriced_calls,
        calls_with_cache_reads = r.calls_with_cache_reads + excluded.calls_with_cache_reads,
        cache_saved_usd_e6 = r.cache_saved_usd_e6 + excluded.cache_saved_usd_e6,
        cache_saved_calls = r.cache_saved_calls + excluded.cache_saved_calls,
        latency_ms_sum = r.latency_ms_sum + excluded.latency_ms_sum,
        latency_ms_max = greatest(r.latency_ms_max, excluded.latency_ms_max),
        latency_hist = llm_hist_merge(r.latency_hist, excluded.latency_hist)
$$;

-- Add jobs to llm_rollup_jobs (as llm_rollup_add_calls does for calls).
CREATE FUNCTION llm_rollup_add_jobs(batch llm_jobs[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO llm_rollup_jobs AS r
    SELECT (j.finished_at AT TIME ZONE 'UTC')::date, j.tenant, j.kind, j.status,
           coalesce(j.error_code, ''), coalesce(j.provider, ''), coalesce(j.model, ''),
           count(*), sum(j.attempts)::bigint, count(*) FILTER (WHERE j.cache_hit),
           sum(j.images)::bigint,
           sum(j.input_tokens)::bigint, sum(j.output_tokens)::bigint,
           sum(j.cache_read_tokens)::bigint, sum(j.cache_write_tokens)::bigint,
           sum(j.cache_write_1h_tokens)::bigint, sum(j.reasoning_tokens)::bigint,
           sum(j.image_input_tokens)::bigint,
           coalesce(sum(j.cost_usd), 0), count(j.cost_usd),
           sum(j.cache_saved_input_tokens)::bigint, sum(j.cache_saved_output_tokens)::bigint,
           coalesce(sum(j.cache_saved_cost_usd), 0), count(j.cache_saved_cost_usd),
           sum(j.processing_ms)::bigint, max(j.processing_ms),
           llm_hist(llm_latency_bucket(j.processing_ms))
    FROM unnest(batch) j
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    ORDER BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT (day, tenant, kind, status, error_code, provider, model) DO UPDATE SET
        jobs = r.jobs + excluded.jobs,
        attempts = r.attempts + excluded.attempts,
        cache_hits = r.cache_hits + excluded.cache_hits,
        images = r.images + excluded.images,
        input_tokens = r.input_tokens + excluded.input_tokens,
        output_tokens = r.output_tokens + excluded.output_tokens,
        cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
        cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
        cache_write_1h_tokens = r.cache_write_1h_tokens + excluded.cache_write_1h_tokens,
        reasoning_tokens = r.reasoning_tokens + excluded.reasoning_tokens,
        image_input_tokens = r.image_input_tokens + excluded.image_input_tokens,
        cost_usd = r.cost_usd + excluded.cost_usd,
        priced_jobs = r.priced_jobs + excluded.priced_jobs,
        cache_saved_input_tokens = r.cache_saved_input_tokens + excluded.cache_saved_input_tokens,
        cache_saved_output_tokens = r.cache_saved_output_tokens + excluded.cache_saved_output_tokens,
        cache_saved_cost_usd = r.cache_saved_cost_usd + excluded.cache_saved_cost_usd,
        cache_saved_priced = r.cache_saved_priced + excluded.cache_saved_priced,
        processing_ms_sum = r.processing_ms_sum + excluded.processing_ms_sum,
        processing_ms_max = greatest(r.processing_ms_max, excluded.processing_ms_max),
        processing_hist = llm_hist_merge(r.processing_hist, excluded.processing_hist)
$$;

-- Rebuild the rollups of the UTC days from_day..to_day (NULL: unbounded) from the raw rows.
-- The recorder keeps them current as it writes; this is for the upgrade and for
-- `llm-worker prices reprice`, which changes recorded costs. It locks the rollups against the
-- recorders' increments for its transaction, so none is lost or counted twice. A day is added
-- in parts of about 100,000 rows, each holding whole jobs (parts by a hash of the job id), so
-- memory stays bounded whatever a day holds.
CREATE FUNCTION llm_rollup_rebuild(from_day date, to_day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_day date;
    last_day  date;
    d         date;
    lo        timestamptz;
    hi        timestamptz;
    n         bigint;
    parts     integer;
    k         integer;
BEGIN
    LOCK TABLE llm_rollup_calls, llm_rollup_jobs IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM llm_rollup_calls WHERE day >= coalesce(from_day, '-infinity'::date)
                                   AND day <= coalesce(to_day, 'infinity'::date);
    DELETE FROM llm_rollup_jobs WHERE day >= coalesce(from_day, '-infinity'::date)
                                  AND day <= coalesce(to_day, 'infinity'::date);
    SELECT least((SELECT (min(started_at) AT TIME ZONE 'UTC')::date FROM llm_calls),
                 (SELECT (min(finished_at) AT TIME ZONE 'UTC')::date FROM llm_jobs)),
           greatest((SELECT (max(started_at) AT TIME ZONE 'UTC')::date FROM llm_calls),
                    (SELECT (max(finished_at) AT TIME ZONE 'UTC')::date FROM llm_jobs))
      INTO first_day, last_day;
    IF first_day IS NULL THEN
        RETURN;
    END IF;
    first_day := greatest(first_day, coalesce(from_day, first_day));
    last_day := least(last_day, coalesce(to_day, last_day));
    d := first_day;
    WHILE d <= last_day LOOP
        lo := d::timestamp AT TIME ZONE 'UTC';
        hi := (d + 1)::timestamp AT TIME ZONE 'UTC';
        SELECT count(*) INTO n FROM llm_calls WHERE started_at >= lo AND started_at < hi;
        parts := greatest(1, ceil(n / 100000.0)::integer);
        FOR k IN 0 .. parts - 1 LOOP
            PERFORM llm_rollup_add_calls(ARRAY(
                SELECT c FROM llm_calls c
                WHERE c.started_at >= lo AND c.started_at < hi
                  AND (parts = 1 OR (hashtext(c.job_id::text) & 2147483647) % parts = k)));
        END LOOP;
        SELECT count(*) INTO n FROM llm_jobs WHERE finished_at >= lo AND finished_at < hi;
        parts := greatest(1, ceil(n / 100000.0)::integer);
        FOR k IN 0 .. parts - 1 LOOP
            PERFORM llm_rollup_add_jobs(ARRAY(
                SELECT j FROM llm_jobs j
                WHERE j.finished_at >= lo AND j.finished_at < hi
                  AND (parts = 1 OR (hashtext(j.job_id::text) & 2147483647) % parts = k)));
        END LOOP;
        d := d + 1;
    END LOOP;
END
$$;

SELECT llm_rollup_rebuild(NULL, NULL);

-- The views of before, now read from the rollups: same columns, same figures.

-- Per UTC day, tenant, provider, model.
CREATE VIEW llm_usage_daily AS
SELECT r.day,
       r.tenant,
       r.provider,
       r.model,
       sum(r.calls)::bigint                                  AS calls,
       sum(r.jobs)::bigint                                   AS jobs,
       coalesce(sum(r.calls) FILTER (WHERE r.status = 'error'), 0)::bigint AS failed_calls,
       sum(r.input_tokens)::bigint                           AS input_tokens,
       sum(r.output_tokens)::bigint                          AS output_tokens,
       CASE WHEN sum(r.priced_calls) > 0 THEN sum(r.cost_usd) END AS cost_usd,
       sum(r.unpriced_calls)::bigint                         AS unpriced_calls,
       sum(r.cache_read_tokens)::bigint                      AS cache_read_tokens,
       sum(r.cache_write_tokens)::bigint                     AS cache_write_tokens,
       sum(r.cache_write_1h_tokens)::bigint                  AS cache_write_1h_tokens,
       sum(r.reasoning_tokens)::bigint                       AS reasoning_tokens,
       sum(r.image_input_tokens)::bigint                     AS image_input_tokens
FROM llm_rollup_calls r
GROUP BY 1, 2, 3, 4;

-- Jobs per day (UTC, by when they finished), tenant, kind and outcome. error_code is NULL for
-- answered jobs.
CREATE VIEW llm_jobs_daily AS
SELECT r.day,
       r.tenant,
       r.kind,
       r.status,
       nullif(r.error_code, '')                              AS error_code,
       sum(r.jobs)::bigint                                   AS jobs,
       sum(r.input_tokens)::bigint                           AS input_tokens,
       sum(r.output_tokens)::bigint                          AS output_tokens,
       CASE WHEN sum(r.priced_jobs) > 0 THEN sum(r.cost_usd) END AS cost_usd
FROM llm_rollup_jobs r
GROUP BY 1, 2, 3, 4, 5;

-- Spend today and this month (UTC, by when each call started) per tenant with calls this
-- month, next to its budgets and the share used (see the first definition's notes).
CREATE VIEW llm_tenant_spend AS
WITH d AS (
    SELECT (now() AT TIME ZONE 'UTC')::date AS day,
           date_trunc('month', now() AT TIME ZONE 'UTC')::date AS month
), spend AS (
    SELECT r.tenant,
           coalesce(sum(r.cost_usd) FILTER (WHERE r.day >= d.day), 0)              AS day_usd,
           coalesce(sum(r.input_tokens + r.output_tokens)
                    FILTER (WHERE r.day >= d.day), 0)::bigint                      AS day_tokens,
           coalesce(sum(r.cost_usd), 0)                                            AS month_usd,
           coalesce(sum(r.input_tokens + r.output_tokens), 0)::bigint              AS month_tokens
    FROM llm_rollup_calls r, d
    WHERE r.day >= d.month
    GROUP BY r.tenant
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

-- Cache hits and savings per UTC day and tenant.
CREATE VIEW llm_cache_savings_daily AS
SELECT r.day,
       r.tenant,
       coalesce(sum(r.jobs) FILTER (WHERE r.kind = 'generate'), 0)::bigint AS generate_jobs,
       sum(r.cache_hits)::bigint                                          AS cache_hits,
       sum(r.cache_saved_input_tokens + r.cache_saved_output_tokens)::bigint AS tokens_saved,
       CASE WHEN sum(r.cache_saved_priced) > 0 THEN sum(r.cache_saved_cost_usd) END AS cost_saved_usd
FROM llm_rollup_jobs r
GROUP BY 1, 2;

-- The provider's prompt cache per UTC day, tenant, provider and model.
CREATE VIEW llm_prompt_cache_daily AS
SELECT r.day,
       r.tenant,
       r.provider,
       r.model,
       sum(r.calls)::bigint                                   AS calls,
       sum(r.calls_with_cache_reads)::bigint                  AS calls_with_cache_reads,
       sum(r.input_tokens)::bigint                            AS input_tokens,
       sum(r.cache_read_tokens)::bigint                       AS cache_read_tokens,
       sum(r.cache_write_tokens + r.cache_write_1h_tokens)::bigint AS cache_write_tokens,
       round(sum(r.cache_read_tokens)::numeric / nullif(sum(r.input_tokens), 0), 4) AS cache_read_share,
       CASE WHEN sum(r.cache_saved_calls) > 0 THEN sum(r.cache_saved_usd_e6) / 1000000 END
                                                              AS cache_saved_usd
FROM llm_rollup_calls r
GROUP BY 1, 2, 3, 4;

-- Latency per UTC day, provider and model: calls, failure rate and percentiles (to within a
-- histogram bucket, about 26 %), from the rollup.
CREATE VIEW llm_provider_latency_daily AS
SELECT r.day,
       r.provider,
       r.model,
       sum(r.calls)::bigint                                             AS calls,
       coalesce(sum(r.calls) FILTER (WHERE r.status = 'error'), 0)::bigint AS failed_calls,
       round(coalesce(sum(r.calls) FILTER (WHERE r.status = 'error'), 0)::numeric
             / sum(r.calls), 4)                                         AS failure_rate,
       round(sum(r.latency_ms_sum)::numeric / sum(r.calls))::bigint     AS latency_ms_avg,
       llm_hist_quantile(llm_hist_sum(r.latency_hist), 0.5, max(r.latency_ms_max))  AS latency_ms_p50,
       llm_hist_quantile(llm_hist_sum(r.latency_hist), 0.95, max(r.latency_ms_max)) AS latency_ms_p95,
       llm_hist_quantile(llm_hist_sum(r.latency_hist), 0.99, max(r.latency_ms_max)) AS latency_ms_p99,
       max(r.latency_ms_max)                                            AS latency_ms_max
FROM llm_rollup_calls r
GROUP BY 1, 2, 3;
