//! `retry`: throughput when some jobs fail once, and no job succeeding twice
//! (issue #7).
//!
//! `N` `test.fail` jobs: every fifth (20 %) carries `{"times": 1}` and fails
//! its first attempt with a retryable error; the others carry
//! `{"times": 0}` and succeed at once. All are the same kind and handler, so
//! the retry is the only difference. The worker publishes the failed
//! attempt's copy (confirmed) and acks; the copy comes back after the
//! backoff and succeeds. Two retry-delay tiers, each on its own queue:
//! backoff **0** (the copy is republished straight to the work queue) and
//! **1 s** (through the delay ladder); `max_attempts` 2, no jitter.
//!
//! Per tier: completed jobs/s (`N` / first start to last success) against
//! the ideal (every attempt at the noop drain rate of this run, plus the one
//! backoff); the retries per failing job, which must be exactly 1; and the
//! duplicates, jobs that succeeded more than once, counted per job id from
//! the worker's observer, which must be 0. A job id that never succeeds is
//! an error.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskmill_client::NewJob;
use taskmill_core::Outcome;
use taskmill_core::config::Config;
use taskmill_core::retry::Jitter;

use crate::error::ensure;
use crate::harness::{Bench, InProcessWorker, Tally, deadline_for, enqueue_jobs, per_second};
use crate::noop;
use crate::report::{Row, ScenarioReport, Target, pct};

/// Jobs by default (issue #7).
pub(crate) const DEFAULT_JOBS: u64 = 20_000;
/// Every `FAIL_EVERY`-th job fails once: 20 %.
const FAIL_EVERY: u64 = 5;
/// The retry-delay tiers: the backoff of the one retry.
const TIERS: [Duration; 2] = [Duration::ZERO, Duration::from_secs(1)];
/// The kind of every job.
const KIND: &str = "test.fail";

/// What one tier measured over the rounds.
struct Tier {
    backoff: Duration,
    queue: String,
    config: Config,
    spans: Vec<f64>,
    retries: u64,
    duplicates: u64,
}

/// Runs the scenario with `jobs` jobs per tier, `rounds` times (the best
/// round of each tier counts; the tiers alternate which goes first).
pub(crate) async fn run(b: &Bench, jobs: u64, rounds: u32) -> crate::Result<ScenarioReport> {
    let noop_rate = noop::drain_rate(b, jobs.max(2_000)).await?;
    let mut tiers = Vec::new();
    for backoff in TIERS {
        let queue = b.queue("retry", &format!("backoff-{}ms", backoff.as_millis()));
        let mut config = b.worker_config(&queue, b.config.concurrency);
        config.diagnostic_kinds = true;
        config.max_attempts = 2;
        config.backoff_base_ms = backoff.as_millis() as u64;
        config.jitter = Jitter::None;
        b.declare(&queue).await?;
        tiers.push(Tier {
            backoff,
            queue,
            config,
            spans: Vec::new(),
            retries: 0,
            duplicates: 0,
        });
    }
    let client = b.client(b.config.max_payload_bytes).await?;
    let failing = jobs.div_ceil(FAIL_EVERY);

    let warm = (jobs / 10).clamp(50, 1_000).min(jobs);
    eprintln!("retry: warm-up with {warm} jobs, backoff 0");
    let ids = enqueue_jobs(&client, batch(&tiers[0].queue, warm)).await?;
    checked_drain(tiers[0].config.clone(), &ids, tiers[0].backoff).await?;

    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..tiers.len()).collect()
        } else {
            (0..tiers.len()).rev().collect()
        };
        for i in order {
            let t = &mut tiers[i];
            eprintln!(
                "retry: round {} of {rounds}: {jobs} jobs, {failing} failing once, backoff {} ms",
                round + 1,
                t.backoff.as_millis()
            );
            let ids = enqueue_jobs(&client, batch(&t.queue, jobs)).await?;
            let d = checked_drain(t.config.clone(), &ids, t.backoff).await?;
            t.spans.push(d.span.as_secs_f64());
            t.retries += d.retries;
            t.duplicates += d.duplicates;
        }
    }
    client.close().await;

    let mut rows = Vec::new();
    let mut tiers_json = Vec::new();
    for t in &tiers {
        let label = format!("backoff {} s", t.backoff.as_secs_f64());
        let drain_s = t.spans.iter().copied().fold(f64::MAX, f64::min);
        let rate = per_second(jobs, Duration::from_secs_f64(drain_s));
        let ideal_s = t.backoff.as_secs_f64() + (jobs + failing) as f64 / noop_rate;
        let ideal_rate = jobs as f64 / ideal_s;
        let per_failing = t.retries as f64 / (failing * u64::from(rounds)) as f64;
        rows.push(Row::pct(
            format!("{label}: completed jobs/s vs ideal"),
            rate,
            ideal_rate,
        ));
        rows.push(Row::value(
            format!("{label}: retries per failing job"),
            per_failing,
        ));
        rows.push(
            Row::value(format!("{label}: duplicates"), t.duplicates as f64)
                .with(Target::none(t.duplicates, "jobs succeeded twice")),
        );
        tiers_json.push(json!({
            "backoff_ms": t.backoff.as_millis() as u64,
            "drain_s": drain_s,
            "completed_jobs_per_s": rate,
            "ideal_s": ideal_s,
            "ideal_jobs_per_s": ideal_rate,
            "pct_of_ideal": pct(rate, ideal_rate),
            "retries": t.retries,
            "retries_per_failing_job": per_failing,
            "duplicates": t.duplicates,
            "per_round_drain_s": t.spans,
        }));
    }
    let duplicates: u64 = tiers.iter().map(|t| t.duplicates).sum();
    let retries: u64 = tiers.iter().map(|t| t.retries).sum();
    Ok(ScenarioReport {
        scenario: "retry",
        rows,
        json: json!({
            "jobs": jobs,
            "rounds": rounds,
            "kind": KIND,
            "failing_jobs": failing,
            "failing_fraction": failing as f64 / jobs as f64,
            "max_attempts": 2,
            "jitter": "none",
            "noop_drain_jobs_per_s": noop_rate,
            "jobs_drained": jobs,
            "missing": 0,
            "retries": retries,
            "duplicates": duplicates,
            "tiers": Value::Array(tiers_json),
        }),
    })
}

