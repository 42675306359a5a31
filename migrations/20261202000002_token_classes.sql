-- Token classes and cost as billed (CONTRACT.md section 7).
--
-- Every class is a part of input_tokens or output_tokens, never added to them:
-- cache_read_tokens, cache_write_tokens, cache_write_1h_tokens and image_input_tokens are parts
-- of input_tokens; reasoning_tokens is a part of output_tokens. A call's cost is
--   (input - cache_read - cache_write - cache_write_1h - image_input) * input price
-- + (output - reasoning) * output price
-- + each class * its own price,
-- per million tokens, with the llm_prices row in force when the call started; NULL when a class
-- with tokens has no price (never a guess). llm_cost() below is that sum.

ALTER TABLE llm_calls
    ADD COLUMN cache_read_tokens     bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens    bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_1h_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens      bigint NOT NULL DEFAULT 0,
    ADD COLUMN image_input_tokens    bigint NOT NULL DEFAULT 0,
    -- The price row this call was costed with: llm_prices (provider, model, effective_from).
    -- NULL when no row was in force. A later price never changes a recorded cost;
    -- `llm-worker prices reprice` re-applies prices on purpose and updates this too.
    ADD COLUMN price_effective_from  timestamptz;

ALTER TABLE llm_jobs
    ADD COLUMN cache_read_tokens     bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens    bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_1h_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens      bigint NOT NULL DEFAULT 0,
    ADD COLUMN image_input_tokens    bigint NOT NULL DEFAULT 0;

-- A price per class, USD per million tokens; NULL = not priced.
ALTER TABLE llm_prices
    ADD COLUMN cache_read_usd_per_mtok     numeric(20, 10) CHECK (cache_read_usd_per_mtok >= 0),
    ADD COLUMN cache_write_usd_per_mtok    numeric(20, 10) CHECK (cache_write_usd_per_mtok >= 0),
    ADD COLUMN cache_write_1h_usd_per_mtok numeric(20, 10) CHECK (cache_write_1h_usd_per_mtok >= 0),
    ADD COLUMN reasoning_usd_per_mtok      numeric(20, 10) CHECK (reasoning_usd_per_mtok >= 0),
    ADD COLUMN image_input_usd_per_mtok    numeric(20, 10) CHECK (image_input_usd_per_mtok >= 0),
    -- Where the row came from: the price file and the date its prices were checked
    -- (`llm-worker prices load`), NULL for rows written by hand.
    ADD COLUMN source text;

-- Rows written before classes existed: OpenAI, Anthropic and Gemini bill thinking tokens at the
-- output price and image tokens at the input price, so the costs those rows gave stay the
-- same. Cache reads and writes have provider-specific prices: left unpriced.
UPDATE llm_prices
SET reasoning_usd_per_mtok = output_usd_per_mtok,
    image_input_usd_per_mtok = input_usd_per_mtok;

-- The price row in force for a provider and model at a time (none before its first row).
CREATE FUNCTION llm_price_at(provider text, model text, at timestamptz)
RETURNS SETOF llm_prices LANGUAGE sql STABLE AS $$
    SELECT * FROM llm_prices p
    WHERE p.provider = llm_price_at.provider AND p.model = llm_price_at.model
      AND p.effective_from <= llm_price_at.at
    ORDER BY p.effective_from DESC LIMIT 1
$$;

-- Which row costed the calls recorded so far (the one in force at their start).
UPDATE llm_calls c
SET price_effective_from = (SELECT p.effective_from FROM llm_price_at(c.provider, c.model, c.started_at) p)
WHERE c.cost_usd IS NOT NULL AND c.input_tokens + c.output_tokens > 0;

-- A call's cost at price row `p` (NULL when p is NULL or a class with tokens is unpriced).
CREATE FUNCTION llm_cost(p llm_prices, input_tokens bigint, output_tokens bigint,
                         cache_read_tokens bigint, cache_write_tokens bigint,
                         cache_write_1h_tokens bigint, reasoning_tokens bigint,
                         image_input_tokens bigint)
