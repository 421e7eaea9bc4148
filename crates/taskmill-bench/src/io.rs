//! `io`: many sleeping IO jobs at once.
//!
//! `N` `io.sleep` jobs of `SLEEP` each with `C` running at once can drain no
//! faster than the ideal `N x SLEEP / C`, nor faster than the worker moves
//! jobs at all (`N / noop drain rate`); taskmill's drain is compared with the
//! larger of the two. A separate probe reads the memory of a worker process
//! idle and with `--in-flight` jobs running at once.

use std::time::Duration;

use serde_json::json;

use crate::error::ensure;
use crate::harness::{Bench, CEILING_WINDOW, deadline_for, drain, enqueue, mb};
use crate::report::{Row, ScenarioReport, Target};
use crate::{noop, rss};

/// Jobs by default.
pub(crate) const DEFAULT_JOBS: u64 = 20_000;
/// Jobs running at once.
pub(crate) const CONCURRENCY: usize = 1_000;
/// How long each job sleeps.
pub(crate) const SLEEP: Duration = Duration::from_millis(100);

/// Worker RSS targets, in MB.
const IDLE_RSS_MB: f64 = 30.0;
const LOADED_RSS_MB: f64 = 150.0;

/// Runs the scenario with `jobs` jobs; the memory probe holds `in_flight`
/// jobs at once.
pub(crate) async fn run(
    b: &Bench,
    jobs: u64,
    rounds: u32,
    in_flight: u16,
) -> crate::Result<ScenarioReport> {
    let noop_rate = noop::drain_rate(b, jobs.max(2_000)).await?;
    let payload = format!("{{\"ms\": {}}}", SLEEP.as_millis()).into_bytes();
    let queue = b.queue("io", "jobs");
    let config = b.worker_config(&queue, CONCURRENCY);
    let prefetch = config.queue_settings(&queue).prefetch;
    b.declare(&queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;

    // The ceiling: the same number of same-size messages, bare.
    let ceiling = b.ceiling("io").await?;
    let c_pub = ceiling.publish(jobs, &payload, CEILING_WINDOW).await?;
    let c_con = ceiling.consume(jobs, prefetch, deadline_for(jobs)).await?;
    ceiling.delete().await;

    let warm = (CONCURRENCY as u64).min(jobs);
    eprintln!("io: warm-up with {warm} jobs");
    enqueue(&client, &queue, "io.sleep", &payload, warm).await?;
    drain(config.clone(), warm).await?;

    eprintln!(
        "io: {jobs} io.sleep jobs of {} ms, {CONCURRENCY} at once",
        SLEEP.as_millis()
    );
    let mut drains = Vec::new();
    let mut not_ok = 0;
    let mut t_pub = Duration::MAX;
    for round in 0..rounds {
        eprintln!("io: round {} of {rounds}", round + 1);
        t_pub = t_pub.min(enqueue(&client, &queue, "io.sleep", &payload, jobs).await?);
        let d = drain(config.clone(), jobs).await?;
        ensure!(d.jobs == jobs, "{} of {jobs} io jobs drained", d.jobs);
        not_ok += d.not_ok;
        drains.push(d.elapsed.as_secs_f64());
    }
    client.close().await;

    eprintln!("io: memory of a worker process, idle and with {in_flight} jobs in flight");
    let mem = rss::probe(b, in_flight).await?;

    let drain_s = drains.iter().copied().fold(f64::MAX, f64::min);
    let ideal_s = jobs as f64 * SLEEP.as_secs_f64() / CONCURRENCY as f64;
    let bound_s = ideal_s.max(jobs as f64 / noop_rate);
    let idle_mb = mb(mem.idle.rss_bytes);
    let loaded_mb = mb(mem.loaded.rss_bytes);
    let rows = vec![
        Row::times("drain s vs ideal N*0.1/C", drain_s, ideal_s),
        Row::times("drain s vs max(ideal, N/noop)", drain_s, bound_s).with(Target::at_most(
            drain_s / bound_s,
            1.1,
            "<= 1.1 x".into(),
            " x",
        )),
        Row::times(
            "drain s vs bare consume",
            drain_s,
            c_con.elapsed.as_secs_f64(),
        ),
        Row::value("worker RSS idle MB", idle_mb).with(Target::at_most(
            idle_mb,
            IDLE_RSS_MB,
            format!("<= {IDLE_RSS_MB:.0} MB"),
            " MB",
        )),
        Row::value(
            format!("worker RSS, {} in flight MB", mem.in_flight),
            loaded_mb,
        )
        .with(Target::at_most(
            loaded_mb,
            LOADED_RSS_MB,
            format!("<= {LOADED_RSS_MB:.0} MB"),
            " MB",
        )),
    ];
    let json = json!({
        "jobs": jobs,
        "sleep_ms": SLEEP.as_millis() as u64,
        "concurrency": CONCURRENCY,
        "rounds": rounds,
        "jobs_drained": jobs,
        "jobs_not_ok": not_ok,
        "drain_s": drain_s,
        "per_round_drain_s": drains,
        "ideal_s": ideal_s,
        "noop_drain_jobs_per_s": noop_rate,
        "bound_s": bound_s,
        "drain_vs_ideal": drain_s / ideal_s,
        "drain_vs_bound": drain_s / bound_s,
        "taskmill_publish_jobs_per_s": crate::harness::per_second(jobs, t_pub),
        "ceiling_publish_jobs_per_s": c_pub.per_second(),
        "ceiling_consume_s": c_con.elapsed.as_secs_f64(),
        "worker_memory": mem,
    });
    Ok(ScenarioReport {
        scenario: "io",
        rows,
        json,
    })
}
