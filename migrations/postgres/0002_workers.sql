-- Worker registry, PostgreSQL flavour: one row per worker process, upserted by its
-- heartbeat.
--
-- A key claimed by a worker whose row says it is gone (stopped_at set by a clean
-- shutdown, or no heartbeat for dead_after_ms, the limit that worker chose) can be
-- taken over at once, without waiting for the key's lease. Times come from now().

CREATE TABLE IF NOT EXISTS taskmill_workers (
    id             TEXT        PRIMARY KEY,
    host           TEXT        NOT NULL,
    version        TEXT        NOT NULL,
    -- JSON array of the queue names the worker consumes.
    queues         TEXT        NOT NULL,
    concurrency    BIGINT      NOT NULL,
    pool_size      BIGINT      NOT NULL,
    -- The worker's own clock, for display only; never compared with database times.
    started_at_ms  BIGINT      NOT NULL,
    in_flight      BIGINT      NOT NULL,
    jobs_done      BIGINT      NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL,
    dead_after_ms  BIGINT      NOT NULL CHECK (dead_after_ms >= 0),
    -- Set by a clean shutdown (deregister); cleared by the next heartbeat.
    stopped_at     TIMESTAMPTZ
);
