//! Registering handlers and starting a worker.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmill_core::JobError;
use taskmill_core::config::Config;
use taskmill_telemetry::http::HttpServer;
use taskmill_telemetry::{Metrics, Readiness};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, JobContext, erase, erase_tx};
use crate::{runtime, shared};
use taskmill_cpu::{CpuPool, CpuRegistry, HandlerError, JobInput, PoolConfig, RestartCause};
use taskmill_store::CompletionTx;
use taskmill_telemetry::traces::spans;

/// A worker that cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] taskmill_core::config::ConfigError),
    /// The HTTP endpoint could not be bound.
    #[error("{0}")]
    Http(std::io::Error),
    /// Two handlers were registered under one kind.
    #[error("kind `{0}` is registered twice")]
    DuplicateKind(String),
    /// The run loop task failed.
    #[error("worker task failed: {0}")]
    Join(String),
    /// The CPU worker-process pool could not start.
    #[error("cannot start the CPU process pool: {0}")]
    CpuPool(#[from] taskmill_cpu::PoolError),
}

pub use crate::shared::{JobObserver, JobReport};

/// Builds a [`Worker`]: register handlers by kind, then [`WorkerBuilder::build`].
pub struct WorkerBuilder {
    config: Config,
    handlers: HashMap<String, Handler>,
    cpu: CpuRegistry,
    cpu_program: Option<std::path::PathBuf>,
    duplicate: Option<String>,
    observer: Option<JobObserver>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WorkerBuilder {
    /// A builder for a worker with `config`.
    pub fn new(config: Config) -> Self {
        WorkerBuilder {
            config,
            handlers: HashMap::new(),
            cpu: CpuRegistry::new(),
            cpu_program: None,
            duplicate: None,
            observer: None,
            metrics: None,
        }
    }

    /// Registers an IO handler: an async function run inline on the tokio
    /// runtime, many at once. `P` is the payload type (parsed from the JSON
    /// body once), `R` the result.
    pub fn io<P, R, F, Fut>(mut self, kind: &str, f: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(JobContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, JobError>> + Send + 'static,
    {
        self.add(kind, Handler::Io(erase(kind, f)));
        self
    }

    /// Registers a transactional IO handler: it receives the store's open
    /// completion transaction, writes its own rows in it and returns it with
    /// its result; the completion record and those rows commit together or
    /// not at all, which makes database effects exactly-once. The job's
    /// idempotency key (or, without one, its job id) is claimed first.
    pub fn io_transactional<P, R, F, Fut>(mut self, kind: &str, f: F) -> Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(JobContext, P, CompletionTx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(R, CompletionTx), JobError>> + Send + 'static,
    {
        self.add(kind, Handler::IoTx(erase_tx(kind, f)));
        self
    }

    /// Registers a CPU handler: a plain function run in a local worker
    /// process (the same binary re-executed in child mode), so it cannot block
    /// the event loop, can be killed on timeout and cannot crash the worker.
    /// The binary must call [`WorkerBuilder::run_child_if_requested`] (or
    /// `taskmill_cpu::run_child` with the same kinds) before anything else.
    pub fn cpu<P, R, F>(mut self, kind: &str, f: F) -> Self
    where
        P: DeserializeOwned,
        R: Serialize,
        F: Fn(&JobInput<'_>, P) -> Result<R, HandlerError> + Send + Sync + 'static,
    {
        if self.cpu.contains(kind) {
            self.duplicate.get_or_insert_with(|| kind.to_string());
        } else {
            // In the child, each job runs inside a `taskmill.cpu.run` span
            // parented on the worker's span (the traceparent crossed the pipe).
            self.cpu
                .register_json(kind, move |input: &JobInput<'_>, p: P| {
                    let span = spans::cpu_run_span(
                        &input.kind,
                        &input.job_id,
                        input.attempt,
                        input.traceparent.as_deref(),
                    );
                    let _entered = span.enter();
                    let r = f(input, p);
                    match &r {
                        Ok(_) => spans::record_outcome(&span, "ok", None),
                        Err(e) => spans::record_outcome(&span, "error", Some(e.message())),
                    }
                    r
                });
        }
        self.add(kind, Handler::Cpu);
        self
    }

    /// The program the CPU pool starts (default: this executable). It must
    /// serve the same CPU kinds in child mode.
    pub fn cpu_program(mut self, program: impl Into<std::path::PathBuf>) -> Self {
        self.cpu_program = Some(program.into());
        self
    }

    /// In a CPU child process (`TASKMILL_CPU_CHILD=1`), serves the registered
    /// CPU kinds over stdin/stdout and exits; otherwise returns `self`. Call it
    /// first thing in `main`, before logging or a runtime is set up.
    pub fn run_child_if_requested(self) -> Self {
        if taskmill_cpu::is_child_mode() {
            // Logs go to stderr (the parent's); spans are exported like the
            // parent's, from the inherited OTEL_* variables, and flushed at exit.
            let json = std::env::var("TASKMILL_LOG_FORMAT").is_ok_and(|f| f == "json");
            let level = std::env::var("TASKMILL_LOG_LEVEL").unwrap_or_else(|_| "info".into());
            if let Err(e) = taskmill_telemetry::logging::init(json, &level) {
                eprintln!("taskmill CPU process: logging: {e}");
            }
            taskmill_cpu::run_child_with(&self.cpu, taskmill_telemetry::logging::shutdown);
        }
        self
    }

    fn add(&mut self, kind: &str, h: Handler) {
        if self.handlers.insert(kind.to_string(), h).is_some() {
            self.duplicate.get_or_insert_with(|| kind.to_string());
        }
    }

    /// Calls `f` for every finished job.
    pub fn on_job_done(mut self, f: impl Fn(&JobReport) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// Uses `metrics` instead of a fresh registry (to share it with other parts).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The kinds registered so far.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.handlers.keys().cloned().collect();
        k.sort();
        k
    }

    /// Checks the configuration and the registrations.
    pub fn build(self) -> Result<Worker, WorkerError> {
        self.config.validate()?;
        if let Some(kind) = self.duplicate {
            return Err(WorkerError::DuplicateKind(kind));
        }
        let worker_id = self.config.worker_id(taskmill_broker::default_worker_id);
        let mut config = self.config;
        let has_cpu = self.handlers.values().any(|h| matches!(h, Handler::Cpu));
        if has_cpu && !config.queues.contains(&config.cpu_queue) {
            config.queues.push(config.cpu_queue.clone());
        }
        // Celery queues are consumed like the others; the job path and the
        // declaration look the protocol up with `Config::is_celery_queue`.
        config.queues.extend(config.celery_queues.iter().cloned());
        Ok(Worker {
            shared: Arc::new(shared::Shared {
                metrics: self
                    .metrics
                    .unwrap_or_else(|| Metrics::new(env!("CARGO_PKG_VERSION"))),
                readiness: Readiness::new(),
                handlers: self.handlers,
                observer: self.observer,
                worker_id,
                host: taskmill_broker::host_name(),
                leases: Default::default(),
                lease_timing: crate::leases::LeaseTiming::new(
                    Duration::from_millis(config.lease_ms),
                    Duration::from_millis(config.heartbeat_ms),
                ),
                permits: Default::default(),
                store: tokio::sync::OnceCell::new(),
                cpu: std::sync::OnceLock::new(),
                config,
            }),
            cpu_program: self.cpu_program,
            has_cpu,
        })
    }
}

/// A configured worker, ready to start.
pub struct Worker {
    shared: Arc<shared::Shared>,
    cpu_program: Option<std::path::PathBuf>,
    has_cpu: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.shared.worker_id)
            .finish()
    }
}

impl Worker {
    /// The worker's metrics.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// Binds the HTTP endpoint and starts consuming. Runs until `shutdown` is
    /// cancelled and the drain is over.
    pub async fn start(self, shutdown: CancellationToken) -> Result<WorkerHandle, WorkerError> {
        let shared = self.shared;
        // Every check starts failing, so /readyz cannot say ready before the
        // broker, the store and each consumer are up.
        runtime::register_checks(&shared);
        if self.has_cpu {
            let c = &shared.config;
            let mut cfg = PoolConfig::for_current_exe(c.cpu_processes);
            if c.cpu_rayon_threads > 0 {
                cfg.rayon_threads_per_child = c.cpu_rayon_threads;
            }
            let mib = |n: u64| (n > 0).then_some(n * 1024 * 1024);
            cfg.max_jobs_per_child =
                (c.cpu_max_jobs_per_child > 0).then_some(c.cpu_max_jobs_per_child);
            cfg.max_rss_per_child_bytes = mib(c.cpu_max_rss_mb);
            cfg.address_space_limit_bytes = mib(c.cpu_address_space_mb);
            if let Some(p) = self.cpu_program {
                cfg.program = p;
            }
            let restarts = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "taskmill_cpu_process_restarts_total",
                    "CPU worker processes replaced, by cause.",
                ),
                &["cause"],
            )
            .expect("valid metric");
            for cause in RestartCause::ALL {
                restarts.with_label_values(&[cause.as_str()]);
            }
            let _ = shared
                .metrics
                .registry()
                .register(Box::new(restarts.clone()));
            cfg.on_restart = Some(Arc::new(move |cause: RestartCause| {
                restarts.with_label_values(&[cause.as_str()]).inc();
            }));
            let pool = CpuPool::start(cfg).await?;
            let _ = shared.metrics.registry().register(Box::new(
                crate::cpu_metrics::PoolCollector::new(pool.clone()),
            ));
            shared.readiness.set("cpu_pool", pool.live() > 0);
            tracing::info!(size = pool.size(), "CPU process pool started");
            let _ = shared.cpu.set(pool);
        }
        let http = HttpServer::bind(
            shared.config.http_addr,
            shared.metrics.clone(),
            shared.readiness.clone(),
        )
        .await
        .map_err(WorkerError::Http)?;
        let http_addr = http.local_addr();
        // The HTTP endpoint outlives the drain so probes and scrapes keep
        // answering until the process exits.
        let http_stop = CancellationToken::new();
        let stop = http_stop.clone();
        let http_task = tokio::spawn(async move {
            if let Err(e) = http.serve(async move { stop.cancelled().await }).await {
                tracing::error!(error = %e, "HTTP endpoint failed");
            }
        });
        tracing::info!(
            worker_id = %shared.worker_id,
            http = %http_addr,
            queues = ?shared.config.queues,
            kinds = ?{ let mut k: Vec<_> = shared.handlers.keys().collect(); k.sort(); k },
            "worker starting"
        );
        let shared_readiness = shared.readiness.clone();
        let join = tokio::spawn(async move {
            runtime::supervise(shared, shutdown).await;
            http_stop.cancel();
            let _ = http_task.await;
        });
        Ok(WorkerHandle {
            http_addr,
            readiness: shared_readiness,
            join,
        })
    }
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The bound address of the HTTP endpoint.
    pub http_addr: SocketAddr,
    readiness: Readiness,
    join: JoinHandle<()>,
}

impl WorkerHandle {
    /// Whether `/readyz` reports ready now.
    pub fn is_ready(&self) -> bool {
        self.readiness.status().0
    }

    /// Waits until the worker is ready (connected, topology declared,
    /// consuming every queue), or `timeout` passes; returns whether it is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        while !self.is_ready() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Waits until the worker has drained and stopped.
    pub async fn wait(self) -> Result<(), WorkerError> {
        self.join
            .await
            .map_err(|e| WorkerError::Join(e.to_string()))
    }
}
