//! `latency`: enqueue-to-start latency under an open-loop load.
//!
//! A publisher sends noop jobs on a fixed schedule (10 %, 50 % and 80 % of the
//! noop drain rate measured in this run, or `--rate`) for a fixed time,
//! whatever the confirms do: they are awaited by another task, so a slow
//! broker or worker makes the queue grow and shows up in the latency instead
//! of slowing the publisher down. The latency is each job's `queue_wait`:
//! from the enqueue timestamp it carries (`taskmill-enqueued-at-us`) to the
//! start of its handler. The ceiling runs the same schedule with a bare
//! publisher and consumer (send time carried in the body, taken at delivery).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskmill_broker::{Broker, Outgoing, PendingConfirm, Publisher};
use taskmill_core::Envelope;

use crate::error::ensure;
use crate::harness::{Bench, InProcessWorker, Tally, json_payload};
use crate::noop;
use crate::report::{Row, ScenarioReport, Target, millis};
use crate::stats::quantile;

/// Fractions of the noop drain rate tried by default.
const FRACTIONS: [f64; 3] = [0.1, 0.5, 0.8];
/// Targets at 50 % of the drain rate (classic queues), in ms.
const P50_MS: f64 = 2.0;
const P99_MS: f64 = 10.0;

/// One load level.
struct Level {
    label: String,
    fraction: Option<f64>,
    rate: f64,
}

/// Runs the scenario: each level for `seconds`. Without `rate`, the levels
/// are fractions of the noop drain rate (measured with `rate_jobs` jobs when
/// this run has none yet).
pub(crate) async fn run(
    b: &Bench,
    rate: Option<f64>,
    seconds: f64,
    rate_jobs: u64,
) -> crate::Result<ScenarioReport> {
    ensure!(
        seconds > 0.0 && seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    let levels: Vec<Level> = match rate {
        Some(r) => {
            ensure!(r > 0.0, "--rate must be positive");
            vec![Level {
                label: format!("{r:.0}/s"),
                fraction: None,
                rate: r,
            }]
        }
        None => {
            let noop_rate = noop::drain_rate(b, rate_jobs).await?;
            FRACTIONS
                .iter()
                .map(|f| Level {
                    label: format!("{:.0} % ({:.0}/s)", f * 100.0, noop_rate * f),
                    fraction: Some(*f),
                    rate: noop_rate * f,
                })
                .collect()
        }
    };
    let duration = Duration::from_secs_f64(seconds);
    let payload = json_payload(noop::PAYLOAD_BYTES);
    let queue = b.queue("latency", "jobs");
    let config = b.worker_config(&queue, b.config.concurrency);
    let prefetch = config.queue_settings(&queue).prefetch;
    let worker = InProcessWorker::start(config, Tally::keeping_waits()).await?;
    let producer = Broker::connect(&b.config.amqp_url, "taskmill bench producer").await?;
    let publisher = producer.publisher().await?;
    let ceiling = b.ceiling("latency").await?;
    let result = async {
        // Warm-up: one second at the lowest level, not recorded.
        let warm = Duration::from_secs(1);
        let lowest = levels.iter().map(|l| l.rate).fold(f64::MAX, f64::min);
        eprintln!("latency: warm-up, 1 s at {lowest:.0} jobs/s");
        let (sent, _) = open_loop(
            &publisher,
            "noop",
            &queue,
            &payload,
            lowest,
            warm,
            b.config.max_payload_bytes,
        )
        .await?;
        worker.tally.wait_for(sent, Duration::from_secs(60)).await?;
        worker.tally.take_waits();
        ceiling
            .open_loop(
                lowest,
                warm,
                noop::PAYLOAD_BYTES,
                prefetch,
                Duration::from_secs(60),
            )
            .await?;

        let mut rows = Vec::new();
        let mut levels_json = Vec::new();
        let mut not_ok = 0;
        for level in &levels {
            eprintln!(
                "latency: {} for {seconds} s (taskmill, then ceiling)",
                level.label
            );
            let before = worker.tally.done();
            let (sent, lag) = open_loop(
                &publisher,
                "noop",
                &queue,
                &payload,
                level.rate,
                duration,
                b.config.max_payload_bytes,
            )
            .await?;
            worker
                .tally
                .wait_for(before + sent, duration + Duration::from_secs(120))
                .await?;
            let mut waits = worker.tally.take_waits();
            waits.sort();
            let ceiling_run = ceiling
                .open_loop(
                    level.rate,
                    duration,
                    noop::PAYLOAD_BYTES,
                    prefetch,
                    duration + Duration::from_secs(120),
                )
                .await?;
            let mut c_waits = ceiling_run.latencies;
            c_waits.sort();
            let mut lag = lag;
            lag.sort();
            let mut c_lag = ceiling_run.publish_lag;
            c_lag.sort();

            let at_half = level.fraction == Some(0.5);
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
                let t = ms(quantile(&waits, q));
                let c = ms(quantile(&c_waits, q));
                let mut row = Row::times(format!("{} {name} ms", level.label), t, c);
                let limit = match name {
                    "p50" => Some(P50_MS),
                    "p99" => Some(P99_MS),
                    _ => None,
                };
                if let (true, Some(limit)) = (at_half, limit) {
                    let target = Target::at_most(t, limit, format!("<= {limit:.0} ms"), " ms");
                    // The issue sets the latency targets for classic queues.
                    row = row.with(
                        if b.queue_type == taskmill_core::config::QueueType::Classic {
                            target
                        } else {
                            target.informative()
                        },
                    );
                }
                rows.push(row);
            }
            rows.push(Row::times(
                format!("{} publisher lag p99 ms", level.label),
                ms(quantile(&lag, 0.99)),
                ms(quantile(&c_lag, 0.99)),
            ));
            levels_json.push(json!({
                "level": level.label,
                "fraction_of_noop_drain": level.fraction,
                "rate_jobs_per_s": level.rate,
                "seconds": seconds,
                "jobs": sent,
                "samples": waits.len(),
                "taskmill_ms": summary(&waits),
                "ceiling_ms": summary(&c_waits),
                "ceiling_samples": c_waits.len(),
                "publish_lag_ms": summary(&lag),
                "ceiling_publish_lag_ms": summary(&c_lag),
            }));
        }
        not_ok += worker.tally.not_ok();
        Ok::<_, crate::Error>((rows, levels_json, not_ok))
    }
    .await;
    ceiling.delete().await;
    producer.close().await;
    worker.stop().await?;
    let (rows, levels_json, not_ok) = result?;
    Ok(ScenarioReport {
        scenario: "latency",
        rows,
        json: json!({
            "payload_bytes": noop::PAYLOAD_BYTES,
            "concurrency": b.config.concurrency,
            "prefetch": prefetch,
            "jobs_not_ok": not_ok,
            "levels": levels_json,
        }),
    })
}

