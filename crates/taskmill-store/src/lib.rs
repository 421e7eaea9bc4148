//! # taskmill-store: the idempotency and result store
//!
//! The store keeps one row per **idempotency key** and serves two promises:
//!
//! 1. **A job with an idempotency key completes at most once.** Workers [`claim`] a key before
//!    running the job; only the holder of the claim, at the fencing epoch it was granted, can
//!    record the outcome. Every other delivery of the same key sees
//!    [`Claim::AlreadyCompleted`] (ack and skip), [`Claim::AlreadyFailed`] or
//!    [`Claim::HeldElsewhere`] (retry later).
//! 2. **A handler whose side effect is a write to the store's database gets it exactly once**,
//!    by doing that write inside the transaction that records the completion
//!    ([`IdempotencyStore::begin_completion`] -> [`CompletionTx`] -> [`CompletionTx::commit`]).
//!    Either the effect and the `completed` row commit together, or neither does.
//!
//! It knows nothing about AMQP; the worker decides what to ack.
//!
//! ## Layout
//!
//! | module | what |
//! | --- | --- |
//! | this file | public types ([`Claim`], [`ClaimToken`], [`Record`]), the [`IdempotencyStore`] trait, the [`Store`] enum and [`Store::connect`] |
//! | `sqlite` | [`SqliteStore`]: embedded default, one WAL-mode file shared by tasks and processes |
//! | `postgres` | [`PgStore`]: PostgreSQL for several worker hosts |
//! | `tx` | [`CompletionTx`]: the transactional completion |
//! | `migrate` | the SQL files of `migrations/sqlite` and `migrations/postgres`, embedded |
//! | `error` | [`StoreError`] and [`redact_url`] |
//!
//! The schema is in `migrations/<backend>/NNNN_*.sql` at the workspace root and is applied by
//! [`Store::connect`]; several processes connecting at once to a fresh database is safe
//! (PostgreSQL: an advisory lock; SQLite: the migration runs inside `BEGIN IMMEDIATE`).
//!
//! ## State machine of one key
//!
//! ```text
//!                  claim: no row
//!   (no row) ───────────────────────────► CLAIMED (owner, epoch = 1, lease)
//!      ▲                                   │  ⟲ extend_lease: lease = now + d
//!      │                                   │  ⟲ claim after the lease expired (or after
//!      │                                   │    release): new owner, epoch + 1; writes
//!      │                                   │    made with the old epoch: LeaseLost
//!      │                                   │
//!      │            complete / CompletionTx::commit        fail
//!      │                 ┌─────────────────┴──────────────────┐
//!      │                 ▼                                    ▼
//!      │            COMPLETED (result)                  FAILED (error)
//!      │                 │                                    │
//!      └─────────────────┴──── forget(key), or purge_older_than ┘
//!                              (purge only takes finished rows)
//!
//! claim on CLAIMED, lease live -> HeldElsewhere { owner, expires_in }
//! claim on COMPLETED           -> AlreadyCompleted { result }   (ack, do not run)
//! claim on FAILED              -> AlreadyFailed { error }       (forget(key) to replay)
//! any token write with an old epoch, or after the key left CLAIMED -> StoreError::LeaseLost
//! ```
//!
//! Lease times always come from the database clock (`now()` on PostgreSQL,
//! `unixepoch('subsec')` on SQLite), so workers with skewed clocks agree on expiry.
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use taskmill_store::{Claim, IdempotencyStore, Store};
//!
//! # async fn demo() -> Result<(), taskmill_store::StoreError> {
//! let store = Store::connect("sqlite://taskmill.db").await?;
//! match store
//!     .claim("order-42", "job-1", "send_invoice", "worker-a", Duration::from_secs(60))
//!     .await?
//! {
//!     Claim::Acquired(token) => {
//!         // Exactly-once database effect: write inside the completion transaction.
//!         let mut tx = store.begin_completion(&token).await?;
//!         tx.execute("INSERT INTO invoices (order_id) VALUES (?)", &["order-42"])
//!             .await?; // `$1` on PostgreSQL, see CompletionTx::execute
//!         tx.commit(&serde_json::json!({ "invoice": 7 })).await?;
//!         // ... now ack the message.
//!     }
//!     Claim::AlreadyCompleted { .. } | Claim::AlreadyFailed { .. } => { /* ack, skip */ }
//!     Claim::HeldElsewhere { expires_in, .. } => { /* retry after expires_in */ }
//! }
//! # Ok(()) }
//! ```
//!
//! [`claim`]: IdempotencyStore::claim

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

