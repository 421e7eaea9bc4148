//! Transactional completion: the handler's database writes and the `completed` row commit
//! together or not at all.

use sqlx::{AssertSqlSafe, PgConnection, Postgres, Sqlite, SqliteConnection, Transaction};

use crate::{Backend, ClaimToken, StoreError, json_text, lease_lost, postgres, sqlite};

/// An open database transaction that holds a verified claim, returned by
/// [`IdempotencyStore::begin_completion`](crate::IdempotencyStore::begin_completion).
///
/// **This is how exactly-once database effects work.** At-least-once delivery means a handler
/// may run more than once; if its only side effect is a write to the store's database and that
/// write goes through this transaction, then the write and the key's `completed` row commit
/// atomically:
///
/// * [`commit`](CompletionTx::commit) writes the result row and commits: the effect happened
///   exactly once, and every later delivery of the key sees `AlreadyCompleted`.
/// * Dropping the value (error, panic, cancelled future) or calling
///   [`rollback`](CompletionTx::rollback) rolls everything back, the handler's rows included;
///   the key stays `claimed`, so after [`release`](crate::IdempotencyStore::release) or lease
///   expiry a retry claims it and runs again from a clean slate.
///
/// While it is open the claim cannot be taken over: on PostgreSQL the row is locked
/// (`SELECT ... FOR UPDATE`), so a competing claim waits; on SQLite the transaction was opened
/// with `BEGIN IMMEDIATE` and holds the database's write lock, so **every other writer (all
/// workers on that file) waits**. Keep it short: compute first, then open the transaction,
/// write, commit.
///
/// Effects outside this database (HTTP calls, other databases, files) are not covered: they
/// stay at-least-once and need their own idempotency.
pub struct CompletionTx {
    token: ClaimToken,
    inner: Inner,
}

impl std::fmt::Debug for CompletionTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionTx")
            .field("token", &self.token)
            .field("backend", &self.backend())
            .finish()
    }
}

enum Inner {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl CompletionTx {
    pub(crate) fn sqlite_tx(token: ClaimToken, tx: Transaction<'static, Sqlite>) -> Self {
        CompletionTx {
            token,
            inner: Inner::Sqlite(tx),
        }
    }

    pub(crate) fn postgres_tx(token: ClaimToken, tx: Transaction<'static, Postgres>) -> Self {
        CompletionTx {
            token,
            inner: Inner::Postgres(tx),
        }
    }

    /// The claim this transaction completes.
    pub fn token(&self) -> &ClaimToken {
        &self.token
    }

    /// The backend, to choose the SQL dialect.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// The transaction's connection on PostgreSQL (`None` on SQLite). Run any sqlx query on
    /// it (`query(..).execute(tx.postgres().unwrap())`); it commits with the completion.
    pub fn postgres(&mut self) -> Option<&mut PgConnection> {
        match &mut self.inner {
            Inner::Postgres(tx) => Some(&mut **tx),
            Inner::Sqlite(_) => None,
        }
    }

    /// The transaction's connection on SQLite (`None` on PostgreSQL).
    pub fn sqlite(&mut self) -> Option<&mut SqliteConnection> {
        match &mut self.inner {
            Inner::Sqlite(tx) => Some(&mut **tx),
            Inner::Postgres(_) => None,
        }
    }

    /// Runs one statement inside the transaction with text parameters and returns the number
    /// of rows affected; for handlers that need no backend-specific code.
    ///
    /// Placeholders follow the backend: `?` (or `?1`, `?2`...) on SQLite, `$1`, `$2`... on
    /// PostgreSQL ([`CompletionTx::backend`] tells which). Every bind is sent as text; on
    /// PostgreSQL cast where a column is not text (`$1::bigint`). Pass data only through
    /// `text_binds`, never by formatting it into `sql`.
    pub async fn execute(&mut self, sql: &str, text_binds: &[&str]) -> Result<u64, StoreError> {
        let sql = AssertSqlSafe(sql);
        match &mut self.inner {
            Inner::Sqlite(tx) => {
                let mut q = sqlx::query(sql);
                for b in text_binds {
                    q = q.bind(*b);
                }
                Ok(q.execute(&mut **tx)
                    .await
                    .map_err(StoreError::db("completion execute"))?
                    .rows_affected())
            }
            Inner::Postgres(tx) => {
                let mut q = sqlx::query(sql);
                for b in text_binds {
                    q = q.bind(*b);
                }
                Ok(q.execute(&mut **tx)
                    .await
                    .map_err(StoreError::db("completion execute"))?
                    .rows_affected())
            }
        }
    }

    /// Records `result`, marks the key completed and commits, together with everything the
    /// handler wrote through this transaction.
    ///
    /// On an error nothing is committed, except in one case no database can rule out: the
    /// connection dies while the COMMIT is in flight, so the outcome is unknown. Treat a
    /// `Database` error from here as retryable; the retry's claim then reveals what happened.
    pub async fn commit(self, result: &serde_json::Value) -> Result<(), StoreError> {
        let text = json_text(result);
        let token = self.token;
        let changed = match self.inner {
            Inner::Sqlite(mut tx) => {
                let n = sqlite::mark_completed(&mut *tx, &token, &text)
                    .await
                    .map_err(StoreError::db("commit"))?;
                if n == 1 {
                    tx.commit().await.map_err(StoreError::db("commit"))?;
                }
                n
            }
            Inner::Postgres(mut tx) => {
                let n = postgres::mark_completed(&mut *tx, &token, &text)
                    .await
                    .map_err(StoreError::db("commit"))?;
                if n == 1 {
                    tx.commit().await.map_err(StoreError::db("commit"))?;
                }
                n
            }
        };
        // The claim was verified and locked when the transaction began, so this cannot
        // happen unless someone bypassed the store (e.g. a manual DELETE under SQLite's lock
        // is impossible; a handler that updated taskmill_jobs itself is not). The transaction
        // was dropped, i.e. rolled back.
        if changed != 1 {
            return Err(lease_lost(&token));
        }
        tracing::debug!(key = %token.key, fencing = token.fencing, "completed (transactional)");
        Ok(())
    }

    /// Rolls back the handler's writes; the key stays claimed by this token (release it, or
    /// let the lease expire, so that a retry can run). Dropping the value does the same.
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.inner {
            Inner::Sqlite(tx) => tx.rollback().await,
            Inner::Postgres(tx) => tx.rollback().await,
        }
        .map_err(StoreError::db("rollback"))
    }
}
