//! `noop`: how fast taskmill moves jobs that do nothing, against the bare
//! broker loop.
//!
//! Three phases, each done by the ceiling and then by taskmill on its own
//! fresh queue: publish everything with no consumer (client `enqueue_many`
//! against pipelined confirms), drain the full queue (a worker started after
//! the publish against a bare consume-and-ack loop), and overlapped (consumer
//! up first, then publish; first publish to last ack).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use taskmill_broker::ceiling::Ceiling;
use taskmill_client::Client;
use taskmill_core::config::Config;

use crate::error::ensure;
use crate::harness::{
    Bench, CEILING_WINDOW, Drained, InProcessWorker, Tally, cpu_time, cpu_us_per, deadline_for,
    drain, enqueue, json_payload, per_second,
};
use crate::report::{Row, ScenarioReport, Target, pct};

/// Payload of a noop job, in bytes.
pub(crate) const PAYLOAD_BYTES: usize = 1024;
/// Jobs by default.
pub(crate) const DEFAULT_JOBS: u64 = 200_000;

/// Rates of one side (taskmill or ceiling) over the rounds, in jobs/s.
#[derive(Debug, Default, Serialize)]
struct Rates {
    publish: Vec<f64>,
    drain: Vec<f64>,
    end_to_end: Vec<f64>,
    /// CPU of this process per job while publishing, in µs.
    publish_cpu_us: Vec<f64>,
    /// CPU of this process per job while draining, in µs.
    drain_cpu_us: Vec<f64>,
}

/// Runs the scenario with `jobs` jobs, `rounds` times (the sides alternate
/// which goes first; the best round of each counts); remembers the drain rate
/// in `b`.
pub(crate) async fn run(b: &Bench, jobs: u64, rounds: u32) -> crate::Result<ScenarioReport> {
    let payload = json_payload(PAYLOAD_BYTES);
    let concurrency = b.config.concurrency;
    let deadline = deadline_for(jobs);
    let queue = b.queue("noop", "jobs");
    let config = b.worker_config(&queue, concurrency);
    // The ceiling consumes under the same prefetch as the worker.
    let prefetch = config.queue_settings(&queue).prefetch;
    b.declare(&queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;
    let ceiling = b.ceiling("noop").await?;
    let side = Side {
        client: &client,
        queue: &queue,
        config: &config,
        payload: &payload,
        ceiling: &ceiling,
        prefetch,
        deadline,
    };

    // Warm-up: broker queue processes, connections, allocator.
    let warm = (jobs / 20).clamp(500, 10_000).min(jobs);
    eprintln!("noop: warm-up with {warm} messages");
    side.ceiling_publish_drain(warm, &mut Rates::default())
        .await?;
    side.taskmill_publish_drain(warm).await?;

    let mut t = Rates::default();
    let mut c = Rates::default();
    let mut not_ok = 0;
    let mut drained = u64::MAX;
    for round in 0..rounds {
        eprintln!(
            "noop: round {} of {rounds}: publish then drain, then overlapped; {jobs} jobs",
            round + 1
        );
        let ceiling_first = round % 2 == 0;
        let (cp, cd, tp, td, tpc);
        if ceiling_first {
            (cp, cd) = side.ceiling_publish_drain(jobs, &mut c).await?;
            (tp, tpc, td) = side.taskmill_publish_drain(jobs).await?;
        } else {
            (tp, tpc, td) = side.taskmill_publish_drain(jobs).await?;
            (cp, cd) = side.ceiling_publish_drain(jobs, &mut c).await?;
        }
        t.publish_cpu_us.push(cpu_us_per(tpc, jobs));
        t.drain_cpu_us.push(cpu_us_per(td.cpu, jobs));
        drained = drained.min(td.jobs);
        not_ok += td.not_ok;
        let (ce, te);
        if ceiling_first {
            ce = side.ceiling_overlapped(jobs).await?;
            te = side.taskmill_overlapped(jobs).await?;
        } else {
            te = side.taskmill_overlapped(jobs).await?;
            ce = side.ceiling_overlapped(jobs).await?;
        }
        not_ok += te.1;
        c.publish.push(cp);
        c.drain.push(cd);
        c.end_to_end.push(ce);
        t.publish.push(per_second(jobs, tp));
        t.drain.push(td.per_second());
        t.end_to_end.push(te.0);
    }
    ceiling.delete().await;
    client.close().await;
    ensure!(drained == jobs, "{drained} of {jobs} jobs drained");

    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let least = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let phases = [
        ("publish", &t.publish, &c.publish, Some(80.0)),
        ("drain", &t.drain, &c.drain, Some(80.0)),
        ("end-to-end", &t.end_to_end, &c.end_to_end, None),
    ];
    b.set_noop_rate(best(&t.drain));
    let mut rows = Vec::new();
    let mut json = json!({
        "jobs": jobs,
        "rounds": rounds,
        "payload_bytes": PAYLOAD_BYTES,
        "warmup_jobs": warm,
        "concurrency": concurrency,
        "prefetch": prefetch,
        "jobs_drained": drained,
        "jobs_not_ok": not_ok,
        "per_round_jobs_per_s": { "taskmill": t, "ceiling": c },
    });
    let obj = json.as_object_mut().expect("an object");
    for (name, taskmill, ceiling, min_pct) in phases {
        let (taskmill, ceiling) = (best(taskmill), best(ceiling));
        let mut row = Row::pct(format!("{name} jobs/s"), taskmill, ceiling);
        if let Some(min) = min_pct {
            row = row.with(Target::at_least(
                pct(taskmill, ceiling),
                min,
                format!(">= {min:.0} % of ceiling"),
            ));
        }
        rows.push(row);
        obj.insert(
            name.replace('-', "_"),
            json!({
                "taskmill_jobs_per_s": taskmill,
                "ceiling_jobs_per_s": ceiling,
                "pct_of_ceiling": pct(taskmill, ceiling),
            }),
        );
    }
    // CPU per job: the least of the rounds (noise only adds).
    for (name, t_cpu, c_cpu) in [
        ("publish", &t.publish_cpu_us, &c.publish_cpu_us),
        ("drain", &t.drain_cpu_us, &c.drain_cpu_us),
    ] {
        let (t_cpu, c_cpu) = (least(t_cpu), least(c_cpu));
        rows.push(Row::times(format!("{name} CPU us/job"), t_cpu, c_cpu));
        obj.insert(
            format!("{name}_cpu_us_per_job"),
            json!({ "taskmill": t_cpu, "ceiling": c_cpu }),
        );
    }
    Ok(ScenarioReport {
        scenario: "noop",
        rows,
        json,
    })
}

/// What both sides of a round need.
struct Side<'a> {
    client: &'a Client,
    queue: &'a str,
    config: &'a Config,
    payload: &'a [u8],
    ceiling: &'a Ceiling,
    prefetch: u16,
    deadline: Duration,
}

