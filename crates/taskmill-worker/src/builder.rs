//! Registering handlers and starting a worker.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmill_core::config::Config;
use taskmill_core::{JobError, Outcome};
use taskmill_telemetry::http::HttpServer;
use taskmill_telemetry::{Metrics, Readiness};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handler::{IoHandler, JobContext, erase};
use crate::runtime;

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
}

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

/// Builds a [`Worker`]: register handlers by kind, then [`WorkerBuilder::build`].
pub struct WorkerBuilder {
    config: Config,
    io: HashMap<String, IoHandler>,
    duplicate: Option<String>,
    observer: Option<JobObserver>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("kinds", &self.io.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WorkerBuilder {
    /// A builder for a worker with `config`.
    pub fn new(config: Config) -> Self {
        WorkerBuilder {
            config,
            io: HashMap::new(),
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
        if self.io.insert(kind.to_string(), erase(kind, f)).is_some() {
            self.duplicate.get_or_insert_with(|| kind.to_string());
        }
        self
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
        let mut k: Vec<String> = self.io.keys().cloned().collect();
        k.sort();
        k
    }

    /// Checks the configuration and the registrations.
    pub fn build(self) -> Result<Worker, WorkerError> {
        self.config.validate()?;
        if let Some(kind) = self.duplicate {
            return Err(WorkerError::DuplicateKind(kind));
        }
        let worker_id = self.config.worker_id();
        Ok(Worker {
            shared: Arc::new(runtime::Shared {
                metrics: self
                    .metrics
                    .unwrap_or_else(|| Metrics::new(env!("CARGO_PKG_VERSION"))),
                readiness: Readiness::new(),
                io: self.io,
                observer: self.observer,
                worker_id,
                config: self.config,
            }),
        })
    }
}

/// A configured worker, ready to start.
pub struct Worker {
    shared: Arc<runtime::Shared>,
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
            kinds = ?{ let mut k: Vec<_> = shared.io.keys().collect(); k.sort(); k },
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
