//! The job's idempotency key in the store: claim it before the run, record
//! the completion or the failure after it, release it for another attempt.
//!
//! Every store call here is fenced by the claim's token (owner + epoch), so a
//! worker that lost its lease can never record an outcome over the new
//! holder's. Failures are counted and logged (`events::StoreWriteFailed`) and
//! turned into a finding the decision handles; none is ignored.

use std::time::Duration;

use taskmill_core::{DeadReason, Envelope, JobError};
use taskmill_store::{Claim, ClaimToken, IdempotencyStore, Parked, StoreError};

use super::Job;
use super::celery::CELERY_EXCEPTION;
use super::decide::Finding;
use super::events::StoreWriteFailed;
use crate::handler::Handler;

/// The key a job is claimed under: its idempotency key; a transactional job
/// (its writes must commit once) or a job acked early (the store is its
/// record) without one is keyed by its job id.
pub(super) fn key_of(env: &Envelope, handler: &Handler, acks_early: bool) -> Option<String> {
    env.idempotency_key
        .clone()
        .or_else(|| (acks_early || matches!(handler, Handler::IoTx(_))).then(|| env.job_id.clone()))
}

/// Parks the delivery's message with the job's claim, so the job survives
/// the early ack of its delivery: if this worker dies, a live worker's
/// sweeper republishes it (`runtime::sweep_orphans`).
pub(super) async fn park(job: &Job<'_>) -> Result<(), Finding> {
    let shared = &job.session.shared;
    let token = job
        .token
        .as_ref()
        .expect("a job acked early is always claimed")
        .token();
    let parked = Parked {
        queue: job.info.queue.clone(),
        message: job.incoming.parked(job.wire.dead_body(&job.payload)),
    };
    match job.session.store().park(token, &parked).await {
        Ok(()) => Ok(()),
        Err(e @ StoreError::InvalidInput { .. }) => Err(Finding::Refused {
            reason: DeadReason::PayloadTooLarge,
            detail: format!("cannot park the long job in the store: {e}"),
        }),
        Err(e) => {
            StoreWriteFailed {
                key: &token.key,
                what: "park",
                error: &e,
            }
            .emit(shared);
            Err(Finding::StoreUnavailable {
                error: e.to_string(),
            })
        }
    }
}

/// How long after a held key should free up a redelivery claims it again.
const CLAIM_RETRY_MARGIN: Duration = Duration::from_millis(250);

/// Claims `key` for one lease (the heartbeat renews it while the job runs):
/// the token, or the finding that settles the delivery without running it
/// (duplicate, held elsewhere, store down).
pub(super) async fn claim(job: &Job<'_>, key: &str) -> Result<ClaimToken, Finding> {
    let shared = &job.session.shared;
    let lease = shared.lease_timing.lease;
    let store = job.session.store();
    let env = &job.env;
    let mut forgot = false;
    let mut waited = false;
    loop {
        let claim = store
            .claim(key, &env.job_id, &env.kind, &shared.worker_id, lease)
            .await;
        return match claim {
            Ok(Claim::Acquired(token)) => Ok(token),
            Ok(Claim::AlreadyCompleted { result }) => Err(Finding::AlreadyCompleted { result }),
            Ok(Claim::AlreadyFailed { .. }) if env.replay && !forgot => {
                // An operator replayed a job whose key ended in failure.
                tracing::info!(job_id = %env.job_id, key, "replay: forgetting the failed key");
                if let Err(e) = store.forget(key).await {
                    tracing::warn!(error = %e, "cannot forget the key for the replay");
                }
                forgot = true;
                continue;
            }
            Ok(Claim::AlreadyFailed { error }) => Err(Finding::AlreadyFailed { error }),
            // A redelivery (its worker's connection closed: often a crash)
            // whose key frees up within one death deadline waits for it here,
            // once, instead of going through the delay ladder to the tail of
            // a queue that may hold a long backlog by then: that is what
            // keeps recovery after a `kill -9` within seconds. A producer's
            // duplicate (not redelivered) defers at once.
            Ok(Claim::HeldElsewhere { expires_in, .. })
                if job.incoming.redelivered()
                    && !waited
                    && expires_in <= shared.lease_timing.dead_after =>
            {
                waited = true;
                tokio::time::sleep(expires_in + CLAIM_RETRY_MARGIN).await;
                continue;
            }
            Ok(Claim::HeldElsewhere { expires_in, .. }) => {
                Err(Finding::HeldElsewhere { expires_in })
            }
            Err(e @ StoreError::InvalidInput { .. }) => {
                // Nothing about this job will ever be accepted by the store
                // (a NUL byte in its key, say): waiting cannot help, so it is
                // refused once instead of deferred forever.
                StoreWriteFailed {
                    key,
                    what: "claim",
                    error: &e,
                }
                .emit(shared);
                Err(Finding::Refused {
                    reason: DeadReason::BadHeader,
                    detail: format!("the store refuses the job: {e}"),
                })
            }
            Err(e) => {
                shared.readiness.set("store", false);
                StoreWriteFailed {
                    key,
                    what: "claim",
                    error: &e,
                }
                .emit(shared);
                Err(Finding::StoreUnavailable {
                    error: e.to_string(),
                })
            }
        };
    }
}

/// Records a successful run's completion, retrying briefly on transient
/// store errors; returns whether the outcome is settled (recorded, or owned
/// by the worker that took the key over).
pub(super) async fn record_completion(
    job: &Job<'_>,
    token: &ClaimToken,
    value: &serde_json::Value,
) -> bool {
    let shared = &job.session.shared;
    let mut wait = Duration::from_millis(100);
    for _ in 1..=3 {
        match job.session.store().complete(token, value).await {
            Ok(()) => return true,
            Err(StoreError::LeaseLost { .. }) => {
                // Another worker took the key over after our lease expired and
                // will record its own outcome; ours must not overwrite it.
                shared.metrics.leases_lost_total.inc();
                tracing::warn!(key = %token.key, "lease lost before completion; the job may have run twice");
                return true;
            }
            Err(e) => {
                StoreWriteFailed {
                    key: &token.key,
                    what: "complete",
                    error: &e,
                }
                .emit(shared);
                if !e.is_transient() {
                    return false;
                }
                tokio::time::sleep(wait).await;
                wait *= 4;
            }
        }
    }
    false
}

/// Gives the key back unfinished so another attempt can claim it. On failure
/// the lease expires by itself (a later attempt defers until then).
pub(super) async fn release(job: &Job<'_>, token: &ClaimToken) {
    if let Err(e) = job.session.store().release(token).await {
        StoreWriteFailed {
            key: &token.key,
            what: "release",
            error: &e,
        }
        .emit(&job.session.shared);
    }
}

/// Records the final failure, so a redelivered copy is a duplicate instead
/// of another run. On failure the key stays claimed until its lease ends and
/// a redelivery runs the job again (at-least-once).
pub(super) async fn record_failure(
    job: &Job<'_>,
    token: &ClaimToken,
    reason: DeadReason,
    err: &JobError,
    celery_exception: Option<serde_json::Value>,
) {
    let mut record = serde_json::json!({
        "reason": reason.as_str(),
        "error": err.to_string(),
        "attempts": job.env.attempt,
    });
    if let Some(exc) = celery_exception {
        // Reported again to a client whose task is redelivered.
        record[CELERY_EXCEPTION] = exc;
    }
    if let Err(e) = job.session.store().fail(token, &record).await {
        StoreWriteFailed {
            key: &token.key,
            what: "fail",
            error: &e,
        }
        .emit(&job.session.shared);
    }
}
