//! What every scenario shares: unique queues deleted at the end, an
//! in-process worker whose finished jobs are tallied, timed enqueues, the
//! ceiling, and reading the process's memory.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskmill_broker::ceiling::Ceiling;
use taskmill_broker::{Broker, QueueSpec};
use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;
use taskmill_core::config::{Config, QueueType};
use taskmill_core::wire::dead_queue_name;
use taskmill_worker::{CancellationToken, JobReport, WorkerBuilder, WorkerHandle};

use crate::error::{Context, ensure};

/// Confirms the ceiling keeps outstanding, the same window as the client's
/// `enqueue_many`.
pub(crate) const CEILING_WINDOW: usize = 2048;

/// The store URL of every bench worker.
pub(crate) const MEMORY_STORE: &str = "sqlite::memory:";

/// One benchmark run against one broker and one queue type.
pub(crate) struct Bench {
    /// The configuration every in-process worker starts from.
    pub(crate) config: Config,
    /// Type of every queue the run declares (taskmill's and the ceiling's).
    pub(crate) queue_type: QueueType,
    /// Admin connection: declare, count, delete.
    pub(crate) admin: Broker,
    /// The noop drain rate measured earlier in this run, in jobs/s.
    pub(crate) noop_drain_rate: Mutex<Option<f64>>,
    /// Part of every queue name of this run.
    pub(crate) run_id: String,
    /// The store URL configured before the bench replaced it with an
    /// in-memory one (`None`: the default SQLite file). Used by the `celery`
    /// scenario, whose worker claims every task in its store.
    pub(crate) configured_store_url: Option<String>,
    queues: Mutex<Vec<String>>,
    /// Exchanges the scenarios created (Celery declares one per queue),
    /// deleted by [`Bench::cleanup`].
    exchanges: Mutex<Vec<String>>,
    /// Queues of the whole run (the CPU queue), deleted by [`Bench::finish`].
    run_queues: Vec<String>,
    /// The program run as `<worker_exe> worker` by the scenarios that need
    /// a worker process of its own.
    pub(crate) worker_exe: PathBuf,
}

