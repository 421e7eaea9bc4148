//! Memory of a worker process on its own: idle, and with many IO jobs in
//! flight.
//!
//! The probe runs the real `taskmill worker` (this binary) as a child, so its
//! resident size is the worker's alone: not the benchmark's publisher, the
//! ceiling's buffers or what the allocator kept from earlier scenarios. The
//! jobs are published from this process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::harness::{Bench, Memory, enqueue};

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
pub(crate) async fn probe(b: &Bench, in_flight: u16) -> anyhow::Result<WorkerMemory> {
    let queue = b.queue("io-rss", "jobs");
    let addr = free_local_addr()?;
    let exe = std::env::current_exe().context("locating the taskmill binary")?;
    let mut child = tokio::process::Command::new(exe)
        .args(["worker", "--queue", &queue])
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
        .env("TASKMILL_STORE_URL", super::harness::MEMORY_STORE)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting `taskmill worker` for the memory probe")?;
    let pid = child.id().context("the probe worker has no pid")?;
    let result = async {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the probe worker exited early with {status}");
            }
            if matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "the probe worker was not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
            anyhow::ensure!(
                Instant::now() < until,
                "only {running} of {in_flight} probe jobs were in flight at once"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (_, metrics) = http_get(addr, "/metrics").await?;
            running = in_flight_gauge(&metrics, &queue).unwrap_or(0);
        }
        let loaded = Memory::of_pid(pid);
        let children = children_of(pid);
        Ok(WorkerMemory {
            idle,
            loaded,
            in_flight: running,
            children_rss_bytes: children.iter().map(|c| Memory::of_pid(*c).rss_bytes).sum(),
            children: children.len(),
        })
    }
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// A loopback address with a port free right now, for a child worker's HTTP
/// server.
pub(crate) fn free_local_addr() -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The child processes of `pid` (from every thread's `children` list).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The samples of metric `name` with label `queue="<queue>"` in a
/// Prometheus text exposition: each sample's line and value.
pub(crate) fn samples<'a>(
    metrics: &'a str,
    name: &str,
    queue: &str,
) -> impl Iterator<Item = (&'a str, f64)> {
    let prefix = format!("{name}{{");
    let label = format!("queue=\"{queue}\"");
    metrics
        .lines()
        .filter(move |l| l.starts_with(&prefix) && l.contains(&label))
        .filter_map(|l| Some((l, l.rsplit(' ').next()?.parse::<f64>().ok()?)))
}

/// The value of `taskmill_jobs_in_flight{...queue="<queue>"...}`.
fn in_flight_gauge(metrics: &str, queue: &str) -> Option<u64> {
    samples(metrics, "taskmill_jobs_in_flight", queue)
        .map(|(_, v)| v as u64)
        .reduce(|a, b| a + b)
}

/// A plain HTTP/1.1 GET on loopback; returns (status, body).
pub(crate) async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("GET timed out")??;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
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
