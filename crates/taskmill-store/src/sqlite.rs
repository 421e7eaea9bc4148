//! SQLite backend: the embedded default.
//!
//! One file in WAL mode shared by every task of a process and by several processes. SQLite has
//! one writer at a time; a writer that finds the file locked waits up to `busy_timeout`
//! (set on every connection) instead of failing. Every write here is either a single
//! autocommit statement or a transaction opened with `BEGIN IMMEDIATE`, which takes the write
//! lock up front: a deferred transaction that reads and then writes can fail with
//! `SQLITE_BUSY` without waiting (its snapshot went stale), and that is exactly the pattern
//! to avoid when several processes race.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, Executor, Row, Sqlite, SqliteConnection};

use crate::error::{bad_url, redact_url};
use crate::group_commit::GroupCommit;
use crate::{
    CLAIM_RETRIES, Claim, ClaimToken, CompletionTx, Existing, IdempotencyStore, PURGE_BATCH,
    RawRecord, Record, StoreError, StoreOptions, json_text, lease_lost, millis,
};

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

/// [`IdempotencyStore`] on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Claims and completions, committed in groups (see [`crate::group_commit`]).
    batch: GroupCommit,
}

impl SqliteStore {
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
        let batch = GroupCommit::start(pool.clone());
        Ok(SqliteStore { pool, batch })
    }

    /// The connection pool, for handler code that writes to the same file outside a
    /// completion (and for tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
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

/// The claim decision for `key`, run on `conn` (inside the group commit's
/// transaction, so no other writer can change the row between its
/// statements). A [`StoreError::Database`] means the connection or the
/// transaction failed; any other error is about this key's row alone.
pub(crate) async fn claim_on(
    conn: &mut SqliteConnection,
    key: &str,
    job_id: &str,
    kind: &str,
    owner: &str,
    lease_ms: i64,
) -> Result<Claim, StoreError> {
    // One statement decides: insert a fresh claim, or take over a claimed row whose lease
    // expired, bumping the epoch. A row that is not taken over is left untouched and
    // RETURNING yields nothing.
    for _ in 0..CLAIM_RETRIES {
        let row = sqlx::query(CLAIM_SQL)
            .bind(key)
            .bind(job_id)
            .bind(kind)
            .bind(owner)
            .bind(lease_ms)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db("claim"))?;
        if let Some(row) = row {
            let fencing: i64 = row.try_get(0).map_err(StoreError::db("claim"))?;
            tracing::debug!(key, owner, fencing, "claim acquired");
            return Ok(Claim::Acquired(ClaimToken {
                key: key.to_owned(),
                owner: owner.to_owned(),
                fencing,
            }));
        }
        let existing = sqlx::query(INSPECT_SQL)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::db("claim"))?;
        let Some(row) = existing else {
            continue; // deleted in between (forget/purge): try to insert again
        };
        let existing = Existing {
            state: row.try_get("state").map_err(StoreError::db("claim"))?,
            owner: row.try_get("owner").map_err(StoreError::db("claim"))?,
            result: row.try_get("result").map_err(StoreError::db("claim"))?,
            error: row.try_get("error").map_err(StoreError::db("claim"))?,
            expires_in_ms: row
                .try_get("expires_in_ms")
                .map_err(StoreError::db("claim"))?,
        };
        let holder = existing.owner.clone();
        if let Some(claim) = existing.into_claim(key)? {
            return Ok(claim);
        }
        tracing::trace!(
            key,
            holder,
            "lease expired between statements; claiming again"
        );
    }
    // The row kept changing under us; let the caller retry later like any held key.
    Ok(Claim::HeldElsewhere {
        owner: String::new(),
        expires_in: Duration::ZERO,
    })
}

/// Marks the token's claim completed; returns rows changed (0 = lease lost).
pub(crate) async fn mark_completed<'c, E>(
    ex: E,
    token: &ClaimToken,
    result_json: &str,
) -> Result<u64, sqlx::Error>
where
    E: Executor<'c, Database = Sqlite>,
{
    let q = sqlx::query(concat!(
        "UPDATE taskmill_jobs SET state = 'completed', result = ?4, error = NULL,",
        " lease_expires_at = NULL, completed_at = ",
        now_ms!(),
        ", updated_at = ",
        now_ms!(),
        fenced!()
    ));
    Ok(q.bind(&token.key)
        .bind(&token.owner)
        .bind(token.fencing)
        .bind(result_json)
        .execute(ex)
        .await?
        .rows_affected())
}

