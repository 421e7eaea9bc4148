//! `mixed`: IO-job latency while the CPU pool is saturated (issue #7, the
//! hybrid case).
//!
//! One worker serves an IO queue and the CPU queue. In the *saturated* phase
//! the CPU queue first gets enough `cpu.hash` jobs of about 250 ms to keep
//! every pool process busy for the whole phase (the rest is purged after);
//! then an open-loop publisher sends `N` `io.sleep` 100 ms jobs at a fixed
//! rate. In the *idle* phase the same IO stream runs with the CPU queue
//! empty: the reference. The phases alternate which goes first per round.
//!
//! An IO job's latency is enqueue to finished: its `queue_wait` (from the
//! enqueue stamp it carries) plus its run time, from the worker's job
//! reports. A worker that keeps CPU work off its event loop keeps the p99
//! near the sleep time; the target is the CPU isolation test's bound,
//! `2 x sleep + 100 ms`. The pool's saturation is checked, not assumed: the
//! share of the IO phase (first IO publish to last IO job finished) during
//! which the pool processes held a CPU job, from the CPU jobs' own reports.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskmill_broker::{Broker, Publisher};
use taskmill_core::Outcome;
use taskmill_core::config::Config;

use crate::error::ensure;
use crate::harness::{Bench, InProcessWorker, Tally, enqueue};
use crate::latency::{ms, open_loop, summary};
use crate::report::{Row, ScenarioReport, Target, millis};
use crate::stats::quantile;
use crate::{cpu, io};

/// IO jobs per phase by default.
pub(crate) const DEFAULT_JOBS: u64 = 5_000;
/// The IO stream's rate, in jobs/s (about 50 sleeping at once).
const IO_RATE: f64 = 500.0;
/// Aimed duration of one CPU job's compute.
const CPU_JOB_TIME: Duration = Duration::from_millis(250);
/// CPU work queued beyond the IO stream's length: the start, the last IO
/// jobs' sleep and the drain's tail.
const CPU_MARGIN: Duration = Duration::from_secs(2);
/// Time the pool gets to take its first CPU jobs before the IO stream.
const SETTLE: Duration = Duration::from_millis(200);
/// Target: IO p99 at most `2 x sleep + P99_SLACK` with the pool saturated.
const P99_SLACK: Duration = Duration::from_millis(100);
/// Target: the share of the IO phase the pool was busy, in %.
const BUSY_PCT: f64 = 95.0;

/// What one phase measured.
struct Phase {
    saturated: bool,
    /// IO latencies (enqueue to finished), sorted.
    latencies: Vec<Duration>,
    /// Their two parts, each sorted: enqueue to start, and run time.
    queue_waits: Vec<Duration>,
    run_times: Vec<Duration>,
    /// First IO publish to last IO job finished.
    window: Duration,
    /// Share of the window the pool processes held a CPU job, in %.
    busy_pct: f64,
    /// CPU jobs that finished inside the window.
    cpu_done_in_window: u64,
    /// CPU jobs still queued when the worker stopped (purged).
    cpu_left: u32,
    not_ok: u64,
    publisher_lag: Vec<Duration>,
}

impl Phase {
    fn p(&self, q: f64) -> f64 {
        ms(quantile(&self.latencies, q))
    }

    fn side(&self) -> &'static str {
        if self.saturated { "saturated" } else { "idle" }
    }

    fn json(&self) -> Value {
        json!({
            "side": self.side(),
            "samples": self.latencies.len(),
            "latency_ms": summary(&self.latencies),
            "queue_wait_ms": summary(&self.queue_waits),
            "run_ms": summary(&self.run_times),
            "io_phase_s": self.window.as_secs_f64(),
            "cpu_pool_busy_pct": self.busy_pct,
            "cpu_jobs_done_in_io_phase": self.cpu_done_in_window,
            "cpu_jobs_left_queued": self.cpu_left,
            "publisher_lag_p99_ms": ms(quantile(&self.publisher_lag, 0.99)),
        })
    }
}

/// What every phase shares.
struct Setup<'a> {
    b: &'a Bench,
    config: Config,
    publisher: Publisher,
    client: taskmill_client::Client,
    io_queue: String,
    cpu_queue: String,
    io_payload: Vec<u8>,
    cpu_payload: Vec<u8>,
    cpu_jobs: u64,
    processes: usize,
}

