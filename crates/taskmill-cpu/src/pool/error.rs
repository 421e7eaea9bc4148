//! The errors of the pool: [`CpuError`] for one job (it says whether a retry
//! makes sense) and [`PoolError`] for starting the pool.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::registry::HandlerError;

/// Why a CPU job did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    /// The job ran past its timeout; its process was killed and replaced.
    #[error("CPU job timed out after {after:?}; its worker process was killed")]
    Timeout {
        /// The timeout that was exceeded.
        after: Duration,
    },
    /// The worker process died during the job.
    #[error("CPU worker process died during the job: {cause}")]
    Crashed {
        /// How it ended, e.g. `"killed by signal 6 (SIGABRT)"`.
        cause: String,
    },
    /// The handler panicked; the process was replaced.
    #[error("CPU job handler panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The handler returned an error.
    #[error("CPU job handler returned a {0}")]
    Handler(#[from] HandlerError),
    /// The payload does not fit in one frame.
    #[error("CPU job payload of {size} bytes exceeds the frame limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// Configured `max_frame_bytes` (minus the frame header).
        max: usize,
    },
    /// The pool is shut down (or shutting down); the job was never started.
    #[error("CPU pool is shut down; the job was not started")]
    PoolClosed,
    /// The pool shut down while the job ran and its grace period ran out; the
    /// process was killed. Leave the message unacked so another worker runs it.
    #[error("CPU job interrupted by pool shutdown; its worker process was killed")]
    Interrupted,
    /// The child sent something that is not a valid frame; it was killed and
    /// replaced.
    #[error("protocol error from CPU worker process: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
}

impl CpuError {
    /// Whether running the job again may succeed: true for timeouts, crashes,
    /// panics, protocol errors, shutdown and retryable handler errors; false
    /// for permanent handler errors and oversized payloads.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Handler(err) => err.is_retryable(),
            Self::PayloadTooLarge { .. } => false,
            Self::Timeout { .. }
            | Self::Crashed { .. }
            | Self::Panicked { .. }
            | Self::PoolClosed
            | Self::Interrupted
            | Self::Protocol { .. } => true,
        }
    }

    /// Whether the job failed only because the pool is shutting down: the
    /// caller should leave the message unacked (redelivered, attempt not
    /// counted) rather than schedule a retry.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::PoolClosed | Self::Interrupted)
    }

    /// The retry delay the handler asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Handler(HandlerError::Retryable {
                retry_after_ms: Some(ms),
                ..
            }) => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

/// Why [`CpuPool::start`](super::CpuPool::start) failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A configuration value is out of range.
    #[error("invalid CPU pool configuration: {0}")]
    InvalidConfig(String),
    /// The worker program could not be started.
    #[error("cannot start CPU worker process {program:?}: {source}")]
    Spawn {
        /// The configured program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program started but did not complete the ready handshake.
    #[error("CPU worker process {program:?} failed its start-up handshake: {reason}")]
    Handshake {
        /// The configured program.
        program: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// [`CpuPool::start`](super::CpuPool::start) was called inside a worker process.
    #[error(
        "refusing to start a CPU pool inside a CPU worker process; \
         main() must call taskmill_cpu::run_child when is_child_mode() is true"
    )]
    NestedPool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability() {
        assert!(
            CpuError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(CpuError::Crashed { cause: "x".into() }.is_retryable());
        assert!(
            CpuError::Panicked {
                message: "x".into()
            }
            .is_retryable()
        );
        assert!(CpuError::Handler(HandlerError::retryable("x")).is_retryable());
        assert!(!CpuError::Handler(HandlerError::permanent("x")).is_retryable());
        assert!(!CpuError::PayloadTooLarge { size: 2, max: 1 }.is_retryable());
        assert!(CpuError::Interrupted.is_shutdown() && CpuError::PoolClosed.is_shutdown());
        let e = CpuError::Handler(HandlerError::Retryable {
            message: "busy".into(),
            retry_after_ms: Some(1500),
        });
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(
            e.to_string(),
            "CPU job handler returned a retryable error: busy"
        );
        assert_eq!(
            CpuError::Crashed {
                cause: "killed by signal 6 (SIGABRT)".into()
            }
            .to_string(),
            "CPU worker process died during the job: killed by signal 6 (SIGABRT)"
        );
    }
}
