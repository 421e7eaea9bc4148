//! `taskmill bench` as a library: throughput, latency and memory against the
//! raw broker ceiling, measured in the same run. The binary parses the flags
//! into [`Options`] and calls [`run`].
//!
//! Every scenario uses fresh queues with unique names (deleted at the end,
//! also on error or Ctrl-C), warms up, then measures. Each figure is shown
//! next to the ceiling, the same number of same-size messages moved by a
//! bare lapin loop in this process ([`taskmill_broker::ceiling`]), so a
//! ratio holds on a noisy machine. See `docs/benchmarks.md`.
//!
//! Layout:
//! - [`error`]: the bench's [`Error`].
//! - [`stats`]: percentiles for summaries.
//! - [`harness`]: queues, the in-process worker and its tally, timed enqueues,
//!   memory readings.
//! - one file per scenario: [`noop`], [`io`], [`cpu`], [`mixed`],
//!   [`latency`], [`retry`], [`payload`], [`celery`]; [`rss`] is the
//!   worker-process memory probe used by `io`.
//! - [`report`]: rows, targets, the table.
//!
//! Output: the human table on stdout; with `--json`, one JSON object per
//! scenario per line on stdout and the table on stderr. Progress goes to
//! stderr.

mod celery;
mod cpu;
pub mod error;
mod harness;
mod io;
mod latency;
mod mixed;
mod noop;
mod payload;
mod report;
mod retry;
mod rss;
pub mod stats;

use std::path::PathBuf;
use std::time::Instant;

use clap::ValueEnum;
use serde_json::{Value, json};
use taskmill_core::config::{Config, QueueType};

pub use error::{Error, Result};

use error::ensure;
use harness::{Bench, Memory};
use report::ScenarioReport;

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// No-op jobs (1 KB): publish, drain and overlapped rates vs the ceiling.
    Noop,
    /// `io.sleep` 100 ms jobs, 1 000 at once: drain time vs the ideal; worker
    /// memory idle and with `--in-flight` jobs running.
    Io,
    /// `cpu.hash` jobs of ~10 ms and ~1 ms through the worker's process pool
    /// with 1 and N processes: jobs/s, speed-up N vs 1, and the pool's
    /// hand-off round trip p50/p99.
    Cpu,
    /// A stream of `io.sleep` 100 ms jobs while `cpu.hash` jobs saturate the
    /// CPU pool of the same worker: the IO jobs' enqueue-to-finished latency
    /// p50/p99 vs the sleep time and vs the same stream with the pool idle.
    Mixed,
    /// Open-loop load at 10/50/80 % of the noop drain rate: enqueue-to-start
    /// latency percentiles.
    Latency,
    /// Jobs of which 20 % fail once with a retryable error, with a retry
    /// backoff of 0 and of 1 s: completed jobs/s, retries per failing job,
    /// and duplicates (jobs that succeeded twice; must be 0).
    Retry,
    /// 64 KiB and 1 MiB payloads: MB/s vs the ceiling.
    Payload,
    /// No-op Celery tasks sent by the Python Celery client, drained by a
    /// `taskmill worker --celery-queue` vs a real `celery worker` (prefork,
    /// 2 processes, acks_late): tasks/s of both and their ratio. Needs the
    /// Python virtualenv (`make venv`).
    Celery,
    /// Every scenario above, in that order.
    All,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Noop => "noop",
            Scenario::Io => "io",
            Scenario::Cpu => "cpu",
            Scenario::Mixed => "mixed",
            Scenario::Latency => "latency",
            Scenario::Retry => "retry",
            Scenario::Payload => "payload",
            Scenario::Celery => "celery",
            Scenario::All => "all",
        }
    }
}

/// What to run, and how big: `taskmill bench`'s flags (see its `--help`
/// for the defaults of `jobs`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario to run.
    pub scenario: Scenario,
    /// Jobs of the scenario; `None`: the scenario's default.
    pub jobs: Option<u64>,
    /// Type of every queue the run declares, taskmill's and the ceiling's.
    pub queue_type: QueueType,
    /// Print one JSON object per scenario on stdout (the table goes to stderr).
    pub json: bool,
    /// latency: one fixed rate in jobs/s instead of 10/50/80 % of the noop
    /// drain rate.
    pub rate: Option<f64>,
    /// latency: seconds of load per rate.
    pub seconds: f64,
    /// Measurement rounds; the best round of each side counts.
    pub rounds: u32,
    /// io: jobs held in flight at once when the worker's memory is read.
    pub in_flight: u16,
    /// celery: the Python interpreter that has Celery (`None`:
    /// `TASKMILL_BENCH_PYTHON`, then `.venv/bin/python`, then `python3`).
    pub python: Option<PathBuf>,
    /// The program whose `worker` subcommand is `taskmill worker`, for the
    /// scenarios that run a worker as a child process (`io`'s memory probe,
    /// `celery`).
    pub worker_exe: PathBuf,
}

