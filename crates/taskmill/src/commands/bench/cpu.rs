//! `cpu`: CPU-bound jobs through the pool of worker processes.
//!
//! `N` `cpu.hash` jobs (a SHA-256 chain of a fixed length, a few ms each) are
//! published to the CPU queue, then a worker drains them through its process
//! pool. The reference is the raw compute: the same `N` chains computed in
//! this process on as many threads as the pool has processes, with no
//! broker, no IPC, no JSON. The ratio is what the pool costs on top of the
//! work itself (hand-off, framing, process scheduling, acks).

use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{Bench, CEILING_WINDOW, deadline_for, drain, enqueue};
use super::report::{Row, ScenarioReport};
use crate::kinds::hash_chain;

/// Jobs by default.
pub(crate) const DEFAULT_JOBS: u64 = 2_000;
/// Aimed duration of one job's compute.
const JOB_TIME: Duration = Duration::from_millis(5);

/// Runs the scenario with `jobs` jobs, `rounds` times (best round counts).
pub(crate) async fn run(b: &Bench, jobs: u64, rounds: u32) -> anyhow::Result<ScenarioReport> {
    let processes = match b.config.cpu_processes {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let chain = calibrate().await?;
    let payload = format!("{{\"rounds\": {chain}}}").into_bytes();
    // CPU kinds go to the worker's CPU queue (this run's own).
    let queue = b.config.cpu_queue.clone();
    let config = b.worker_config(&queue, b.config.concurrency);
    b.declare(&queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;

    let ceiling = b.ceiling("cpu").await?;
    let prefetch = config.queue_settings(&queue).prefetch;
    let c_pub = ceiling.publish(jobs, &payload, CEILING_WINDOW).await?;
    let c_con = ceiling.consume(jobs, prefetch, deadline_for(jobs)).await?;
    ceiling.delete().await;

    let warm = (jobs / 10).clamp(processes as u64, 200).min(jobs);
    eprintln!("cpu: warm-up with {warm} jobs, {processes} processes");
    enqueue(&client, &queue, "cpu.hash", &payload, warm).await?;
    drain(config.clone(), warm).await?;

    let mut drains = Vec::new();
    let mut computes = Vec::new();
    let mut not_ok = 0;
    for round in 0..rounds {
        eprintln!(
            "cpu: round {} of {rounds}: {jobs} cpu.hash jobs of {chain} rounds",
            round + 1
        );
        computes.push(compute(jobs, chain, processes).await?.as_secs_f64());
        enqueue(&client, &queue, "cpu.hash", &payload, jobs).await?;
        let d = drain(config.clone(), jobs).await?;
        anyhow::ensure!(d.jobs == jobs, "{} of {jobs} cpu jobs drained", d.jobs);
        not_ok += d.not_ok;
        drains.push(d.elapsed.as_secs_f64());
    }
    client.close().await;
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let (drain_s, compute_s) = (best(&drains), best(&computes));
    let rows = vec![
        Row::times("drain s vs raw compute", drain_s, compute_s),
        Row::pct(
            "jobs/s vs raw compute",
            jobs as f64 / drain_s,
            jobs as f64 / compute_s,
        ),
    ];
    Ok(ScenarioReport {
        scenario: "cpu",
        rows,
        json: json!({
            "jobs": jobs,
            "rounds": rounds,
            "hash_rounds_per_job": chain,
            "processes": processes,
            "jobs_drained": jobs,
            "jobs_not_ok": not_ok,
            "drain_s": drain_s,
            "raw_compute_s": compute_s,
            "drain_vs_compute": drain_s / compute_s,
            "per_round_drain_s": drains,
            "per_round_compute_s": computes,
            "ceiling_publish_jobs_per_s": c_pub.per_second(),
            "ceiling_consume_jobs_per_s": c_con.per_second(),
        }),
    })
}

/// The chain length that takes about [`JOB_TIME`] on this machine.
pub(crate) async fn calibrate() -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(|| {
        let probe = 20_000u64;
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            std::hint::black_box(hash_chain(std::hint::black_box(probe)));
            best = best.min(t.elapsed());
        }
        let per_round = best.as_secs_f64() / probe as f64;
        ((JOB_TIME.as_secs_f64() / per_round) as u64).max(1_000)
    })
    .await
    .map_err(|e| anyhow::anyhow!("calibration failed: {e}"))
}

/// Computes `jobs` chains of `chain` rounds on `threads` threads; returns
/// how long it took.
async fn compute(jobs: u64, chain: u64, threads: usize) -> anyhow::Result<Duration> {
    tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                        std::hint::black_box(hash_chain(std::hint::black_box(chain)));
                    }
                });
            }
        });
        start.elapsed()
    })
    .await
    .map_err(|e| anyhow::anyhow!("compute failed: {e}"))
}