RETURNS numeric LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN input_tokens + output_tokens = 0 THEN 0
        WHEN (cache_read_tokens > 0 AND p.cache_read_usd_per_mtok IS NULL)
          OR (cache_write_tokens > 0 AND p.cache_write_usd_per_mtok IS NULL)
          OR (cache_write_1h_tokens > 0 AND p.cache_write_1h_usd_per_mtok IS NULL)
          OR (reasoning_tokens > 0 AND p.reasoning_usd_per_mtok IS NULL)
          OR (image_input_tokens > 0 AND p.image_input_usd_per_mtok IS NULL) THEN NULL
        ELSE (greatest(input_tokens - cache_read_tokens - cache_write_tokens
                       - cache_write_1h_tokens - image_input_tokens, 0) * p.input_usd_per_mtok
              + greatest(output_tokens - reasoning_tokens, 0) * p.output_usd_per_mtok
              + cache_read_tokens * coalesce(p.cache_read_usd_per_mtok, 0)
              + cache_write_tokens * coalesce(p.cache_write_usd_per_mtok, 0)
              + cache_write_1h_tokens * coalesce(p.cache_write_1h_usd_per_mtok, 0)
              + reasoning_tokens * coalesce(p.reasoning_usd_per_mtok, 0)
              + image_input_tokens * coalesce(p.image_input_usd_per_mtok, 0)) / 1000000
    END
$$;

-- The provider's prompt cache per UTC day, tenant, provider and model: how much of the prompt
-- it served, what it wrote, and what the reads saved against the input price of the price
-- row each call was costed with (NULL where reads are unpriced).
CREATE VIEW llm_prompt_cache_daily AS
SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day,
       c.tenant,
       c.provider,
       c.model,
       count(*)                                        AS calls,
       count(*) FILTER (WHERE c.cache_read_tokens > 0) AS calls_with_cache_reads,
       sum(c.input_tokens)::bigint                     AS input_tokens,
       sum(c.cache_read_tokens)::bigint                AS cache_read_tokens,
       sum(c.cache_write_tokens + c.cache_write_1h_tokens)::bigint AS cache_write_tokens,
       round(sum(c.cache_read_tokens)::numeric / nullif(sum(c.input_tokens), 0), 4) AS cache_read_share,
       sum(c.cache_read_tokens * (p.input_usd_per_mtok - p.cache_read_usd_per_mtok)) / 1000000
                                                       AS cache_saved_usd
FROM llm_calls c
LEFT JOIN llm_prices p
       ON p.provider = c.provider AND p.model = c.model
      AND p.effective_from = c.price_effective_from
GROUP BY 1, 2, 3, 4;

-- The daily usage view gains the classes (new columns at the end; existing queries unchanged).
CREATE OR REPLACE VIEW llm_usage_daily AS
SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day,
       c.tenant,
       c.provider,
       c.model,
       count(*)                      AS calls,
       count(DISTINCT c.job_id)      AS jobs,
       count(*) FILTER (WHERE c.status = 'error') AS failed_calls,
       sum(c.input_tokens)::bigint   AS input_tokens,
       sum(c.output_tokens)::bigint  AS output_tokens,
       sum(c.cost_usd)               AS cost_usd,
       count(*) FILTER (WHERE c.cost_usd IS NULL AND c.input_tokens + c.output_tokens > 0) AS unpriced_calls,
       sum(c.cache_read_tokens)::bigint     AS cache_read_tokens,
       sum(c.cache_write_tokens)::bigint    AS cache_write_tokens,
       sum(c.cache_write_1h_tokens)::bigint AS cache_write_1h_tokens,
       sum(c.reasoning_tokens)::bigint      AS reasoning_tokens,
       sum(c.image_input_tokens)::bigint    AS image_input_tokens
FROM llm_calls c
GROUP BY 1, 2, 3, 4;
