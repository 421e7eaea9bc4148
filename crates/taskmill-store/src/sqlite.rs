//! SQLite backend: the embedded default. Its SQL text, and how to open the file.
//!
//! One file in WAL mode shared by every task of a process and by several processes. SQLite has
//! one writer at a time; a writer that finds the file locked waits up to `busy_timeout`
//! (set on every connection) instead of failing. Every write here is either a single
//! autocommit statement or a transaction opened with `BEGIN IMMEDIATE`, which takes the write
//! lock up front: a deferred transaction that reads and then writes can fail with
//! `SQLITE_BUSY` without waiting (its snapshot went stale), and that is exactly the pattern
//! to avoid when several processes race. Claims, completions and heartbeats go through the
//! group commit ([`crate::group_commit`]).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Sqlite};
use taskmill_core::redact::redact_url;

use crate::dialect::{Dialect, run_and_decode};
use crate::error::bad_url;
use crate::group_commit::GroupCommit;
use crate::{ClaimToken, CompletionTx, SqlStore, StoreError, StoreOptions};

/// The database clock in epoch milliseconds. SQLite evaluates `'now'` once per statement,
/// so every use within one statement sees the same instant.
macro_rules! now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// The fencing condition shared by every write made with a token (`?1` key, `?2` owner,
/// `?3` epoch).
macro_rules! fenced {
    () => {
        " WHERE key = ?1 AND owner = ?2 AND attempts = ?3 AND state = 'claimed'"
    };
}

/// Drops the parked copy of the message (an outcome or a release makes it moot); a SET
/// clause fragment ending in a comma.
macro_rules! unpark {
    () => {
        " parked_queue = NULL, parked_message = NULL,"
    };
}

/// The fencing condition of the owner of `taskmill_jobs` being known dead: it shut down
/// cleanly, or its last heartbeat is older than the `dead_after` it announced.
macro_rules! owner_dead {
    () => {
        concat!(
            " EXISTS (SELECT 1 FROM taskmill_workers w WHERE w.id = taskmill_jobs.owner",
            " AND (w.stopped_at IS NOT NULL OR w.last_heartbeat + w.dead_after_ms <= ",
            now_ms!(),
            "))"
        )
    };
}

/// [`IdempotencyStore`](crate::IdempotencyStore) on SQLite.
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating if missing) the database named by a `sqlite:` URL and migrates it.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let redacted = redact_url(url);
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| bad_url(&redacted, &format!("cannot parse SQLite URL ({e})")))?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            // SQLite creates the file but not its directory; `sqlite://data/taskmill.db`
            // should work on a fresh checkout or an empty volume.
            if let Some(dir) = opts.get_filename().parent()
                && !dir.as_os_str().is_empty()
            {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| StoreError::Database {
                        op: "connect",
                        source: sqlx::Error::Io(e),
                    })?;
            }
        }
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(options.sqlite_busy_timeout)
            .foreign_keys(true)
            .synchronous(if options.sqlite_full_sync {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            });
        let pool_opts = SqlitePoolOptions::new().acquire_timeout(options.acquire_timeout);
        let pool_opts = if in_memory {
            // Each in-memory database lives as long as one connection holding it: keep exactly
            // one, forever (sqlx's shared-cache trick would otherwise hit table locks that
            // busy_timeout does not wait for).
            pool_opts
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            pool_opts.max_connections(options.max_connections.unwrap_or(4).max(1))
        };
        // Opening a fresh file runs `PRAGMA journal_mode = WAL`, which needs an exclusive
        // lock. When several processes open the same new file at once, SQLite can answer
        // that pragma with SQLITE_BUSY without consulting the busy handler, so the wait is
        // done here, bounded by the same busy timeout.
        let deadline = tokio::time::Instant::now() + options.sqlite_busy_timeout;
        let mut pause = Duration::from_millis(5);
        let pool = loop {
            match pool_opts.clone().connect_with(opts.clone()).await {
                Ok(pool) => break pool,
                Err(e) if is_busy(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(url = %redacted, "sqlite file busy while opening; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(StoreError::db("connect")(e)),
            }
        };
        let store = SqliteStore::with_pool(pool).await?;
        tracing::info!(url = %redacted, "sqlite store ready");
        Ok(store)
    }

    /// Wraps an existing pool and applies pending migrations. The pool should use WAL mode and
    /// a busy timeout, as [`SqliteStore::connect`] sets up.
    pub async fn with_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await.map_err(StoreError::db("migrate"))?;
        // sqlx's migration lock is a no-op on SQLite, so two processes migrating a fresh file
        // would both try to apply 0001. Holding the write lock for the whole run serializes
        // them: the second one waits (busy_timeout), then finds the migration recorded.
        // sqlx turns the migrator's own per-migration transactions into savepoints.
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("migrate"))?;
        // `run_direct` rather than `run`: `run` goes through `Acquire`, whose impl for
        // `&mut SqliteConnection` makes this future `Send` only for one specific lifetime,
        // so it could not be spawned (sqlx documents `run_direct` as that workaround).
        crate::migrate::SQLITE
            .run_direct(None, &mut *tx, false)
            .await?;
        tx.commit().await.map_err(StoreError::db("migrate"))?;
        drop(conn);
        let batch = GroupCommit::start::<Sqlite>(pool.clone());
        Ok(SqlStore::new(pool, Some(batch)))
    }
}

