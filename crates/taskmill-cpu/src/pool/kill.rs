//! Stopping a child: closing its stdin, SIGTERM, grace, SIGKILL of its
//! process group, and reaping it ([`Stop`], [`reap`], [`stop`]).

use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::shared::Shared;
use super::worker::Worker;
use crate::exit::describe_exit_status;

/// How to stop a worker process.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stop {
    /// Close stdin (the child exits 0 at EOF), wait `kill_grace`, then
    /// SIGTERM, `kill_grace`, SIGKILL.
    Retire,
    /// The child is exiting on its own (after a panic report or EOF): wait
    /// `kill_grace`, then SIGKILL.
    Expect,
    /// SIGTERM, wait `kill_grace`, SIGKILL.
    Terminate,
    /// SIGKILL right away.
    Kill,
}

/// How a reaped worker ended.
pub(super) struct Reaped {
    status: Option<ExitStatus>,
    /// Whether we had to signal it (so a SIGKILL status is ours, not the OOM killer's).
    signalled_by_us: bool,
}

impl Reaped {
    pub(super) fn cause(&self) -> String {
        match self.status {
            Some(status) if self.signalled_by_us => format!(
                "closed its output without exiting; killed by the pool ({})",
                describe_exit_status(status)
            ),
            Some(status) => describe_exit_status(status),
            None => "exit status unavailable".to_owned(),
        }
    }
}

impl Worker {
    /// Signals the child's process group (it leads its own group, so this also
    /// reaches processes a handler spawned), falling back to the pid alone.
    /// Does nothing once the child was reaped: its pid may be reused.
    pub(super) fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id() {
            let pid = Pid::from_raw(pid as i32);
            if killpg(pid, signal).is_err() {
                let _ = kill(pid, signal);
            }
        }
    }

    pub(super) async fn wait_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(err)) => {
                warn!(pid = self.pid, %err, "cannot wait for CPU worker process");
                None
            }
            Err(_elapsed) => None,
        }
    }

    pub(super) async fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGKILL);
        let _ = self.child.start_kill();
        self.child.wait().await.ok()
    }

    pub(super) async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match self.wait_within(grace).await {
            Some(status) => Some(status),
            None => self.kill_and_wait().await,
        }
    }
}

/// Stops and reaps a worker that was serving, and removes it from the live
/// count and the pid list.
pub(super) async fn reap(shared: &Shared, w: Worker, how: Stop) -> Reaped {
    let slot = w.slot;
    let reaped = stop(shared.cfg.kill_grace, w, how).await;
    shared.live.fetch_sub(1, Ordering::SeqCst);
    shared.set_pid(slot, None);
    reaped
}

/// Stops and reaps a worker process.
pub(super) async fn stop(grace: Duration, mut w: Worker, how: Stop) -> Reaped {
    // Closing stdin first means a healthy child sees EOF and exits 0.
    drop(w.stdin.take());
    let mut signalled_by_us = false;
    let status = match how {
        Stop::Kill => {
            signalled_by_us = true;
            w.kill_and_wait().await
        }
        Stop::Terminate => {
            signalled_by_us = true;
            w.terminate(grace).await
        }
        Stop::Expect | Stop::Retire => match w.wait_within(grace).await {
            Some(status) => Some(status),
            None => {
                signalled_by_us = true;
                if matches!(how, Stop::Retire) {
                    w.terminate(grace).await
                } else {
                    w.kill_and_wait().await
                }
            }
        },
    };
    debug!(pid = w.pid, ?how, status = ?status, "CPU worker process reaped");
    Reaped {
        status,
        signalled_by_us,
    }
}
