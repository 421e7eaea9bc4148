//! The decision at the heart of the pipeline, as a pure function.
//!
//! Each stage of a delivery's life (decode, the Celery gate, the claim, the
//! run) ends in a [`Finding`]: a plain value saying what it found. [`decide`]
//! turns the finding, the kind's retry policy and the attempt number into a
//! [`Settlement`]: ack, retry, defer, dead-letter, or leave the delivery to the
//! broker. Nothing here touches the broker, the store or the clock (the
//! backoff's jitter comes in as a number), so every rule about a job's fate is
//! tested below without RabbitMQ; `settle.rs` only carries a settlement out.

use std::time::Duration;

use taskmill_core::retry::RetryPolicy;
use taskmill_core::wire::MAX_DELAY;
use taskmill_core::{DeadReason, JobError, Outcome};

/// Retry delay when the store cannot be reached or did not record a completion.
pub(crate) const STORE_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Longest wait before re-checking a key held by another worker.
pub(crate) const MAX_DEFER: Duration = Duration::from_secs(300);
/// How long after another worker's lease ends its key is checked again.
pub(crate) const DEFER_MARGIN: Duration = Duration::from_secs(1);

/// What a stage of the pipeline found, in plain values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finding {
    /// The message could not be decoded or validated.
    Refused {
        /// Why, as the dead-letter reason.
        reason: DeadReason,
        /// What is wrong, without the reason code.
        detail: String,
    },
    /// No handler is registered for the job's kind.
    UnknownKind,
    /// A Celery task past its `expires`.
    Expired {
        /// What to tell the operator (when it expired).
        detail: String,
    },
    /// A Celery task whose `eta` is still `wait` away.
    NotDue {
        /// Time until the task is due.
        wait: Duration,
    },
    /// The job's key had completed before: nothing runs again.
    AlreadyCompleted {
        /// The result recorded then.
        result: Option<serde_json::Value>,
    },
    /// The job's key had failed for good before: nothing runs again.
    AlreadyFailed {
        /// The failure record.
        error: serde_json::Value,
    },
    /// Another live worker holds the job's key; its lease ends in `expires_in`.
    HeldElsewhere {
        /// The holder's lease left.
        expires_in: Duration,
    },
    /// The store did not answer the claim.
    StoreUnavailable {
        /// The store's error.
        error: String,
    },
    /// The handler succeeded.
    Succeeded {
        /// Its result.
        value: serde_json::Value,
        /// Whether the completion is durable (recorded in the store, or the job
        /// has no key and so nothing to record).
        recorded: bool,
    },
    /// The handler failed; its error decides retry or dead-letter.
    Failed(JobError),
    /// Shutdown stopped the job before it ended.
    Interrupted {
        /// What stopped it.
        why: String,
    },
}

impl Finding {
    /// The text for the report, the logs and the dead-letter header.
    pub(crate) fn detail(&self, kind: &str) -> Option<String> {
        match self {
            Finding::Refused { reason, detail } => Some(format!("{}: {detail}", reason.as_str())),
            Finding::Expired { detail } | Finding::StoreUnavailable { error: detail } => {
                Some(detail.clone())
            }
            Finding::UnknownKind => Some(format!("no handler is registered for kind `{kind}`")),
            Finding::Succeeded {
                recorded: false, ..
            } => Some("completion not recorded".into()),
            Finding::Failed(e) => Some(e.to_string()),
            Finding::Interrupted { why } => Some(why.clone()),
            Finding::NotDue { .. }
            | Finding::AlreadyCompleted { .. }
            | Finding::AlreadyFailed { .. }
            | Finding::HeldElsewhere { .. }
            | Finding::Succeeded { recorded: true, .. } => None,
        }
    }
}

/// The numbers a decision depends on besides the finding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// The delivery's 1-based attempt.
    pub(crate) attempt: u32,
    /// The kind's retry policy.
    pub(crate) policy: &'a RetryPolicy,
    /// A uniform random number in [0, 1) for the backoff's jitter.
    pub(crate) jitter: f64,
}

