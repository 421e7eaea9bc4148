//! PostgreSQL backend, for worker replicas on several hosts: its SQL text, and connecting.
//!
//! All statements run at READ COMMITTED. The claim is one `INSERT ... ON CONFLICT DO UPDATE
//! ... WHERE lease expired`, which PostgreSQL makes atomic against concurrent inserts and
//! updates of the same key; the completion transaction locks the row with `FOR UPDATE`, so a
//! competing takeover waits for it and then re-reads the committed row. Each transaction locks
//! at most one `taskmill_jobs` row, so the store itself cannot deadlock.

use std::str::FromStr;

use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use taskmill_core::redact::{redact_url, scrub};

use crate::dialect::{Dialect, run_and_decode};
use crate::error::bad_url;
use crate::{ClaimToken, CompletionTx, SqlStore, StoreError, StoreOptions};

/// Epoch milliseconds of a `timestamptz` expression, for reading times in one backend-neutral
/// unit.
macro_rules! ms {
    ($col:literal) => {
        concat!("(EXTRACT(EPOCH FROM ", $col, ") * 1000)::bigint AS ", $col)
    };
}

/// The fencing condition shared by every write made with a token (`$1` key, `$2` owner,
/// `$3` epoch).
macro_rules! fenced {
    () => {
        " WHERE key = $1 AND owner = $2 AND attempts = $3 AND state = 'claimed'"
    };
}

/// Drops the parked copy of the message (an outcome or a release makes it moot); a SET
/// clause fragment ending in a comma.
macro_rules! unpark {
    () => {
        " parked_queue = NULL, parked_message = NULL,"
    };
}

/// The owner of `taskmill_jobs` is known dead: it shut down cleanly, or its last heartbeat
/// is older than the `dead_after` it announced.
macro_rules! owner_dead {
    () => {
        "EXISTS (SELECT 1 FROM taskmill_workers w WHERE w.id = taskmill_jobs.owner
        AND (w.stopped_at IS NOT NULL
             OR w.last_heartbeat + w.dead_after_ms * interval '1 millisecond' <= now()))"
    };
}

/// [`IdempotencyStore`](crate::IdempotencyStore) on PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connects to the database named by a `postgres://` URL and migrates it.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let redacted = redact_url(url);
        let opts = PgConnectOptions::from_str(url).map_err(|e| {
            bad_url(
                &redacted,
                &scrub(&format!("cannot parse PostgreSQL URL ({e})"), url),
            )
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.unwrap_or(10).max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(opts)
            .await
            .map_err(|e| scrub_db_error("connect", e, url))?;
        let store = PgStore::with_pool(pool).await?;
        tracing::info!(url = %redacted, "postgres store ready");
        Ok(store)
    }

    /// Wraps an existing pool and applies pending migrations (serialized across processes by
    /// sqlx's advisory lock).
    pub async fn with_pool(pool: PgPool) -> Result<Self, StoreError> {
        crate::migrate::POSTGRES.run(&pool).await?;
        Ok(SqlStore::new(pool, None))
    }
}

/// Connection errors are the one place where driver text might echo connection settings;
/// rebuild them as configuration errors with any password scrubbed.
fn scrub_db_error(op: &'static str, e: sqlx::Error, url: &str) -> StoreError {
    let text = e.to_string();
    let clean = scrub(&text, url);
    if clean == text {
        StoreError::Database { op, source: e }
    } else {
        StoreError::Database {
            op,
            source: sqlx::Error::Configuration(clean.into()),
        }
    }
}

impl Dialect for Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";
    // Insert a fresh claim, or take over a claimed row whose lease expired or whose owner is
    // known dead (bumping the epoch). A row that is not taken over is left untouched and
    // RETURNING yields nothing.
    const CLAIM: &'static str = concat!(
        "INSERT INTO taskmill_jobs
    (key, state, owner, lease_expires_at, attempts, job_id, kind, created_at, updated_at)
VALUES ($1, 'claimed', $4, now() + $5::float8 * interval '1 millisecond', 1, $2, $3, now(), now())
ON CONFLICT (key) DO UPDATE SET
    owner = EXCLUDED.owner,
    lease_expires_at = EXCLUDED.lease_expires_at,
    attempts = taskmill_jobs.attempts + 1,
    job_id = EXCLUDED.job_id,
    kind = EXCLUDED.kind,
    updated_at = now()
WHERE taskmill_jobs.state = 'claimed'
    AND (taskmill_jobs.lease_expires_at <= now() OR ",
        owner_dead!(),
        ")
RETURNING attempts"
    );
    // What is there when the claim did not acquire. `expires_in_ms` is when the key becomes
    // claimable: the earlier of the lease deadline and, when the owner has a registry row,
    // its death deadline (now, if it deregistered; LEAST ignores the NULL of no row). Rounded
    // up to whole ms, so "0" means claimable by the same clock the claim used.
    const INSPECT: &'static str = "\
SELECT j.state, j.owner, j.result, j.error,
       GREATEST(0, CEIL(EXTRACT(EPOCH FROM (
           LEAST(COALESCE(j.lease_expires_at, now()),
                 CASE WHEN w.stopped_at IS NOT NULL THEN now()
                      ELSE w.last_heartbeat + w.dead_after_ms * interval '1 millisecond' END)
           - now())) * 1000))::bigint AS expires_in_ms