impl Side<'_> {
    /// Ceiling publish then consume rates; their CPU per message goes to
    /// `cpu`.
    async fn ceiling_publish_drain(&self, n: u64, cpu: &mut Rates) -> crate::Result<(f64, f64)> {
        let before = cpu_time();
        let p = self
            .ceiling
            .publish(n, self.payload, CEILING_WINDOW)
            .await?;
        let between = cpu_time();
        let c = self
            .ceiling
            .consume(n, self.prefetch, self.deadline)
            .await?;
        let after = cpu_time();
        cpu.publish_cpu_us.push(cpu_us_per(between - before, n));
        cpu.drain_cpu_us.push(cpu_us_per(after - between, n));
        Ok((p.per_second(), c.per_second()))
    }

    /// taskmill: `enqueue_many` with no worker running, then a worker
    /// drains. Returns the publish time and its CPU, and the drain.
    async fn taskmill_publish_drain(&self, n: u64) -> crate::Result<(Duration, Duration, Drained)> {
        let before = cpu_time();
        let p = enqueue(self.client, self.queue, "noop", self.payload, n).await?;
        let cpu = cpu_time().saturating_sub(before);
        let d = drain(self.config.clone(), n).await?;
        Ok((p, cpu, d))
    }

    /// Ceiling: consumer up, then publish; first publish to last ack.
    async fn ceiling_overlapped(&self, n: u64) -> crate::Result<f64> {
        let p = self
            .ceiling
            .round_trip(
                n,
                self.payload,
                CEILING_WINDOW,
                self.prefetch,
                self.deadline,
            )
            .await?;
        Ok(p.per_second())
    }

    /// taskmill: worker up, then `enqueue_many`; first publish to last ack.
    /// Returns the rate and the jobs not `ok`.
    async fn taskmill_overlapped(&self, n: u64) -> crate::Result<(f64, u64)> {
        let worker = InProcessWorker::start(self.config.clone(), Tally::default()).await?;
        let start = Instant::now();
        let published = enqueue(self.client, self.queue, "noop", self.payload, n).await;
        let waited = worker.tally.wait_for(n, self.deadline).await;
        let last = worker.tally.last_done();
        let not_ok = worker.tally.not_ok();
        worker.stop().await?;
        published?;
        waited?;
        let took = last.map_or_else(|| start.elapsed(), |l| l.saturating_duration_since(start));
        Ok((per_second(n, took), not_ok))
    }
}

/// The noop drain rate: the one measured earlier in this run, or a quick
/// measurement of `jobs` jobs (publish, then drain) now.
pub(crate) async fn drain_rate(b: &Bench, jobs: u64) -> crate::Result<f64> {
    if let Some(r) = b.known_noop_rate() {
        return Ok(r);
    }
    eprintln!("measuring the noop drain rate with {jobs} jobs");
    let payload = json_payload(PAYLOAD_BYTES);
    let queue = b.queue("noop-rate", "jobs");
    b.declare(&queue).await?;
    let client = b.client(b.config.max_payload_bytes).await?;
    let config = b.worker_config(&queue, b.config.concurrency);
    let warm = (jobs / 10).clamp(100, 5_000).min(jobs);
    enqueue(&client, &queue, "noop", &payload, warm).await?;
    drain(config.clone(), warm).await?;
    enqueue(&client, &queue, "noop", &payload, jobs).await?;
    let d = drain(config, jobs).await?;
    client.close().await;
    let rate = d.per_second();
    ensure!(rate > 0.0, "the noop drain could not be timed");
    b.set_noop_rate(rate);
    Ok(rate)
}