mod error;
mod group_commit;
mod migrate;
mod postgres;
mod sqlite;
mod tx;

pub use error::{StoreError, redact_url};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use tx::CompletionTx;

/// Outcome of [`IdempotencyStore::claim`].
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The caller now holds the key: run the job, then record the outcome with the token.
    Acquired(ClaimToken),
    /// The key already completed; `result` is what the completing run recorded.
    /// The caller should not run the job again (ack and skip).
    AlreadyCompleted {
        /// The recorded result (`None` only for a row written without one).
        result: Option<serde_json::Value>,
    },
    /// The key failed for good; `error` is what the failing run recorded.
    /// Call [`IdempotencyStore::forget`] first to replay it.
    AlreadyFailed {
        /// The recorded error.
        error: serde_json::Value,
    },
    /// Another run holds a live lease on the key (this can be the same owner id, e.g. a
    /// redelivered duplicate while the first copy still runs). Retry after `expires_in` at
    /// the earliest. (`owner` is empty and `expires_in` zero in the rare case where the row
    /// kept changing during the claim; retry later all the same.)
    HeldElsewhere {
        /// Owner id of the current holder.
        owner: String,
        /// Time left on the holder's lease, by the database clock.
        expires_in: Duration,
    },
}

/// Proof of a claim, needed to record its outcome.
///
/// `fencing` is the key's acquisition epoch (the row's `attempts`): each takeover of an
/// expired lease increments it, and every write made with a token checks owner *and* epoch,
/// so a worker that was presumed dead cannot overwrite its successor's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClaimToken {
    /// The idempotency key.
    pub key: String,
    /// The owner id given to [`IdempotencyStore::claim`].
    pub owner: String,
    /// The epoch granted by the claim (1 for the first acquisition of a key).
    pub fencing: i64,
}

/// State of a key's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Held by an owner under a lease (live or expired).
    Claimed,
    /// Finished with a result.
    Completed,
    /// Finished with a final error.
    Failed,
}

impl JobState {
    /// The spelling stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Claimed => "claimed",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    fn parse(key: &str, s: &str) -> Result<Self, StoreError> {
        match s {
            "claimed" => Ok(JobState::Claimed),
            "completed" => Ok(JobState::Completed),
            "failed" => Ok(JobState::Failed),
            other => Err(StoreError::Corrupt {
                key: key.to_owned(),
                detail: format!("unknown state {other:?}"),
            }),
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the store, for tooling (`taskmill status`, the dead-letter tools).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The idempotency key.
    pub key: String,
    /// Current state.
    pub state: JobState,
    /// Owner id of the current or last claim.
    pub owner: String,
    /// How many times the key was acquired; also the current fencing epoch.
    pub attempts: i64,
    /// Lease deadline while claimed; `None` once completed or failed.
    pub lease_expires_at: Option<SystemTime>,
    /// Result recorded by the completion.
    pub result: Option<serde_json::Value>,
    /// Error recorded by the final failure.
    pub error: Option<serde_json::Value>,
    /// Job id (message id) of the latest claim.
    pub job_id: String,
    /// Job kind of the latest claim.
    pub kind: String,
    /// First claim.
    pub created_at: SystemTime,
    /// Last change of any kind.
    pub updated_at: SystemTime,
    /// When the key completed successfully.
    pub completed_at: Option<SystemTime>,
}

/// Which database a store (or a [`CompletionTx`]) runs on; handlers use it to pick their SQL
/// dialect (`?` placeholders on SQLite, `$1` on PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Tuning for [`Store::connect_with`]. The defaults suit one worker process.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Pool size. Default 10 for PostgreSQL; for SQLite the default is 4, because writes
    /// serialize on the file lock anyway (an in-memory database always uses 1).
    pub max_connections: Option<u32>,
    /// How long to wait for a pooled connection. Default 30 s.
    pub acquire_timeout: Duration,
    /// SQLite: how long a writer waits for the file lock held by another connection or
    /// process before failing with "database is locked". Default 30 s.
    pub sqlite_busy_timeout: Duration,
    /// SQLite: `synchronous = FULL` (default `true`) so a recorded completion survives a power
    /// loss before the message is acked; `false` uses `NORMAL` (survives process crashes only,
    /// faster).
    pub sqlite_full_sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: None,
            acquire_timeout: Duration::from_secs(30),
            sqlite_busy_timeout: Duration::from_secs(30),
            sqlite_full_sync: true,
        }
    }
}

