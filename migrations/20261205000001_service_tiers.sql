-- Service tiers (docs/batch.md): a call made through a provider's Batch API, or at OpenAI's
-- flex tier, is billed at a fraction of the standard price. Each price row says which
-- fraction (OpenAI and Anthropic bill batches at half price; OpenAI's flex tier is half too).
ALTER TABLE llm_prices
    ADD COLUMN batch_price_factor numeric NOT NULL DEFAULT 0.5
        CHECK (batch_price_factor > 0 AND batch_price_factor <= 1),
    ADD COLUMN flex_price_factor numeric NOT NULL DEFAULT 0.5
        CHECK (flex_price_factor > 0 AND flex_price_factor <= 1);

-- The tier each call was made at: 'standard', 'flex' or 'batch'. Rows recorded before are
-- standard calls.
ALTER TABLE llm_calls
    ADD COLUMN service_tier text NOT NULL DEFAULT 'standard'
        CHECK (service_tier IN ('standard', 'flex', 'batch'));

-- The fraction of the standard price a call at `tier` pays under price row `p`.
CREATE FUNCTION llm_tier_factor(p llm_prices, tier text)
RETURNS numeric LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE tier
        WHEN 'batch' THEN p.batch_price_factor
        WHEN 'flex' THEN p.flex_price_factor
        ELSE 1
    END
$$;

-- What the cheaper tiers saved, per day, tenant, provider, model and tier: the calls' cost
-- and what they would have cost at the standard price. Reads the raw calls of the tiers
-- other than standard (filter on `day` for a long history).
CREATE VIEW llm_tier_savings AS
SELECT (c.started_at AT TIME ZONE 'UTC')::date AS day, c.tenant, c.provider, c.model,
       c.service_tier, count(*) AS calls, sum(c.cost_usd) AS cost_usd,
       sum(c.cost_usd / llm_tier_factor(p, c.service_tier)) AS standard_cost_usd,
       sum(c.cost_usd / llm_tier_factor(p, c.service_tier)) - sum(c.cost_usd) AS saved_usd
FROM llm_calls c
LEFT JOIN LATERAL llm_price_at(c.provider, c.model, c.started_at) p ON true
WHERE c.service_tier <> 'standard'
GROUP BY 1, 2, 3, 4, 5;
