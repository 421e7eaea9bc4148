//! The bench's error: what failed, with the chain of what it was doing.
//!
//! A scenario either measures or fails; nothing decides on the kind of
//! failure, so one variant carries a check that did not hold and another
//! wraps any source error with the step it interrupted. [`Error`]'s
//! `Display` never repeats its source: a reporter prints the chain.

use std::fmt::Display;

/// The error of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A check or a precondition did not hold (a count, a deadline, an
    /// argument out of range).
    #[error("{0}")]
    Failed(String),
    /// A step failed; `source` says why.
    #[error("{context}")]
    Context {
        /// The step, e.g. `enqueueing 1000 noop jobs to Q`.
        context: String,
        /// What went wrong in it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The broker refused or lost an operation.
    #[error(transparent)]
    Broker(#[from] taskmill_broker::BrokerError),
    /// A publish was not confirmed.
    #[error(transparent)]
    Publish(#[from] taskmill_broker::PublishError),
    /// A job the bench built is not valid.
    #[error(transparent)]
    Invalid(#[from] taskmill_core::wire::DecodeError),
    /// A job could not be enqueued.
    #[error(transparent)]
    Enqueue(#[from] taskmill_client::EnqueueError),
    /// An in-process worker could not start or run.
    #[error(transparent)]
    Worker(#[from] taskmill_worker::WorkerError),
    /// The CPU process pool could not start or run a job.
    #[error(transparent)]
    CpuPool(#[from] taskmill_cpu::PoolError),
    /// A job of the pool's hand-off round trip failed.
    #[error(transparent)]
    CpuJob(#[from] taskmill_cpu::CpuError),
    /// A task the bench spawned panicked or was cancelled.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// A probe (HTTP, child process, scratch dir) failed.
    #[error(transparent)]
    Testkit(#[from] taskmill_testkit::Error),
    /// A file, pipe or process operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A child printed something that is not the JSON it should.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// This error as the source of a failed `context`.
    pub fn context(self, context: impl Display) -> Error {
        Error::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }
}

/// A bench result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to a failure, as `anyhow::Context` does.
pub(crate) trait Context<T> {
    /// Wraps the failure with `context`.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the failure with the context `f` computes (only on failure).
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.to_string(),
            source: Box::new(e),
        })
    }

    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            source: Box::new(e),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Display) -> Result<T> {
        self.ok_or_else(|| Error::Failed(context.to_string()))
    }

    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Failed(f().to_string()))
    }
}

/// Fails the function with [`Error::Failed`] and a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Failed(format!($($arg)*)))
    };
}

/// Fails the function with [`Error::Failed`] unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        // Bound first: `!` on a float comparison would read as its inverse.
        let holds: bool = $cond;
        if !holds {
            $crate::error::bail!($($arg)*);
        }
    };
}

pub(crate) use {bail, ensure};