impl StoreOptions {
    /// Sets [`StoreOptions::max_connections`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Sets [`StoreOptions::sqlite_full_sync`].
    pub fn sqlite_full_sync(mut self, full: bool) -> Self {
        self.sqlite_full_sync = full;
        self
    }

    /// Sets [`StoreOptions::sqlite_busy_timeout`].
    pub fn sqlite_busy_timeout(mut self, timeout: Duration) -> Self {
        self.sqlite_busy_timeout = timeout;
        self
    }

    /// Sets [`StoreOptions::acquire_timeout`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

/// The store operations, implemented by [`SqliteStore`], [`PgStore`] and [`Store`].
///
/// Methods return `impl Future + Send` (rather than `async fn`) so that generic callers can
/// spawn the futures on a multi-threaded runtime.
pub trait IdempotencyStore: Send + Sync {
    /// Tries to acquire `key` for `owner` for `lease`.
    ///
    /// Acquires when the key has no row, or when its row is `claimed` under an expired lease
    /// (the previous holder is presumed dead): the takeover happens in one statement and
    /// increments the epoch, which fences the previous holder out.
    fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Records the result and marks the key completed.
    ///
    /// Fails with [`StoreError::LeaseLost`] (writing nothing) if the claim was taken over,
    /// released, failed or forgotten. A completion after the lease expired still succeeds if
    /// nobody took the key over meanwhile: the epoch, not the clock, decides.
    fn complete(
        &self,
        token: &ClaimToken,
        result: &serde_json::Value,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Opens the completion transaction: verifies and locks the claim, then hands the
    /// transaction to the handler. See [`CompletionTx`].
    fn begin_completion(
        &self,
        token: &ClaimToken,
    ) -> impl Future<Output = Result<CompletionTx, StoreError>> + Send;

    /// Records a final failure (permanent error or attempts exhausted). Later claims see
    /// [`Claim::AlreadyFailed`]. Fenced like [`IdempotencyStore::complete`].
    fn fail(
        &self,
        token: &ClaimToken,
        error: &serde_json::Value,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the lease up without an outcome (retryable failure): the lease is made to expire
    /// now, so the retry copy's claim takes the key over at once (with a new epoch).
    fn release(&self, token: &ClaimToken) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Moves the lease deadline to `now + lease` (heartbeat for long jobs).
    fn extend_lease(
        &self,
        token: &ClaimToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the row of `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Deletes the row of `key` whatever its state (explicit replay of a failed key). Returns
    /// whether a row existed. A live holder's later writes then fail with `LeaseLost`.
    fn forget(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes completed and failed rows whose last change is older than `retention`; never
    /// touches claimed rows. Returns the number of rows deleted. Works in batches so it never
    /// holds a long lock.
    fn purge_older_than(
        &self,
        retention: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Round trip to the database (readiness probe).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A store on either backend, chosen by URL at run time.
#[derive(Debug, Clone)]
pub enum Store {
    /// SQLite backend.
    Sqlite(SqliteStore),
    /// PostgreSQL backend.
    Postgres(PgStore),
}

impl Store {
    /// Connects with [`StoreOptions::default`] and applies pending migrations.
    ///
    /// Accepted URLs: `sqlite://path/to/file.db` (relative or absolute path; created if
    /// missing), `sqlite:///abs/path.db`, `sqlite::memory:` (one private in-memory database,
    /// for tests), and `postgres://user[:password]@host[:port]/database` (or
    /// `postgresql://`). Anything else is [`StoreError::BadUrl`].
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, &StoreOptions::default()).await
    }

    /// Like [`Store::connect`], with tuning.
    pub async fn connect_with(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        let trimmed = url.trim();
        if trimmed.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::connect(trimmed, options).await?))
        } else if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect(trimmed, options).await?))
        } else {
            let (shown, why) = match trimmed.split_once(':') {
                _ if trimmed.is_empty() => (String::new(), "the URL is empty".to_owned()),
                Some((scheme, _)) => (
                    redact_url(trimmed),
                    format!("unsupported scheme {scheme:?}"),
                ),
                // Without a scheme we cannot tell which part could be a secret (it may be a
                // password pasted into the wrong setting), so the value is not repeated.
                None => (
                    "<value without a scheme, not shown>".to_owned(),
                    "no scheme; for a file write sqlite://<path>".to_owned(),
                ),
            };
            Err(error::bad_url(&shown, &why))
        }
    }

    /// Which backend this store runs on.
    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite store, if that is the backend.
    pub fn as_sqlite(&self) -> Option<&SqliteStore> {
        match self {
            Store::Sqlite(s) => Some(s),
            Store::Postgres(_) => None,
        }
    }

    /// The PostgreSQL store, if that is the backend.
    pub fn as_postgres(&self) -> Option<&PgStore> {
        match self {
            Store::Postgres(s) => Some(s),
            Store::Sqlite(_) => None,
        }
    }

    /// Closes the pool: waits for checked-out connections to come back, then closes them all.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.pool().close().await,
            Store::Postgres(s) => s.pool().close().await,
        }
    }
}