/// SQLITE_BUSY and its extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT, BUSY_TIMEOUT).
fn is_busy(e: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i32 = 5;
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == SQLITE_BUSY),
        _ => false,
    }
}

impl Dialect for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const CLAIM: &'static str = concat!(
        "INSERT INTO taskmill_jobs",
        " (key, state, owner, lease_expires_at, attempts, job_id, kind, created_at, updated_at)",
        " VALUES (?1, 'claimed', ?4, ",
        now_ms!(),
        " + ?5, 1, ?2, ?3, ",
        now_ms!(),
        ", ",
        now_ms!(),
        ")",
        " ON CONFLICT (key) DO UPDATE SET",
        " owner = excluded.owner, lease_expires_at = excluded.lease_expires_at,",
        " attempts = taskmill_jobs.attempts + 1, job_id = excluded.job_id,",
        " kind = excluded.kind, updated_at = excluded.updated_at",
        " WHERE taskmill_jobs.state = 'claimed'",
        " AND (taskmill_jobs.lease_expires_at <= excluded.updated_at OR",
        owner_dead!(),
        ") RETURNING attempts"
    );
    // The key becomes claimable at the earlier of its lease deadline and, when the owner has
    // a registry row, that row's death deadline (now, if it deregistered). SQLite's
    // two-argument MIN is NULL if either is, hence the COALESCE to the lease.
    const INSPECT: &'static str = concat!(
        "SELECT j.state, j.owner, j.result, j.error,",
        " MAX(MIN(COALESCE(j.lease_expires_at, 0), COALESCE(CASE",
        " WHEN w.stopped_at IS NOT NULL THEN 0",
        " ELSE w.last_heartbeat + w.dead_after_ms END, j.lease_expires_at, 0)) - ",
        now_ms!(),
        ", 0) AS expires_in_ms",
        " FROM taskmill_jobs j LEFT JOIN taskmill_workers w ON w.id = j.owner",
        " WHERE j.key = ?1"
    );
    const COMPLETE: &'static str = concat!(
        "UPDATE taskmill_jobs SET state = 'completed', result = ?4, error = NULL,",
        unpark!(),
        " lease_expires_at = NULL, completed_at = ",
        now_ms!(),
        ", updated_at = ",
        now_ms!(),
        fenced!()
    );
    const FAIL: &'static str = concat!(
        "UPDATE taskmill_jobs SET state = 'failed', error = ?4, result = NULL,",
        unpark!(),
        " lease_expires_at = NULL, updated_at = ",
        now_ms!(),
        fenced!()
    );
    const RELEASE: &'static str = concat!(
        "UPDATE taskmill_jobs SET",
        unpark!(),
        " lease_expires_at = ",
        now_ms!(),
        ", updated_at = ",
        now_ms!(),
        fenced!()
    );
    const EXTEND: &'static str = concat!(
        "UPDATE taskmill_jobs SET lease_expires_at = ",
        now_ms!(),
        " + ?4, updated_at = ",
        now_ms!(),
        fenced!()
    );
    const PARK: &'static str = concat!(
        "UPDATE taskmill_jobs SET parked_queue = ?4, parked_message = ?5, updated_at = ",
        now_ms!(),
        fenced!()
    );
    // One statement: SQLite runs one writer at a time, so two sweepers cannot pick the
    // same row; the second sees the first one's new lease and skips it.
    const TAKE_ORPHANS: &'static str = concat!(
        "UPDATE taskmill_jobs SET owner = ?1, attempts = attempts + 1, lease_expires_at = ",
        now_ms!(),
        " + ?2, updated_at = ",
        now_ms!(),
        " WHERE key IN (SELECT key FROM taskmill_jobs",
        " WHERE state = 'claimed' AND parked_queue IS NOT NULL",
        " AND (lease_expires_at <= ",
        now_ms!(),
        " OR",
        owner_dead!(),
        ") ORDER BY lease_expires_at LIMIT ?3)",
        " RETURNING key, attempts, parked_queue, parked_message"
    );
    const HOLD: &'static str = concat!("SELECT 1 AS held FROM taskmill_jobs", fenced!());
    const GET: &'static str = "SELECT key, state, owner, attempts, lease_expires_at, result, \
        error, job_id, kind, created_at, updated_at, completed_at \
        FROM taskmill_jobs WHERE key = ?1";
    const FORGET: &'static str = "DELETE FROM taskmill_jobs WHERE key = ?1";
    const PURGE: &'static str = concat!(
        "DELETE FROM taskmill_jobs WHERE key IN (",
        " SELECT key FROM taskmill_jobs",
        " WHERE state <> 'claimed' AND updated_at < ",
        now_ms!(),
        " - ?1 LIMIT ?2)"
    );
    // Two statements in one text, run as one request of the group commit (one commit).
    const HEARTBEAT: &'static str = concat!(
        "INSERT INTO taskmill_workers (id, host, version, queues, concurrency, pool_size,",
        " started_at_ms, in_flight, jobs_done, dead_after_ms, last_heartbeat, stopped_at)",
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ",
        now_ms!(),
        ", NULL)",
        " ON CONFLICT (id) DO UPDATE SET host = excluded.host, version = excluded.version,",
        " queues = excluded.queues, concurrency = excluded.concurrency,",
        " pool_size = excluded.pool_size, started_at_ms = excluded.started_at_ms,",
        " in_flight = excluded.in_flight, jobs_done = excluded.jobs_done,",
        " dead_after_ms = excluded.dead_after_ms, last_heartbeat = excluded.last_heartbeat,",
        " stopped_at = NULL;",
        " UPDATE taskmill_jobs SET lease_expires_at = ",
        now_ms!(),
        " + ?12, updated_at = ",
        now_ms!(),
        " FROM (SELECT json_extract(value, '$.key') AS k, json_extract(value, '$.owner') AS o,",
        " json_extract(value, '$.fencing') AS f FROM json_each(?11)) AS t",
        " WHERE taskmill_jobs.key = t.k AND taskmill_jobs.owner = t.o",
        " AND taskmill_jobs.attempts = t.f AND taskmill_jobs.state = 'claimed'",
        " RETURNING key"
    );
    const DEREGISTER: &'static str = concat!(
        "UPDATE taskmill_workers SET stopped_at = ",
        now_ms!(),
        " WHERE id = ?1"
    );
    const WORKERS: &'static str = concat!(
        "SELECT id, host, version, queues, concurrency, pool_size, started_at_ms, in_flight,",
        " jobs_done, last_heartbeat, dead_after_ms,",
        " (stopped_at IS NOT NULL) AS deregistered,",
        " (stopped_at IS NULL AND last_heartbeat + dead_after_ms > ",
        now_ms!(),
        ") AS alive",
        " FROM taskmill_workers ORDER BY last_heartbeat DESC, id"
    );

    run_and_decode!();

    async fn begin_completion(
        store: &SqlStore<Self>,
        token: &ClaimToken,
    ) -> Result<CompletionTx, StoreError> {
        // Verify now, but take no lock: the write lock is taken when the handler first uses
        // the transaction (see CompletionTx), so a handler that computes before it writes
        // does not stop every other claim and completion on the file meanwhile.
        let mut conn = store.conn("begin_completion").await?;
        crate::body::hold_on::<Sqlite>(&mut conn, token).await?;
        drop(conn);
        Ok(CompletionTx::sqlite_lazy(token.clone(), store.clone()))
    }
}
