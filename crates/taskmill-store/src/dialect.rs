//! What really differs between the backends: the SQL text (clock, placeholders, JSON
//! unpacking) and how a statement is bound and run. Everything else is one body
//! ([`crate::body`]) generic over [`Dialect`].
//!
//! Every statement numbers its parameters the same way on both backends (`?N` on SQLite,
//! `$N` on PostgreSQL), so the body binds the same [`Arg`] list whatever the backend.

use std::future::Future;

use sqlx::{Database, Encode, Type};

use crate::{ClaimToken, CompletionTx, SqlStore, StoreError};

/// One bound parameter. Only text, integers and the parked message's bytes are ever bound:
/// lists travel as JSON text, which both backends unpack in SQL (`json_each`,
/// `json_to_recordset`).
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(s.to_owned())
    }
}

impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(s)
    }
}

impl From<i64> for Arg {
    fn from(i: i64) -> Self {
        Arg::Int(i)
    }
}

impl From<Vec<u8>> for Arg {
    fn from(b: Vec<u8>) -> Self {
        Arg::Bytes(b)
    }
}

/// The SQL of one backend, implemented on sqlx's database types.
///
/// Parameters of the token statements: 1 key, 2 owner, 3 epoch, then the statement's own.
pub(crate) trait Dialect: Database {
    /// Opens a transaction that writes (SQLite: take the write lock up front, so a
    /// read-then-write never fails with a stale snapshot).
    const BEGIN_WRITE: &'static str;
    /// 1 key, 2 job id, 3 kind, 4 owner, 5 lease ms -> `attempts` of the acquired row.
    const CLAIM: &'static str;
    /// 1 key -> state, owner, result, error, expires_in_ms (time until the key becomes
    /// claimable: the lease left, or sooner the owner's registry deadline).
    const INSPECT: &'static str;
    /// Token + 4 result JSON.
    const COMPLETE: &'static str;
    /// Token + 4 error JSON.
    const FAIL: &'static str;
    /// Token.
    const RELEASE: &'static str;
    /// Token + 4 lease ms.
    const EXTEND: &'static str;
    /// Token + 4 queue + 5 message bytes: keeps the parked copy with the claim.
    const PARK: &'static str;
    /// 1 new owner, 2 lease ms, 3 limit -> key, attempts, parked_queue, parked_message of
    /// every parked claim taken over (lease expired or owner known dead), epoch + 1.
    const TAKE_ORPHANS: &'static str;
    /// Token -> one row while the claim is held (PostgreSQL also locks it).
    const HOLD: &'static str;
    /// 1 key -> every column of the row, times as epoch ms.
    const GET: &'static str;
    /// 1 key.
    const FORGET: &'static str;
    /// 1 retention ms, 2 batch size.
    const PURGE: &'static str;
    /// 1 id, 2 host, 3 version, 4 queues JSON, 5 concurrency, 6 pool size, 7 started at
    /// ms, 8 in flight, 9 jobs done, 10 dead-after ms, 11 tokens JSON
    /// (`[{"key","owner","fencing"}]`), 12 lease ms -> the keys whose lease was extended.
    /// One statement text: upserts the worker and extends every lease.
    const HEARTBEAT: &'static str;
    /// 1 worker id.
    const DEREGISTER: &'static str;
    /// Every worker row, newest heartbeat first, times as epoch ms, `alive` as 0/1.
    const WORKERS: &'static str;

    /// Rows changed by a statement.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Opens the completion transaction of `token` (the backends lock differently).
    fn begin_completion(
        store: &SqlStore<Self>,
        token: &ClaimToken,
    ) -> impl Future<Output = Result<CompletionTx, StoreError>> + Send;

    /// Runs `sql` with `args` on `conn`; returns rows changed.
    fn execute<'c>(
        conn: &'c mut Self::Connection,
        sql: sqlx::SqlStr,
        args: Vec<Arg>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'c;

    /// Runs `sql` with `args` on `conn`; returns every row.
    fn fetch_all<'c>(
        conn: &'c mut Self::Connection,
        sql: sqlx::SqlStr,
        args: Vec<Arg>,
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send + 'c;

    /// Reads a text column.
    fn text(row: &Self::Row, col: &str) -> Result<String, sqlx::Error>;
    /// Reads a nullable text column.
    fn opt_text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error>;
    /// Reads an integer column.
    fn int(row: &Self::Row, col: &str) -> Result<i64, sqlx::Error>;
    /// Reads a nullable integer column.
    fn opt_int(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error>;
    /// Reads a byte-string column (BLOB / BYTEA).
    fn bytes(row: &Self::Row, col: &str) -> Result<Vec<u8>, sqlx::Error>;
}

/// A statement text of the store (all of them are constants).
pub(crate) fn sql(text: &'static str) -> sqlx::SqlStr {
    sqlx::SqlSafeStr::into_sql_str(text)
}

/// Binds `args` in order.
pub(crate) fn bind<'q, DB>(
    mut q: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    DB: Database,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    Vec<u8>: for<'t> Encode<'t, DB> + Type<DB>,
{
    for arg in args {
        q = match arg {
            Arg::Text(t) => q.bind(t),
            Arg::Int(i) => q.bind(i),
            Arg::Bytes(b) => q.bind(b),
        };
    }
    q
}

/// The execution and decoding half of [`Dialect`], the same text for each sqlx database
/// type (the types differ, so it cannot be one generic function without naming every
/// sqlx bound).
macro_rules! run_and_decode {
    () => {
        fn rows_affected(result: &Self::QueryResult) -> u64 {
            result.rows_affected()
        }

        fn execute<'c>(
            conn: &'c mut Self::Connection,
            sql: sqlx::SqlStr,
            args: Vec<$crate::dialect::Arg>,
        ) -> impl std::future::Future<Output = Result<u64, sqlx::Error>> + Send + 'c {
            let query = $crate::dialect::bind(sqlx::query(sql), args);
            async move {
                let done = query.execute(&mut *conn).await?;
                Ok(<Self as $crate::dialect::Dialect>::rows_affected(&done))
            }
        }

        fn fetch_all<'c>(
            conn: &'c mut Self::Connection,
            sql: sqlx::SqlStr,
            args: Vec<$crate::dialect::Arg>,
        ) -> impl std::future::Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send + 'c {
            let query = $crate::dialect::bind(sqlx::query(sql), args);
            async move { query.fetch_all(&mut *conn).await }
        }

        fn text(row: &Self::Row, col: &str) -> Result<String, sqlx::Error> {
            sqlx::Row::try_get(row, col)
        }

        fn opt_text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error> {
            sqlx::Row::try_get(row, col)
        }

        fn int(row: &Self::Row, col: &str) -> Result<i64, sqlx::Error> {
            sqlx::Row::try_get(row, col)
        }

        fn opt_int(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error> {
            sqlx::Row::try_get(row, col)
        }

        fn bytes(row: &Self::Row, col: &str) -> Result<Vec<u8>, sqlx::Error> {
            sqlx::Row::try_get(row, col)
        }
    };
}

pub(crate) use run_and_decode;
