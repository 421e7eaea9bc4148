//! Memory of a worker process on its own: idle, and with many IO jobs in
//! flight.
//!
//! The probe runs the real `taskmill worker` (the bench's worker program) as a
//! child, so its
//! resident size is the worker's alone: not the benchmark's publisher, the
//! ceiling's buffers or what the allocator kept from earlier scenarios. The
//! jobs are published from this process.

use std::time::{Duration, Instant};

use serde::Serialize;
use taskmill_testkit::http::free_local_addr;
use taskmill_testkit::metrics::samples;
use taskmill_testkit::process::children_of;
use taskmill_testkit::{TempDir, WorkerProcess};

use crate::error::{Context, ensure};
use crate::harness::{Bench, MEMORY_STORE, Memory, enqueue};

/// How long each probe job sleeps: long enough for all of them to be in
/// flight at once.
const HOLD_MS: u64 = 10_000;

/// What the probe saw.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct WorkerMemory {
    /// Connected, consuming, no job.
    pub(crate) idle: Memory,
    /// With `in_flight` jobs running at once.
    pub(crate) loaded: Memory,
    /// Jobs in flight when `loaded` was read.
    pub(crate) in_flight: u64,
    /// Resident bytes of the worker's child processes (the CPU pool), summed,
    /// when `loaded` was read; not part of `loaded`.
    pub(crate) children_rss_bytes: u64,
    /// How many child processes that is.
    pub(crate) children: usize,
}

/// Starts `taskmill worker` with concurrency `in_flight`, reads its memory
/// idle, publishes `in_flight` `io.sleep` jobs, reads it again once they all
/// run, then kills the worker (the jobs go back to the queue, which is deleted).
pub(crate) async fn probe(b: &Bench, in_flight: u16) -> crate::Result<WorkerMemory> {
    let queue = b.queue("io-rss", "jobs");
    let addr = free_local_addr()?;
    let mut cmd = std::process::Command::new(&b.worker_exe);
    cmd.args(["worker", "--queue", &queue])
        .args(["--concurrency", &in_flight.to_string(), "--prefetch", "0"])
        .args(["--queue-type", b.queue_type.as_str()])
        .args([
            "--http-addr",
            &addr.to_string(),
            "--shutdown-grace-ms",
            "1000",
        ])
        // In the environment, not argv, so the password stays out of `ps`.
        .env("TASKMILL_AMQP_URL", &b.config.amqp_url)
        .env("TASKMILL_LOG_LEVEL", "warn")
        .env("TASKMILL_CPU_QUEUE", &b.config.cpu_queue)
        .env("TASKMILL_STORE_URL", MEMORY_STORE);
    // Dropping it (also on error) kills and reaps it; the jobs go back to
    // the queue, which is deleted.
    let dir = TempDir::new(&format!("bench-io-rss-{}", b.run_id))?;
    let mut worker =
        WorkerProcess::spawn_command(cmd, addr, "the probe worker", &dir.join("worker.log"))
            .context("starting `taskmill worker` for the memory probe")?;
    worker.wait_ready(Duration::from_secs(30)).await?;
    let pid = worker.pid();
    // Let start-up allocations settle before calling it idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Memory::of_pid(pid);

    let client = b.client(b.config.max_payload_bytes).await?;
    let payload = format!("{{\"ms\": {HOLD_MS}}}").into_bytes();
    enqueue(&client, &queue, "io.sleep", &payload, u64::from(in_flight)).await?;
    client.close().await;
    let until = Instant::now() + Duration::from_millis(HOLD_MS - 1_000);
    let mut running = 0;
    while running < u64::from(in_flight) {
        ensure!(
            Instant::now() < until,
            "only {running} of {in_flight} probe jobs were in flight at once"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = worker.metrics().await?;
        running = in_flight_gauge(&metrics, &queue).unwrap_or(0);
    }
    let loaded = Memory::of_pid(pid);
    let children: Vec<u32> = children_of(pid).into_iter().map(|(c, _)| c).collect();
    Ok(WorkerMemory {
        idle,
        loaded,
        in_flight: running,
        children_rss_bytes: children.iter().map(|c| Memory::of_pid(*c).rss_bytes).sum(),
        children: children.len(),
    })
}

/// The value of `taskmill_jobs_in_flight{...queue="<queue>"...}`.
fn in_flight_gauge(metrics: &str, queue: &str) -> Option<u64> {
    samples(metrics, "taskmill_jobs_in_flight", queue)
        .map(|(_, v)| v as u64)
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gauge_of_one_queue() {
        let text = "# HELP x\ntaskmill_jobs_in_flight{class=\"io\",queue=\"a\"} 7\ntaskmill_jobs_in_flight{class=\"io\",queue=\"b\"} 3\n";
        assert_eq!(in_flight_gauge(text, "a"), Some(7));
        assert_eq!(in_flight_gauge(text, "c"), None);
    }
}