impl Facts<'static> {
    /// The facts of a message refused before it has a kind or attempt: no
    /// finding that needs a retry policy can come with them.
    pub(crate) fn none() -> Facts<'static> {
        static NO_RETRY: RetryPolicy = RetryPolicy {
            max_attempts: 1,
            base: Duration::ZERO,
            factor: 1.0,
            cap: Duration::ZERO,
            jitter: taskmill_core::retry::Jitter::None,
        };
        Facts {
            attempt: 1,
            policy: &NO_RETRY,
            jitter: 0.0,
        }
    }
}

/// What happens to a delivery. Every settlement but `LeaveUnacked` ends with
/// the delivery's ack, sent only after what it names is durable.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Settlement {
    /// The outcome is durable (or there is none to record): ack.
    Ack {
        /// `Ok` or `Duplicate`.
        outcome: Outcome,
    },
    /// Publish attempt + 1 to run after `delay`, confirmed, then ack.
    Retry {
        /// The backoff, at least the handler's retry-after, at most the ladder's range.
        delay: Duration,
    },
    /// Publish the same attempt to run after `delay`, confirmed, then ack.
    Defer {
        /// Until when the check waits, at most the ladder's range.
        delay: Duration,
    },
    /// Publish the dead-letter copy, confirmed, then ack.
    DeadLetter {
        /// The `x-taskmill-dead-reason`.
        reason: DeadReason,
        /// `Dead`, `Timeout` or `Crashed`.
        outcome: Outcome,
    },
    /// Send nothing: the delivery returns to its queue when this session's
    /// channel closes (shutdown stopped the job).
    LeaveUnacked,
}

impl Settlement {
    /// The outcome counted in `taskmill_jobs_total`, once the settlement is done.
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        match self {
            Settlement::Ack { outcome } | Settlement::DeadLetter { outcome, .. } => Some(*outcome),
            Settlement::Retry { .. } => Some(Outcome::Retried),
            Settlement::Defer { .. } => Some(Outcome::Deferred),
            Settlement::LeaveUnacked => None,
        }
    }

    /// What happens to a claimed key as the settlement is carried out. A
    /// job acked early (parked in the store) that shutdown stopped keeps its
    /// claim and parked copy: the sweeper of a live worker republishes it
    /// once this worker is gone (releasing would drop the only copy).
    pub(crate) fn store_effect(&self, acked_early: bool) -> StoreEffect {
        match self {
            Settlement::LeaveUnacked if acked_early => StoreEffect::None,
            // Another attempt (here or on another worker) must be able to claim it.
            Settlement::Retry { .. } | Settlement::LeaveUnacked => StoreEffect::Release,
            Settlement::DeadLetter { .. } => StoreEffect::Fail,
            // A completion that was not recorded keeps its lease, so no other
            // worker runs the job again before the deferred copy checks it.
            Settlement::Ack { .. } | Settlement::Defer { .. } => StoreEffect::None,
        }
    }
}

/// Whether the store effect comes before the copy is published. For a
/// delivery still unacked, first: a released key is claimable by the time its
/// retry copy arrives. For a job acked early, after: its parked copy is the
/// only record of the job until the retry or dead-letter copy is confirmed.
pub(crate) fn store_effect_first(acked_early: bool) -> bool {
    !acked_early
}

/// Whether a job with this hard `timeout` is acked before it runs (parked in
/// the store first), because its delivery could otherwise stay unacked past
/// the broker's `consumer_timeout` and get its channel closed. The margin
/// covers the claim, the hand-off and the settlement: a minute, or a tenth
/// of a short consumer timeout. `consumer_timeout` zero: never.
pub(crate) fn acks_early(timeout: Duration, consumer_timeout: Duration) -> bool {
    if consumer_timeout.is_zero() {
        return false;
    }
    let margin = (consumer_timeout / 10).min(Duration::from_secs(60));
    timeout.saturating_add(margin) >= consumer_timeout
}

/// What the store is told about a claimed key as a delivery settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreEffect {
    /// Nothing (already recorded, or kept under its lease).
    None,
    /// Give the key back unfinished.
    Release,
    /// Record the final failure.
    Fail,
}