impl Bench {
    /// Connects the admin channel; `config.queue_type` is set to `queue_type`.
    pub(crate) async fn new(
        mut config: Config,
        queue_type: QueueType,
        worker_exe: PathBuf,
    ) -> crate::Result<Bench> {
        config.queue_type = queue_type;
        config.http_addr = "127.0.0.1:0".parse().expect("valid address");
        config.shutdown_grace_ms = 5_000;
        let configured_store_url = config.store_url.take();
        // Noop and io jobs carry no idempotency key, so the store is never
        // written; an in-memory one keeps the run from leaving files behind.
        config.store_url = Some(MEMORY_STORE.to_string());
        let admin = Broker::connect(&config.amqp_url, "taskmill bench admin").await?;
        let mut b = Bench {
            config,
            queue_type,
            admin,
            noop_drain_rate: Mutex::new(None),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            configured_store_url,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            run_queues: Vec::new(),
            worker_exe,
        };
        // The built-in CPU kinds make every worker consume the CPU queue too:
        // give it one of this run's queues, never a shared one. Every
        // scenario's worker declares it again, so it is deleted only by
        // [`Bench::finish`].
        b.config.cpu_queue = b.queue("cpu", "jobs");
        b.run_queues = std::mem::take(&mut *b.queues.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(b)
    }

    /// A fresh queue name for `scenario`/`role`, deleted (with its dead-letter
    /// queue) by [`Bench::cleanup`].
    pub(crate) fn queue(&self, scenario: &str, role: &str) -> String {
        let name = format!(
            "bench-{scenario}-{role}-{}-{}",
            self.queue_type.as_str(),
            self.run_id
        );
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.push(dead_queue_name(&name));
        q.push(name.clone());
        name
    }

    /// A fresh name for a Celery queue of this run (`role` tells them apart).
    /// Celery declares the queue classic whatever `--queue-type` says, so the
    /// name leaves the type out. The queue, its `Q.dead` and the exchange of
    /// the same name Celery declares are deleted by [`Bench::cleanup`].
    pub(crate) fn celery_queue(&self, role: &str) -> String {
        let name = format!("bench-celery-{role}-{}", self.run_id);
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.push(dead_queue_name(&name));
        q.push(name.clone());
        self.exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        name
    }

    /// Declares a taskmill work queue (and its dead-letter queue) the way a
    /// worker would, so jobs can be published before any worker runs.
    pub(crate) async fn declare(&self, queue: &str) -> crate::Result<()> {
        // A work queue is bound to the delay ladder's delivery exchange: on a
        // broker no worker has used yet, declare the ladder first, as a
        // worker does at start-up (idempotent).
        self.admin.declare_delays().await?;
        self.admin
            .declare(&QueueSpec {
                name: queue.to_string(),
                queue_type: self.queue_type,
                delivery_limit: self.config.delivery_limit,
            })
            .await?;
        Ok(())
    }

    /// Deletes the run's own queues and closes the admin connection.
    pub(crate) async fn finish(&self) {
        self.cleanup().await;
        for q in &self.run_queues {
            let _ = self.admin.delete_queue(q).await;
        }
        self.admin.close().await;
    }

    /// Deletes every queue (and exchange) the scenarios created so far.
    pub(crate) async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        for q in queues {
            let _ = self.admin.delete_queue(&q).await;
        }
        let exchanges =
            std::mem::take(&mut *self.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
        for e in exchanges {
            let _ = self.admin.delete_exchange(&e).await;
        }
    }

    /// A worker configuration for `queue` running `concurrency` jobs at once
    /// (prefetch follows concurrency).
    pub(crate) fn worker_config(&self, queue: &str, concurrency: usize) -> Config {
        let mut c = self.config.clone();
        c.queues = vec![queue.to_string()];
        c.concurrency = concurrency;
        c.prefetch = 0;
        c.queue.clear();
        // Bench payloads are small JSON: with a wide prefetch, accept only as
        // much per message as keeps the window within `max_prefetch_bytes`.
        let per_message =
            c.max_prefetch_bytes / u64::try_from(concurrency.max(1)).unwrap_or(u64::MAX);
        c.max_payload_bytes = c
            .max_payload_bytes
            .min(usize::try_from(per_message).unwrap_or(usize::MAX));
        c.worker_id = Some(format!("bench-{}", self.run_id));
        c
    }

    /// A producer connection that accepts payloads up to `max_payload`.
    pub(crate) async fn client(&self, max_payload: usize) -> crate::Result<Client> {
        Ok(Client::connect(&self.config.amqp_url)
            .await?
            .with_max_payload_bytes(max_payload))
    }

    /// A ceiling connection and queue of this run's queue type.
    pub(crate) async fn ceiling(&self, scenario: &str) -> crate::Result<Ceiling> {
        let q = self.queue(scenario, "ceiling");
        Ok(Ceiling::open(&self.config.amqp_url, &q, self.queue_type).await?)
    }

    /// The noop drain rate measured earlier in this run, if any.
    pub(crate) fn known_noop_rate(&self) -> Option<f64> {
        *self
            .noop_drain_rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the noop drain rate for later scenarios.
    pub(crate) fn set_noop_rate(&self, rate: f64) {
        *self
            .noop_drain_rate
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(rate);
    }
}

/// A generous bound for moving `n` messages, so no loop runs forever.
pub(crate) fn deadline_for(n: u64) -> Duration {
    Duration::from_secs(60 + n / 200)
}

/// Finished jobs of one in-process worker, counted by its observer.
#[derive(Default)]
pub(crate) struct Tally {
    done: AtomicU64,
    not_ok: AtomicU64,
    inner: Mutex<TallyInner>,
}

#[derive(Default)]
struct TallyInner {
    first_start: Option<Instant>,
    last_done: Option<Instant>,
    keep_waits: bool,
    waits: Vec<Duration>,
    keep_jobs: bool,
    jobs: Vec<JobRecord>,
    /// Ids of the jobs that succeeded at least once (kept with `keep_jobs`).
    ok_ids: HashSet<String>,
}

/// One finished attempt, as the observer saw it (kept by
/// [`Tally::keeping_jobs`]).
#[derive(Debug, Clone)]
pub(crate) struct JobRecord {
    /// Kind.
    pub(crate) kind: String,
    /// Job id (the same for every attempt of one job).
    pub(crate) job_id: Option<String>,
    /// Outcome of this attempt.
    pub(crate) outcome: Outcome,
    /// When the handler started (report time minus run time).
    pub(crate) started: Instant,
    /// When the report arrived (after the ack).
    pub(crate) ended: Instant,
    /// Enqueue to start, when the enqueue time is known.
    pub(crate) queue_wait: Option<Duration>,
    /// Time the handler ran.
    pub(crate) run_time: Duration,
}

impl JobRecord {
    /// Enqueue to finished: queue wait plus run time.
    pub(crate) fn latency(&self) -> Option<Duration> {
        Some(self.queue_wait? + self.run_time)
    }
}

impl Tally {
    /// A tally that also keeps every job's enqueue-to-start time.
    pub(crate) fn keeping_waits() -> Tally {
        let t = Tally::default();
        t.inner.lock().unwrap_or_else(|e| e.into_inner()).keep_waits = true;
        t
    }

    /// A tally that also keeps a [`JobRecord`] of every finished attempt
    /// and the ids of the jobs that succeeded.
    pub(crate) fn keeping_jobs() -> Tally {
        let t = Tally::default();
        t.inner.lock().unwrap_or_else(|e| e.into_inner()).keep_jobs = true;
        t
    }

    /// Distinct job ids that succeeded so far (with [`Tally::keeping_jobs`]).
    pub(crate) fn distinct_ok(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ok_ids
            .len() as u64
    }

    /// Attempts of `kind` finished so far (with [`Tally::keeping_jobs`]).
    pub(crate) fn finished_of(&self, kind: &str) -> u64 {
        let i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        i.jobs.iter().filter(|r| r.kind == kind).count() as u64
    }

    /// Takes the records kept so far, leaving none.
    pub(crate) fn take_jobs(&self) -> Vec<JobRecord> {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).jobs)
    }

