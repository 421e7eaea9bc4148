//! PostgreSQL backend, for worker replicas on several hosts.
//!
//! All statements run at READ COMMITTED. The claim is one `INSERT ... ON CONFLICT DO UPDATE
//! ... WHERE lease expired`, which PostgreSQL makes atomic against concurrent inserts and
//! updates of the same key; the completion transaction locks the row with `FOR UPDATE`, so a
//! competing takeover waits for it and then re-reads the committed row. Each transaction locks
//! at most one `taskmill_jobs` row, so the store itself cannot deadlock.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, Row};

use crate::error::{bad_url, redact_url, scrub};
use crate::{
    CLAIM_RETRIES, Claim, ClaimToken, CompletionTx, Existing, IdempotencyStore, PURGE_BATCH,
    RawRecord, Record, StoreError, StoreOptions, json_text, lease_lost, millis,
};

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

/// [`IdempotencyStore`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
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
        Ok(PgStore { pool })
    }

    /// The connection pool, for handler code that writes to the same database outside a
    /// completion (and for tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
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

/// Marks the token's claim completed; returns rows changed (0 = lease lost).
pub(crate) async fn mark_completed<'c, E>(
    ex: E,
    token: &ClaimToken,
    result_json: &str,
) -> Result<u64, sqlx::Error>
where
    E: Executor<'c, Database = Postgres>,
{
    let q = sqlx::query(concat!(
        "UPDATE taskmill_jobs SET state = 'completed', result = $4, error = NULL,",
        " lease_expires_at = NULL, completed_at = now(), updated_at = now()",
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

fn raw_record(row: &PgRow) -> Result<RawRecord, sqlx::Error> {
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

/// Insert a fresh claim, or take over a claimed row whose lease expired (bumping the epoch).
/// A row that is not taken over is left untouched and RETURNING yields nothing.
const CLAIM_SQL: &str = "\
INSERT INTO taskmill_jobs
    (key, state, owner, lease_expires_at, attempts, job_id, kind, created_at, updated_at)
VALUES ($1, 'claimed', $4, now() + $5::float8 * interval '1 millisecond', 1, $2, $3, now(), now())
ON CONFLICT (key) DO UPDATE SET
    owner = EXCLUDED.owner,
    lease_expires_at = EXCLUDED.lease_expires_at,
    attempts = taskmill_jobs.attempts + 1,
    job_id = EXCLUDED.job_id,
    kind = EXCLUDED.kind,
    updated_at = now()
WHERE taskmill_jobs.state = 'claimed' AND taskmill_jobs.lease_expires_at <= now()
RETURNING attempts";

/// What is there when the claim did not acquire: remaining lease rounded up to whole ms,
/// so "0" means expired by the same clock the claim used.
const INSPECT_SQL: &str = "\
SELECT state, owner, result, error,
       GREATEST(0, CEIL(EXTRACT(EPOCH FROM (COALESCE(lease_expires_at, now()) - now())) * 1000))::bigint
           AS expires_in_ms
FROM taskmill_jobs WHERE key = $1";

impl PgStore {
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

impl IdempotencyStore for PgStore {
    async fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_RETRIES {
            let row = sqlx::query(CLAIM_SQL)
                .bind(key)
                .bind(job_id)
                .bind(kind)
                .bind(owner)
                .bind(millis(lease))
                .fetch_optional(&self.pool)
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
                .fetch_optional(&self.pool)
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

    async fn complete(
        &self,
        token: &ClaimToken,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let n = mark_completed(&self.pool, token, &json_text(result))
            .await
            .map_err(StoreError::db("complete"))?;
        if n == 1 {
            tracing::debug!(key = %token.key, fencing = token.fencing, "completed");
            Ok(())
        } else {
            Err(lease_lost(token))
        }
    }

    async fn begin_completion(&self, token: &ClaimToken) -> Result<CompletionTx, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::db("begin_completion"))?;
        // FOR UPDATE holds the row until commit/rollback: a takeover attempt blocks on it and
        // then sees our outcome. If a takeover committed first, the re-checked WHERE fails.
        let held = sqlx::query(concat!(
            "SELECT 1 FROM taskmill_jobs",
            fenced!(),
            " FOR UPDATE"
        ))
        .bind(&token.key)
        .bind(&token.owner)
        .bind(token.fencing)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db("begin_completion"))?;
        if held.is_none() {
            return Err(lease_lost(token));
        }
        Ok(CompletionTx::postgres_tx(token.clone(), tx))
    }

    async fn fail(&self, token: &ClaimToken, error: &serde_json::Value) -> Result<(), StoreError> {
        let text = json_text(error);
        self.fenced_write(
            "fail",
            concat!(
                "UPDATE taskmill_jobs SET state = 'failed', error = $4, result = NULL,",
                " lease_expires_at = NULL, updated_at = now()",
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
                "UPDATE taskmill_jobs SET lease_expires_at = now(), updated_at = now()",
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
                "UPDATE taskmill_jobs",
                " SET lease_expires_at = now() + $4::float8 * interval '1 millisecond',",
                " updated_at = now()",
                fenced!()
            ),
            token,
            Some(Bind::Int(millis(lease))),
        )
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT key, state, owner, attempts, result, error, job_id, kind, ",
            ms!("lease_expires_at"),
            ", ",
            ms!("created_at"),
            ", ",
            ms!("updated_at"),
            ", ",
            ms!("completed_at"),
            " FROM taskmill_jobs WHERE key = $1"
        ))
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
        let n = sqlx::query("DELETE FROM taskmill_jobs WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(StoreError::db("forget"))?
            .rows_affected();
        Ok(n > 0)
    }

    async fn purge_older_than(&self, retention: Duration) -> Result<u64, StoreError> {
        // SKIP LOCKED: a row under a completion transaction is not finished yet anyway.
        const PURGE_SQL: &str = "\
DELETE FROM taskmill_jobs WHERE key IN (
    SELECT key FROM taskmill_jobs
    WHERE state <> 'claimed' AND updated_at < now() - $1::float8 * interval '1 millisecond'
    LIMIT $2 FOR UPDATE SKIP LOCKED)";
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