/// The fate of a delivery, from what its last stage found.
pub(crate) fn decide(finding: &Finding, facts: Facts<'_>) -> Settlement {
    match finding {
        Finding::Refused { reason, .. } => dead(*reason),
        Finding::UnknownKind => dead(DeadReason::UnknownKind),
        Finding::Expired { .. } => dead(DeadReason::Expired),
        Finding::NotDue { wait } => defer(*wait),
        Finding::AlreadyCompleted { .. } | Finding::AlreadyFailed { .. } => Settlement::Ack {
            outcome: Outcome::Duplicate,
        },
        Finding::HeldElsewhere { expires_in } => {
            defer(expires_in.saturating_add(DEFER_MARGIN).min(MAX_DEFER))
        }
        Finding::StoreUnavailable { .. }
        | Finding::Succeeded {
            recorded: false, ..
        } => defer(STORE_RETRY_DELAY),
        Finding::Succeeded { recorded: true, .. } => Settlement::Ack {
            outcome: Outcome::Ok,
        },
        Finding::Failed(err) => failed(err, facts),
        Finding::Interrupted { .. } => Settlement::LeaveUnacked,
    }
}

fn failed(err: &JobError, facts: Facts<'_>) -> Settlement {
    if !err.is_retryable() {
        return Settlement::DeadLetter {
            reason: err.dead_reason(),
            outcome: err.final_outcome(),
        };
    }
    if !facts.policy.allows_retry_after(facts.attempt) {
        return Settlement::DeadLetter {
            reason: DeadReason::AttemptsExhausted,
            outcome: err.final_outcome(),
        };
    }
    Settlement::Retry {
        delay: facts
            .policy
            .next_delay(facts.attempt, facts.jitter, err.retry_after()),
    }
}

fn dead(reason: DeadReason) -> Settlement {
    Settlement::DeadLetter {
        reason,
        outcome: Outcome::Dead,
    }
}

