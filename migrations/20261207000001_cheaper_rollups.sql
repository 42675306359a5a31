-- The rollup increments, cheaper for Postgres (docs/benchmarks.md, "Against milestone 1").
-- Same figures, same keys, same lock order; only how Postgres computes them changes:
--
-- * plpgsql instead of sql: an SQL function's INSERT is parsed and planned again at every
--   call (about 1 ms each, twice per recorder batch), plpgsql keeps the plan for the session.
-- * Latency histograms from counts per bucket: the rows are first grouped by key and bucket
--   with built-in aggregates, then each key's histogram is made from its (bucket, count)
--   pairs in one call (llm_hist_from), instead of one plpgsql call per row (llm_hist).
--
-- Together about a third of the Postgres time a recorded job costs. llm_hist stays (views and
-- llm_rollup_rebuild's callers may use it); llm_rollup_rebuild calls these functions as before.

-- The histogram holding counts[i] durations in bucket buckets[i] (llm_latency_bucket).
CREATE FUNCTION llm_hist_from(buckets integer[], counts bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    h bigint[] := array_fill(0::bigint, ARRAY[61]);
BEGIN
    FOR i IN 1 .. coalesce(array_length(buckets, 1), 0) LOOP
        h[buckets[i] + 1] := h[buckets[i] + 1] + counts[i];
    END LOOP;
    RETURN h;
END
$$;

CREATE OR REPLACE FUNCTION llm_rollup_add_calls(batch llm_calls[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO llm_rollup_calls AS r
    SELECT g.day, g.tenant, g.kind, g.provider, g.model, g.status,
           sum(g.calls)::bigint, sum(g.jobs)::bigint,
           sum(g.input_tokens)::bigint, sum(g.output_tokens)::bigint,
           sum(g.cache_read_tokens)::bigint, sum(g.cache_write_tokens)::bigint,
           sum(g.cache_write_1h_tokens)::bigint, sum(g.reasoning_tokens)::bigint,
           sum(g.image_input_tokens)::bigint, sum(g.images)::bigint,
           sum(g.estimated_calls)::bigint,
           coalesce(sum(g.cost_usd), 0), sum(g.priced_calls)::bigint,
           sum(g.unpriced_calls)::bigint, sum(g.calls_with_cache_reads)::bigint,
           coalesce(sum(g.saved_e6), 0), sum(g.saved_calls)::bigint,
           sum(g.latency_ms_sum)::bigint, max(g.latency_ms_max),
           llm_hist_from(array_agg(g.bucket), array_agg(g.calls))
    FROM (
        SELECT c.day, c.tenant, c.kind, c.provider, c.model, c.status,
               llm_latency_bucket(c.latency_ms) AS bucket,
               count(*) AS calls, count(*) FILTER (WHERE c.first_of_job) AS jobs,
               sum(c.input_tokens) AS input_tokens, sum(c.output_tokens) AS output_tokens,
               sum(c.cache_read_tokens) AS cache_read_tokens,
               sum(c.cache_write_tokens) AS cache_write_tokens,
               sum(c.cache_write_1h_tokens) AS cache_write_1h_tokens,
               sum(c.reasoning_tokens) AS reasoning_tokens,
               sum(c.image_input_tokens) AS image_input_tokens, sum(c.images) AS images,
               count(*) FILTER (WHERE c.tokens_estimated) AS estimated_calls,
               sum(c.cost_usd) AS cost_usd, count(c.cost_usd) AS priced_calls,
               count(*) FILTER (WHERE c.cost_usd IS NULL
                                  AND c.input_tokens + c.output_tokens > 0) AS unpriced_calls,
               count(*) FILTER (WHERE c.cache_read_tokens > 0) AS calls_with_cache_reads,
               sum(c.saved_e6) AS saved_e6, count(c.saved_e6) AS saved_calls,
               sum(c.latency_ms) AS latency_ms_sum, max(c.latency_ms) AS latency_ms_max
        FROM (
            SELECT c.*, (c.started_at AT TIME ZONE 'UTC')::date AS day,
                   row_number() OVER (PARTITION BY c.job_id,
                                                   (c.started_at AT TIME ZONE 'UTC')::date,
                                                   c.provider, c.model
                                      ORDER BY c.attempt) = 1 AS first_of_job,
                   c.cache_read_tokens * (p.input_usd_per_mtok - p.cache_read_usd_per_mtok)
                       AS saved_e6
            FROM unnest(batch) c
            LEFT JOIN llm_prices p
                   ON p.provider = c.provider AND p.model = c.model
                  AND p.effective_from = c.price_effective_from
        ) c
        GROUP BY 1, 2, 3, 4, 5, 6, 7
    ) g
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
        latency_hist = llm_hist_merge(r.latency_hist, excluded.latency_hist);
END
$$;

CREATE OR REPLACE FUNCTION llm_rollup_add_jobs(batch llm_jobs[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO llm_rollup_jobs AS r
    SELECT g.day, g.tenant, g.kind, g.status, g.error_code, g.provider, g.model,
           sum(g.jobs)::bigint, sum(g.attempts)::bigint, sum(g.cache_hits)::bigint,
           sum(g.images)::bigint,
           sum(g.input_tokens)::bigint, sum(g.output_tokens)::bigint,
           sum(g.cache_read_tokens)::bigint, sum(g.cache_write_tokens)::bigint,
           sum(g.cache_write_1h_tokens)::bigint, sum(g.reasoning_tokens)::bigint,
           sum(g.image_input_tokens)::bigint,
           coalesce(sum(g.cost_usd), 0), sum(g.priced_jobs)::bigint,
           sum(g.saved_input)::bigint, sum(g.saved_output)::bigint,
           coalesce(sum(g.saved_cost), 0), sum(g.saved_priced)::bigint,
           sum(g.processing_ms_sum)::bigint, max(g.processing_ms_max),
           llm_hist_from(array_agg(g.bucket), array_agg(g.jobs))
    FROM (
        SELECT (j.finished_at AT TIME ZONE 'UTC')::date AS day, j.tenant, j.kind, j.status,
               coalesce(j.error_code, '') AS error_code, coalesce(j.provider, '') AS provider,
               coalesce(j.model, '') AS model,
               llm_latency_bucket(j.processing_ms) AS bucket,
               count(*) AS jobs, sum(j.attempts) AS attempts,
               count(*) FILTER (WHERE j.cache_hit) AS cache_hits, sum(j.images) AS images,
               sum(j.input_tokens) AS input_tokens, sum(j.output_tokens) AS output_tokens,
               sum(j.cache_read_tokens) AS cache_read_tokens,
               sum(j.cache_write_tokens) AS cache_write_tokens,
               sum(j.cache_write_1h_tokens) AS cache_write_1h_tokens,
               sum(j.reasoning_tokens) AS reasoning_tokens,
               sum(j.image_input_tokens) AS image_input_tokens,
               sum(j.cost_usd) AS cost_usd, count(j.cost_usd) AS priced_jobs,
               sum(j.cache_saved_input_tokens) AS saved_input,
               sum(j.cache_saved_output_tokens) AS saved_output,
               sum(j.cache_saved_cost_usd) AS saved_cost,
               count(j.cache_saved_cost_usd) AS saved_priced,
               sum(j.processing_ms) AS processing_ms_sum,
               max(j.processing_ms) AS processing_ms_max
        FROM unnest(batch) j
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ) g
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
        processing_hist = llm_hist_merge(r.processing_hist, excluded.processing_hist);
END
$$;
