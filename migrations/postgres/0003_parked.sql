-- Parked jobs, PostgreSQL flavour: a copy of a long job's message kept with its claim, so
-- the worker can ack the delivery early (before the broker's consumer timeout) and a
-- sweeper on any live worker can republish the job if its worker dies.
--
-- Both columns are NULL unless the current claim parked a copy; complete, fail, release
-- and forget clear it. Nullable columns without a default are a catalog-only change:
-- existing rows are not rewritten.

ALTER TABLE taskmill_jobs ADD COLUMN IF NOT EXISTS parked_queue TEXT;
ALTER TABLE taskmill_jobs ADD COLUMN IF NOT EXISTS parked_message BYTEA;

-- The sweeper looks only at parked claims, oldest lease first.
CREATE INDEX IF NOT EXISTS taskmill_jobs_parked_lease
    ON taskmill_jobs (lease_expires_at)
    WHERE parked_queue IS NOT NULL;