/// A delay beyond the ladder's range goes to its maximum: the copy comes back
/// early and is checked (and deferred) again.
fn defer(delay: Duration) -> Settlement {
    Settlement::Defer {
        delay: delay.min(MAX_DELAY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use taskmill_core::retry::Jitter;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(60),
            jitter: Jitter::None,
        }
    }

    fn facts(policy: &RetryPolicy, attempt: u32) -> Facts<'_> {
        Facts {
            attempt,
            policy,
            jitter: 0.5,
        }
    }

    fn retryable() -> JobError {
        JobError::retryable("down")
    }

    /// Every finding, with the settlement it must get on attempt 1 of 3
    /// (no jitter: backoff 1 s on attempt 1).
    #[test]
    fn each_finding_has_its_settlement() {
        let p = policy(3);
        let dl = |reason, outcome| Settlement::DeadLetter { reason, outcome };
        let table: Vec<(Finding, Settlement)> = vec![
            (
                Finding::Refused {
                    reason: DeadReason::InvalidJson,
                    detail: "x".into(),
                },
                dl(DeadReason::InvalidJson, Outcome::Dead),
            ),
            (
                Finding::UnknownKind,
                dl(DeadReason::UnknownKind, Outcome::Dead),
            ),
            (
                Finding::Expired {
                    detail: "then".into(),
                },
                dl(DeadReason::Expired, Outcome::Dead),
            ),
            (
                Finding::NotDue {
                    wait: Duration::from_secs(7),
                },
                Settlement::Defer {
                    delay: Duration::from_secs(7),
                },
            ),
            (
                Finding::AlreadyCompleted { result: None },
                Settlement::Ack {
                    outcome: Outcome::Duplicate,
                },
            ),
            (
                Finding::AlreadyFailed {
                    error: serde_json::json!({}),
                },
                Settlement::Ack {
                    outcome: Outcome::Duplicate,
                },
            ),
            (
                Finding::HeldElsewhere {
                    expires_in: Duration::from_secs(10),
                },
                Settlement::Defer {
                    delay: Duration::from_secs(11),
                },
            ),
            (
                Finding::StoreUnavailable {
                    error: "gone".into(),
                },
                Settlement::Defer {
                    delay: STORE_RETRY_DELAY,
                },
            ),
            (
                Finding::Succeeded {
                    value: serde_json::Value::Null,
                    recorded: true,
                },
                Settlement::Ack {
                    outcome: Outcome::Ok,
                },
            ),
            (
                Finding::Succeeded {
                    value: serde_json::Value::Null,
                    recorded: false,
                },
                Settlement::Defer {
                    delay: STORE_RETRY_DELAY,
                },
            ),
            (
                Finding::Failed(retryable()),
                Settlement::Retry {
                    delay: Duration::from_secs(1),
                },
            ),
            (
                Finding::Failed(JobError::Timeout {
                    after: Duration::from_secs(1),
                }),
                Settlement::Retry {
                    delay: Duration::from_secs(1),
                },
            ),
            (
                Finding::Failed(JobError::Crashed { cause: "x".into() }),
                Settlement::Retry {
                    delay: Duration::from_secs(1),
                },
            ),
            (
                Finding::Failed(JobError::permanent("no")),
                dl(DeadReason::HandlerError, Outcome::Dead),
            ),
            (
                Finding::Failed(JobError::InvalidJson {
                    message: "x".into(),
                }),
                dl(DeadReason::InvalidJson, Outcome::Dead),
            ),
            (
                Finding::Failed(JobError::InvalidPayload {
                    message: "x".into(),
                }),
                dl(DeadReason::InvalidPayload, Outcome::Dead),
            ),
            (
                Finding::Interrupted {
                    why: "shutdown".into(),
                },
                Settlement::LeaveUnacked,
            ),
        ];
        for (finding, want) in table {
            assert_eq!(decide(&finding, facts(&p, 1)), want, "{finding:?}");
        }
    }

    #[test]
    fn the_last_attempt_dead_letters_with_the_errors_outcome() {
        let p = policy(3);
        let cases = [
            (retryable(), Outcome::Dead),
            (
                JobError::Timeout {
                    after: Duration::from_secs(1),
                },
                Outcome::Timeout,
            ),
            (JobError::Crashed { cause: "x".into() }, Outcome::Crashed),
        ];
        for (err, outcome) in cases {
            assert_eq!(
                decide(&Finding::Failed(err), facts(&p, 3)),
                Settlement::DeadLetter {
                    reason: DeadReason::AttemptsExhausted,
                    outcome
                }
            );
        }
        // One attempt allowed: the first failure is the last.
        assert!(matches!(
            decide(&Finding::Failed(retryable()), facts(&policy(1), 1)),
            Settlement::DeadLetter {
                reason: DeadReason::AttemptsExhausted,
                ..
            }
        ));
    }

    #[test]
    fn retry_after_raises_the_backoff_and_saturates() {
        let p = policy(5);
        let with_hint = |secs| {
            Finding::Failed(JobError::Retryable {
                message: "slow down".into(),
                retry_after: Some(Duration::from_secs(secs)),
            })
        };
        assert_eq!(
            decide(&with_hint(30), facts(&p, 1)),
            Settlement::Retry {
                delay: Duration::from_secs(30)
            }
        );
        // A hint shorter than the backoff does not shorten it (attempt 3: 4 s).
        assert_eq!(
            decide(&with_hint(1), facts(&p, 3)),
            Settlement::Retry {
                delay: Duration::from_secs(4)
            }
        );
        // Absurd hints end at the ladder's maximum instead of overflowing.
        assert_eq!(
            decide(&with_hint(u64::MAX), facts(&p, 1)),
            Settlement::Retry { delay: MAX_DELAY }
        );
    }

    #[test]
    fn defers_are_bounded() {
        let p = policy(3);
        let held = |d| Finding::HeldElsewhere { expires_in: d };
        assert_eq!(
            decide(&held(Duration::from_secs(3600)), facts(&p, 1)),
            Settlement::Defer { delay: MAX_DEFER }
        );
        assert_eq!(
            decide(&held(Duration::MAX), facts(&p, 1)),
            Settlement::Defer { delay: MAX_DEFER }
        );
        assert_eq!(
            decide(
                &Finding::NotDue {
                    wait: Duration::MAX
                },
                facts(&p, 1)
            ),
            Settlement::Defer { delay: MAX_DELAY }
        );
    }

    #[test]
    fn store_effects_follow_the_settlement() {
        use StoreEffect::*;
        let cases = [
            (
                Settlement::Ack {
                    outcome: Outcome::Ok,
                },
                None,
            ),
            (
                Settlement::Retry {
                    delay: Duration::ZERO,
                },
                Release,
            ),
            (
                Settlement::Defer {
                    delay: Duration::ZERO,
                },
                None,
            ),
            (
                Settlement::DeadLetter {
                    reason: DeadReason::Timeout,
                    outcome: Outcome::Timeout,
                },
                Fail,
            ),
            (Settlement::LeaveUnacked, Release),
        ];
        for (s, effect) in cases {
            assert_eq!(s.store_effect(false), effect, "{s:?}");
        }
        assert_eq!(Settlement::LeaveUnacked.outcome(), Option::None);
        // A parked job stopped by shutdown keeps its claim for the sweeper.
        assert_eq!(Settlement::LeaveUnacked.store_effect(true), None);
        assert_eq!(
            Settlement::Retry {
                delay: Duration::ZERO
            }
            .store_effect(true),
            Release
        );
        assert!(store_effect_first(false));
        assert!(!store_effect_first(true));
    }

    #[test]
    fn long_jobs_ack_early() {
        let min = Duration::from_secs(60);
        let thirty = 30 * min;
        assert!(!acks_early(Duration::from_secs(300), thirty));
        assert!(!acks_early(28 * min, thirty));
        assert!(acks_early(29 * min, thirty));
        assert!(acks_early(2 * 60 * min, thirty));
        // A lowered consumer timeout (5 s, as in the tests): 10 % margin.
        let five = Duration::from_secs(5);
        assert!(!acks_early(Duration::from_secs(4), five));
        assert!(acks_early(Duration::from_millis(4_600), five));
        assert!(acks_early(Duration::from_secs(15), five));
        // Off.
        assert!(!acks_early(Duration::MAX, Duration::ZERO));
    }

    fn any_error() -> impl Strategy<Value = JobError> {
        prop_oneof![
            (any::<String>(), proptest::option::of(any::<u64>())).prop_map(|(m, s)| {
                JobError::Retryable {
                    message: m,
                    retry_after: s.map(Duration::from_millis),
                }
            }),
            any::<String>().prop_map(JobError::permanent),
            any::<u64>().prop_map(|s| JobError::Timeout {
                after: Duration::from_millis(s)
            }),
            any::<String>().prop_map(|c| JobError::Crashed { cause: c }),
            any::<String>().prop_map(|m| JobError::InvalidJson { message: m }),
        ]
    }

    proptest! {
        /// A failed job is retried exactly while its error is retryable and
        /// attempts remain; every delay stays within the ladder; a permanent
        /// error never retries.
        #[test]
        fn failures_retry_only_while_attempts_remain(
            err in any_error(),
            attempt in 1u32..50,
            max in 1u32..20,
            jitter in 0.0f64..1.0,
        ) {
            let p = RetryPolicy { jitter: Jitter::Full, ..policy(max) };
            let s = decide(&Finding::Failed(err.clone()), Facts { attempt, policy: &p, jitter });
            match s {
                Settlement::Retry { delay } => {
                    prop_assert!(err.is_retryable());
                    prop_assert!(attempt < max);
                    prop_assert!(delay <= MAX_DELAY);
                    if let JobError::Retryable { retry_after: Some(h), .. } = &err {
                        prop_assert!(delay >= (*h).min(MAX_DELAY));
                    }
                }
                Settlement::DeadLetter { reason, outcome } => {
                    prop_assert!(!err.is_retryable() || attempt >= max);
                    prop_assert_eq!(outcome, err.final_outcome());
                    if err.is_retryable() {
                        prop_assert_eq!(reason, DeadReason::AttemptsExhausted);
                    } else {
                        prop_assert_eq!(reason, err.dead_reason());
                    }
                }
                other => prop_assert!(false, "a failure settled as {:?}", other),
            }
        }

        /// Every settlement but leaving it to the broker is counted once.
        #[test]
        fn every_acked_settlement_has_an_outcome(secs in any::<u64>()) {
            let p = policy(3);
            let f = Finding::HeldElsewhere { expires_in: Duration::from_secs(secs) };
            let s = decide(&f, facts(&p, 1));
            prop_assert_eq!(s.outcome(), Some(Outcome::Deferred));
        }
    }
}