/// `n` jobs for `queue`: every `FAIL_EVERY`-th (the first included) fails
/// once, the others succeed at once.
fn batch(queue: &str, n: u64) -> Vec<NewJob> {
    (0..n)
        .map(|i| {
            let times = u32::from(fails(i));
            NewJob::raw(KIND, format!("{{\"times\": {times}}}").into_bytes()).queue(queue)
        })
        .collect()
}

/// Whether the `i`-th job of a batch fails once.
fn fails(i: u64) -> bool {
    i.is_multiple_of(FAIL_EVERY)
}

/// What one checked drain measured.
struct Checked {
    /// First start to last success.
    span: Duration,
    /// Attempts that ended `retried`.
    retries: u64,
    /// Jobs that succeeded more than once (a success of a job of an earlier
    /// drain counts too).
    duplicates: u64,
}

/// Starts a worker on a queue holding the jobs `ids` (as made by [`batch`])
/// and waits until every one succeeded; then checks, per job id, that each
/// failing job was retried exactly once and no other was, and counts the
/// jobs that succeeded more than once.
async fn checked_drain(
    config: Config,
    ids: &[String],
    backoff: Duration,
) -> crate::Result<Checked> {
    let n = ids.len() as u64;
    let worker = InProcessWorker::start(config, Tally::keeping_jobs()).await?;
    let deadline = deadline_for(n + n.div_ceil(FAIL_EVERY)) + backoff;
    let until = Instant::now() + deadline;
    let waited = loop {
        if worker.tally.distinct_ok() >= n {
            break Ok(());
        }
        if Instant::now() >= until {
            break Err(crate::Error::Failed(format!(
                "only {} of {n} jobs succeeded within {deadline:?}",
                worker.tally.distinct_ok()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Stopped first, so every attempt that ran has reported.
    let tally = worker.tally.clone();
    worker.stop().await?;
    waited?;
    let records = tally.take_jobs();
    // Per job id: (successes, retries, other outcomes).
    let mut per_id: HashMap<&str, (u64, u64, u64)> =
        ids.iter().map(|id| (id.as_str(), (0, 0, 0))).collect();
    let (mut first_start, mut last_ok) = (None::<Instant>, None::<Instant>);
    let mut strays = 0;
    for r in &records {
        let Some(c) = r.job_id.as_deref().and_then(|id| per_id.get_mut(id)) else {
            // A job of an earlier drain: it succeeded there already.
            strays += u64::from(r.outcome == Outcome::Ok);
            continue;
        };
        first_start = Some(first_start.map_or(r.started, |f| f.min(r.started)));
        match r.outcome {
            Outcome::Ok => {
                c.0 += 1;
                last_ok = Some(last_ok.map_or(r.ended, |l| l.max(r.ended)));
            }
            Outcome::Retried => c.1 += 1,
            _ => c.2 += 1,
        }
    }
    let mut missing = 0;
    let mut duplicates = strays;
    let mut retries = 0;
    let mut misretried = 0;
    let mut other = 0;
    for (i, id) in ids.iter().enumerate() {
        let (ok, retried, others) = per_id[id.as_str()];
        missing += u64::from(ok == 0);
        duplicates += u64::from(ok > 1);
        retries += retried;
        let expected = u64::from(fails(i as u64));
        misretried += u64::from(retried != expected);
        other += others;
    }
    ensure!(
        missing == 0,
        "{missing} of {n} jobs never succeeded (each must succeed exactly once)"
    );
    ensure!(
        misretried == 0 && other == 0,
        "{misretried} jobs were not retried exactly as planned (once if failing, else never), \
         {other} attempts ended neither ok nor retried"
    );
    let span = match (first_start, last_ok) {
        (Some(f), Some(l)) => l.saturating_duration_since(f),
        _ => Duration::ZERO,
    };
    Ok(Checked {
        span,
        retries,
        duplicates,
    })
}
