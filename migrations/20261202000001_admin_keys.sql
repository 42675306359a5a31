-- Operator keys of the gateway: `llm-worker keys create --admin`. An admin key sees the whole
-- fleet's status (`GET /v1/status`, every worker's provider health); a tenant's key sees only
-- the deployment's configured models. Existing keys stay tenant keys.
ALTER TABLE llm_api_keys ADD COLUMN IF NOT EXISTS admin boolean NOT NULL DEFAULT false;
