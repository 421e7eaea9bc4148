//! Heartbeat leases: a claim on a job's key is short (the `lease_ms`
//! setting, 15 s by default) and kept alive by one batched heartbeat per
//! worker while the job runs, so a worker that dies stops extending its keys
//! and they become claimable within one lease — or at once, when the store's
//! worker registry shows the holder dead (no heartbeat for `dead_after`).
//!
//! [`Leases`] is the set of claims this worker holds right now. A claim is in
//! it from the moment it is taken until its delivery settles (for a CPU job
//! that includes the wait for a free process, so a queued job's lease cannot
//! run out before it starts). [`heartbeat_loop`] sends them all to the store
//! in one call per tick, together with the worker's registry row.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskmill_store::{ClaimToken, Heartbeat, IdempotencyStore, WorkerInfo};
use tokio_util::sync::CancellationToken;

use crate::shared::{Shared, Ticks};

/// The claims this worker holds, and the counters its registry row reports.
#[derive(Default)]
pub(crate) struct Leases {
    next_id: AtomicU64,
    held: Mutex<HashMap<u64, ClaimToken>>,
    /// Jobs running now (keyed or not).
    pub(crate) in_flight: AtomicU64,
    /// Jobs settled since the worker started.
    pub(crate) jobs_done: AtomicU64,
}

impl Leases {
    /// Keeps `token`'s lease alive until the returned hold is dropped.
    pub(crate) fn hold(self: &Arc<Self>, token: ClaimToken) -> LeaseHold {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, token.clone());
        LeaseHold {
            leases: self.clone(),
            id,
            token,
        }
    }

    /// Every claim held now.
    pub(crate) fn tokens(&self) -> Vec<ClaimToken> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ClaimToken>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One claim kept alive by the heartbeat; dropping it stops the extension.
pub(crate) struct LeaseHold {
    leases: Arc<Leases>,
    id: u64,
    token: ClaimToken,
}

impl LeaseHold {
    /// The claim.
    pub(crate) fn token(&self) -> &ClaimToken {
        &self.token
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        self.leases.lock().remove(&self.id);
    }
}

/// The timing of leases, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseTiming {
    /// The lease a claim takes and each heartbeat renews.
    pub(crate) lease: Duration,
    /// Time between heartbeats.
    pub(crate) every: Duration,
    /// How long without a heartbeat the registry counts this worker dead.
    pub(crate) dead_after: Duration,
}

impl LeaseTiming {
    /// The timing for a `lease` and heartbeat interval `every`: a worker is
    /// dead after three missed heartbeats, never later than its lease.
    pub(crate) fn new(lease: Duration, every: Duration) -> LeaseTiming {
        LeaseTiming {
            lease,
            every,
            dead_after: every.saturating_mul(3).min(lease),
        }
    }
}

/// The registry row this worker reports.
pub(crate) fn worker_info(shared: &Shared, started_at_ms: i64) -> WorkerInfo {
    let c = &shared.config;
    let concurrency = c
        .queues
        .iter()
        .map(|q| c.queue_settings(q).concurrency)
        .sum::<usize>();
    WorkerInfo {
        id: shared.worker_id.clone(),
        host: shared.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        queues: c.queues.clone(),
        concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
        pool_size: shared
            .cpu
            .get()
            .map_or(0, |p| u32::try_from(p.size()).unwrap_or(u32::MAX)),
        started_at_ms,
        in_flight: shared.leases.in_flight.load(Ordering::Relaxed),
        jobs_done: shared.leases.jobs_done.load(Ordering::Relaxed),
    }
}

/// Sends one heartbeat per tick until `shutdown`: every held lease extended
/// in one store call, and the registry row refreshed. A failed heartbeat
/// turns the store check not-ready (the leases then run out unless the next
/// one gets through); lost leases are counted.
pub(crate) async fn heartbeat_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let started_at_ms = i64::try_from(taskmill_broker::now_us() / 1000).unwrap_or(i64::MAX);
    let timing = shared.lease_timing;
    let mut ticks = Ticks::new(timing.every, shutdown);
    while ticks.next().await {
        let Some(store) = shared.store.get() else {
            continue;
        };
        let beat = Heartbeat {
            worker: worker_info(&shared, started_at_ms),
            tokens: shared.leases.tokens(),
            lease: timing.lease,
            dead_after: timing.dead_after,
        };
        // A heartbeat that takes longer than a tick is as good as none.
        match tokio::time::timeout(timing.dead_after, store.heartbeat(&beat)).await {
            Ok(Ok(reply)) => {
                shared.readiness.set("store", true);
                if !reply.lost.is_empty() {
                    shared
                        .metrics
                        .leases_lost_total
                        .inc_by(reply.lost.len() as u64);
                    tracing::warn!(keys = ?reply.lost, "leases lost to another worker while running; their completions will not be recorded here");
                }
            }
            Ok(Err(e)) => heartbeat_failed(&shared, &e),
            Err(_) => heartbeat_failed(&shared, &"the store did not answer in time"),
        }
    }
}

fn heartbeat_failed(shared: &Shared, error: &dyn std::fmt::Display) {
    shared.readiness.set("store", false);
    shared
        .metrics
        .store_errors_total
        .with_label_values(&["heartbeat"])
        .inc();
    tracing::warn!(error = %error, "heartbeat failed; running jobs' leases expire unless the next one succeeds");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(key: &str) -> ClaimToken {
        ClaimToken {
            key: key.into(),
            owner: "w".into(),
            fencing: 1,
        }
    }

    #[test]
    fn a_hold_lasts_until_dropped() {
        let leases = Arc::new(Leases::default());
        let a = leases.hold(token("a"));
        let b = leases.hold(token("a"));
        assert_eq!(leases.tokens().len(), 2);
        drop(a);
        assert_eq!(leases.tokens(), vec![token("a")]);
        assert_eq!(b.token().key, "a");
        drop(b);
        assert!(leases.tokens().is_empty());
    }

    #[test]
    fn a_worker_is_dead_after_three_missed_beats_or_its_lease() {
        let t = LeaseTiming::new(Duration::from_secs(15), Duration::from_secs(2));
        assert_eq!(t.dead_after, Duration::from_secs(6));
        let t = LeaseTiming::new(Duration::from_secs(4), Duration::from_secs(2));
        assert_eq!(t.dead_after, Duration::from_secs(4));
    }
}
