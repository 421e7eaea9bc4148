//! The state every task of a worker shares, and what one job reports.
//!
//! It sits below `builder`, `runtime` and `job` so that each of them imports
//! it and none imports another for these types.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use taskmill_broker::Publisher;
use taskmill_core::Outcome;
use taskmill_core::config::Config;
use taskmill_cpu::CpuPool;
use taskmill_store::Store;
use taskmill_telemetry::{Metrics, Readiness};
use tokio_util::sync::CancellationToken;

use crate::handler::Handler;
use crate::leases::{LeaseTiming, Leases};

/// What happened to one job, for in-process observers (the demo, tests).
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Queue.
    pub queue: String,
    /// Kind (as sent, even when not registered).
    pub kind: String,
    /// Job id, when the message had one.
    pub job_id: Option<String>,
    /// Outcome.
    pub outcome: Outcome,
    /// Enqueue to start, when the enqueue time is known.
    pub queue_wait: Option<Duration>,
    /// Time the handler ran.
    pub run_time: Duration,
    /// The error, for failed jobs.
    pub error: Option<String>,
}

/// A callback run for every finished job, after its message was acked.
pub type JobObserver = Arc<dyn Fn(&JobReport) + Send + Sync>;

/// State shared by every task of a worker.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) handlers: HashMap<String, Handler>,
    /// The idempotency store, connected before the first session.
    pub(crate) store: tokio::sync::OnceCell<Store>,
    /// The CPU worker-process pool, when CPU kinds are registered.
    pub(crate) cpu: std::sync::OnceLock<CpuPool>,
    pub(crate) metrics: Metrics,
    pub(crate) readiness: Readiness,
    pub(crate) observer: Option<JobObserver>,
    pub(crate) worker_id: String,
    /// The host name, for the worker registry.
    pub(crate) host: String,
    /// The claims held now, kept alive by the heartbeat.
    pub(crate) leases: Arc<Leases>,
    pub(crate) lease_timing: LeaseTiming,
    /// Per queue, the permits that bound its concurrency. They outlive a
    /// session: jobs of a lost session keep their permits until they finish,
    /// so a flapping broker cannot multiply the load.
    pub(crate) permits: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Shared {
    /// The permits of `queue`, created with `concurrency` on first use.
    pub(crate) fn permits(&self, queue: &str, concurrency: usize) -> Arc<tokio::sync::Semaphore> {
        let mut all = self.permits.lock().unwrap_or_else(|e| e.into_inner());
        all.entry(queue.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(concurrency)))
            .clone()
    }
}

/// What the tasks of one session (one broker connection) share.
pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) publisher: Publisher,
    /// The broker this session is connected to, for the job spans'
    /// `server.address` and `server.port`.
    pub(crate) server: Option<taskmill_telemetry::traces::spans::Server>,
    /// Cancelled to end the session (shutdown, or a fault below).
    pub(crate) stop: CancellationToken,
    /// Why a job task ended the session (the publisher failed), if it did.
    pub(crate) fault: std::sync::Mutex<Option<String>>,
}

impl Session {
    /// Ends the session because something the jobs depend on broke (the
    /// publisher channel): deliveries not acked return to the queue when the
    /// channels close, and the supervisor reconnects and redeclares.
    pub(crate) fn fail(&self, why: String) {
        let mut f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(reason = %why, "ending the broker session");
            *f = Some(why);
        }
        self.stop.cancel();
    }

    /// Takes the fault that ended the session, if one did.
    pub(crate) fn take_fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(crate) fn store(&self) -> &Store {
        self.shared
            .store
            .get()
            .expect("the store is connected before any session starts")
    }
}

/// The clock of a periodic task (heartbeat, purge, sweep) that ends with a
/// cancellation: a missed tick is delayed, never bunched up.
pub(crate) struct Ticks {
    interval: tokio::time::Interval,
    stop: CancellationToken,
}

impl Ticks {
    /// Ticks every `every` (the first at once) until `stop`.
    pub(crate) fn new(every: Duration, stop: CancellationToken) -> Ticks {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks { interval, stop }
    }

    /// Waits for the next tick; false once `stop` is cancelled.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}