impl Options {
    fn jobs_for(&self, s: Scenario, all: bool) -> (u64, u64) {
        match (s, all, self.jobs) {
            (Scenario::Noop, _, j) => (j.unwrap_or(noop::DEFAULT_JOBS), 0),
            (Scenario::Io, true, Some(j)) => ((j / 10).max(100), 0),
            (Scenario::Io, _, j) => (j.unwrap_or(io::DEFAULT_JOBS), 0),
            (Scenario::Cpu, true, Some(j)) => ((j / 100).max(20), 0),
            (Scenario::Cpu, _, j) => (j.unwrap_or(cpu::DEFAULT_JOBS), 0),
            (Scenario::Mixed, true, Some(j)) => ((j / 40).max(100), 0),
            (Scenario::Mixed, _, j) => (j.unwrap_or(mixed::DEFAULT_JOBS), 0),
            (Scenario::Retry, true, Some(j)) => ((j / 10).max(100), 0),
            (Scenario::Retry, _, j) => (j.unwrap_or(retry::DEFAULT_JOBS), 0),
            (Scenario::Payload, true, Some(j)) => ((j / 100).max(20), (j / 1_000).max(5)),
            (Scenario::Payload, _, j) => {
                let n = j.unwrap_or(payload::DEFAULT_JOBS);
                (n, (n / 10).max(5))
            }
            (Scenario::Celery, true, Some(j)) => ((j / 10).max(100), 0),
            (Scenario::Celery, _, j) => (j.unwrap_or(celery::DEFAULT_TASKS), 0),
            // Jobs of the quick noop drain measurement, when none ran before.
            (Scenario::Latency | Scenario::All, _, j) => (j.unwrap_or(io::DEFAULT_JOBS), 0),
        }
    }
}

/// Runs the scenario(s) against the broker of `config`, prints the results;
/// fails if a scenario failed.
///
/// The running program must serve as a CPU worker process when re-executed
/// in child mode (call [`taskmill_kinds::run_cpu_child_if_requested`] first
/// thing in `main`): the in-process workers' CPU pools start it.
pub async fn run(config: Config, args: Options) -> Result<()> {
    ensure!(args.jobs != Some(0), "--jobs must be at least 1");
    ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    ensure!(
        (1..=100).contains(&args.rounds),
        "--rounds must be in 1..=100"
    );
    let broker = taskmill_core::redact::redact_url(&config.amqp_url);
    let b = Bench::new(config, args.queue_type, args.worker_exe.clone()).await?;
    let all = args.scenario == Scenario::All;
    let list = if all {
        vec![
            Scenario::Noop,
            Scenario::Io,
            Scenario::Cpu,
            Scenario::Mixed,
            Scenario::Latency,
            Scenario::Retry,
            Scenario::Payload,
            Scenario::Celery,
        ]
    } else {
        vec![args.scenario]
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut reports: Vec<ScenarioReport> = Vec::new();
    let work = async {
        for s in list {
            let started = Instant::now();
            let result = run_one(&b, s, &args, all).await;
            b.cleanup().await;
            let mut report =
                result.map_err(|e| e.context(format_args!("scenario {}", s.name())))?;
            let mut obj = json!({
                "scenario": s.name(),
                "queue_type": args.queue_type.as_str(),
                "run_id": b.run_id,
                "taskmill_version": env!("CARGO_PKG_VERSION"),
                "cores": cores,
                "elapsed_s": started.elapsed().as_secs_f64(),
                "process_memory": Memory::of_self(),
                "targets": report.targets_json(),
            });
            if let (Some(o), Value::Object(extra)) = (obj.as_object_mut(), report.json.take()) {
                o.extend(extra);
            }
            if args.json {
                println!("{obj}");
            }
            reports.push(report);
        }
        Ok::<(), crate::Error>(())
    };
    let outcome = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(crate::Error::Failed("interrupted".to_string())),
    };
    // Again, for a run cut short by Ctrl-C; and the run's CPU queue.
    b.finish().await;
    let peak = harness::mb(Memory::of_self().peak_rss_bytes);
    let header = format!(
        "taskmill bench: {} queues, broker {broker}, {cores} cores, peak RSS of this process {peak:.1} MB",
        args.queue_type.as_str()
    );
    let table = report::table(&header, &reports);
    if args.json {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    outcome
}

async fn run_one(
    b: &Bench,
    s: Scenario,
    args: &Options,
    all: bool,
) -> crate::Result<ScenarioReport> {
    let (n, m) = args.jobs_for(s, all);
    match s {
        Scenario::Noop => noop::run(b, n, args.rounds).await,
        Scenario::Io => io::run(b, n, args.rounds, args.in_flight).await,
        Scenario::Cpu => cpu::run(b, n, args.rounds).await,
        Scenario::Mixed => mixed::run(b, n, args.rounds).await,
        Scenario::Latency => latency::run(b, args.rate, args.seconds, n).await,
        Scenario::Retry => retry::run(b, n, args.rounds).await,
        Scenario::Payload => payload::run(b, n, m, args.rounds).await,
        Scenario::Celery => celery::run(b, n, args.rounds, args.python.as_deref()).await,
        Scenario::All => unreachable!("expanded by run"),
    }
}
