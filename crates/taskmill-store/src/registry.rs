//! The worker registry: what a heartbeat carries and what `workers()` reads back.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::ClaimToken;

/// Who a worker is and what it is doing, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Unique id of the worker process; the `owner` of its claims.
    pub id: String,
    /// Host name the worker runs on.
    pub host: String,
    /// Version of the worker binary.
    pub version: String,
    /// Queues the worker consumes.
    pub queues: Vec<String>,
    /// Jobs it runs at once.
    pub concurrency: u32,
    /// CPU worker processes in its pool.
    pub pool_size: u32,
    /// When it started, in epoch milliseconds by the worker's own clock (display only).
    pub started_at_ms: i64,
    /// Jobs running now.
    pub in_flight: u64,
    /// Jobs finished since it started.
    pub jobs_done: u64,
}

/// One heartbeat of one worker: extends the leases of all its running claims and
/// registers the worker, in one round trip
/// ([`IdempotencyStore::heartbeat`](crate::IdempotencyStore::heartbeat)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The worker sending it.
    pub worker: WorkerInfo,
    /// Every claim the worker still runs.
    pub tokens: Vec<ClaimToken>,
    /// New lease of each token, from now by the database clock.
    pub lease: Duration,
    /// How long after this heartbeat, without another, the worker counts as dead: its
    /// claims can then be taken over at once, whatever their lease says.
    pub dead_after: Duration,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeartbeatReply {
    /// Keys of the tokens whose lease was not extended: taken over, released, completed or
    /// forgotten meanwhile. The worker must stop trusting these claims.
    pub lost: Vec<String>,
}

/// One row of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// What its last heartbeat said.
    pub worker: WorkerInfo,
    /// When its last heartbeat arrived, by the database clock.
    pub last_heartbeat: SystemTime,
    /// The `dead_after` of its last heartbeat.
    pub dead_after: Duration,
    /// It shut down cleanly ([`deregister_worker`](crate::IdempotencyStore::deregister_worker)).
    pub deregistered: bool,
    /// Not deregistered, and its last heartbeat is younger than `dead_after`.
    pub alive: bool,
}