/// Runs the scenario: `io_jobs` IO jobs per phase, `rounds` rounds of an
/// idle and a saturated phase (the lowest p99 of each side counts).
pub(crate) async fn run(b: &Bench, io_jobs: u64, rounds: u32) -> crate::Result<ScenarioReport> {
    let chain = cpu::calibrate(CPU_JOB_TIME).await?;
    let processes = match b.config.cpu_processes {
        0 => taskmill_cpu::available_cores(),
        n => n,
    };
    let stream = Duration::from_secs_f64(io_jobs as f64 / IO_RATE);
    let per_process = (stream + CPU_MARGIN).as_secs_f64() / CPU_JOB_TIME.as_secs_f64();
    let cpu_jobs = processes as u64 * per_process.ceil() as u64;
    let io_queue = b.queue("mixed", "io");
    let cpu_queue = b.config.cpu_queue.clone();
    b.declare(&io_queue).await?;
    b.declare(&cpu_queue).await?;
    let producer = Broker::connect(&b.config.amqp_url, "taskmill bench producer").await?;
    let setup = Setup {
        b,
        // One worker serves both: the IO queue at the io scenario's
        // concurrency, the CPU queue at the pool's pace.
        config: b.worker_config(&io_queue, io::CONCURRENCY),
        publisher: producer.publisher().await?,
        client: b.client(b.config.max_payload_bytes).await?,
        io_queue,
        cpu_queue,
        io_payload: format!("{{\"ms\": {}}}", io::SLEEP.as_millis()).into_bytes(),
        cpu_payload: format!("{{\"rounds\": {chain}}}").into_bytes(),
        cpu_jobs,
        processes,
    };
    let result = async {
        let warm = io_jobs.min(IO_RATE as u64);
        eprintln!("mixed: warm-up, {warm} io.sleep jobs with the pool saturated");
        setup.phase(warm, true).await?;
        let mut phases = Vec::new();
        for round in 0..rounds {
            let sides = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for saturated in sides {
                eprintln!(
                    "mixed: round {} of {rounds}: {io_jobs} io.sleep jobs at {IO_RATE:.0}/s, pool {}",
                    round + 1,
                    if saturated {
                        format!("saturated by {cpu_jobs} cpu.hash jobs of ~{} ms", CPU_JOB_TIME.as_millis())
                    } else {
                        "idle".to_string()
                    }
                );
                phases.push(setup.phase(io_jobs, saturated).await?);
            }
        }
        Ok::<_, crate::Error>(phases)
    }
    .await;
    setup.client.close().await;
    producer.close().await;
    let phases = result?;

    let best = |saturated: bool| {
        phases
            .iter()
            .filter(|p| p.saturated == saturated)
            .min_by(|a, b| a.p(0.99).total_cmp(&b.p(0.99)))
            .expect("one phase of each side per round")
    };
    let (sat, idle) = (best(true), best(false));
    let sleep_ms = millis(io::SLEEP);
    let bound_ms = 2.0 * sleep_ms + millis(P99_SLACK);
    let (sat_p50, sat_p99) = (sat.p(0.5), sat.p(0.99));
    let (idle_p50, idle_p99) = (idle.p(0.5), idle.p(0.99));
    let not_ok: u64 = phases.iter().map(|p| p.not_ok).sum();
    let rows = vec![
        Row::times("io p50 ms, pool saturated vs sleep", sat_p50, sleep_ms),
        Row::times("io p99 ms, pool saturated vs sleep", sat_p99, sleep_ms).with(Target::at_most(
            sat_p99,
            bound_ms,
            format!("<= 2 x sleep + {} ms", P99_SLACK.as_millis()),
            " ms",
        )),
        Row::times("io p50 ms, pool saturated vs idle", sat_p50, idle_p50),
        Row::times("io p99 ms, pool saturated vs idle", sat_p99, idle_p99),
        Row::value(
            format!("cpu pool busy % of the io phase ({processes} processes)"),
            sat.busy_pct,
        )
        .with(Target::at_least(
            sat.busy_pct,
            BUSY_PCT,
            format!(">= {BUSY_PCT:.0} % (saturated)"),
        )),
    ];
    Ok(ScenarioReport {
        scenario: "mixed",
        rows,
        json: json!({
            "io_jobs": io_jobs,
            "rounds": rounds,
            "io_rate_jobs_per_s": IO_RATE,
            "io_sleep_ms": io::SLEEP.as_millis() as u64,
            "io_concurrency": io::CONCURRENCY,
            "cpu_processes": processes,
            "cpu_job_ms": CPU_JOB_TIME.as_millis() as u64,
            "hash_rounds_per_job": chain,
            "cpu_jobs_per_phase": cpu_jobs,
            "jobs_not_ok": not_ok,
            "saturated_ms": summary(&sat.latencies),
            "idle_ms": summary(&idle.latencies),
            "p50_vs_sleep": sat_p50 / sleep_ms,
            "p99_vs_sleep": sat_p99 / sleep_ms,
            "p99_bound_ms": bound_ms,
            "p99_saturated_vs_idle": sat_p99 / idle_p99,
            "cpu_pool_busy_pct": sat.busy_pct,
            "cpu_jobs_done_in_io_phase": sat.cpu_done_in_window,
            "cpu_jobs_left_queued": sat.cpu_left,
            "per_round": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        }),
    })
}

