//! What the bench (`taskmill-bench`) and the integration tests of the
//! `taskmill` crate both need to drive real workers: nothing here knows about
//! AMQP, queues or job kinds.
//!
//! Layout:
//! - [`http`]: a plain HTTP GET on loopback, free ports.
//! - [`metrics`]: reading samples out of a Prometheus text exposition.
//! - [`process`]: children of a pid and their state (from `/proc/PID/stat`),
//!   process groups killed as one, log tails.
//! - [`dirs`]: scratch directories removed when dropped.
//! - [`rabbit`]: extra RabbitMQ nodes beside the service broker (TLS
//!   listeners, clusters), stopped and wiped when dropped.
//! - [`worker`]: starting a worker in this process or as a child
//!   `taskmill worker` process, and waiting until its `/readyz` answers 200.
//!
//! ```no_run
//! # async fn f(addr: std::net::SocketAddr) -> Result<(), taskmill_testkit::Error> {
//! let (status, body) = taskmill_testkit::http::get(addr, "/metrics").await?;
//! let done = taskmill_testkit::metrics::metric_value(&body, "taskmill_jobs_total{queue=\"q\"}");
//! # let _ = (status, done); Ok(()) }
//! ```

pub mod dirs;
pub mod http;
pub mod metrics;
pub mod process;
pub mod rabbit;
pub mod worker;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use dirs::TempDir;
pub use worker::{WorkerProcess, start_in_process};

/// Why a helper could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, socket or process operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// An in-process worker could not start.
    #[error(transparent)]
    Worker(#[from] taskmill_worker::WorkerError),
    /// An HTTP request got no complete answer in time.
    #[error("GET {path} timed out after {timeout:?}")]
    HttpTimeout {
        /// The path asked for.
        path: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// An HTTP request was answered, but not with 200.
    #[error("GET {path} answered {status}")]
    HttpStatus {
        /// The path asked for.
        path: String,
        /// The status code (0: not HTTP).
        status: u16,
    },
    /// A worker process exited before its `/readyz` answered 200.
    #[error("{name} exited before it was ready: {status}\n{log}")]
    ExitedEarly {
        /// The worker's name.
        name: String,
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log, if it has one.
        log: String,
    },
    /// A worker's `/readyz` did not answer 200 in time.
    #[error("{name} was not ready within {timeout:?}\n{log}")]
    NotReady {
        /// The worker's name.
        name: String,
        /// How long it waited.
        timeout: Duration,
        /// The end of its log, if it has one.
        log: String,
    },
    /// A process did not exit within its grace after SIGTERM; it was killed.
    #[error("{name} did not exit within {grace:?} of SIGTERM; killed")]
    NotStopped {
        /// The process's name.
        name: String,
        /// The grace it had.
        grace: Duration,
    },
    /// A scratch directory could not be created.
    #[error("creating {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
}
