//! `celery`: Celery tasks sent by the real Python Celery client, drained by
//! taskmill beside the same tasks drained by a real `celery worker`, on the
//! same broker, in the same run.
//!
//! Each round, for each side (the sides alternate which goes first):
//! `bench/celery_vs_taskmill.py publish` sends `N` no-op tasks (`noop`, the
//! name of taskmill's built-in no-op kind) into a fresh Celery queue; once the
//! broker holds all `N`, the worker starts as a child process in its own
//! process group:
//!
//! - taskmill: this binary, `taskmill worker --celery-queue Q` and no other
//!   queue, default settings (its store: the default SQLite file in a
//!   temporary data dir, or the configured store URL);
//! - celery: `bench/celery_vs_taskmill.py worker`, which execs `celery worker`
//!   with the bench app (prefork, 2 processes, `acks_late`).
//!
//! Both are timed the same way, from outside, by passive declares of the queue
//! every 5 ms: from the first poll that sees fewer than `N` ready messages
//! (the first task consumed) to the first that sees none. Then, with the
//! clock stopped: nothing unacknowledged (`rabbitmqctl`, when on `PATH`), `N`
//! tasks counted `ok` in taskmill's `/metrics`, and, once the worker is
//! stopped (which returns any unacked delivery to the queue), no message left.
//!
//! The children are killed with their whole process group (Celery's pool, the
//! worker's CPU processes) when a side ends, on error and on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use taskmill_testkit::TempDir;
use taskmill_testkit::http::{free_local_addr, get as http_get};
use taskmill_testkit::metrics::samples;
use taskmill_testkit::process::{ProcessGroup, log_tail};
use tokio::io::AsyncReadExt;

use crate::error::{Context, bail, ensure};
use crate::harness::{Bench, deadline_for, per_second};
use crate::report::{Row, ScenarioReport};

/// Tasks by default.
pub(crate) const DEFAULT_TASKS: u64 = 20_000;
/// The Python entry point, relative to the repository root.
const SCRIPT: &str = "bench/celery_vs_taskmill.py";
/// Environment variable naming the Python interpreter.
const PYTHON_ENV: &str = "TASKMILL_BENCH_PYTHON";
/// How often the queue is polled while a side drains.
const POLL: Duration = Duration::from_millis(5);
/// How long a worker may take from its start to its first task.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a worker may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The Celery worker's processes (`celery worker -c`).
const CELERY_PROCESSES: u32 = 2;

/// The two workers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Taskmill,
    Celery,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Taskmill => "taskmill",
            Side::Celery => "celery",
        }
    }
}

/// One side's measurement in one round.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    side: &'static str,
    round: u32,
    /// Python's send loop (kombu, no publisher confirms), in tasks/s.
    send_per_s: f64,
    /// First task consumed to queue empty, in seconds.
    drain_s: f64,
    drain_per_s: f64,
    /// Unacknowledged after the drain, per `rabbitmqctl` (`None`: not run).
    unacked_after: Option<u64>,
    /// taskmill only: tasks counted `ok` and not `ok` in `/metrics`.
    taskmill_ok: Option<u64>,
    taskmill_not_ok: Option<u64>,
}

/// Runs the scenario with `tasks` tasks per side and round; `python` is the
/// `--python` flag.
pub(crate) async fn run(
    b: &Bench,
    tasks: u64,
    rounds: u32,
    python: Option<&Path>,
) -> crate::Result<ScenarioReport> {
    let py = Python::find(python).await?;
    let store = Store::of(b);
    eprintln!(
        "celery: {} with celery {}, taskmill store {}",
        py.interpreter.display(),
        py.celery_version,
        store.label
    );
    let mut runs: Vec<Measured> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Taskmill, Side::Celery]
        } else {
            [Side::Celery, Side::Taskmill]
        };
        for side in order {
            eprintln!(
                "celery: round {} of {rounds}: {tasks} tasks drained by {}",
                round + 1,
                side.name()
            );
            let m = measure(b, &py, side, tasks, round + 1)
                .await
                .with_context(|| format!("{} side, round {}", side.name(), round + 1))?;
            eprintln!(
                "celery:   {}: {:.0} tasks/s ({:.2} s)",
                side.name(),
                m.drain_per_s,
                m.drain_s
            );
            runs.push(m);
        }
    }

    let best = |side: Side, f: fn(&Measured) -> f64| {
        runs.iter()
            .filter(|m| m.side == side.name())
            .map(f)
            .fold(0.0, f64::max)
    };
    let t = best(Side::Taskmill, |m| m.drain_per_s);
    let c = best(Side::Celery, |m| m.drain_per_s);
    let send = runs.iter().map(|m| m.send_per_s).fold(0.0, f64::max);
    let ratio = if c > 0.0 { t / c } else { 0.0 };
    let rows = vec![
        Row::times(
            format!(
                "drain tasks/s vs celery prefork {CELERY_PROCESSES} (store {})",
                store.label
            ),
            t,
            c,
        ),
        Row::value("Python client send tasks/s (no confirms)", send),
    ];
    let json = json!({
        "tasks": tasks,
        "rounds": rounds,
        "taskmill_tasks_per_s": t,
        "celery_tasks_per_s": c,
        "ratio_taskmill_to_celery": ratio,
        "python_send_tasks_per_s": send,
        "store": store.label,
        "store_url": store.shown_url,
        "taskmill_worker": "child process: taskmill worker --celery-queue Q, default settings",
        "celery_worker": format!("celery worker -P prefork -c {CELERY_PROCESSES}, acks_late, prefetch multiplier 4"),
        "celery_queue_type": "classic",
        "celery_version": py.celery_version,
        "python": py.interpreter.display().to_string(),
        "per_round": runs,
    });
    Ok(ScenarioReport {
        scenario: "celery",
        rows,
        json,
    })
}