    fn observe(&self, r: &JobReport) {
        let now = Instant::now();
        {
            let mut i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let started = now.checked_sub(r.run_time).unwrap_or(now);
            if i.first_start.is_none_or(|f| started < f) {
                i.first_start = Some(started);
            }
            i.last_done = Some(now);
            if i.keep_waits
                && let Some(w) = r.queue_wait
            {
                i.waits.push(w);
            }
            if i.keep_jobs {
                if r.outcome == Outcome::Ok
                    && let Some(id) = &r.job_id
                    && !i.ok_ids.contains(id)
                {
                    i.ok_ids.insert(id.clone());
                }
                i.jobs.push(JobRecord {
                    kind: r.kind.clone(),
                    job_id: r.job_id.clone(),
                    outcome: r.outcome,
                    started,
                    ended: now,
                    queue_wait: r.queue_wait,
                    run_time: r.run_time,
                });
            }
        }
        if r.outcome != Outcome::Ok {
            self.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Jobs finished (acked) so far.
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Jobs whose outcome was not `ok`.
    pub(crate) fn not_ok(&self) -> u64 {
        self.not_ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` jobs finished; fails after `deadline`.
    pub(crate) async fn wait_for(&self, n: u64, deadline: Duration) -> crate::Result<()> {
        let until = Instant::now() + deadline;
        while self.done() < n {
            ensure!(
                Instant::now() < until,
                "only {} of {n} jobs finished within {deadline:?}",
                self.done()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Start of the earliest job to end of the latest.
    pub(crate) fn span(&self) -> Option<Duration> {
        let i = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Some(i.last_done?.saturating_duration_since(i.first_start?))
    }

    /// When the latest job finished.
    pub(crate) fn last_done(&self) -> Option<Instant> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_done
    }

    /// Takes the enqueue-to-start times kept so far, leaving none.
    pub(crate) fn take_waits(&self) -> Vec<Duration> {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).waits)
    }
}

/// A worker running in this process, with the built-in kinds.
pub(crate) struct InProcessWorker {
    handle: WorkerHandle,
    shutdown: CancellationToken,
    /// Its finished jobs.
    pub(crate) tally: Arc<Tally>,
}

impl InProcessWorker {
    /// Starts a worker with `config` and waits until it consumes. The
    /// diagnostic kinds are registered when `config.diagnostic_kinds` is on.
    pub(crate) async fn start(config: Config, tally: Tally) -> crate::Result<InProcessWorker> {
        let tally = Arc::new(tally);
        let t = tally.clone();
        let diagnostic = config.diagnostic_kinds;
        let worker = taskmill_kinds::register(WorkerBuilder::new(config), diagnostic)
            .on_job_done(move |r| t.observe(r))
            .build()?;
        let (handle, shutdown) =
            taskmill_testkit::start_in_process(worker, Duration::from_secs(30))
                .await
                .context("starting the bench worker")?;
        Ok(InProcessWorker {
            handle,
            shutdown,
            tally,
        })
    }

    /// Stops the worker and waits for its drain.
    pub(crate) async fn stop(self) -> crate::Result<()> {
        self.shutdown.cancel();
        self.handle.wait().await?;
        Ok(())
    }
}

/// Publishes `n` jobs of `kind` with `payload` through the client's
/// `enqueue_many`; returns first publish to last confirm.
pub(crate) async fn enqueue(
    client: &Client,
    queue: &str,
    kind: &str,
    payload: &[u8],
    n: u64,
) -> crate::Result<Duration> {
    let start = Instant::now();
    let ids = client
        .enqueue_many((0..n).map(|_| NewJob::raw(kind, payload.to_vec()).queue(queue)))
        .await
        .with_context(|| format!("enqueueing {n} {kind} jobs to {queue}"))?;
    let took = start.elapsed();
    ensure!(ids.len() as u64 == n, "{} of {n} jobs enqueued", ids.len());
    Ok(took)
}

/// Publishes `jobs` through the client's `enqueue_many`; returns their ids
/// in order.
pub(crate) async fn enqueue_jobs(client: &Client, jobs: Vec<NewJob>) -> crate::Result<Vec<String>> {
    let n = jobs.len();
    let ids = client
        .enqueue_many(jobs)
        .await
        .with_context(|| format!("enqueueing {n} jobs"))?;
    ensure!(ids.len() == n, "{} of {n} jobs enqueued", ids.len());
    Ok(ids)
}

/// CPU time (user + system) this process used so far, from
/// `/proc/self/stat` (in USER_HZ ticks of 10 ms). Over a phase in which only
/// one side runs, its difference is that side's cost, a figure far less
/// noisy than a rate on a shared machine.
pub(crate) fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Microseconds of CPU per item.
pub(crate) fn cpu_us_per(cpu: Duration, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        cpu.as_secs_f64() * 1e6 / n as f64
    }
}

/// What draining a queue of already published jobs measured.
pub(crate) struct Drained {
    /// Jobs finished.
    pub(crate) jobs: u64,
    /// CPU this process used from the worker's start to the last job.
    pub(crate) cpu: Duration,
    /// Jobs whose outcome was not `ok`.
    pub(crate) not_ok: u64,
    /// Start of the first job to ack of the last.
    pub(crate) elapsed: Duration,
}

impl Drained {
    /// Jobs per second.
    pub(crate) fn per_second(&self) -> f64 {
        per_second(self.jobs, self.elapsed)
    }
}

/// Starts a worker on a queue already holding `n` jobs and times the drain.
pub(crate) async fn drain(config: Config, n: u64) -> crate::Result<Drained> {
    let cpu_before = cpu_time();
    let worker = InProcessWorker::start(config, Tally::default()).await?;
    let waited = worker.tally.wait_for(n, deadline_for(n)).await;
    let cpu = cpu_time().saturating_sub(cpu_before);
    let (done, not_ok, span) = (
        worker.tally.done(),
        worker.tally.not_ok(),
        worker.tally.span(),
    );
    worker.stop().await?;
    waited?;
    Ok(Drained {
        jobs: done,
        cpu,
        not_ok,
        elapsed: span.unwrap_or_default(),
    })
}

/// `n / elapsed`, 0 when nothing was timed.
pub(crate) fn per_second(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// A JSON document of exactly `len` bytes (a string of `x`), at least 2.
pub(crate) fn json_payload(len: usize) -> Vec<u8> {
    let len = len.max(2);
    let mut v = vec![b'x'; len];
    v[0] = b'"';
    v[len - 1] = b'"';
    v
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Memory {
    /// `VmRSS`: resident now, in bytes.
    pub(crate) rss_bytes: u64,
    /// `VmHWM`: the peak resident size so far, in bytes.
    pub(crate) peak_rss_bytes: u64,
}

impl Memory {
    /// This process's memory.
    pub(crate) fn of_self() -> Memory {
        Memory::read("/proc/self/status")
    }

    /// Another process's memory.
    pub(crate) fn of_pid(pid: u32) -> Memory {
        Memory::read(&format!("/proc/{pid}/status"))
    }

    fn read(path: &str) -> Memory {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kib = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        Memory {
            rss_bytes: kib("VmRSS:"),
            peak_rss_bytes: kib("VmHWM:"),
        }
    }
}

/// Bytes as MB (10^6), for tables.
pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_asked_size() {
        for len in [2, 3, 1024, 65_536] {
            let p = json_payload(len);
            assert_eq!(p.len(), len);
            serde_json::from_slice::<serde_json::Value>(&p).unwrap();
        }
    }

    #[test]
    fn reads_own_cpu_time() {
        let before = cpu_time();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time() > before);
    }

    #[test]
    fn reads_own_memory() {
        let m = Memory::of_self();
        assert!(m.rss_bytes > 0 && m.peak_rss_bytes >= m.rss_bytes);
    }
}