FROM taskmill_jobs j LEFT JOIN taskmill_workers w ON w.id = j.owner
WHERE j.key = $1";
    const COMPLETE: &'static str = concat!(
        "UPDATE taskmill_jobs SET state = 'completed', result = $4, error = NULL,",
        unpark!(),
        " lease_expires_at = NULL, completed_at = now(), updated_at = now()",
        fenced!()
    );
    const FAIL: &'static str = concat!(
        "UPDATE taskmill_jobs SET state = 'failed', error = $4, result = NULL,",
        unpark!(),
        " lease_expires_at = NULL, updated_at = now()",
        fenced!()
    );
    const RELEASE: &'static str = concat!(
        "UPDATE taskmill_jobs SET",
        unpark!(),
        " lease_expires_at = now(), updated_at = now()",
        fenced!()
    );
    const EXTEND: &'static str = concat!(
        "UPDATE taskmill_jobs",
        " SET lease_expires_at = now() + $4::float8 * interval '1 millisecond',",
        " updated_at = now()",
        fenced!()
    );
    const PARK: &'static str = concat!(
        "UPDATE taskmill_jobs SET parked_queue = $4, parked_message = $5, updated_at = now()",
        fenced!()
    );
    // SKIP LOCKED: a row another sweeper (or a claim) is taking over right now is left to
    // it; a row it took over before we locked is re-checked against its new lease and
    // dropped, so two sweepers never take the same row.
    const TAKE_ORPHANS: &'static str = concat!(
        "UPDATE taskmill_jobs SET owner = $1, attempts = attempts + 1,
    lease_expires_at = now() + $2::float8 * interval '1 millisecond', updated_at = now()
WHERE key IN (
    SELECT key FROM taskmill_jobs
    WHERE state = 'claimed' AND parked_queue IS NOT NULL
        AND (lease_expires_at <= now() OR ",
        owner_dead!(),
        ")
    ORDER BY lease_expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING key, attempts, parked_queue, parked_message"
    );
    // FOR UPDATE holds the row until commit/rollback: a takeover attempt blocks on it and
    // then sees our outcome. If a takeover committed first, the re-checked WHERE fails.
    const HOLD: &'static str = concat!(
        "SELECT 1 AS held FROM taskmill_jobs",
        fenced!(),
        " FOR UPDATE"
    );
    const GET: &'static str = concat!(
        "SELECT key, state, owner, attempts, result, error, job_id, kind, ",
        ms!("lease_expires_at"),
        ", ",
        ms!("created_at"),
        ", ",
        ms!("updated_at"),
        ", ",
        ms!("completed_at"),
        " FROM taskmill_jobs WHERE key = $1"
    );
    const FORGET: &'static str = "DELETE FROM taskmill_jobs WHERE key = $1";
    // SKIP LOCKED: a row under a completion transaction is not finished yet anyway.
    const PURGE: &'static str = "\
DELETE FROM taskmill_jobs WHERE key IN (
    SELECT key FROM taskmill_jobs
    WHERE state <> 'claimed' AND updated_at < now() - $1::float8 * interval '1 millisecond'
    LIMIT $2 FOR UPDATE SKIP LOCKED)";
    // One statement, one round trip: the upsert runs as a data-modifying CTE (PostgreSQL
    // always runs those to completion), the UPDATE extends every token at once.
    const HEARTBEAT: &'static str = "\
WITH beat AS (
    INSERT INTO taskmill_workers (id, host, version, queues, concurrency, pool_size,
        started_at_ms, in_flight, jobs_done, dead_after_ms, last_heartbeat, stopped_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now(), NULL)
    ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, version = EXCLUDED.version,
        queues = EXCLUDED.queues, concurrency = EXCLUDED.concurrency,
        pool_size = EXCLUDED.pool_size, started_at_ms = EXCLUDED.started_at_ms,
        in_flight = EXCLUDED.in_flight, jobs_done = EXCLUDED.jobs_done,
        dead_after_ms = EXCLUDED.dead_after_ms, last_heartbeat = now(), stopped_at = NULL
)
UPDATE taskmill_jobs AS j
SET lease_expires_at = now() + $12::float8 * interval '1 millisecond', updated_at = now()
FROM json_to_recordset($11::json) AS t(key text, owner text, fencing bigint)
WHERE j.key = t.key AND j.owner = t.owner AND j.attempts = t.fencing AND j.state = 'claimed'
RETURNING j.key";
    const DEREGISTER: &'static str = "UPDATE taskmill_workers SET stopped_at = now() WHERE id = $1";
    const WORKERS: &'static str = concat!(
        "SELECT id, host, version, queues, concurrency, pool_size, started_at_ms, in_flight,",
        " jobs_done, dead_after_ms, ",
        ms!("last_heartbeat"),
        ", (CASE WHEN stopped_at IS NULL THEN 0 ELSE 1 END)::bigint AS deregistered,",
        " (CASE WHEN stopped_at IS NULL",
        " AND last_heartbeat + dead_after_ms * interval '1 millisecond' > now()",
        " THEN 1 ELSE 0 END)::bigint AS alive",
        " FROM taskmill_workers ORDER BY last_heartbeat DESC, id"
    );

    run_and_decode!();

    async fn begin_completion(
        store: &SqlStore<Self>,
        token: &ClaimToken,
    ) -> Result<CompletionTx, StoreError> {
        let mut tx = store
            .pool()
            .begin()
            .await
            .map_err(StoreError::db("begin_completion"))?;
        crate::body::hold_on::<Postgres>(&mut tx, token).await?;
        Ok(CompletionTx::postgres_tx(token.clone(), tx))
    }
}
