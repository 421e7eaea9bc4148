//! Workers that are ready: one started in this process, or a child
//! `taskmill worker` process, each waited for until `/readyz` answers 200
//! (the queues are declared and consumed then).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use taskmill_worker::{CancellationToken, Worker, WorkerHandle};

use crate::{Error, http, process};

/// Starts `worker` in this process and waits up to `ready_within` until it is
/// ready; returns its handle and the token that shuts it down.
pub async fn start_in_process(
    worker: Worker,
    ready_within: Duration,
) -> Result<(WorkerHandle, CancellationToken), Error> {
    let shutdown = CancellationToken::new();
    let handle = worker.start(shutdown.clone()).await?;
    if !handle.wait_ready(ready_within).await {
        shutdown.cancel();
        return Err(Error::NotReady {
            name: "the in-process worker".to_string(),
            timeout: ready_within,
            log: String::new(),
        });
    }
    Ok((handle, shutdown))
}

/// A real `taskmill worker` process. Dropping it kills it (SIGKILL) and
/// reaps it, so no worker outlives a failed test or an aborted probe; when
/// the thread is panicking, the end of its log is printed to help the
/// diagnosis.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Option<Child>,
    /// The worker's HTTP endpoint (`/readyz`, `/metrics`).
    pub addr: SocketAddr,
    /// A name for messages.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl WorkerProcess {
    /// `exe worker` with no inherited `TASKMILL_*` variable (a worker refuses
    /// unknown ones, and the caller alone decides the configuration) and
    /// `TASKMILL_HTTP_ADDR` set to a free loopback port; returns the command
    /// and that address.
    pub fn command(exe: &Path) -> Result<(Command, SocketAddr), Error> {
        let addr = http::free_local_addr()?;
        let mut cmd = Command::new(exe);
        cmd.arg("worker");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TASKMILL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TASKMILL_HTTP_ADDR", addr.to_string());
        Ok((cmd, addr))
    }

    /// Spawns `exe worker` (see [`WorkerProcess::command`]) with
    /// `TASKMILL_WORKER_ID=<name>-<port>`, then `env` (which may override
    /// anything); output goes to `log_dir/<name>.log`.
    pub fn spawn(
        exe: &Path,
        name: &str,
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<WorkerProcess, Error> {
        let (mut cmd, addr) = WorkerProcess::command(exe)?;
        cmd.env("TASKMILL_WORKER_ID", format!("{name}-{}", addr.port()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        WorkerProcess::spawn_command(cmd, addr, name, &log_dir.join(format!("{name}.log")))
    }

    /// Spawns `cmd`, a worker whose HTTP endpoint is `addr`, with its output
    /// appended to `log`.
    pub fn spawn_command(
        mut cmd: Command,
        addr: SocketAddr,
        name: &str,
        log: &Path,
    ) -> Result<WorkerProcess, Error> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let child = cmd.stdin(Stdio::null()).spawn()?;
        Ok(WorkerProcess {
            child: Some(child),
            addr,
            name: name.to_string(),
            log: log.to_path_buf(),
        })
    }

    /// The process id (0 once it was killed or terminated).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until `/readyz` answers 200; fails if the process exits or
    /// `timeout` passes first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(Error::ExitedEarly {
                    name: self.name.clone(),
                    status,
                    log: self.log_tail(40),
                });
            }
            if http::is_ready(self.addr).await {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    timeout,
                    log: self.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> Result<String, Error> {
        http::get_ok(self.addr, "/metrics").await
    }

    /// `kill -9` and reap: no drain, no acks, no store writes after this.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit (the graceful drain); returns the
    /// status. SIGKILL after `timeout`, and fails then.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let Some(mut c) = self.child.take() else {
            return Err(Error::Io(std::io::Error::other(format!(
                "{} is not running",
                self.name
            ))));
        };
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                return Err(Error::NotStopped {
                    name: self.name.clone(),
                    grace: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// The last `n` lines of the worker's log, under a title line.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- last lines of {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            process::log_tail(&self.log, n)
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