/// Publishes, starts one side's worker, times its drain, checks, stops it.
async fn measure(
    b: &Bench,
    py: &Python,
    side: Side,
    n: u64,
    round: u32,
) -> crate::Result<Measured> {
    let role = format!("{}-r{round}", side.name());
    let queue = b.celery_queue(&role);
    let dir = TempDir::new(&format!("bench-celery-{}-{role}", b.run_id))?;

    let send_s = py.publish(&b.config.amqp_url, &queue, n, &dir.0).await?;
    wait_depth(b, &queue, n, deadline_for(n))
        .await
        .context("after the Python client sent the tasks")?;

    let log = dir.0.join("worker.log");
    let (mut worker, metrics) = match side {
        Side::Taskmill => {
            let (g, addr) = spawn_taskmill(b, &queue, &dir.0, &log)?;
            (g, Some(addr))
        }
        Side::Celery => (py.worker(&b.config.amqp_url, &queue, &log)?, None),
    };
    let checked = async {
        let drain = time_drain(b, &queue, n, &mut worker).await?;
        // The clock has stopped: the checks.
        let (mut ok, mut not_ok) = (None, None);
        if let Some(addr) = metrics {
            let (o, x) = wait_counted(addr, &queue, n).await?;
            (ok, not_ok) = (Some(o), Some(x));
        }
        let unacked = wait_all_acked(&queue).await?;
        Ok::<_, crate::Error>((drain, ok, not_ok, unacked))
    }
    .await;
    let stopped = worker.stop("the worker", STOP_GRACE).await;
    let (drain, taskmill_ok, taskmill_not_ok, unacked_after) =
        checked.with_context(|| format!("worker log, last lines:\n{}", log_tail(&log, 20)))?;
    stopped?;
    // The worker's connection is closed, so an unacked delivery would be
    // ready again.
    let left = b.admin.queue_depth(&queue).await?;
    ensure!(
        left == 0,
        "{left} messages back in {queue} after the worker stopped"
    );
    Ok(Measured {
        side: side.name(),
        round,
        send_per_s: per_second(n, send_s),
        drain_s: drain.as_secs_f64(),
        drain_per_s: per_second(n, drain),
        unacked_after,
        taskmill_ok,
        taskmill_not_ok,
    })
}

/// Polls until `queue` holds `n` ready messages.
async fn wait_depth(b: &Bench, queue: &str, n: u64, deadline: Duration) -> crate::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let depth = u64::from(b.admin.queue_depth(queue).await?);
        if depth == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "{queue} holds {depth} of {n} messages after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// First poll with fewer than `n` ready messages to the first with none.
