-- taskmill idempotency + result store, SQLite flavour.
--
-- Times are INTEGER milliseconds since the Unix epoch, always produced by the
-- database itself (CAST(unixepoch('subsec') * 1000 AS INTEGER)) so that every
-- process sharing the file compares leases against one clock.
--
-- JSON payloads (result, error) are stored as TEXT exactly as serde_json wrote them.

CREATE TABLE IF NOT EXISTS taskmill_jobs (
    -- The idempotency key chosen by the producer.
    key              TEXT    PRIMARY KEY NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('claimed', 'completed', 'failed')),
    -- Worker id that holds (or last held) the claim.
    owner            TEXT    NOT NULL,
    -- Lease deadline while state = 'claimed'; NULL once the key is completed or failed.
    lease_expires_at INTEGER,
    -- Number of times the key was acquired. It is also the fencing epoch: a
    -- completion must present the value it was granted, so a worker whose lease
    -- was taken over cannot write.
    attempts         INTEGER NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    result           TEXT,
    error            TEXT,
    job_id           TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    completed_at     INTEGER
) WITHOUT ROWID;

-- Retention purge scans finished rows by age; live claims are never purged, so
-- they are left out of the index.
CREATE INDEX IF NOT EXISTS taskmill_jobs_finished_updated_at
    ON taskmill_jobs (updated_at)
    WHERE state <> 'claimed';
