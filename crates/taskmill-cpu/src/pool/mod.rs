//! Parent side: a fixed-size pool of supervised worker processes.
//!
//! Layout: one *supervisor task* per slot owns one child process at a time.
//! Callers of [`CpuPool::run`] put a job into a bounded channel (capacity 1,
//! so waiting callers queue in FIFO order on the channel's semaphore instead
//! of in an unbounded buffer); whichever supervisor is idle takes it, writes
//! the request frame, reads the response and answers through a oneshot.
//! Because the supervisor, not the caller, owns the child, a caller that is
//! cancelled mid-job can never leave a child half-way through a response in
//! the idle set: the supervisor notices the dropped oneshot, kills and
//! replaces the child.
//!
//! Children are forked from one dedicated long-lived thread (the *spawner*)
//! because `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//! exits, and tokio may retire the worker or blocking thread a supervisor
//! happens to run on.
//!
//! Layout: [`CpuPool`], [`CpuRequest`] and [`measure_handoff`] here;
//! `config` ([`PoolConfig`]), `error` ([`CpuError`], [`PoolError`]),
//! `restart` ([`RestartCause`]), `handoff` (the job a caller hands to a
//! supervisor), `shared` (state shared by handles and supervisors),
//! `supervisor` (one task per slot), `spawn` (the spawner thread, handshake,
//! respawn), `worker` (a running child and the exchange over its pipes),
//! `kill` (SIGTERM, grace, SIGKILL of the process group; reaping), `recycle`
//! (retiring a child by job count or RSS).

mod config;
mod error;
mod handoff;
mod kill;
mod recycle;
mod restart;
mod shared;
mod spawn;
mod supervisor;
mod worker;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::info;

pub use config::{PoolConfig, RestartHook, available_cores};
pub use error::{CpuError, PoolError};
pub use restart::RestartCause;

use crate::child::{NOOP_KIND, is_child_mode};
use handoff::Job;
use kill::{Stop, reap};
use shared::Shared;
use spawn::{spawn_worker, start_spawner};
use supervisor::supervise;

/// One CPU job for [`CpuPool::run`].
#[derive(Debug, Clone)]
pub struct CpuRequest {
    /// Job id (passed to the handler).
    pub job_id: String,
    /// Kind: selects the handler in the child's [`CpuRegistry`](crate::CpuRegistry).
    pub kind: String,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// W3C trace context to continue in the child.
    pub traceparent: Option<String>,
    /// Payload bytes, handed to the child verbatim.
    pub payload: Bytes,
    /// Hard limit on the job once a child has taken it (the wait for an idle
    /// child is not included: bound that by dropping the `run` future).
    pub timeout: Duration,
}

impl CpuRequest {
    /// A first-attempt request without trace context.
    pub fn new(
        job_id: impl Into<String>,
        kind: impl Into<String>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Self {
        Self {
            job_id: job_id.into(),
            kind: kind.into(),
            attempt: 1,
            traceparent: None,
            payload: payload.into(),
            timeout,
        }
    }
}

/// Dropping the last [`CpuPool`] handle starts an immediate shutdown.
struct PoolHandle {
    shared: Arc<Shared>,
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.shared.begin_shutdown(Instant::now());
    }
}

/// A pool of worker processes for CPU-bound jobs. Cheap to clone; all clones
/// share the same processes. Dropping the last clone kills and reaps the
/// children in the background; call [`shutdown`](Self::shutdown) to drain.
#[derive(Clone)]
pub struct CpuPool {
    inner: Arc<PoolHandle>,
}