async fn time_drain(
    b: &Bench,
    queue: &str,
    n: u64,
    worker: &mut ProcessGroup,
) -> crate::Result<Duration> {
    let mut until = Instant::now() + START_DEADLINE;
    let mut start: Option<Instant> = None;
    loop {
        let depth = u64::from(b.admin.queue_depth(queue).await?);
        let now = Instant::now();
        if start.is_none() && depth < n {
            start = Some(now);
            until = now + deadline_for(n);
        }
        if depth == 0 {
            return Ok(now.saturating_duration_since(start.unwrap_or(now)));
        }
        if let Some(status) = worker.child.try_wait()? {
            bail!("the worker exited with {status} with {depth} tasks left in {queue}");
        }
        ensure!(
            now < until,
            "{}: {depth} of {n} tasks left in {queue}",
            if start.is_none() {
                "the worker consumed nothing within 60 s"
            } else {
                "the worker did not drain in time"
            }
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until taskmill's `/metrics` count `n` finished tasks of `queue`;
/// returns (ok, not ok). Fails if any was not `ok`.
async fn wait_counted(
    addr: std::net::SocketAddr,
    queue: &str,
    n: u64,
) -> crate::Result<(u64, u64)> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, not_ok) = match http_get(addr, "/metrics").await {
            Ok((200, text)) => jobs_total(&text, queue),
            _ => (0, 0),
        };
        ensure!(not_ok == 0, "{not_ok} tasks did not end `ok`");
        if ok >= n {
            return Ok((ok, not_ok));
        }
        ensure!(
            Instant::now() < until,
            "/metrics counts {ok} of {n} tasks ok after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `taskmill_jobs_total` of `queue`: (outcome `ok`, any other outcome).
fn jobs_total(metrics: &str, queue: &str) -> (u64, u64) {
    let (mut ok, mut other) = (0, 0);
    for (line, v) in samples(metrics, "taskmill_jobs_total", queue) {
        if line.contains("outcome=\"ok\"") {
            ok += v as u64;
        } else {
            other += v as u64;
        }
    }
    (ok, other)
}

/// Waits until `rabbitmqctl` shows `queue` with nothing ready or unacked;
/// returns the unacked count then (0), or `None` without a usable
/// `rabbitmqctl`.
async fn wait_all_acked(queue: &str) -> crate::Result<Option<u64>> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let Some(counts) = rabbitmqctl_counts(queue).await else {
            return Ok(None);
        };
        if counts == (0, 0) {
            return Ok(Some(0));
        }
        ensure!(
            Instant::now() < until,
            "rabbitmqctl: {queue} still has {} ready and {} unacked after 30 s",
            counts.0,
            counts.1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// (ready, unacked) of `queue` per `rabbitmqctl list_queues`; `None` when it
/// cannot be run or does not list the queue.
async fn rabbitmqctl_counts(queue: &str) -> Option<(u64, u64)> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "list_queues", "name", "messages_ready"])
            .arg("messages_unacknowledged")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f[..] {
            [name, ready, unacked] if name == queue => {
                Some((ready.parse().ok()?, unacked.parse().ok()?))
            }
            _ => None,
        }
    })
}

/// Starts `taskmill worker --celery-queue <queue>` (this binary) with default
/// settings and the configured store, if any (else the default SQLite file in
/// `dir`); returns it and its `/metrics` address.
fn spawn_taskmill(
    b: &Bench,
    queue: &str,
    dir: &Path,
    log: &Path,
) -> crate::Result<(ProcessGroup, std::net::SocketAddr)> {
    let addr = free_local_addr()?;
    let mut cmd = tokio::process::Command::new(&b.worker_exe);
    cmd.args(["worker", "--celery-queue", queue]);
    // Default settings: none of this shell's TASKMILL_* (nor its config file).
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKMILL_") {
            cmd.env_remove(k);
        }
    }
    // In the environment, not argv, so the password stays out of `ps`.
    cmd.env("TASKMILL_AMQP_URL", &b.config.amqp_url)
        .env("TASKMILL_QUEUES", "")
        .env("TASKMILL_HTTP_ADDR", addr.to_string())
        .env("TASKMILL_DATA_DIR", dir.join("data"))
        .env("TASKMILL_LOG_LEVEL", "warn")
        // The run's CPU queue, declared as the other scenarios declare it.
        .env("TASKMILL_CPU_QUEUE", &b.config.cpu_queue)
        .env("TASKMILL_QUEUE_TYPE", b.queue_type.as_str())
        .env(
            "TASKMILL_DELIVERY_LIMIT",
            b.config.delivery_limit.to_string(),
        );
    if let Some(url) = &b.configured_store_url {
        cmd.env("TASKMILL_STORE_URL", url);
    }
    let group = ProcessGroup::spawn(cmd, log).context("starting taskmill worker")?;
    Ok((group, addr))
}

/// The Python interpreter with Celery, and the bench's entry point.
struct Python {
    interpreter: PathBuf,
    script: PathBuf,
    celery_version: String,
}

