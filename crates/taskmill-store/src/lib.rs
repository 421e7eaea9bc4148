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
//! 3. **A parked job survives its worker.** A long job's worker keeps a copy of the message
//!    with its claim ([`IdempotencyStore::park`]) and acks the delivery early; if the worker
//!    dies, a sweeper on any live worker takes the orphan over
//!    ([`IdempotencyStore::take_orphans`]), republishes it and releases the key.
//!
//! It knows nothing about AMQP; the worker decides what to ack, and the parked message is
//! opaque bytes the broker crate encodes.
//!
//! ## Layout
//!
//! | module | what |
//! | --- | --- |
//! | this file | the [`IdempotencyStore`] trait, the [`Store`] enum and [`Store::connect`] |
//! | `types` | the public data types: [`Claim`], [`ClaimToken`], [`Parked`], [`JobState`], [`Record`], [`Backend`], [`StoreOptions`], [`MAX_PARKED_MESSAGE`] |
//! | `sql_store` | [`SqlStore`]: the one implementation of the trait, for either backend |
//! | `body` | the logic written once: claim decision, fenced writes, heartbeat, orphan takeover, rows; checks of arguments |
//! | `dialect` | what differs per backend: SQL text, binding and decoding (`Dialect`) |
//! | `sqlite` | SQLite's SQL and opening the file ([`SqliteStore`] = `SqlStore<Sqlite>`) |
//! | `postgres` | PostgreSQL's SQL and connecting ([`PgStore`] = `SqlStore<Postgres>`) |
//! | `group_commit` | SQLite's writer task: claims, completions and heartbeats committed in groups, one savepoint each |
//! | `registry` | [`Heartbeat`], [`WorkerInfo`], [`HeartbeatReply`], [`WorkerRecord`] |
//! | `tx` | [`CompletionTx`]: the transactional completion |
//! | `migrate` | the SQL files of `migrations/sqlite` and `migrations/postgres`, embedded |
//! | `error` | [`StoreError`]; URLs are redacted by [`redact_url`] (from `taskmill_core::redact`) |
//!
//! Imports only go down this list's dependency order: `sql_store` -> `group_commit` ->
//! `body` -> `dialect`; the backend files only add their SQL and connection setup.
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
//!      │                                   │  ⟲ heartbeat: every lease of a worker at once
//!      │                                   │  ⟲ claim after the lease expired (or after
//!      │                                   │    release, or when the owner is known dead:
//!      │                                   │    deregistered or silent past its dead_after):
//!      │                                   │    new owner, epoch + 1; writes
//!      │                                   │    made with the old epoch: LeaseLost
//!      │                                   │  ⟲ park: keep a copy of the message
//!      │                                   │  ⟲ take_orphans: a parked claim whose holder
//!      │                                   │    is gone (same rule as the claim's
//!      │                                   │    takeover) -> the sweeper, epoch + 1
//!      │                                   │  ⟲ release / complete / fail drop the copy
//!      │                                   │
//!      │            complete / CompletionTx::commit        fail
//!      │                 ┌─────────────────┴──────────────────┐
//!      │                 ▼                                    ▼
//!      │            COMPLETED (result)                  FAILED (error)
//!      │                 │                                    │
//!      └─────────────────┴──── forget(key), or purge_older_than ┘
//!                              (purge only takes finished rows)
//!
//! claim on CLAIMED, holder live -> HeldElsewhere { owner, expires_in }
//!                                  (expires_in: until the lease ends or, sooner, the
//!                                   holder's last_heartbeat + dead_after)
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
use std::time::Duration;

mod body;
mod dialect;
mod error;
mod group_commit;
mod migrate;
mod postgres;
mod registry;
mod sql_store;
mod sqlite;
mod tx;
mod types;

pub use error::StoreError;
pub use postgres::PgStore;
pub use registry::{Heartbeat, HeartbeatReply, WorkerInfo, WorkerRecord};
pub use sql_store::SqlStore;
pub use sqlite::SqliteStore;
/// The one URL redaction of taskmill, re-exported for callers of the store.
pub use taskmill_core::redact::redact_url;
pub use tx::CompletionTx;
pub use types::{
    Backend, Claim, ClaimToken, JobState, MAX_PARKED_MESSAGE, Parked, Record, StoreOptions,
};

