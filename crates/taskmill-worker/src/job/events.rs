//! The events of a delivery's life, each a type whose `emit` logs it and
//! counts it, so a metric and its log line are written in one place (and the
//! pipeline stays free of `with_label_values` calls).

use std::time::Duration;

use taskmill_core::DeadReason;
use taskmill_telemetry::metrics::UNKNOWN_KIND;

use super::decide::{Finding, Settlement};
use crate::shared::{JobReport, Shared};

/// A message refused at decode, before it has a kind.
pub(super) struct Refused<'a> {
    pub(super) queue: &'a str,
    pub(super) message_id: Option<&'a str>,
    pub(super) reason: DeadReason,
    pub(super) detail: &'a str,
}

impl Refused<'_> {
    pub(super) fn emit(&self) {
        tracing::warn!(queue = %self.queue, message_id = ?self.message_id, reason = self.reason.as_str(), error = %self.detail, "refusing message");
    }
}

/// A decoded job's time in the queue, from its enqueue to now.
pub(super) struct QueueWaited<'a> {
    pub(super) labels: [&'a str; 2],
    pub(super) wait: Duration,
}

impl QueueWaited<'_> {
    pub(super) fn emit(&self, shared: &Shared) {
        shared
            .metrics
            .job_queue_wait_seconds
            .with_label_values(&self.labels)
            .observe(self.wait.as_secs_f64());
    }
}

/// A handler's run ended (whatever its result).
pub(super) struct Ran<'a> {
    pub(super) labels: [&'a str; 2],
    pub(super) took: Duration,
}

impl Ran<'_> {
    pub(super) fn emit(&self, shared: &Shared) {
        shared
            .metrics
            .job_run_seconds
            .with_label_values(&self.labels)
            .observe(self.took.as_secs_f64());
    }
}

/// The decision for a decoded job, before it is carried out.
pub(super) struct Decided<'a> {
    pub(super) queue: &'a str,
    pub(super) job_id: &'a str,
    pub(super) kind: &'a str,
    pub(super) attempt: u32,
    pub(super) finding: &'a Finding,
    pub(super) settlement: &'a Settlement,
    pub(super) detail: Option<&'a str>,
}

impl Decided<'_> {
    pub(super) fn emit(&self) {
        let (queue, job_id, kind, attempt) = (self.queue, self.job_id, self.kind, self.attempt);
        let error = self.detail.unwrap_or("");
        match (self.finding, self.settlement) {
            (Finding::UnknownKind, _) => {
                tracing::warn!(queue, job_id, kind, "refusing job: unknown kind");
            }
            (Finding::Expired { .. }, _) => {
                tracing::info!(
                    queue,
                    job_id,
                    kind,
                    error,
                    "Celery task expired; not running it"
                );
            }
            (Finding::NotDue { wait }, _) => {
                tracing::debug!(job_id, wait = ?wait, "Celery task not due yet; delaying it to its eta");
            }
            (Finding::AlreadyCompleted { .. }, _) => {
                tracing::debug!(job_id, "duplicate: key already completed");
            }
            (Finding::AlreadyFailed { .. }, _) => {
                tracing::debug!(job_id, "duplicate: key already failed for good");
            }
            (Finding::HeldElsewhere { .. }, Settlement::Defer { delay }) => {
                tracing::debug!(job_id, retry_in = ?delay, "key held by a live lease; deferring");
            }
            (Finding::StoreUnavailable { .. }, _) => {
                tracing::warn!(job_id, error, "cannot claim the idempotency key; deferring");
            }
            (
                Finding::Succeeded {
                    recorded: false, ..
                },
                _,
            ) => {
                tracing::warn!(
                    job_id,
                    "completion not recorded; checking the key again later"
                );
            }
            (Finding::Failed(_), Settlement::Retry { delay }) => {
                tracing::info!(queue, job_id, kind, attempt, retry_in = ?delay, error, "job failed; retrying");
            }
            (Finding::Failed(_), Settlement::DeadLetter { reason, .. }) => {
                tracing::warn!(
                    queue,
                    job_id,
                    kind,
                    attempt,
                    reason = reason.as_str(),
                    error,
                    "job failed for good; dead-lettering"
                );
            }
            (Finding::Interrupted { .. }, _) => {
                tracing::info!(
                    queue,
                    job_id,
                    reason = error,
                    "job stopped by shutdown; leaving it to the broker"
                );
            }
            _ => {}
        }
    }
}

/// A copy (retry, deferral, dead letter, Celery result) confirmed by the broker.
pub(super) struct Confirmed {
    pub(super) took: Duration,
}

impl Confirmed {
    pub(super) fn emit(&self, shared: &Shared) {
        shared
            .metrics
            .publish_confirm_seconds
            .observe(self.took.as_secs_f64());
    }
}

/// A dead-letter copy confirmed in `Q.dead`.
pub(super) struct DeadLettered<'a> {
    pub(super) queue: &'a str,
    pub(super) reason: DeadReason,
}

impl DeadLettered<'_> {
    pub(super) fn emit(&self, shared: &Shared) {
        shared
            .metrics
            .dead_letters_total
            .with_label_values(&[self.queue, self.reason.as_str()])
            .inc();
    }
}

/// An ack that could not be sent: the broker will redeliver the message.
pub(super) struct AckFailed<'a> {
    pub(super) queue: &'a str,
    pub(super) error: &'a dyn std::fmt::Display,
}

impl AckFailed<'_> {
    pub(super) fn emit(&self, shared: &Shared) {
        shared.metrics.ack_failures_total.inc();
        tracing::warn!(queue = %self.queue, error = %self.error, "ack failed; the broker will redeliver this message");
    }
}

/// A store call on the way to a settlement that failed; the caller says
/// what happens instead (defer, retry, or leave it to the lease).
pub(super) struct StoreWriteFailed<'a> {
    pub(super) key: &'a str,
    pub(super) what: &'static str,
    pub(super) error: &'a dyn std::fmt::Display,
}

impl StoreWriteFailed<'_> {
    pub(super) fn emit(&self, shared: &Shared) {
        shared
            .metrics
            .store_errors_total
            .with_label_values(&[self.what])
            .inc();
        tracing::warn!(key = %self.key, operation = self.what, error = %self.error, "store call failed");
    }
}

/// A job settled and acked: counted by outcome and handed to the observer.
pub(super) struct Finished {
    pub(super) report: JobReport,
}

impl Finished {
    pub(super) fn emit(self, shared: &Shared) {
        let r = &self.report;
        let kind = if shared.handlers.contains_key(&r.kind) {
            r.kind.as_str()
        } else {
            UNKNOWN_KIND
        };
        shared
            .metrics
            .jobs_total
            .with_label_values(&[&r.queue, kind, r.outcome.as_str()])
            .inc();
        shared
            .leases
            .jobs_done
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(obs) = &shared.observer {
            obs(r);
        }
    }
}
