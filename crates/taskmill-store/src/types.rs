//! The public data types of the store: what a claim returns ([`Claim`], [`ClaimToken`]), the
//! parked copy of a message ([`Parked`]), a key's row ([`JobState`], [`Record`]), and how to
//! connect ([`Backend`], [`StoreOptions`]). No IO here; the trait and the
//! [`Store`](crate::Store) enum that use them are in `lib.rs`.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Outcome of [`IdempotencyStore::claim`](crate::IdempotencyStore::claim).
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
    /// Call [`IdempotencyStore::forget`](crate::IdempotencyStore::forget) first to replay it.
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
        /// When the key becomes claimable if the holder does nothing more, by the database
        /// clock: the lease left or, when the holder has a registry row, the time until its
        /// `last_heartbeat + dead_after` if that comes first. A heartbeat of the holder
        /// moves both later, so a claim retried then can find it held again.
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
    /// The owner id given to [`IdempotencyStore::claim`](crate::IdempotencyStore::claim).
    pub owner: String,
    /// The epoch granted by the claim (1 for the first acquisition of a key).
    pub fencing: i64,
}

/// Most bytes of a [`Parked`] message the store keeps; a larger one is refused with
/// [`StoreError::InvalidInput`] (16 MiB).
pub const MAX_PARKED_MESSAGE: usize = 16 * 1024 * 1024;

/// A copy of a job's message kept with its claim
/// ([`IdempotencyStore::park`](crate::IdempotencyStore::park)), so that the delivery can be
/// acked early and a sweeper can republish the job if its worker dies.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Parked {
    /// The queue to republish the message to.
    pub queue: String,
    /// The message, encoded by the broker crate; opaque to the store. At most
    /// [`MAX_PARKED_MESSAGE`] bytes.
    pub message: Vec<u8>,
}

impl std::fmt::Debug for Parked {
    // The message can be megabytes of payload: show its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("queue", &self.queue)
            .field("message_len", &self.message.len())
            .finish()
    }
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

    pub(crate) fn parse(key: &str, s: &str) -> Result<Self, StoreError> {
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

/// Which database a store (or a [`CompletionTx`](crate::CompletionTx)) runs on; handlers use
/// it to pick their SQL dialect (`?` placeholders on SQLite, `$1` on PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Tuning for [`Store::connect_with`](crate::Store::connect_with). The defaults suit one
/// worker process.
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
