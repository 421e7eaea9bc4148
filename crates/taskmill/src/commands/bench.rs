//! `taskmill bench`: the flags; the scenarios live in `taskmill-bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use taskmill_bench::{Options, Scenario};
use taskmill_core::config::{Config, QueueType};

/// Arguments of `taskmill bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Jobs: noop 200 000, io 20 000, cpu 300 (of ~10 ms per pool size; the
    /// ~1 ms runs get ten times as many), mixed 5 000 IO per phase (the CPU
    /// work is sized to fill the pool meanwhile), retry 20 000 per backoff
    /// tier, payload 2 000 (64 KiB; 1 MiB gets a tenth), celery 20 000
    /// tasks per side and round. With `all`, the noop count; io, retry and
    /// celery get a tenth of it, mixed a fortieth, cpu and payload a
    /// hundredth (1 MiB a thousandth).
    #[arg(long)]
    pub jobs: Option<u64>,
    /// Type of every queue the run declares, taskmill's and the ceiling's.
    #[arg(long, default_value = "quorum")]
    pub queue_type: QueueType,
    /// Print one JSON object per scenario on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// latency: one fixed rate in jobs/s instead of 10/50/80 % of the noop
    /// drain rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// latency: seconds of load per rate.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Measurement rounds of noop, io, cpu, mixed, retry, payload and celery;
    /// the sides alternate which goes first and the best round of each side
    /// counts (noise only ever slows a run down).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// io: jobs held in flight at once when the worker's memory is read.
    #[arg(long, default_value_t = 10_000)]
    pub in_flight: u16,
    /// celery: the Python interpreter that has Celery (also
    /// TASKMILL_BENCH_PYTHON; default `.venv/bin/python` in the current
    /// directory, then `python3`).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
}

/// Runs the bench; the worker processes it starts are this binary.
pub async fn run(config: Config, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let worker_exe = std::env::current_exe().context("locating the taskmill binary")?;
    let options = Options {
        scenario: args.scenario,
        jobs: args.jobs,
        queue_type: args.queue_type,
        json: args.json,
        rate: args.rate,
        seconds: args.seconds,
        rounds: args.rounds,
        in_flight: args.in_flight,
        python: args.python,
        worker_exe,
    };
    taskmill_bench::run(config, options).await?;
    Ok(ExitCode::SUCCESS)
}
