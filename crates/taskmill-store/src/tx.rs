//! Transactional completion: the handler's database writes and the `completed` row commit
//! together or not at all.

use sqlx::{
    AssertSqlSafe, PgConnection, Postgres, SqlSafeStr, Sqlite, SqliteConnection, Transaction,
};

use crate::body::{complete_on, hold_on, json_text};
use crate::dialect::{Arg, Dialect};
use crate::sql_store::group_complete;
use crate::{Backend, ClaimToken, SqliteStore, StoreError};

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
/// On PostgreSQL the row is locked (`SELECT ... FOR UPDATE`) while it is open, so a
/// competing claim waits.
///
/// On SQLite the file has one writer, so the transaction takes no lock when it begins: the
/// claim is verified, and the write lock (`BEGIN IMMEDIATE`, claim verified again) is taken
/// when the handler first runs a statement ([`execute`](CompletionTx::execute) or
/// [`sqlite`](CompletionTx::sqlite)). From then until commit **every other writer on the
/// file waits**, so compute first, then write and return. A handler that writes nothing
/// commits through the group commit like a plain completion. Before the first statement the
/// claim is protected by its lease (kept alive by the worker's heartbeat) and fencing: if
/// it was taken over meanwhile, the first statement or the commit fails with `LeaseLost`
/// and nothing is written.
///
/// Why not the alternatives: buffering the handler's statements until commit would hide
/// their row counts and errors from the handler, and a deferred transaction that reads
/// before it writes fails with `SQLITE_BUSY_SNAPSHOT` whenever any claim committed
/// meanwhile (always, under load).
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
    /// The store, and the write transaction once the handler first used it.
    Sqlite(SqliteStore, Option<Transaction<'static, Sqlite>>),
    Postgres(Transaction<'static, Postgres>),
}

impl CompletionTx {
    pub(crate) fn sqlite_lazy(token: ClaimToken, store: SqliteStore) -> Self {
        CompletionTx {
            token,
            inner: Inner::Sqlite(store, None),
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
            Inner::Sqlite(..) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// The transaction's connection on PostgreSQL (`None` on SQLite). Run any sqlx query on
    /// it (`query(..).execute(tx.postgres().unwrap())`); it commits with the completion.
    pub fn postgres(&mut self) -> Option<&mut PgConnection> {
        match &mut self.inner {
            Inner::Postgres(tx) => Some(&mut **tx),
            Inner::Sqlite(..) => None,
        }
    }

    /// The transaction's connection on SQLite (`Ok(None)` on PostgreSQL). The first call
    /// takes the file's write lock and verifies the claim again (`LeaseLost` if it was
    /// taken over since [`begin_completion`](crate::IdempotencyStore::begin_completion)).
    pub async fn sqlite(&mut self) -> Result<Option<&mut SqliteConnection>, StoreError> {
        let Inner::Sqlite(store, open) = &mut self.inner else {
            return Ok(None);
        };
        if open.is_none() {
            let mut tx = store
                .pool()
                .begin_with(Sqlite::BEGIN_WRITE)
                .await
                .map_err(StoreError::db("begin_completion"))?;
            hold_on::<Sqlite>(&mut tx, &self.token).await?;
            *open = Some(tx);
        }
        Ok(open.as_deref_mut())
    }

    /// Runs one statement inside the transaction with text parameters and returns the number
    /// of rows affected; for handlers that need no backend-specific code.
    ///
    /// Placeholders follow the backend: `?` (or `?1`, `?2`...) on SQLite, `$1`, `$2`... on
    /// PostgreSQL ([`CompletionTx::backend`] tells which). Every bind is sent as text; on
    /// PostgreSQL cast where a column is not text (`$1::bigint`). Pass data only through
    /// `text_binds`, never by formatting it into `sql`.
    pub async fn execute(&mut self, sql: &str, text_binds: &[&str]) -> Result<u64, StoreError> {
        let sql = AssertSqlSafe(sql.to_owned()).into_sql_str();
        let binds: Vec<Arg> = text_binds.iter().map(|b| Arg::from(*b)).collect();
        let done = match self.backend() {
            Backend::Sqlite => {
                let conn = self.sqlite().await?.expect("backend is SQLite");
                Sqlite::execute(conn, sql, binds).await
            }
            Backend::Postgres => {
                let conn = self.postgres().expect("backend is PostgreSQL");
                Postgres::execute(conn, sql, binds).await
            }
        };
        done.map_err(StoreError::db("completion execute"))
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
        // A lost claim (possible on SQLite before the first statement, or if a handler
        // updated taskmill_jobs itself) is `LeaseLost`; the dropped transaction rolls back.
        match self.inner {
            // Nothing written: a plain completion, committed with the group.
            Inner::Sqlite(store, None) => group_complete(&store, &token, text).await?,
            Inner::Sqlite(_, Some(tx)) => commit_on(tx, &token, &text).await?,
            Inner::Postgres(tx) => commit_on(tx, &token, &text).await?,
        }
        tracing::debug!(key = %token.key, fencing = token.fencing, "completed (transactional)");
        Ok(())
    }

    /// Rolls back the handler's writes; the key stays claimed by this token (release it, or
    /// let the lease expire, so that a retry can run). Dropping the value does the same.
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.inner {
            Inner::Sqlite(_, None) => Ok(()),
            Inner::Sqlite(_, Some(tx)) => tx.rollback().await,
            Inner::Postgres(tx) => tx.rollback().await,
        }
        .map_err(StoreError::db("rollback"))
    }
}

/// Marks the claim completed inside `tx` and commits it.
async fn commit_on<D: Dialect>(
    mut tx: Transaction<'static, D>,
    token: &ClaimToken,
    result_json: &str,
) -> Result<(), StoreError> {
    complete_on::<D>(&mut tx, token, result_json).await?;
    tx.commit().await.map_err(StoreError::db("commit"))
}
