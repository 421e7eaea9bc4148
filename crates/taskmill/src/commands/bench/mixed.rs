//! `mixed`: IO and CPU jobs at once in one worker.
//!
//! The same `io.sleep` load as the `io` scenario and `cpu.hash` jobs of about
//! 5 ms, each drained alone and then both together by one worker. A worker that
//! keeps CPU work off its event loop drains the IO jobs together about as
//! fast as alone; the ratios say how much each kind slows the other.

use serde_json::json;

use super::harness::{Bench, InProcessWorker, Tally, deadline_for, drain, enqueue};
use super::report::{Row, ScenarioReport};
use super::{cpu, io};

/// Aimed duration of one CPU job's compute.
const CPU_JOB_TIME: std::time::Duration = std::time::Duration::from_millis(5);

/// Runs `io_jobs` IO jobs and `cpu_jobs` CPU jobs, alone and together,
/// `rounds` times (best round of each counts).
pub(crate) async fn run(
    b: &Bench,
    io_jobs: u64,
    cpu_jobs: u64,
    rounds: u32,
) -> anyhow::Result<ScenarioReport> {
    let chain = cpu::calibrate(CPU_JOB_TIME).await?;
    let cpu_payload = format!("{{\"rounds\": {chain}}}").into_bytes();
    let io_payload = format!("{{\"ms\": {}}}", io::SLEEP.as_millis()).into_bytes();
    let io_queue = b.queue("mixed", "io");
    let cpu_queue = b.config.cpu_queue.clone();
    // One worker serves both: the IO queue at the io scenario's
    // concurrency, the CPU queue at the pool's pace.
    let config = b.worker_config(&io_queue, io::CONCURRENCY);
    b.declare(&io_queue).await?;
    b.declare(&cpu_queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;
    let total = io_jobs + cpu_jobs;

    let warm_io = io_jobs.min(io::CONCURRENCY as u64);
    let warm_cpu = cpu_jobs.min(20);
    eprintln!("mixed: warm-up");
    enqueue(&client, &io_queue, "io.sleep", &io_payload, warm_io).await?;
    enqueue(&client, &cpu_queue, "cpu.hash", &cpu_payload, warm_cpu).await?;
    drain(config.clone(), warm_io + warm_cpu).await?;

    let (mut io_alone, mut cpu_alone) = (f64::MAX, f64::MAX);
    let (mut io_mixed, mut cpu_mixed) = (f64::MAX, f64::MAX);
    let mut not_ok = 0;
    for round in 0..rounds {
        eprintln!(
            "mixed: round {} of {rounds}: {io_jobs} io.sleep and {cpu_jobs} cpu.hash jobs, alone then together",
            round + 1
        );
        enqueue(&client, &io_queue, "io.sleep", &io_payload, io_jobs).await?;
        let d = drain(config.clone(), io_jobs).await?;
        not_ok += d.not_ok;
        io_alone = io_alone.min(d.elapsed.as_secs_f64());
        enqueue(&client, &cpu_queue, "cpu.hash", &cpu_payload, cpu_jobs).await?;
        let d = drain(config.clone(), cpu_jobs).await?;
        not_ok += d.not_ok;
        cpu_alone = cpu_alone.min(d.elapsed.as_secs_f64());

        enqueue(&client, &cpu_queue, "cpu.hash", &cpu_payload, cpu_jobs).await?;
        enqueue(&client, &io_queue, "io.sleep", &io_payload, io_jobs).await?;
        let worker = InProcessWorker::start(config.clone(), Tally::by_kind()).await?;
        let waited = worker.tally.wait_for(total, deadline_for(total)).await;
        let spans = worker.tally.kind_spans();
        not_ok += worker.tally.not_ok();
        worker.stop().await?;
        waited?;
        let span = |kind: &str| {
            spans
                .iter()
                .find(|(k, _, _)| k == kind)
                .map(|(_, n, d)| (*n, d.as_secs_f64()))
                .unwrap_or((0, 0.0))
        };
        let (io_n, io_s) = span("io.sleep");
        let (cpu_n, cpu_s) = span("cpu.hash");
        anyhow::ensure!(
            io_n == io_jobs && cpu_n == cpu_jobs,
            "mixed drain: {io_n} of {io_jobs} io and {cpu_n} of {cpu_jobs} cpu jobs"
        );
        io_mixed = io_mixed.min(io_s);
        cpu_mixed = cpu_mixed.min(cpu_s);
    }
    client.close().await;
    let rows = vec![
        Row::times("io drain s, together vs alone", io_mixed, io_alone),
        Row::times("cpu drain s, together vs alone", cpu_mixed, cpu_alone),
    ];
    Ok(ScenarioReport {
        scenario: "mixed",
        rows,
        json: json!({
            "io_jobs": io_jobs,
            "cpu_jobs": cpu_jobs,
            "rounds": rounds,
            "io_sleep_ms": io::SLEEP.as_millis() as u64,
            "io_concurrency": io::CONCURRENCY,
            "hash_rounds_per_job": chain,
            "jobs_drained": total,
            "jobs_not_ok": not_ok,
            "io_alone_s": io_alone,
            "io_mixed_s": io_mixed,
            "cpu_alone_s": cpu_alone,
            "cpu_mixed_s": cpu_mixed,
            "io_slowdown": io_mixed / io_alone,
            "cpu_slowdown": cpu_mixed / cpu_alone,
        }),
    })
}
