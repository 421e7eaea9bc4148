//! Where a Celery task's life differs from a taskmill job's: the copies stay
//! Celery messages, `eta` and `expires` are checked before anything runs, and
//! every final state (and RETRY) is told to the client's `rpc://` reply queue,
//! after the outcome is durable and before the ack.

use std::time::Duration;

use taskmill_broker::now_us;
use taskmill_broker::{Incoming, Outgoing, PublishError};
use taskmill_core::celery::{self, CeleryException, CeleryTask, ReplyTo, ResultStatus};
use taskmill_core::{DeadReason, Envelope, JobError};

use super::decide::{Finding, Settlement};
use super::events::Confirmed;
use crate::shared::Session;

/// The key of a failure record that holds the exception reported to Celery.
pub(super) const CELERY_EXCEPTION: &str = "celery_exception";

/// The protocol a delivery came in, and what its copies and results need.
pub(crate) enum Wire {
    /// taskmill protocol v1: the body moved into the envelope's payload.
    Taskmill,
    /// Celery protocol v2: the body stays in the delivery, so every copy is
    /// still a Celery message; outcomes go to the client's reply queue.
    Celery(CeleryTask),
}

impl Wire {
    /// The body of a dead-letter copy: the payload taken out of a taskmill
    /// delivery; `None` (the delivery's own body) for Celery.
    pub(super) fn dead_body<'a>(&self, payload: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Wire::Taskmill => Some(payload),
            Wire::Celery(_) => None,
        }
    }

    /// The client's reply queue, for a Celery task that has one.
    pub(super) fn reply_to(&self) -> Option<&ReplyTo> {
        match self {
            Wire::Celery(task) => task.reply.as_ref(),
            Wire::Taskmill => None,
        }
    }

    /// Celery's `expires` and `eta`, checked before anything runs: an expired
    /// task is dead-lettered (reason `expired`) and reported REVOKED, as
    /// Celery does; a task not due yet goes through the delay ladder until its
    /// `eta` instead of being held unacked.
    pub(super) fn gate(&self, now_us: u64) -> Option<Finding> {
        let Wire::Celery(task) = self else {
            return None;
        };
        if task.expired_at(now_us) {
            let at = celery::format_iso8601(task.expires_us.unwrap_or(0));
            return Some(Finding::Expired {
                detail: format!("the Celery task expired at {at}"),
            });
        }
        task.wait_at(now_us).map(|wait| Finding::NotDue { wait })
    }

    /// The copy of a delivery that runs `next` after `delay`: a taskmill job,
    /// or the Celery message itself with `retries` = attempt - 1 and `eta` =
    /// when it is due (never earlier than its own `eta`: a delay clamped to the
    /// ladder's maximum only means another round through the ladder).
    pub(super) fn delayed(
        &self,
        incoming: &Incoming,
        next: &Envelope,
        delay: Duration,
    ) -> Result<Outgoing, String> {
        match self {
            Wire::Taskmill => Outgoing::job_delayed(next, delay),
            Wire::Celery(task) => {
                let due = now_us()
                    .saturating_add(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX))
                    .max(task.eta_us.unwrap_or(0));
                let headers = celery::redelivery_headers(
                    next.attempt.saturating_sub(1),
                    due,
                    next.first_failed_at_ms,
                );
                incoming.delayed_copy(&headers, delay)
            }
        }
    }
}

/// What a Celery client is told about an outcome (`rpc://` result message).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notice {
    pub(super) status: ResultStatus,
    pub(super) result: serde_json::Value,
    pub(super) traceback: Option<String>,
}

impl Notice {
    fn success(result: serde_json::Value) -> Notice {
        Notice {
            status: ResultStatus::Success,
            result,
            traceback: None,
        }
    }

    fn error(status: ResultStatus, exc: &CeleryException, traceback: impl Into<String>) -> Notice {
        Notice {
            status,
            result: exc.to_json(),
            traceback: Some(traceback.into()),
        }
    }

    /// What the client of a task is told when its delivery settles this way
    /// (pure; `None` when there is nothing to tell: a deferral, a shutdown).
    pub(super) fn for_settlement(
        finding: &Finding,
        settlement: &Settlement,
        kind: &str,
        detail: Option<&str>,
    ) -> Option<Notice> {
        let detail = detail.unwrap_or_default();
        Some(match (finding, settlement) {
            (Finding::Succeeded { value, .. }, Settlement::Ack { .. }) => {
                Notice::success(value.clone())
            }
            // A Celery client may still wait: the run that completed the key
            // may have stopped before its result was sent.
            (Finding::AlreadyCompleted { result }, _) => {
                Notice::success(result.clone().unwrap_or_default())
            }
            (Finding::AlreadyFailed { error }, _) => {
                let text = error["error"].as_str().unwrap_or("failed").to_string();
                let exc = error
                    .get(CELERY_EXCEPTION)
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_else(|| {
                        CeleryException::from_job_error(&JobError::permanent(text.clone()))
                    });
                Notice::error(ResultStatus::Failure, &exc, text)
            }
            (Finding::Expired { .. }, _) => Notice::error(
                ResultStatus::Revoked,
                &CeleryException::revoked("expired"),
                detail,
            ),
            (Finding::UnknownKind, _) => Notice::error(
                ResultStatus::Failure,
                &CeleryException::from_refusal(DeadReason::UnknownKind, detail, Some(kind)),
                detail,
            ),
            (
                Finding::Refused {
                    reason,
                    detail: what,
                },
                _,
            ) => Notice::error(
                ResultStatus::Failure,
                &CeleryException::from_refusal(*reason, what, None),
                detail,
            ),
            (Finding::Failed(err), Settlement::Retry { .. }) => Notice::error(
                ResultStatus::Retry,
                &CeleryException::from_job_error(err),
                err.to_string(),
            ),
            (Finding::Failed(err), Settlement::DeadLetter { reason, .. }) => Notice::error(
                ResultStatus::Failure,
                &CeleryException::from_job_error(err),
                format!("{}: {err}", reason.as_str()),
            ),
            _ => return None,
        })
    }
}

