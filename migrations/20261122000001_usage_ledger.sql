-- The usage and cost ledger (CONTRACT.md section 4). Written only by the recorder, which
-- projects stored results from the LLM_RESULTS stream; every insert is idempotent.

-- One row per job.
CREATE TABLE llm_jobs (
    job_id        uuid PRIMARY KEY,
    trace_id      text        NOT NULL,
    tenant        text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('generate', 'embed')),
    task_type     text,
    status        text        NOT NULL CHECK (status IN ('ok', 'error')),
    provider      text,                       -- final provider (null when no call succeeded)
    model         text,                       -- final model
    input_tokens  bigint      NOT NULL DEFAULT 0,   -- all calls of the job
    output_tokens bigint      NOT NULL DEFAULT 0,   -- all calls of the job
    cost_usd      numeric(20, 10),            -- all calls; NULL when a price is unknown
    attempts      integer     NOT NULL DEFAULT 0,
    cache_hit     boolean     NOT NULL DEFAULT false,
    error_code    text,
    error_message text,
    metadata      jsonb,
    worker_id     text,
    received_at   timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    processing_ms bigint      NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_jobs_finished_at ON llm_jobs (finished_at);
CREATE INDEX llm_jobs_tenant_finished_at ON llm_jobs (tenant, finished_at);
CREATE INDEX llm_jobs_trace_id ON llm_jobs (trace_id);

-- One row per provider call, failed ones included (they can cost money).
CREATE TABLE llm_calls (
    job_id           uuid        NOT NULL,
    attempt          integer     NOT NULL,
    trace_id         text        NOT NULL,
    tenant           text        NOT NULL,
    provider         text        NOT NULL,
    model            text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('ok', 'error')),
    input_tokens     bigint      NOT NULL DEFAULT 0,
    output_tokens    bigint      NOT NULL DEFAULT 0,
    tokens_estimated boolean     NOT NULL DEFAULT false,
    cost_usd         numeric(20, 10),         -- price in force at started_at; NULL if unknown
    latency_ms       bigint      NOT NULL,
    ttft_ms          bigint,
    http_status      integer,
    error_code       text,
    error_message    text,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX llm_calls_started_at ON llm_calls (started_at);
CREATE INDEX llm_calls_trace_id ON llm_calls (trace_id);
CREATE INDEX llm_calls_provider_model_started_at ON llm_calls (provider, model, started_at);
CREATE INDEX llm_calls_tenant_started_at ON llm_calls (tenant, started_at);

-- Prices: USD per million tokens, in force from effective_from until the next row.
CREATE TABLE llm_prices (
    provider            text           NOT NULL,
    model               text           NOT NULL,
    effective_from      timestamptz    NOT NULL DEFAULT now(),
    input_usd_per_mtok  numeric(20, 10) NOT NULL CHECK (input_usd_per_mtok >= 0),
    output_usd_per_mtok numeric(20, 10) NOT NULL CHECK (output_usd_per_mtok >= 0),
    PRIMARY KEY (provider, model, effective_from)
);

-- Per UTC day, tenant, provider, model.
CREATE VIEW llm_usage_daily AS
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
       count(*) FILTER (WHERE c.cost_usd IS NULL AND c.input_tokens + c.output_tokens > 0) AS unpriced_calls
FROM llm_calls c
GROUP BY 1, 2, 3, 4;