impl Setup<'_> {
    /// One phase: with `saturated`, queue the CPU work first; start the
    /// worker, stream `io_jobs` IO jobs, wait for all of them, stop the
    /// worker and purge what is left of the CPU work.
    async fn phase(&self, io_jobs: u64, saturated: bool) -> crate::Result<Phase> {
        if saturated {
            enqueue(
                &self.client,
                &self.cpu_queue,
                "cpu.hash",
                &self.cpu_payload,
                self.cpu_jobs,
            )
            .await?;
        }
        let worker = InProcessWorker::start(self.config.clone(), Tally::keeping_jobs()).await?;
        let tally = worker.tally.clone();
        let streamed = async {
            tokio::time::sleep(SETTLE).await;
            let start = Instant::now();
            let (sent, lag) = open_loop(
                &self.publisher,
                "io.sleep",
                &self.io_queue,
                &self.io_payload,
                IO_RATE,
                Duration::from_secs_f64(io_jobs as f64 / IO_RATE),
                self.b.config.max_payload_bytes,
            )
            .await?;
            let deadline = Duration::from_secs(60);
            let until = Instant::now() + deadline;
            while tally.finished_of("io.sleep") < sent {
                ensure!(
                    Instant::now() < until,
                    "only {} of {sent} io jobs finished within {deadline:?} of the last publish",
                    tally.finished_of("io.sleep")
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, crate::Error>((start, lag, sent))
        }
        .await;
        worker.stop().await?;
        let cpu_left = self.b.admin.purge(&self.cpu_queue).await?;
        let (start, mut publisher_lag, sent) = streamed?;
        publisher_lag.sort_unstable();

        let records = tally.take_jobs();
        let end = records
            .iter()
            .filter(|r| r.kind == "io.sleep")
            .map(|r| r.ended)
            .max()
            .unwrap_or(start);
        let window = end.saturating_duration_since(start);
        let mut latencies: Vec<Duration> = records
            .iter()
            .filter(|r| r.kind == "io.sleep")
            .filter_map(|r| r.latency())
            .collect();
        latencies.sort_unstable();
        let io = || records.iter().filter(|r| r.kind == "io.sleep");
        let mut queue_waits: Vec<Duration> = io().filter_map(|r| r.queue_wait).collect();
        queue_waits.sort_unstable();
        let mut run_times: Vec<Duration> = io().map(|r| r.run_time).collect();
        run_times.sort_unstable();
        ensure!(
            latencies.len() as u64 == sent,
            "{} of {sent} io jobs reported an enqueue time",
            latencies.len()
        );
        // Time inside the window during which a pool process held a job.
        let mut busy = Duration::ZERO;
        let mut cpu_done_in_window = 0;
        for r in records.iter().filter(|r| r.kind == "cpu.hash") {
            let (from, to) = (r.started.max(start), r.ended.min(end));
            busy += to.saturating_duration_since(from);
            cpu_done_in_window += u64::from(r.ended >= start && r.ended <= end);
        }
        let capacity = window.as_secs_f64() * self.processes as f64;
        let busy_pct = if capacity > 0.0 {
            busy.as_secs_f64() / capacity * 100.0
        } else {
            0.0
        };
        Ok(Phase {
            saturated,
            latencies,
            queue_waits,
            run_times,
            window,
            busy_pct,
            cpu_done_in_window,
            cpu_left,
            not_ok: records.iter().filter(|r| r.outcome != Outcome::Ok).count() as u64,
            publisher_lag,
        })
    }
}