/// Publishes a result message to a Celery client's reply queue, confirmed.
/// A reply queue that no longer exists (the client went away) drops the
/// result, as Celery does. A RETRY notice is informative: if it cannot be
/// sent, the job goes on. Any other failure to send a final state ends the
/// session like a failed publish: the delivery returns unacked and its
/// redelivery, finding the outcome recorded, reports it again.
pub(super) async fn notify(session: &Session, to: &ReplyTo, notice: Notice) -> bool {
    let body = celery::result_body(
        to,
        notice.status,
        &notice.result,
        notice.traceback.as_deref(),
        now_us(),
    );
    // Results go only to a client's reply queue, never into a queue of the
    // vhost that a forged `reply_to` names.
    let msg = match Outgoing::celery_result(to, body, &session.shared.config.queues) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!(task_id = %to.task_id, error = %e, "Celery result dropped");
            return true;
        }
    };
    match session.publisher.publish(&msg).await {
        Ok(took) => {
            Confirmed { took }.emit(&session.shared);
            true
        }
        Err(PublishError::Unroutable { .. }) => {
            tracing::info!(task_id = %to.task_id, reply_to = %to.queue, status = notice.status.as_str(), "the Celery client's reply queue is gone; result dropped");
            true
        }
        Err(e) if !notice.status.is_ready() => {
            tracing::warn!(task_id = %to.task_id, error = %e, "cannot send the RETRY state to the Celery client");
            true
        }
        Err(e) => {
            session.fail(format!(
                "cannot send the result of Celery task {} to {}: {e}",
                to.task_id, to.queue
            ));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmill_core::Outcome;

    fn ack(outcome: Outcome) -> Settlement {
        Settlement::Ack { outcome }
    }

    #[test]
    fn each_final_state_is_told_once_and_deferrals_are_not() {
        let ok = Finding::Succeeded {
            value: serde_json::json!(42),
            recorded: true,
        };
        let n = Notice::for_settlement(&ok, &ack(Outcome::Ok), "k", None).unwrap();
        assert_eq!(n.status, ResultStatus::Success);
        assert_eq!(n.result, serde_json::json!(42));

        let err = JobError::retryable("down");
        let retry = Settlement::Retry {
            delay: Duration::from_secs(1),
        };
        let n = Notice::for_settlement(&Finding::Failed(err.clone()), &retry, "k", None).unwrap();
        assert_eq!(n.status, ResultStatus::Retry);

        let dead = Settlement::DeadLetter {
            reason: DeadReason::AttemptsExhausted,
            outcome: Outcome::Dead,
        };
        let n = Notice::for_settlement(&Finding::Failed(err), &dead, "k", None).unwrap();
        assert_eq!(n.status, ResultStatus::Failure);
        assert!(n.traceback.unwrap().starts_with("attempts_exhausted: "));

        let expired = Finding::Expired {
            detail: "then".into(),
        };
        let n = Notice::for_settlement(&expired, &dead, "k", Some("then")).unwrap();
        assert_eq!(n.status, ResultStatus::Revoked);

        let held = Finding::HeldElsewhere {
            expires_in: Duration::from_secs(1),
        };
        let defer = Settlement::Defer {
            delay: Duration::from_secs(2),
        };
        assert_eq!(Notice::for_settlement(&held, &defer, "k", None), None);
        let unrecorded = Finding::Succeeded {
            value: serde_json::json!(1),
            recorded: false,
        };
        assert_eq!(Notice::for_settlement(&unrecorded, &defer, "k", None), None);
        let stopped = Finding::Interrupted { why: "x".into() };
        assert_eq!(
            Notice::for_settlement(&stopped, &Settlement::LeaveUnacked, "k", None),
            None
        );
    }

    #[test]
    fn a_duplicate_reports_the_recorded_outcome() {
        let done = Finding::AlreadyCompleted {
            result: Some(serde_json::json!("r")),
        };
        let n = Notice::for_settlement(&done, &ack(Outcome::Duplicate), "k", None).unwrap();
        assert_eq!(
            (n.status, n.result),
            (ResultStatus::Success, serde_json::json!("r"))
        );
        let failed = Finding::AlreadyFailed {
            error: serde_json::json!({"error": "nope"}),
        };
        let n = Notice::for_settlement(&failed, &ack(Outcome::Duplicate), "k", None).unwrap();
        assert_eq!(n.status, ResultStatus::Failure);
        assert_eq!(n.traceback.as_deref(), Some("nope"));
    }
}