impl Python {
    /// The interpreter: `--python`, else `$TASKMILL_BENCH_PYTHON`, else
    /// `.venv/bin/python` in the current dir, else `python3`; checks that it
    /// imports celery.
    async fn find(flag: Option<&Path>) -> crate::Result<Python> {
        let from_env = std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty());
        let venv = Path::new(".venv/bin/python");
        let interpreter = match (flag, from_env) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(p)) => PathBuf::from(p),
            (None, None) if venv.exists() => venv.to_path_buf(),
            (None, None) => PathBuf::from("python3"),
        };
        let script = [
            PathBuf::from(SCRIPT),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(SCRIPT),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{SCRIPT} not found: run `taskmill bench celery` from the repository root")
        })?;
        let hint = format!(
            "run `make venv` in the repository root (it creates .venv with Celery), or name an \
             interpreter that has it with --python or {PYTHON_ENV}"
        );
        let out = tokio::process::Command::new(&interpreter)
            .arg(&script)
            .arg("version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("cannot run {}: {hint}", interpreter.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or_default();
            bail!(
                "{} cannot import celery ({last}): {hint}",
                interpreter.display()
            );
        }
        Ok(Python {
            interpreter,
            script,
            celery_version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    fn command(&self, amqp_url: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.interpreter);
        cmd.arg(&self.script)
            // In the environment, not argv, so the password stays out of `ps`.
            .env("BENCH_AMQP_URL", amqp_url);
        cmd
    }

    /// Sends `n` no-op tasks to `queue` with the Celery client; returns the
    /// time of its send loop.
    async fn publish(
        &self,
        amqp_url: &str,
        queue: &str,
        n: u64,
        dir: &Path,
    ) -> crate::Result<Duration> {
        let mut cmd = self.command(amqp_url);
        cmd.args(["publish", "--queue", queue, "--n", &n.to_string()]);
        let log = dir.join("publish.log");
        let mut g =
            ProcessGroup::spawn_piped(cmd, &log).context("starting the Python publisher")?;
        let mut stdout = g.child.stdout.take().context("no stdout")?;
        let run = async {
            let mut out = String::new();
            stdout.read_to_string(&mut out).await?;
            let status = g.child.wait().await?;
            Ok::<_, std::io::Error>((out, status))
        };
        let (out, status) = tokio::time::timeout(deadline_for(n), run)
            .await
            .context("the Python publisher timed out")??;
        g.disarm();
        ensure!(
            status.success(),
            "the Python publisher failed with {status}:\n{}",
            log_tail(&log, 20)
        );
        let line = out.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("the Python publisher printed {line:?}"))?;
        let s = v["send_seconds"]
            .as_f64()
            .context("no send_seconds from the Python publisher")?;
        Ok(Duration::from_secs_f64(s.max(0.0)))
    }

    /// Starts the comparison's `celery worker` on `queue`.
    fn worker(&self, amqp_url: &str, queue: &str, log: &Path) -> crate::Result<ProcessGroup> {
        let mut cmd = self.command(amqp_url);
        cmd.args(["worker", "--queue", queue]);
        ProcessGroup::spawn(cmd, log).context("starting celery worker")
    }
}

/// Which store the taskmill side uses.
struct Store {
    /// For the table: `sqlite file` (the default), `postgres`, ...
    label: String,
    /// The configured URL, password redacted; `None` for the default.
    shown_url: Option<String>,
}

impl Store {
    fn of(b: &Bench) -> Store {
        match &b.configured_store_url {
            None => Store {
                label: "sqlite file (default, temp data dir)".to_string(),
                shown_url: None,
            },
            Some(url) => {
                let label = if url.starts_with("postgres") {
                    "postgres (configured)"
                } else if url.contains(":memory:") {
                    "sqlite in memory (configured)"
                } else if url.starts_with("sqlite") {
                    "sqlite file (configured)"
                } else {
                    "configured"
                };
                Store {
                    label: label.to_string(),
                    shown_url: Some(taskmill_core::redact::redact_url(url)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_jobs_of_one_queue_by_outcome() {
        let text = "# TYPE taskmill_jobs_total counter\n\
            taskmill_jobs_total{queue=\"a\",kind=\"noop\",outcome=\"ok\"} 1500\n\
            taskmill_jobs_total{queue=\"a\",kind=\"noop\",outcome=\"dead\"} 2\n\
            taskmill_jobs_total{queue=\"b\",kind=\"noop\",outcome=\"ok\"} 7\n";
        assert_eq!(jobs_total(text, "a"), (1500, 2));
        assert_eq!(jobs_total(text, "c"), (0, 0));
    }
}
