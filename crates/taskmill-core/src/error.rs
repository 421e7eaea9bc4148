//! Handler errors and job outcomes.
//!
//! The error a handler returns decides what the runtime does with the job; the
//! runtime never guesses from error strings.

use std::time::Duration;

/// The error of a job handler. Its variant decides the job's fate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// A transient failure (a dependency is down, a rate limit was hit): the
    /// job may succeed if run again, optionally not before `retry_after`.
    #[error("retryable error: {message}")]
    Retryable {
        /// What went wrong, for the dead-letter headers and logs.
        message: String,
        /// The earliest moment a new attempt makes sense, if the handler knows it.
        retry_after: Option<Duration>,
    },
    /// A failure that no retry can fix (bad input, a refused operation).
    #[error("permanent error: {message}")]
    Permanent {
        /// What went wrong.
        message: String,
    },
    /// The payload is not JSON at all. Permanent.
    #[error("payload is not valid JSON: {message}")]
    InvalidJson {
        /// The parser's message.
        message: String,
    },
    /// The payload is JSON but does not fit the kind's payload type. Permanent.
    #[error("invalid payload: {message}")]
    InvalidPayload {
        /// The deserializer's message.
        message: String,
    },
    /// The job overran its hard timeout and was stopped.
    #[error("timed out after {}", humantime::format_duration(*after))]
    Timeout {
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The job's task panicked, or its worker process died.
    #[error("crashed: {cause}")]
    Crashed {
        /// What killed it: a panic message, a signal, an exit status.
        cause: String,
    },
}

impl JobError {
    /// A retryable error without a retry-after hint.
    pub fn retryable(message: impl Into<String>) -> Self {
        JobError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        JobError::Permanent {
            message: message.into(),
        }
    }

    /// The error for a payload that `serde_json` could not deserialize:
    /// [`JobError::InvalidJson`] for syntax errors, [`JobError::InvalidPayload`]
    /// for JSON of the wrong shape.
    pub fn from_payload_error(kind: &str, e: &serde_json::Error) -> Self {
        if e.is_syntax() || e.is_eof() {
            JobError::InvalidJson {
                message: e.to_string(),
            }
        } else {
            JobError::InvalidPayload {
                message: format!("payload does not fit kind `{kind}`: {e}"),
            }
        }
    }

    /// Whether another attempt could succeed. Panics, crashes and timeouts
    /// count as retryable: the next attempt may run on a healthier machine.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            JobError::Retryable { .. } | JobError::Timeout { .. } | JobError::Crashed { .. }
        )
    }

    /// The outcome this error gives a job that is not retried.
    pub fn final_outcome(&self) -> Outcome {
        match self {
            JobError::Timeout { .. } => Outcome::Timeout,
            JobError::Crashed { .. } => Outcome::Crashed,
            _ => Outcome::Dead,
        }
    }

    /// The handler's hint for the earliest next attempt, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            JobError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The dead-letter reason for a job that ends with this error.
    pub fn dead_reason(&self) -> DeadReason {
        match self {
            JobError::Retryable { .. } | JobError::Permanent { .. } => DeadReason::HandlerError,
            JobError::InvalidJson { .. } => DeadReason::InvalidJson,
            JobError::InvalidPayload { .. } => DeadReason::InvalidPayload,
            JobError::Timeout { .. } => DeadReason::Timeout,
            JobError::Crashed { .. } => DeadReason::Crashed,
        }
    }
}

use crate::wire::DeadReason;

/// How a job ended, as counted in `taskmill_jobs_total{outcome}`. A bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The handler succeeded and the message was acked.
    Ok,
    /// A retry copy was published; this attempt is over.
    Retried,
    /// The job was dead-lettered (refused at decode, permanent error, exhausted).
    Dead,
    /// The job's idempotency key had already completed; nothing ran.
    Duplicate,
    /// Another worker holds the job's key right now; a delayed copy was
    /// published to try again after its lease.
    Deferred,
    /// The job overran its timeout and was dead-lettered.
    Timeout,
    /// The job's task or process crashed and the job was dead-lettered.
    Crashed,
}

impl Outcome {
    /// The label value used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Duplicate => "duplicate",
            Outcome::Deferred => "deferred",
            Outcome::Timeout => "timeout",
            Outcome::Crashed => "crashed",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