/// Runs `$call` on whichever backend store `$store` holds, bound to `$s`.
macro_rules! on_backend {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

/// The store operations, implemented by [`SqliteStore`], [`PgStore`] and [`Store`].
///
/// Methods return `impl Future + Send` (rather than `async fn`) so that generic callers can
/// spawn the futures on a multi-threaded runtime.
pub trait IdempotencyStore: Send + Sync {
    /// Tries to acquire `key` for `owner` for `lease`.
    ///
    /// Acquires when the key has no row, or when its row is `claimed` under an expired lease
    /// (the previous holder is presumed dead), or by an owner the registry knows is dead
    /// (deregistered, or no heartbeat within the `dead_after` it announced) whatever its
    /// lease: the takeover happens in one statement and increments the epoch, which fences
    /// the previous holder out. Owners without a registry row keep the lease rule alone.
    ///
    /// Text containing NUL is refused with the permanent [`StoreError::InvalidInput`].
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

    /// Keeps `parked` with the claim (fenced by owner + epoch; LeaseLost otherwise), so the job
    /// survives the early ack of its delivery. Cleared by complete, fail, release and forget.
    ///
    /// A queue name with NUL or a message over [`MAX_PARKED_MESSAGE`] is refused with the
    /// permanent [`StoreError::InvalidInput`]. Parking again replaces the copy.
    fn park(
        &self,
        token: &ClaimToken,
        parked: &Parked,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes over at most `limit` parked claims whose holder is gone (lease expired, or the
    /// owner's registry row deregistered / silent past its dead_after), for `owner` with
    /// `lease`, each with a new epoch: the caller republishes the message, then releases the
    /// token (release clears the parked copy, so the republished job claims the key anew).
    /// Two sweepers never take the same row (one statement per call: PostgreSQL skips rows
    /// locked by another sweeper, SQLite has one writer).
    fn take_orphans(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(ClaimToken, Parked)>, StoreError>> + Send;

    /// One round trip: extends every token's lease to now + lease (fenced by owner+epoch),
    /// and upserts the worker's registry row. Returns the keys whose lease was lost
    /// (taken over or completed elsewhere) so the worker can stop trusting them.
    fn heartbeat(
        &self,
        beat: &Heartbeat,
    ) -> impl Future<Output = Result<HeartbeatReply, StoreError>> + Send;

    /// Marks the worker gone (clean shutdown) so its remaining claims can be taken over at
    /// once. Its next heartbeat, if any, registers it again.
    fn deregister_worker(
        &self,
        worker_id: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The registry (for `taskmill status` later): every row, newest heartbeat first.
    fn workers(&self) -> impl Future<Output = Result<Vec<WorkerRecord>, StoreError>> + Send;

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
        on_backend!(self, s => s.pool().close().await)
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
        on_backend!(self, s => s.claim(key, job_id, kind, owner, lease).await)
    }

    async fn complete(&self, t: &ClaimToken, result: &serde_json::Value) -> Result<(), StoreError> {
        on_backend!(self, s => s.complete(t, result).await)
    }

    async fn begin_completion(&self, t: &ClaimToken) -> Result<CompletionTx, StoreError> {
        on_backend!(self, s => s.begin_completion(t).await)
    }

    async fn fail(&self, t: &ClaimToken, error: &serde_json::Value) -> Result<(), StoreError> {
        on_backend!(self, s => s.fail(t, error).await)
    }

    async fn release(&self, t: &ClaimToken) -> Result<(), StoreError> {
        on_backend!(self, s => s.release(t).await)
    }

    async fn extend_lease(&self, t: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        on_backend!(self, s => s.extend_lease(t, lease).await)
    }

    async fn park(&self, t: &ClaimToken, parked: &Parked) -> Result<(), StoreError> {
        on_backend!(self, s => s.park(t, parked).await)
    }

    async fn take_orphans(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(ClaimToken, Parked)>, StoreError> {
        on_backend!(self, s => s.take_orphans(owner, lease, limit).await)
    }

    async fn heartbeat(&self, beat: &Heartbeat) -> Result<HeartbeatReply, StoreError> {
        on_backend!(self, s => s.heartbeat(beat).await)
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<(), StoreError> {
        on_backend!(self, s => s.deregister_worker(worker_id).await)
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        on_backend!(self, s => s.workers().await)
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        on_backend!(self, s => s.get(key).await)
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        on_backend!(self, s => s.forget(key).await)
    }

    async fn purge_older_than(&self, retention: Duration) -> Result<u64, StoreError> {
        on_backend!(self, s => s.purge_older_than(retention).await)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, s => s.ping().await)
    }
}

/// Compile-time check: every public future must be `Send` for *any* borrow lifetime, so that
/// the worker can `tokio::spawn` code that awaits them.
#[cfg(test)]
#[allow(dead_code)]
mod send_check {
    use super::*;

    fn is_send<T: Send>(_: T) {}

    fn store_futures_are_send(
        s: &Store,
        t: &ClaimToken,
        v: &serde_json::Value,
        b: &Heartbeat,
        p: &Parked,
    ) {
        is_send(Store::connect("sqlite::memory:"));
        is_send(s.claim("k", "j", "k", "o", Duration::ZERO));
        is_send(s.complete(t, v));
        is_send(s.begin_completion(t));
        is_send(s.fail(t, v));
        is_send(s.release(t));
        is_send(s.extend_lease(t, Duration::ZERO));
        is_send(s.park(t, p));
        is_send(s.take_orphans("o", Duration::ZERO, 1));
        is_send(s.heartbeat(b));
        is_send(s.deregister_worker("w"));
        is_send(s.workers());
        is_send(s.get("k"));
        is_send(s.forget("k"));
        is_send(s.purge_older_than(Duration::ZERO));
        is_send(s.ping());
        is_send(s.close());
    }

    fn tx_futures_are_send(tx: &mut CompletionTx) {
        is_send(tx.execute("x", &[]));
    }

    fn sqlite_tx_futures_are_send(tx: &mut CompletionTx) {
        is_send(tx.sqlite());
    }

    fn spawnable(s: Store) {
        tokio::spawn(async move {
            let _ = s.claim("k", "j", "k", "o", Duration::ZERO).await;
            let _ = s.ping().await;
            s.close().await;
        });
    }
}