/// A duration in ms, 0 for none.
pub(crate) fn ms(d: Option<Duration>) -> f64 {
    d.map_or(0.0, millis)
}

/// p50, p99, p99.9 and max of `sorted` (ascending), in ms.
pub(crate) fn summary(sorted: &[Duration]) -> Value {
    json!({
        "p50": ms(quantile(sorted, 0.5)),
        "p99": ms(quantile(sorted, 0.99)),
        "p999": ms(quantile(sorted, 0.999)),
        "max": ms(sorted.last().copied()),
    })
}

/// Publishes `kind` jobs to `queue` at `rate` per second for `duration`, on
/// schedule: each publish is sent when due and its confirm is awaited by
/// another task. Returns how many were sent and how late each send was.
pub(crate) async fn open_loop(
    publisher: &Publisher,
    kind: &str,
    queue: &str,
    payload: &[u8],
    rate: f64,
    duration: Duration,
    max_payload_bytes: usize,
) -> crate::Result<(u64, Vec<Duration>)> {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PendingConfirm>();
    let confirming = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            p.wait().await?;
        }
        Ok::<(), taskmill_broker::PublishError>(())
    });
    let mut lag = Vec::with_capacity(total as usize);
    let start = Instant::now();
    let due = |i: u64| start + Duration::from_secs_f64(i as f64 / rate);
    let mut sent = 0u64;
    while sent < total {
        let next = due(sent);
        if next > Instant::now() {
            tokio::time::sleep_until(next.into()).await;
        }
        // Send everything due by now: the timer ticks in milliseconds.
        let now = Instant::now();
        while sent < total && due(sent) <= now {
            // The job is stamped now, as `enqueue` would stamp it.
            let mut env =
                Envelope::new(taskmill_broker::new_job_id(), kind, queue, payload.to_vec());
            env.enqueued_at_us = Some(taskmill_broker::now_us());
            env.validate(max_payload_bytes)?;
            lag.push(Instant::now().saturating_duration_since(due(sent)));
            let pending = publisher.send(&Outgoing::job(&env)).await?;
            let _ = tx.send(pending);
            sent += 1;
        }
    }
    drop(tx);
    confirming.await??;
    Ok((sent, lag))
}
