//! Replaying dead letters: the durability rule of `taskmill dlq replay` as a
//! library function, so any tool (or a test) replays the same way.
//!
//! Each wanted dead letter is published again to its work queue
//! ([`crate::browse::Browsed::replay_to`]: mandatory, confirmed); only once
//! the broker confirmed that copy is the dead letter acked (removed). An
//! unroutable or refused publish stops the replay with an error and leaves
//! the dead letter where it was; dead letters looked at but not replayed stay
//! held by the [`Browser`] until the caller returns them.
//!
//! Replays are pipelined in batches of [`BATCH`]: publish a batch, then await
//! its confirms in order and ack exactly the confirmed ones. A crash between
//! a confirmed publish and its ack leaves a duplicate (the job is in the work
//! queue and still in the DLQ): at-least-once, which the idempotency key
//! makes harmless.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::browse::{Browsed, Browser};
use crate::connection::BrokerError;
use crate::publisher::{PendingConfirm, PublishError, Publisher};

/// Replays published before their confirms are awaited.
pub const BATCH: usize = 100;

/// Which dead letters to replay, and to where.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The work queue the replays go to.
    pub queue: String,
    /// Only the dead letter with this job id (`message_id`); the replay ends
    /// at the first one found.
    pub id: Option<String>,
    /// Only dead letters of this kind (`taskmill-kind`, or a Celery task name).
    pub kind: Option<String>,
    /// Look at no more than this many dead letters.
    pub bound: usize,
}

impl Replay {
    /// Whether `msg` is one to replay.
    pub fn wants(&self, msg: &Browsed) -> bool {
        if let Some(id) = &self.id
            && msg.message_id() != Some(id.as_str())
        {
            return false;
        }
        match &self.kind {
            Some(k) => msg.kind().as_deref() == Some(k.as_str()),
            None => true,
        }
    }
}

/// Why a replay stopped early. Whatever it says, no dead letter was removed
/// without its replacement confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the dead-letter queue failed.
    #[error("reading the dead-letter queue")]
    Read(#[source] BrokerError),
    /// The replacement of a dead letter was not confirmed.
    #[error("replaying job {id} to queue `{queue}` failed; its dead letter stays in the DLQ")]
    Publish {
        /// The job id, or `(no id)`.
        id: String,
        /// The work queue.
        queue: String,
        /// The publish's failure.
        #[source]
        source: PublishError,
    },
    /// Replacements were confirmed but their dead letters were not acked.
    #[error(
        "{count} job(s) were replayed to {queue} but their dead letters could not be removed; they stay in the DLQ (replaying them again runs them twice unless they have an idempotency key)"
    )]
    Ack {
        /// How many.
        count: usize,
        /// The work queue.
        queue: String,
        /// The ack's failure.
        #[source]
        source: BrokerError,
    },
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Dead letters looked at.
    pub looked: usize,
    /// Dead letters replayed (replacement confirmed, dead letter acked).
    pub replayed: usize,
    /// Dead letters looked at and left (not wanted).
    pub skipped: usize,
    /// With [`Replay::id`]: whether it was found.
    pub found: bool,
    /// Whether `stop` ended it.
    pub interrupted: bool,
    /// The error that ended it, if one did.
    pub error: Option<ReplayError>,
}

/// Replays the dead letters `browser` reads that `what` wants, publishing
/// through `publisher`, until the queue, the bound or the wanted id is
/// reached, an error occurs, or `stop` is set (the publishes in flight are
/// settled first). The caller returns the held rest with
/// [`Browser::requeue_all`].
pub async fn replay(
    browser: &mut Browser,
    publisher: &Publisher,
    what: &Replay,
    stop: &AtomicBool,
) -> ReplayReport {
    let queue = what.queue.as_str();
    let mut t = ReplayReport::default();
    loop {
        // Take up to BATCH wanted messages and publish their replacements.
        let mut batch: Vec<(Browsed, PendingConfirm)> = Vec::new();
        let mut exhausted = false;
        while batch.len() < BATCH && t.error.is_none() {
            if stop.load(Ordering::SeqCst) {
                t.interrupted = true;
                break;
            }
            if t.looked >= what.bound || t.found {
                exhausted = true;
                break;
            }
            let msg = match browser.next().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    exhausted = true;
                    break;
                }
                Err(e) => {
                    t.error = Some(ReplayError::Read(e));
                    break;
                }
            };
            t.looked += 1;
            if !what.wants(&msg) {
                // Held until requeue_all returns it, in order.
                t.skipped += 1;
                continue;
            }
            if what.id.is_some() {
                t.found = true;
            }
            match publisher.send(&msg.replay_to(queue)).await {
                Ok(pending) => batch.push((msg, pending)),
                Err(e) => t.error = Some(publish_error(e, &msg, queue)),
            }
        }
        // Settle the batch: ack exactly the dead letters whose replacement
        // the broker confirmed; the others stay held and are returned.
        let mut confirmed = Vec::with_capacity(batch.len());
        for (msg, pending) in batch {
            match pending.wait().await {
                Ok(()) => confirmed.push(msg),
                Err(e) => {
                    let err = publish_error(e, &msg, queue);
                    t.error.get_or_insert(err);
                }
            }
        }
        let n = confirmed.len();
        match browser.ack_many(confirmed).await {
            Ok(()) => t.replayed += n,
            Err(source) => {
                t.error = Some(ReplayError::Ack {
                    count: n,
                    queue: queue.to_string(),
                    source,
                });
            }
        }
        if exhausted || t.interrupted || t.error.is_some() {
            return t;
        }
    }
}

fn publish_error(source: PublishError, msg: &Browsed, queue: &str) -> ReplayError {
    ReplayError::Publish {
        id: msg.message_id().unwrap_or("(no id)").to_string(),
        queue: queue.to_string(),
        source,
    }
}