fn raw_record(row: &SqliteRow) -> Result<RawRecord, sqlx::Error> {
    Ok(RawRecord {
        key: row.try_get("key")?,
        state: row.try_get("state")?,
        owner: row.try_get("owner")?,
        attempts: row.try_get("attempts")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        job_id: row.try_get("job_id")?,
        kind: row.try_get("kind")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

impl SqliteStore {
    /// Runs a fenced single-statement write; 0 rows changed means the lease was lost.
    async fn fenced_write(
        &self,
        op: &'static str,
        sql: &'static str,
        token: &ClaimToken,
        extra: Option<Bind<'_>>,
    ) -> Result<(), StoreError> {
        let mut q = sqlx::query(sql)
            .bind(&token.key)
            .bind(&token.owner)
            .bind(token.fencing);
        q = match extra {
            Some(Bind::Text(t)) => q.bind(t),
            Some(Bind::Int(i)) => q.bind(i),
            None => q,
        };
        let n = q
            .execute(&self.pool)
            .await
            .map_err(StoreError::db(op))?
            .rows_affected();
        if n == 1 {
            tracing::debug!(key = %token.key, fencing = token.fencing, op, "store write");
            Ok(())
        } else {
            Err(lease_lost(token))
        }
    }
}

enum Bind<'a> {
    Text(&'a str),
    Int(i64),
}

const CLAIM_SQL: &str = concat!(
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
    " AND taskmill_jobs.lease_expires_at <= excluded.updated_at",
    " RETURNING attempts"
);
const INSPECT_SQL: &str = concat!(
    "SELECT state, owner, result, error,",
    " MAX(COALESCE(lease_expires_at, 0) - ",
    now_ms!(),
    ", 0) AS expires_in_ms",
    " FROM taskmill_jobs WHERE key = ?1"
);

impl IdempotencyStore for SqliteStore {
    async fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.batch
            .claim(key, job_id, kind, owner, millis(lease))
            .await
    }

    async fn complete(
        &self,
        token: &ClaimToken,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.batch.complete(token, json_text(result)).await
    }

    async fn begin_completion(&self, token: &ClaimToken) -> Result<CompletionTx, StoreError> {
        // BEGIN IMMEDIATE takes the write lock now (waiting up to busy_timeout), so no other
        // connection or process can take the claim over until we commit or roll back.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::db("begin_completion"))?;
        let held = sqlx::query(concat!("SELECT 1 FROM taskmill_jobs", fenced!()))
            .bind(&token.key)
            .bind(&token.owner)
            .bind(token.fencing)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db("begin_completion"))?;
        if held.is_none() {
            // Dropping `tx` rolls back and releases the lock.
            return Err(lease_lost(token));
        }
        Ok(CompletionTx::sqlite_tx(token.clone(), tx))
    }

    async fn fail(&self, token: &ClaimToken, error: &serde_json::Value) -> Result<(), StoreError> {
        let text = json_text(error);
        self.fenced_write(
            "fail",
            concat!(
                "UPDATE taskmill_jobs SET state = 'failed', error = ?4, result = NULL,",
                " lease_expires_at = NULL, updated_at = ",
                now_ms!(),
                fenced!()
            ),
            token,
            Some(Bind::Text(&text)),
        )
        .await
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        self.fenced_write(
            "release",
            concat!(
                "UPDATE taskmill_jobs SET lease_expires_at = ",
                now_ms!(),
                ", updated_at = ",
                now_ms!(),
                fenced!()
            ),
            token,
            None,
        )
        .await
    }

    async fn extend_lease(&self, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        self.fenced_write(
            "extend_lease",
            concat!(
                "UPDATE taskmill_jobs SET lease_expires_at = ",
                now_ms!(),
                " + ?4, updated_at = ",
                now_ms!(),
                fenced!()
            ),
            token,
            Some(Bind::Int(millis(lease))),
        )
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(
            "SELECT key, state, owner, attempts, lease_expires_at, result, error, job_id, kind,
                    created_at, updated_at, completed_at
             FROM taskmill_jobs WHERE key = ?1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::db("get"))?;
        match row {
            None => Ok(None),
            Some(row) => raw_record(&row)
                .map_err(StoreError::db("get"))?
                .into_record()
                .map(Some),
        }
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM taskmill_jobs WHERE key = ?1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("forget"))?
            .rows_affected();
        Ok(n > 0)
    }

    async fn purge_older_than(&self, retention: Duration) -> Result<u64, StoreError> {
        const PURGE_SQL: &str = concat!(
            "DELETE FROM taskmill_jobs WHERE key IN (",
            " SELECT key FROM taskmill_jobs",
            " WHERE state <> 'claimed' AND updated_at < ",
            now_ms!(),
            " - ?1 LIMIT ?2)"
        );
        let mut total = 0u64;
        loop {
            let n = sqlx::query(PURGE_SQL)
                .bind(millis(retention))
                .bind(PURGE_BATCH)
                .execute(&self.pool)
                .await
                .map_err(StoreError::db("purge"))?
                .rows_affected();
            total += n;
            if n < PURGE_BATCH as u64 {
                break;
            }
        }
        tracing::debug!(deleted = total, "purged finished keys");
        Ok(total)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("ping"))?;
        Ok(())
    }
}
