-- taskmill idempotency + result store, PostgreSQL flavour.
--
-- All times come from the database clock (now()), so workers with skewed
-- clocks still agree on whether a lease has expired.
--
-- JSON payloads (result, error) are stored as TEXT exactly as serde_json wrote
-- them (byte-for-byte replay of results; jsonb would reorder keys).

CREATE TABLE IF NOT EXISTS taskmill_jobs (
    -- The idempotency key chosen by the producer.
    key              TEXT        PRIMARY KEY,
    state            TEXT        NOT NULL CHECK (state IN ('claimed', 'completed', 'failed')),
    -- Worker id that holds (or last held) the claim.
    owner            TEXT        NOT NULL,
    -- Lease deadline while state = 'claimed'; NULL once the key is completed or failed.
    lease_expires_at TIMESTAMPTZ,
    -- Number of times the key was acquired. It is also the fencing epoch: a
    -- completion must present the value it was granted, so a worker whose lease
    -- was taken over cannot write.
    attempts         BIGINT      NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    result           TEXT,
    error            TEXT,
    job_id           TEXT        NOT NULL,
    kind             TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at     TIMESTAMPTZ
);

-- Retention purge scans finished rows by age; live claims are never purged, so
-- they are left out of the index.
CREATE INDEX IF NOT EXISTS taskmill_jobs_finished_updated_at
    ON taskmill_jobs (updated_at)
    WHERE state <> 'claimed';
