//! The orphan sweep: a long job is acked before it runs, with its message
//! parked in the store next to its claim (see `job::claim::park`). If its
//! worker dies, nothing in the broker remembers the job; every live worker
//! therefore sweeps, once per half lease, for parked claims whose holder is
//! gone (lease run out, or the registry shows it dead or deregistered). The
//! store hands each orphan to exactly one sweeper (a new epoch); the sweeper
//! republishes the message, waits for the confirm, then releases the key, so
//! the republished job claims it anew and runs. A crash in between leaves the
//! orphan to the next sweep: a duplicate at worst, never a loss.

use std::sync::Arc;
use std::time::Duration;

use taskmill_broker::Outgoing;
use taskmill_store::IdempotencyStore;
use tokio_util::sync::CancellationToken;

use crate::shared::{Session, Ticks};

/// Orphans taken per sweep.
const SWEEP_BATCH: u32 = 100;

/// Sweeps until `stop` (the end of the session, whose publisher it uses).
pub(crate) async fn sweep_orphans(session: Arc<Session>, stop: CancellationToken) {
    let shared = &session.shared;
    let lease = shared.lease_timing.lease;
    let mut ticks = Ticks::new((lease / 2).max(Duration::from_millis(100)), stop);
    while ticks.next().await {
        let store = session.store();
        let orphans = match store
            .take_orphans(&shared.worker_id, lease, SWEEP_BATCH)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                shared
                    .metrics
                    .store_errors_total
                    .with_label_values(&["sweep"])
                    .inc();
                tracing::warn!(error = %e, "orphan sweep failed; trying again next round");
                continue;
            }
        };
        for (token, parked) in orphans {
            let msg = match Outgoing::from_parked(&parked.queue, &parked.message) {
                Ok(m) => m,
                Err(e) => {
                    // Unreadable bytes can never become a job again: record
                    // the failure so the sweep does not take it forever.
                    tracing::error!(key = %token.key, error = %e, "parked message unreadable; marking the job failed");
                    let record = serde_json::json!({
                        "reason": "parked_message_unreadable",
                        "error": e.to_string(),
                    });
                    if let Err(e) = store.fail(&token, &record).await {
                        tracing::warn!(key = %token.key, error = %e, "cannot record the unreadable parked job");
                    }
                    continue;
                }
            };
            match session.publisher.publish(&msg).await {
                Ok(_) => {
                    tracing::info!(key = %token.key, queue = %parked.queue, "republished a long job whose worker died");
                    if let Err(e) = store.release(&token).await {
                        // Its lease runs out and the republished copy claims it then.
                        tracing::warn!(key = %token.key, error = %e, "cannot release a swept key");
                    }
                }
                Err(e) => {
                    // The orphan stays ours for one lease, then the next sweep
                    // (here or elsewhere) takes it again.
                    session.fail(format!("cannot republish an orphaned job: {e}"));
                    return;
                }
            }
        }
    }
}
