-- Image jobs (CONTRACT.md section 8): pictures per job and per call, and per-image prices.
--
-- A call's cost is its tokens at the token prices where the provider reports usage (OpenAI's
-- gpt-image-1 bills image tokens), else its pictures at the model's per-image price for their
-- size and quality (dall-e-3, Gemini image models without usage), NULL when that is unknown.

ALTER TABLE llm_jobs DROP CONSTRAINT llm_jobs_kind_check;
ALTER TABLE llm_jobs ADD CONSTRAINT llm_jobs_kind_check CHECK (kind IN ('generate', 'embed', 'image'));

ALTER TABLE llm_calls
    ADD COLUMN images        integer NOT NULL DEFAULT 0 CHECK (images >= 0),
    ADD COLUMN image_size    text,
    ADD COLUMN image_quality text;

ALTER TABLE llm_jobs
    ADD COLUMN images integer NOT NULL DEFAULT 0 CHECK (images >= 0);

-- USD per picture by size and quality: a JSON object whose keys are '<size>/<quality>'
-- ('1024x1024/hd'), '<size>' (any quality), '*/<quality>' (any size) or '*' (anything), looked
-- up in that order. NULL: the model has no per-image price.
ALTER TABLE llm_prices
    ADD COLUMN per_image_usd jsonb
        CHECK (per_image_usd IS NULL OR jsonb_typeof(per_image_usd) = 'object');

-- The price of one picture of `size` and `quality` at price row `p`: the most specific key
-- whose value is a number (NULL when none is).
CREATE FUNCTION llm_image_price(p llm_prices, size text, quality text)
RETURNS numeric LANGUAGE sql IMMUTABLE AS $$
    SELECT (p.per_image_usd -> k.key)::text::numeric
    FROM unnest(ARRAY[coalesce(size, '*') || '/' || coalesce(quality, '*'),
                      coalesce(size, '*'),
                      '*/' || coalesce(quality, '*'),
                      '*']) WITH ORDINALITY AS k(key, n)
    WHERE jsonb_typeof(p.per_image_usd -> k.key) = 'number'
    ORDER BY k.n
    LIMIT 1
$$;

-- A call's cost at price row `p`: its tokens (llm_cost), or, when it reported none and made
-- pictures, the pictures at their per-image price. The recorder and `prices reprice` both
-- cost calls with this one rule.
CREATE FUNCTION llm_call_cost(p llm_prices, input_tokens bigint, output_tokens bigint,
                              cache_read_tokens bigint, cache_write_tokens bigint,
                              cache_write_1h_tokens bigint, reasoning_tokens bigint,
                              image_input_tokens bigint, images integer, image_size text,
                              image_quality text)
RETURNS numeric LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN input_tokens + output_tokens = 0 AND images > 0
            THEN images * llm_image_price(p, image_size, image_quality)
        ELSE llm_cost(p, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                      cache_write_1h_tokens, reasoning_tokens, image_input_tokens)
    END
$$;
