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

/// A plain HTTP/1.0 GET (so no server chunks the body); returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
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

// ---- Fault-tolerance helpers: real worker processes, per-test databases ----

/// The PostgreSQL server the tests use (no database part): `TASKMILL_STORE_TEST_PG`
/// (shared with the store crate's tests), default `postgres://postgres@127.0.0.1:5432`.
pub fn pg_server_url() -> String {
    std::env::var("TASKMILL_STORE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// A PostgreSQL database created for one test and dropped (`WITH (FORCE)`)
/// when this value is dropped, also when the test fails.
pub struct PgDb {
    /// Database name, `tm_<uuid>`.
    pub name: String,
}

impl PgDb {
    /// Creates a fresh, empty database through the `psql` CLI.
    pub fn create() -> PgDb {
        let name = format!("tm_{}", uuid::Uuid::new_v4().simple());
        psql(
            &format!("{}/postgres", pg_server_url()),
            &format!("CREATE DATABASE {name}"),
        );
        PgDb { name }
    }

    /// The store URL of this database.
    pub fn url(&self) -> String {
        format!("{}/{}", pg_server_url(), self.name)
    }

    /// Runs `sql` in this database; returns psql's unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url(), sql)
    }

    /// Runs a query that returns one integer.
    pub fn count(&self, sql: &str) -> i64 {
        let out = self.query(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("`{sql}` returned {out:?}: {e}"))
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg(format!("{}/postgres", pg_server_url()))
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Runs one SQL command with `psql` (unaligned, tuples only) and returns its
/// output; panics with psql's error when it fails.
pub fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql])
        .output()
        .expect("the tests need the psql CLI");
    assert!(
        out.status.success(),
        "psql `{sql}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("psql output is UTF-8")
}

/// A scratch directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir, named after `name`.
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "taskmill-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside it.
    pub fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real `taskmill worker` process. Dropping it kills it (SIGKILL) and
/// reaps it, so no worker outlives a failed test; when the test is failing,
/// the end of the worker's log is printed to help the diagnosis.
pub struct WorkerProcess {
    child: Option<std::process::Child>,
    /// The worker's HTTP endpoint (`/readyz`, `/metrics`).
    pub addr: std::net::SocketAddr,
    /// A name for messages.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: std::path::PathBuf,
}

impl WorkerProcess {
    /// Spawns `taskmill worker` with `TASKMILL_AMQP_URL` and a free
    /// `TASKMILL_HTTP_ADDR`, then `env` (which may override them). Inherited
    /// `TASKMILL_*` variables are removed: the worker refuses unknown ones,
    /// and the test alone decides the configuration. Output goes to
    /// `log_dir/<name>.log`.
    pub fn spawn(name: &str, env: &[(&str, String)], log_dir: &std::path::Path) -> WorkerProcess {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_taskmill"));
        cmd.arg("worker");
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKMILL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKMILL_AMQP_URL", amqp_url())
            .env("TASKMILL_HTTP_ADDR", addr.to_string())
            .env("TASKMILL_WORKER_ID", format!("{name}-{}", addr.port()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn taskmill worker");
        WorkerProcess {
            child: Some(child),
            addr,
            name: name.to_string(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until `/readyz` answers 200; panics if the process exits or
    /// `timeout` passes first.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "worker {} exited before it was ready: {status}\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if http_get(self.addr, "/readyz")
                .await
                .map(|r| r.0)
                .unwrap_or(0)
                == 200
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "worker {} not ready within {timeout:?}\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.addr, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("scrape {}: {e}", self.name));
        assert_eq!(status, 200, "scrape {}", self.name);
        body
    }

    /// `kill -9`: no drain, no acks, no store writes after this point.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit (graceful drain); returns the status.
    /// SIGKILL after `timeout`, and panics then.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "worker {} did not exit within {timeout:?} of SIGTERM",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last `n` lines of the worker's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("{}", self.log_tail(30));
            }
        }
    }
}

/// The sum of every sample of `name` whose labels include all of `labels`
/// (`key="value"` pairs), in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if ok { value.parse::<f64>().ok() } else { None }
        })
        .fold(0.0, |a, b| a + b)
}

/// Ready messages in `queue` after they settle: the broker requeues a closed
/// channel's unacked messages asynchronously, so poll until the count holds
/// the same for a while (or `timeout`), and return it.
pub async fn settled_depth(broker: &Broker, queue: &str, timeout: Duration) -> u32 {
    let until = Instant::now() + timeout;
    let mut last = broker.queue_depth(queue).await.unwrap();
    let mut same_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = broker.queue_depth(queue).await.unwrap();
        if d != last {
            last = d;
            same_since = Instant::now();
        }
        if same_since.elapsed() >= Duration::from_millis(1000) || Instant::now() > until {
            return last;
        }
    }
}
