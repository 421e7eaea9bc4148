//! A real Prometheus server scrapes the worker's `/metrics` every second and
//! its query API reports exactly the number of jobs the worker ran.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_worker::WorkerBuilder;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const JOBS: usize = 25;

/// A Prometheus server, killed, reaped and its data removed when dropped
/// (a failing assertion included).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    fn start(target: SocketAddr) -> Prometheus {
        let bin = ["prometheus", PROMETHEUS]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect(
                "the Prometheus server is missing: install Debian's `prometheus` package \
                 (`make promtool` does it)",
            );
        let dir = std::env::temp_dir().join(format!(
            "taskmill-prometheus-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: taskmill\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        Prometheus { child, dir, addr }
    }

    /// Its log, for failure messages.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant-vector query with at most one series; `None`
/// while Prometheus has no sample (or is not up yet).
async fn query(prom: SocketAddr, promql: &str) -> Option<f64> {
    let (status, body) =
        common::http_get(prom, &format!("/api/v1/query?query={}", url_encode(promql)))
            .await
            .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    assert_eq!(v["status"], "success", "{body}");
    let result = v["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{body}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_job_count() {
    let queue = common::unique_queue("prom");
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io(
            "test.noop",
            |_ctx, _p: serde_json::Value| async move { Ok(()) },
        )
        .on_job_done(move |_| {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;
    let prom = Prometheus::start(handle.http_addr);

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    client
        .enqueue_many((0..JOBS).map(|n| NewJob::new("test.noop", &n).unwrap().queue(&queue)))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || done.load(Ordering::SeqCst)
            >= JOBS)
        .await,
        "only {} of {JOBS} jobs ran",
        done.load(Ordering::SeqCst)
    );

    let promql = format!("sum(taskmill_jobs_total{{queue=\"{queue}\"}})");
    let until = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < until {
        last = query(prom.addr, &promql).await;
        if last == Some(JOBS as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        last,
        Some(JOBS as f64),
        "Prometheus at {} never reported {JOBS} for `{promql}`; its log:\n{}",
        prom.addr,
        prom.log()
    );
    // The scrape itself was healthy.
    assert_eq!(
        query(prom.addr, "up{job=\"taskmill\"}").await,
        Some(1.0),
        "{}",
        prom.log()
    );

    drop(prom);
    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&client.broker().await.unwrap(), &queue).await;
    let _ = std::fs::remove_dir_all(common::data_dir(&queue));
}