impl IdempotencyStore for Store {
    async fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        match self {
            Store::Sqlite(s) => s.claim(key, job_id, kind, owner, lease).await,
            Store::Postgres(s) => s.claim(key, job_id, kind, owner, lease).await,
        }
    }

    async fn complete(
        &self,
        token: &ClaimToken,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.complete(token, result).await,
            Store::Postgres(s) => s.complete(token, result).await,
        }
    }

    async fn begin_completion(&self, token: &ClaimToken) -> Result<CompletionTx, StoreError> {
        match self {
            Store::Sqlite(s) => s.begin_completion(token).await,
            Store::Postgres(s) => s.begin_completion(token).await,
        }
    }

    async fn fail(&self, token: &ClaimToken, error: &serde_json::Value) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.fail(token, error).await,
            Store::Postgres(s) => s.fail(token, error).await,
        }
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.release(token).await,
            Store::Postgres(s) => s.release(token).await,
        }
    }

    async fn extend_lease(&self, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.extend_lease(token, lease).await,
            Store::Postgres(s) => s.extend_lease(token, lease).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Sqlite(s) => s.get(key).await,
            Store::Postgres(s) => s.get(key).await,
        }
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.forget(key).await,
            Store::Postgres(s) => s.forget(key).await,
        }
    }

    async fn purge_older_than(&self, retention: Duration) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.purge_older_than(retention).await,
            Store::Postgres(s) => s.purge_older_than(retention).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(s) => s.ping().await,
        }
    }
}

// ---- helpers shared by the backends ----

/// Rows deleted per statement by `purge_older_than`, so that a large purge never holds the
/// SQLite write lock (or PostgreSQL row locks) for long.
pub(crate) const PURGE_BATCH: i64 = 5_000;

/// How often `claim` re-runs when the row changed between its two statements (deleted, or
/// its lease expired just then). Each retry is a fresh decision, so a small bound suffices.
pub(crate) const CLAIM_RETRIES: usize = 5;

/// A duration as whole milliseconds for SQL, rounded up so a tiny lease is never zero, and
/// saturated far below any overflow of the database's time arithmetic (~100 years).
pub(crate) fn millis(d: Duration) -> i64 {
    const MAX: u128 = 100 * 365 * 24 * 3600 * 1000;
    let ms = d.as_nanos().div_ceil(1_000_000).min(MAX);
    ms as i64
}

/// Milliseconds since the Unix epoch (as stored/computed by the database) to `SystemTime`.
pub(crate) fn time_from_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

