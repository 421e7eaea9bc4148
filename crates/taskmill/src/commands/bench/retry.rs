//! `retry`: jobs that fail once with a retryable error, then succeed.
//!
//! Each of `N` `test.fail` jobs (`{"times": 1}`) fails its first attempt;
//! the worker publishes a copy to the delay ladder (confirmed) and acks; the
//! copy comes back after the backoff and succeeds. The figure is the time
//! from the first start to the last success, against the least it could be:
//! one backoff plus moving twice the jobs at the noop drain rate. Backoff is
//! fixed (no jitter) so the bound is exact.

use std::time::{Duration, Instant};

use serde_json::json;
use taskmill_core::retry::Jitter;

use super::harness::{Bench, InProcessWorker, Tally, deadline_for, enqueue};
use super::noop;
use super::report::{Row, ScenarioReport};

/// Jobs by default.
pub(crate) const DEFAULT_JOBS: u64 = 5_000;
/// The backoff of the one retry.
const BACKOFF: Duration = Duration::from_millis(500);

/// Runs the scenario with `jobs` jobs, `rounds` times (best round counts).
pub(crate) async fn run(b: &Bench, jobs: u64, rounds: u32) -> anyhow::Result<ScenarioReport> {
    let noop_rate = noop::drain_rate(b, jobs.max(2_000)).await?;
    let queue = b.queue("retry", "jobs");
    let mut config = b.worker_config(&queue, b.config.concurrency);
    config.diagnostic_kinds = true;
    config.max_attempts = 2;
    config.backoff_base_ms = BACKOFF.as_millis() as u64;
    config.jitter = Jitter::None;
    b.declare(&queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;
    let payload = br#"{"times": 1}"#;

    let warm = (jobs / 10).clamp(50, 1_000).min(jobs);
    eprintln!("retry: warm-up with {warm} jobs");
    enqueue(&client, &queue, "test.fail", payload, warm).await?;
    retried_drain(config.clone(), warm).await?;

    let mut spans = Vec::new();
    let mut retried = 0;
    for round in 0..rounds {
        eprintln!(
            "retry: round {} of {rounds}: {jobs} jobs failing once",
            round + 1
        );
        enqueue(&client, &queue, "test.fail", payload, jobs).await?;
        let (span, r) = retried_drain(config.clone(), jobs).await?;
        retried += r;
        spans.push(span.as_secs_f64());
    }
    client.close().await;
    let drain_s = spans.iter().copied().fold(f64::MAX, f64::min);
    let bound_s = BACKOFF.as_secs_f64() + 2.0 * jobs as f64 / noop_rate;
    let rows = vec![
        Row::times("drain s vs backoff + 2N/noop", drain_s, bound_s),
        Row::value(
            "retries per job",
            retried as f64 / (jobs * u64::from(rounds)) as f64,
        ),
    ];
    Ok(ScenarioReport {
        scenario: "retry",
        rows,
        json: json!({
            "jobs": jobs,
            "rounds": rounds,
            "backoff_ms": BACKOFF.as_millis() as u64,
            "jobs_drained": jobs,
            "retries": retried,
            "drain_s": drain_s,
            "bound_s": bound_s,
            "drain_vs_bound": drain_s / bound_s,
            "noop_drain_jobs_per_s": noop_rate,
            "per_round_drain_s": spans,
        }),
    })
}

/// Starts a worker on a queue holding `n` failing-once jobs and waits until
/// all `n` succeeded; returns first start to last success, and the retries.
async fn retried_drain(
    config: taskmill_core::config::Config,
    n: u64,
) -> anyhow::Result<(Duration, u64)> {
    let worker = InProcessWorker::start(config, Tally::default()).await?;
    let deadline = deadline_for(2 * n) + BACKOFF;
    let until = Instant::now() + deadline;
    let result = loop {
        if worker.tally.ok() >= n {
            break Ok(());
        }
        if Instant::now() >= until {
            break Err(anyhow::anyhow!(
                "only {} of {n} retried jobs succeeded within {deadline:?}",
                worker.tally.ok()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let span = worker.tally.span().unwrap_or_default();
    let retried = worker.tally.not_ok();
    worker.stop().await?;
    result?;
    Ok((span, retried))
}
