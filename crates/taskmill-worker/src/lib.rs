//! The taskmill runtime: consume, decode, dispatch, decide ack or dead-letter,
//! drain on shutdown, reconnect.
//!
//! It talks neither SQL nor AMQP frames: the broker crate carries out what this
//! crate decides.
//!
//! Layout:
//! - [`handler`]: [`JobContext`] and the type-erased handler registry.
//! - [`builder`]: [`WorkerBuilder`], where handlers are registered by kind.
//! - `runtime`: the supervisor (connect, declare, consume, reconnect) and the
//!   per-queue consume loops.
//! - `job/`: the life of one delivery, one file per stage, around the pure
//!   `job::decide` (finding -> settlement).
//! - `leases`: heartbeat leases on claimed keys and the worker's registry row.
//! - `sweep`: republishes long jobs parked by a worker that died.
//! - `shared`: the state every task shares (`Shared`, `Session`), [`JobReport`].
//! - [`signal`]: SIGTERM/SIGINT as a cancellation.
//!
//! ```no_run
//! use taskmill_core::{config::Config, JobError};
//! use taskmill_worker::WorkerBuilder;
//!
//! #[derive(serde::Deserialize)]
//! struct Greet { name: String }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = WorkerBuilder::new(Config::default())
//!     .io("greet", |_ctx, p: Greet| async move {
//!         if p.name.is_empty() {
//!             return Err(JobError::permanent("no name"));
//!         }
//!         Ok(format!("hello {}", p.name))
//!     })
//!     .build()?;
//! let shutdown = taskmill_worker::signal::shutdown_on_signals();
//! worker.start(shutdown).await?.wait().await?;
//! # Ok(()) }
//! ```

pub mod builder;
mod cpu_metrics;
pub mod handler;
mod job;
mod leases;
mod runtime;
mod shared;
pub mod signal;
mod sweep;
mod watchdog;

pub use builder::{Worker, WorkerBuilder, WorkerError, WorkerHandle};
pub use handler::JobContext;
pub use shared::{JobObserver, JobReport};
pub use taskmill_core::JobError;
pub use taskmill_cpu::{HandlerError as CpuHandlerError, JobInput as CpuJobInput};
pub use taskmill_store::CompletionTx;
pub use tokio_util::sync::CancellationToken;