pub(crate) fn json_text(value: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    value.to_string()
}

pub(crate) fn parse_json(
    key: &str,
    column: &'static str,
    text: Option<String>,
) -> Result<Option<serde_json::Value>, StoreError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|source| StoreError::CorruptJson {
            key: key.to_owned(),
            column,
            source,
        })
    })
    .transpose()
}

/// Columns of a row as read by both backends (times as epoch milliseconds).
pub(crate) struct RawRecord {
    pub key: String,
    pub state: String,
    pub owner: String,
    pub attempts: i64,
    pub lease_expires_at: Option<i64>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub job_id: String,
    pub kind: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
}

impl RawRecord {
    pub(crate) fn into_record(self) -> Result<Record, StoreError> {
        let state = JobState::parse(&self.key, &self.state)?;
        let result = parse_json(&self.key, "result", self.result)?;
        let error = parse_json(&self.key, "error", self.error)?;
        Ok(Record {
            state,
            owner: self.owner,
            attempts: self.attempts,
            lease_expires_at: self.lease_expires_at.map(time_from_millis),
            result,
            error,
            job_id: self.job_id,
            kind: self.kind,
            created_at: time_from_millis(self.created_at),
            updated_at: time_from_millis(self.updated_at),
            completed_at: self.completed_at.map(time_from_millis),
            key: self.key,
        })
    }
}

/// What the second statement of `claim` found, shared by both backends.
pub(crate) struct Existing {
    pub state: String,
    pub owner: String,
    pub result: Option<String>,
    pub error: Option<String>,
    /// Remaining lease in ms (0 when expired), rounded up.
    pub expires_in_ms: i64,
}

impl Existing {
    /// Turns the existing row into the answer, or `None` when the claim must be retried
    /// (the lease expired between the two statements).
    pub(crate) fn into_claim(self, key: &str) -> Result<Option<Claim>, StoreError> {
        match JobState::parse(key, &self.state)? {
            JobState::Completed => Ok(Some(Claim::AlreadyCompleted {
                result: parse_json(key, "result", self.result)?,
            })),
            JobState::Failed => Ok(Some(Claim::AlreadyFailed {
                error: parse_json(key, "error", self.error)?.unwrap_or(serde_json::Value::Null),
            })),
            JobState::Claimed if self.expires_in_ms <= 0 => Ok(None),
            JobState::Claimed => Ok(Some(Claim::HeldElsewhere {
                owner: self.owner,
                expires_in: Duration::from_millis(self.expires_in_ms as u64),
            })),
        }
    }
}

pub(crate) fn lease_lost(token: &ClaimToken) -> StoreError {
    StoreError::LeaseLost {
        key: token.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_rounds_up_and_saturates() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(200)), 200);
        assert_eq!(millis(Duration::MAX), 100 * 365 * 24 * 3600 * 1000);
    }

    #[test]
    fn times_round_trip() {
        let t = time_from_millis(1_700_000_000_123);
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_700_000_000_123)
        );
    }
}

/// Compile-time check: every public future must be `Send` for *any* borrow lifetime, so that
/// the worker can `tokio::spawn` code that awaits them.
#[cfg(test)]
#[allow(dead_code)]
mod send_check {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    fn store_futures_are_send(s: &Store, t: &ClaimToken, v: &serde_json::Value) {
        is_send(Store::connect("sqlite::memory:"));
        is_send(s.claim("k", "j", "k", "o", Duration::ZERO));
        is_send(s.complete(t, v));
        is_send(s.begin_completion(t));
        is_send(s.fail(t, v));
        is_send(s.release(t));
        is_send(s.extend_lease(t, Duration::ZERO));
        is_send(s.get("k"));
        is_send(s.forget("k"));
        is_send(s.purge_older_than(Duration::ZERO));
        is_send(s.ping());
        is_send(s.close());
    }

    fn tx_futures_are_send(tx: &mut CompletionTx) {
        is_send(tx.execute("x", &[]));
    }

    fn spawnable(s: Store) {
        tokio::spawn(async move {
            let _ = s.claim("k", "j", "k", "o", Duration::ZERO).await;
            let _ = s.ping().await;
            s.close().await;
        });
    }
}
