//! What the integration tests of the `taskmill` crate share beyond
//! `taskmill-testkit`: the broker and database they use, unique queue names,
//! worker configs, the binary under test. Every test uses its own queue
//! names, so tests run in parallel against one broker and leave nothing behind.
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskmill_broker::Broker;
use taskmill_core::config::Config;
pub use taskmill_testkit::metrics::{metric_sum, metric_value};
pub use taskmill_testkit::process::{children_of, is_running};
pub use taskmill_testkit::{TempDir, WorkerProcess};
use taskmill_worker::{
    CancellationToken, JobError, JobReport, Worker, WorkerBuilder, WorkerHandle,
};

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

/// A plain HTTP GET on loopback; returns (status, body).
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(u16, String), taskmill_testkit::Error> {
    taskmill_testkit::http::get(addr, path).await
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    taskmill_testkit::http::free_port().expect("a free port")
}

/// Starts `worker` in this test's process and waits until it is ready;
/// returns its handle and the token that stops it.
pub async fn start(worker: Worker, ready_within: Duration) -> (WorkerHandle, CancellationToken) {
    taskmill_testkit::start_in_process(worker, ready_within)
        .await
        .expect("the in-process worker starts and becomes ready")
}

/// Every finished attempt of an in-process worker, with when it was seen.
pub type Reports = Arc<Mutex<Vec<(Instant, JobReport)>>>;

/// Starts an in-process worker with the built-in and diagnostic kinds (its
/// CPU processes are the binary under test) that records every finished
/// attempt; waits until it is ready.
pub async fn start_recording(
    config: Config,
    ready_within: Duration,
) -> (WorkerHandle, CancellationToken, Reports) {
    let reports: Reports = Arc::default();
    let r = reports.clone();
    let worker = taskmill::kinds::register(WorkerBuilder::new(config), true)
        .cpu_program(env!("CARGO_BIN_EXE_taskmill"))
        .on_job_done(move |rep| r.lock().unwrap().push((Instant::now(), rep.clone())))
        .build()
        .unwrap();
    let (handle, shutdown) = start(worker, ready_within).await;
    (handle, shutdown, reports)
}

/// How many times each `n` of a `test.count` job ran, by `n`.
pub type Counts = Arc<Mutex<Vec<u32>>>;

/// Payload of `test.count`.
#[derive(serde::Deserialize)]
struct Counted {
    n: usize,
}

/// `builder` with a `test.count` handler: a job `{"n": N}` adds one to the
/// count of `N`; an `N` outside `0..n` is a permanent error.
pub fn counting(builder: WorkerBuilder, n: usize) -> (WorkerBuilder, Counts) {
    let counts: Counts = Arc::new(Mutex::new(vec![0u32; n]));
    let c = counts.clone();
    let builder = builder.io("test.count", move |_ctx, p: Counted| {
        let c = c.clone();
        async move {
            let mut c = c.lock().unwrap();
            match c.get_mut(p.n) {
                Some(slot) => {
                    *slot += 1;
                    Ok(())
                }
                None => Err(JobError::permanent(format!("n = {} out of range", p.n))),
            }
        }
    });
    (builder, counts)
}

/// Spawns the `taskmill worker` under test with `TASKMILL_AMQP_URL`, a free
/// `TASKMILL_HTTP_ADDR` and no inherited `TASKMILL_*`, then `env` (which may
/// override them); output goes to `log_dir/<name>.log`.
pub fn spawn_worker(
    name: &str,
    env: &[(&str, String)],
    log_dir: &std::path::Path,
) -> WorkerProcess {
    let mut all = vec![("TASKMILL_AMQP_URL", amqp_url())];
    all.extend(env.iter().cloned());
    WorkerProcess::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_taskmill")),
        name,
        &all,
        log_dir,
    )
    .expect("spawn taskmill worker")
}

/// A scratch directory removed when dropped.
pub fn temp_dir(name: &str) -> TempDir {
    TempDir::new(name).expect("a scratch directory")
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

/// A SQLite store file that several worker processes share (the embedded
/// store works across processes on one file), read with the `sqlite3` CLI.
/// It lives in a scratch directory, removed with that directory.
pub struct SqliteDb {
    /// The database file.
    pub path: std::path::PathBuf,
}

impl SqliteDb {
    /// The store at `dir/store.db` (created by the first worker that connects).
    pub fn in_dir(dir: &std::path::Path) -> SqliteDb {
        SqliteDb {
            path: dir.join("store.db"),
        }
    }

    /// The store URL of this file.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// Runs `sql` on the file; returns the rows as `a|b` lines, like [`PgDb::query`].
    pub fn query(&self, sql: &str) -> String {
        // The workers hold write locks in short bursts; wait them out.
        let out = std::process::Command::new("sqlite3")
            .args(["-batch", "-bail", "-noheader", "-cmd", ".timeout 10000"])
            .arg(&self.path)
            .arg(sql)
            .output()
            .expect("the tests need the sqlite3 CLI");
        assert!(
            out.status.success(),
            "sqlite3 `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("sqlite3 output is UTF-8")
    }

    /// Runs a query that returns one integer.
    pub fn count(&self, sql: &str) -> i64 {
        let out = self.query(sql);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("`{sql}` returned {out:?}: {e}"))
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

/// Runs `rabbitmqctl ARGS` on the local broker; returns its stdout, panics
/// with its output when it fails. Only for the tests that must change the
/// broker itself, each of which restores what it changed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("this test needs rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// The Node.js producer example, `examples/node-producer/`.
pub fn node_example_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/node-producer")
}

/// `node` (or `NODE`), checked to run, with the example's dependencies
/// installed. Fails (never skips) with the remedy when either is missing:
/// `make test` installs both (`make node-deps`).
pub fn node() -> std::path::PathBuf {
    let node = std::env::var_os("NODE").map_or_else(
        || std::path::PathBuf::from("node"),
        std::path::PathBuf::from,
    );
    let version = std::process::Command::new(&node).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "`{}` cannot run: install Node.js 18 or newer (`make node-deps` does it with apt) or set NODE",
        node.display()
    );
    let amqplib = node_example_dir().join("node_modules/amqplib/package.json");
    assert!(
        amqplib.exists(),
        "{} is missing: run `make node-deps` (npm ci in examples/node-producer; `make test` runs it)",
        amqplib.display()
    );
    node
}

/// One job the Node example published, as `enqueue.js` reports it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NodeJob {
    pub id: String,
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

/// Runs the Node example's `enqueue.js` for `queue` with `args`; returns
/// the jobs the broker confirmed. Panics with its output if it fails.
pub async fn node_enqueue(node: &std::path::Path, queue: &str, args: &[&str]) -> Vec<NodeJob> {
    let out = tokio::process::Command::new(node)
        .arg(node_example_dir().join("enqueue.js"))
        .args(["--url", &amqp_url(), "--queue", queue])
        .args(args)
        .output()
        .await
        .expect("run node");
    assert!(
        out.status.success(),
        "enqueue.js {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let job: NodeJob = serde_json::from_str(l).expect("a JSON line per job");
            assert_eq!(job.queue, queue);
            job
        })
        .collect()
}

/// The virtualenv's Python (pika, jsonschema), or `PIKA_PYTHON`.
pub fn venv_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("PIKA_PYTHON") {
        return std::path::PathBuf::from(p);
    }
    let venv = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make venv` (make test creates it) or set PIKA_PYTHON",
        venv.display()
    );
    venv
}
