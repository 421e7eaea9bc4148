//! Local worker processes for CPU-bound taskmill jobs.
//!
//! CPU-heavy handlers run in child processes so they never block the tokio
//! event loop of the worker, a hard timeout can really stop them (the process
//! is killed), and a crash (`abort`, segfault, OOM kill) or a panic takes down
//! one child, not the service. This crate knows nothing about AMQP or storage:
//! it takes a kind, a payload and a timeout and returns result bytes or a
//! [`CpuError`] that says whether a retry makes sense.
//!
//! # Layout
//!
//! * [`registry`]: the child-side [`CpuRegistry`] of plain blocking handlers,
//!   [`JobInput`] and [`HandlerError`].
//! * [`child`]: child mode. The worker binary re-executes itself with
//!   `TASKMILL_CPU_CHILD=1`; [`run_child`] serves one job at a time on the main
//!   thread with blocking IO (no tokio runtime) until stdin closes.
//! * [`frame`]: the length-delimited frames on the child's stdin/stdout
//!   (pure encode/decode).
//! * [`pool`]: the parent-side [`CpuPool`]: a supervisor task per child,
//!   bounded hand-off, timeouts (SIGTERM, grace, SIGKILL), crash detection and
//!   naming, replacement, recycling by job count or RSS, graceful shutdown.
//!   Children die with the parent (`PR_SET_PDEATHSIG`), even on `kill -9`.
//!   A folder, one file per part (configuration, errors, hand-off, supervisor,
//!   spawning, killing, recycling); its module doc lists them.
//! * [`exit`]: names how a child ended (`"killed by signal 6 (SIGABRT)"`).
//!
//! # Rayon inside a job
//!
//! Each child configures its global rayon pool with
//! [`PoolConfig::rayon_threads_per_child`] threads. Keep
//! `size × rayon_threads_per_child ≤ cores`, or jobs compete for cores and
//! every one gets slower. The default is `size = cores` with one rayon thread
//! each (parallelism across jobs); for few, large jobs choose a smaller `size`
//! and more rayon threads.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use taskmill_cpu::{CpuPool, CpuRegistry, CpuRequest, PoolConfig};
//!
//! fn registry() -> CpuRegistry {
//!     let mut reg = CpuRegistry::new();
//!     reg.register_json("sum", |_job, numbers: Vec<u64>| Ok(numbers.iter().sum::<u64>()));
//!     reg
//! }
//!
//! fn main() {
//!     // First thing in main: the same binary is the worker process.
//!     if taskmill_cpu::is_child_mode() {
//!         taskmill_cpu::run_child(&registry());
//!     }
//!     let rt = tokio::runtime::Runtime::new().unwrap();
//!     rt.block_on(async {
//!         let pool = CpuPool::start(PoolConfig::for_current_exe(0)).await.unwrap();
//!         let req = CpuRequest::new("job-1", "sum", &b"[1,2,3]"[..], Duration::from_secs(5));
//!         assert_eq!(pool.run(req).await.unwrap(), b"6");
//!         pool.shutdown(Duration::from_secs(10)).await;
//!     });
//! }
//! ```

#![warn(missing_docs)]

pub mod child;
pub mod exit;
pub mod frame;
pub mod pool;
pub mod registry;

pub use child::{NOOP_KIND, is_child_mode, run_child, run_child_with};
pub use exit::describe_exit_status;
pub use pool::{
    CpuError, CpuPool, CpuRequest, PoolConfig, PoolError, RestartCause, RestartHook,
    available_cores, measure_handoff,
};
pub use registry::{CpuHandler, CpuRegistry, HandlerError, JobInput};
