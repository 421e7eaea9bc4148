//! `payload`: large jobs, in MB/s against the ceiling with the same sizes.
//!
//! For each size: the ceiling publishes and consumes the same number of
//! same-size messages, then taskmill publishes with `enqueue_many` and a worker
//! started afterwards drains the queue. The payload is a JSON string of
//! exactly the given size; the worker's `max_payload_bytes` is raised so the
//! 1 MiB case fits.

use serde_json::{Value, json};

use crate::error::ensure;
use crate::harness::{
    Bench, CEILING_WINDOW, deadline_for, drain, enqueue, json_payload, per_second,
};
use crate::report::{Row, ScenarioReport, pct};

/// 64 KiB.
pub(crate) const KIB_64: usize = 64 * 1024;
/// 1 MiB.
pub(crate) const MIB_1: usize = 1024 * 1024;
/// Jobs of 64 KiB by default; 1 MiB jobs are a tenth of it.
pub(crate) const DEFAULT_JOBS: u64 = 2_000;
/// `max_payload_bytes` for the bench: room above 1 MiB.
const MAX_PAYLOAD: usize = 2 * MIB_1;

/// Runs 64 KiB x `jobs_64k` and 1 MiB x `jobs_1m`.
pub(crate) async fn run(
    b: &Bench,
    jobs_64k: u64,
    jobs_1m: u64,
    rounds: u32,
) -> crate::Result<ScenarioReport> {
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    for (label, size, jobs) in [("64 KiB", KIB_64, jobs_64k), ("1 MiB", MIB_1, jobs_1m)] {
        let (mut r, j) = one_size(b, label, size, jobs, rounds).await?;
        rows.append(&mut r);
        sizes.push(j);
    }
    Ok(ScenarioReport {
        scenario: "payload",
        rows,
        json: json!({ "sizes": sizes, "max_payload_bytes": MAX_PAYLOAD }),
    })
}

async fn one_size(
    b: &Bench,
    label: &str,
    size: usize,
    jobs: u64,
    rounds: u32,
) -> crate::Result<(Vec<Row>, Value)> {
    let payload = json_payload(size);
    let role = format!("{}k", size / 1024);
    let queue = b.queue("payload", &role);
    let mut config = b.worker_config(&queue, b.config.concurrency);
    config.max_payload_bytes = MAX_PAYLOAD;
    let prefetch = config.queue_settings(&queue).prefetch;
    let deadline = deadline_for(jobs * (size as u64 / 1024).max(1));
    b.declare(&queue).await?;
    let client = b.client(MAX_PAYLOAD).await?;
    let ceiling = b.ceiling(&format!("payload-{role}")).await?;

    let warm = (jobs / 10).max(5).min(jobs);
    eprintln!("payload {label}: warm-up with {warm} messages");
    ceiling.publish(warm, &payload, CEILING_WINDOW).await?;
    ceiling.consume(warm, prefetch, deadline).await?;
    enqueue(&client, &queue, "noop", &payload, warm).await?;
    drain(config.clone(), warm).await?;

    let mbps = |per_s: f64| per_s * size as f64 / 1e6;
    let (mut tp, mut cp, mut td, mut cd) = (0f64, 0f64, 0f64, 0f64);
    let mut not_ok = 0;
    for round in 0..rounds {
        eprintln!(
            "payload {label}: round {} of {rounds}, {jobs} jobs",
            round + 1
        );
        let ceiling_first = round % 2 == 0;
        if !ceiling_first {
            let (p, d) = taskmill_side(&client, &queue, &config, &payload, jobs).await?;
            not_ok += d.not_ok;
            (tp, td) = (tp.max(mbps(p)), td.max(mbps(d.per_second())));
        }
        let p = ceiling.publish(jobs, &payload, CEILING_WINDOW).await?;
        let c = ceiling.consume(jobs, prefetch, deadline).await?;
        (cp, cd) = (cp.max(mbps(p.per_second())), cd.max(mbps(c.per_second())));
        if ceiling_first {
            let (p, d) = taskmill_side(&client, &queue, &config, &payload, jobs).await?;
            not_ok += d.not_ok;
            (tp, td) = (tp.max(mbps(p)), td.max(mbps(d.per_second())));
        }
    }
    ceiling.delete().await;
    client.close().await;
    let rows = vec![
        Row::pct(format!("{label} publish MB/s"), tp, cp),
        Row::pct(format!("{label} drain MB/s"), td, cd),
    ];
    let json = json!({
        "payload_bytes": size,
        "jobs": jobs,
        "rounds": rounds,
        "jobs_drained": jobs,
        "jobs_not_ok": not_ok,
        "prefetch": prefetch,
        "publish": {"taskmill_mb_per_s": tp, "ceiling_mb_per_s": cp, "pct_of_ceiling": pct(tp, cp)},
        "drain": {"taskmill_mb_per_s": td, "ceiling_mb_per_s": cd, "pct_of_ceiling": pct(td, cd)},
    });
    Ok((rows, json))
}

/// taskmill's publish rate (jobs/s) and its drain.
async fn taskmill_side(
    client: &taskmill_client::Client,
    queue: &str,
    config: &taskmill_core::config::Config,
    payload: &[u8],
    jobs: u64,
) -> crate::Result<(f64, crate::harness::Drained)> {
    let took = enqueue(client, queue, "noop", payload, jobs).await?;
    let d = drain(config.clone(), jobs).await?;
    ensure!(d.jobs == jobs, "{} of {jobs} jobs drained", d.jobs);
    Ok((per_second(jobs, took), d))
}
