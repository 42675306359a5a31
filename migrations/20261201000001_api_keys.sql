-- API keys of the HTTP gateway (`llm-worker keys`). Only a SHA-256 hash of each key is kept:
-- a key is 32 random bytes, so a fast hash is enough (nothing to brute-force), and the table
-- never holds a usable secret. `prefix` (the key's first characters) identifies a key in lists.
CREATE TABLE IF NOT EXISTS llm_api_keys (
    id          uuid        PRIMARY KEY,
    key_hash    bytea       NOT NULL UNIQUE,
    prefix      text        NOT NULL,
    tenant      text        NOT NULL,
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX IF NOT EXISTS llm_api_keys_tenant ON llm_api_keys (tenant);
