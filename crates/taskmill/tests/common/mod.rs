//! Helpers shared by the integration tests. Every test uses its own queue
//! names, so tests run in parallel against one broker and leave nothing behind.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use taskmill_broker::Broker;
use taskmill_core::config::Config;

/// The broker the tests use: the local one, or `TEST_AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| taskmill_core::config::DEFAULT_AMQP_URL.to_string())
}

/// A queue name unique to this test run.
pub fn unique_queue(test: &str) -> String {
    format!(
        "t-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A worker config serving `queue` with an ephemeral HTTP port.
pub fn config(queue: &str) -> Config {
    Config {
        amqp_url: amqp_url(),
        queues: vec![queue.to_string()],
        http_addr: "127.0.0.1:0".parse().unwrap(),
        worker_id: Some(format!("test-{queue}")),
        shutdown_grace_ms: 5_000,
        data_dir: data_dir(queue),
        ..Config::default()
    }
}

/// A scratch data dir (for the embedded SQLite store) unique to `queue`.
pub fn data_dir(queue: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("taskmill-test-{queue}"))
}

pub async fn broker() -> Broker {
    Broker::connect(&amqp_url(), "taskmill tests")
        .await
        .expect("the tests need RabbitMQ at TEST_AMQP_URL or 127.0.0.1:5672 (make test starts it)")
}

/// Deletes `queue` and its dead-letter queue.
pub async fn cleanup(broker: &Broker, queue: &str) {
    let _ = broker.delete_queue(queue).await;
    let _ = broker.delete_queue(&format!("{queue}.dead")).await;
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
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

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Pids and states (`R`, `S`, `Z`, ...) of the processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let parent: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == ppid {
            out.push((pid, state));
        }
    }
    out
}

/// Whether process `pid` is running (exists and is not a zombie).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}