impl fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPool")
            .field("size", &self.size())
            .field("live", &self.live())
            .field("busy", &self.busy())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl CpuPool {
    /// Starts `cfg.size` worker processes and waits until each one completed
    /// its ready handshake. Must be called inside a tokio runtime.
    pub async fn start(cfg: PoolConfig) -> Result<CpuPool, PoolError> {
        if is_child_mode() {
            return Err(PoolError::NestedPool);
        }
        cfg.validate()?;
        let spawner =
            start_spawner(cfg.clone(), tokio::runtime::Handle::current()).map_err(|source| {
                PoolError::Spawn {
                    program: cfg.program.clone(),
                    source,
                }
            })?;
        let (jobs_tx, jobs_rx) = mpsc::channel(1);
        let size = cfg.size;
        let shared = Arc::new(Shared {
            cfg,
            jobs_tx,
            jobs_rx: Mutex::new(jobs_rx),
            shutdown: watch::Sender::new(None),
            closed: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            restarts: Default::default(),
            pids: StdMutex::new(vec![None; size]),
            spawner,
            tracker: TaskTracker::new(),
        });

        let mut starting = JoinSet::new();
        for slot in 0..size {
            let shared = Arc::clone(&shared);
            starting.spawn(async move { (slot, spawn_worker(&shared, slot).await) });
        }
        let mut workers = Vec::with_capacity(size);
        let mut first_error = None;
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((slot, Ok(worker))) => workers.push((slot, worker)),
                Ok((_, Err(err))) => {
                    first_error.get_or_insert(err);
                }
                Err(join_error) => {
                    first_error.get_or_insert(PoolError::Spawn {
                        program: shared.cfg.program.clone(),
                        source: io::Error::other(join_error.to_string()),
                    });
                }
            }
        }
        if let Some(err) = first_error {
            for (_, worker) in workers {
                reap(&shared, worker, Stop::Kill).await;
            }
            return Err(err);
        }
        for (slot, worker) in workers {
            shared
                .tracker
                .spawn(supervise(Arc::clone(&shared), slot, worker));
        }
        info!(
            size,
            rayon_threads_per_child = shared.cfg.rayon_threads_per_child,
            program = ?shared.cfg.program,
            "CPU pool started"
        );
        Ok(CpuPool {
            inner: Arc::new(PoolHandle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Runs one job on an idle worker process, waiting for one if all are busy.
    ///
    /// Cancellation-safe: dropping the future before a child took the job
    /// means it never starts; dropping it mid-job kills and replaces the child
    /// (counted as [`RestartCause::Cancelled`]).
    pub async fn run(&self, req: CpuRequest) -> Result<Vec<u8>, CpuError> {
        let shared = self.shared();
        if shared.closed.load(Ordering::SeqCst) {
            return Err(CpuError::PoolClosed);
        }
        let (job, answer) = Job::encode(req, shared.cfg.max_frame_bytes)?;
        tokio::select! {
            biased;
            () = shared.shutdown_started() => return Err(CpuError::PoolClosed),
            sent = shared.jobs_tx.send(job) => if sent.is_err() {
                return Err(CpuError::PoolClosed);
            },
        }
        // A dropped reply sender means the job was discarded unstarted by a
        // shutdown.
        answer.await.unwrap_or(Err(CpuError::PoolClosed))
    }

    /// Stops accepting jobs (new and queued ones get [`CpuError::PoolClosed`]),
    /// lets running jobs finish within `grace`, then kills the children still
    /// busy (their callers get [`CpuError::Interrupted`]) and reaps every
    /// child. Returns when no child process is left.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = self.shared();
        shared.begin_shutdown(Instant::now() + grace);
        {
            // Idle supervisors release the queue as soon as they see the
            // shutdown; busy ones never take another job. Closing and draining
            // answers every queued caller now instead of after the grace.
            let mut queue = shared.jobs_rx.lock().await;
            queue.close();
            while queue.try_recv().is_ok() {}
        }
        shared.tracker.close();
        shared.tracker.wait().await;
        info!("CPU pool shut down");
    }

    /// Configured number of worker processes.
    pub fn size(&self) -> usize {
        self.shared().cfg.size
    }

    /// Worker processes currently running a job.
    pub fn busy(&self) -> usize {
        self.shared().busy.load(Ordering::SeqCst)
    }

    /// Worker processes currently alive and ready (handshake done, not yet
    /// reaped). Equal to [`size`](Self::size) except while one is being
    /// replaced, and 0 after [`shutdown`](Self::shutdown).
    pub fn live(&self) -> usize {
        self.shared().live.load(Ordering::SeqCst)
    }

    /// Process ids of the live worker processes.
    pub fn pids(&self) -> Vec<u32> {
        let pids = self.shared().pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.iter().flatten().copied().collect()
    }

    /// How many worker processes were replaced for `cause` so far.
    pub fn restarts(&self, cause: RestartCause) -> u64 {
        self.shared().restarts[cause.index()].load(Ordering::Relaxed)
    }

    /// Replacements for all causes.
    pub fn restarts_total(&self) -> u64 {
        RestartCause::ALL.iter().map(|&c| self.restarts(c)).sum()
    }

    /// Whether [`shutdown`](Self::shutdown) began.
    pub fn is_closed(&self) -> bool {
        self.shared().closed.load(Ordering::SeqCst)
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared().cfg
    }
}

/// Measures `n` sequential round trips of a no-op job through `pool` (frame
/// encode, hand-off to an idle child, pipe write, child dispatch, response):
/// the fixed cost a CPU job pays on top of its own work. For the benchmark
/// tool; not a test.
///
/// The calls are made from a task spawned on the current runtime, as the
/// worker runs each job in its own task. Called straight from `block_on`,
/// every answer would also have to wake the thread blocked outside the
/// runtime, a cost no job in a worker pays.
pub async fn measure_handoff(pool: &CpuPool, n: usize) -> Result<Vec<Duration>, CpuError> {
    let pool = pool.clone();
    let timed = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            let req = CpuRequest::new(
                format!("handoff-{i}"),
                NOOP_KIND,
                Bytes::new(),
                Duration::from_secs(10),
            );
            let started = std::time::Instant::now();
            pool.run(req).await?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    });
    match timed.await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            std::panic::resume_unwind(join_error.into_panic())
        }
        // Only a runtime shutting down cancels the task.
        Err(_) => Err(CpuError::PoolClosed),
    }
}
