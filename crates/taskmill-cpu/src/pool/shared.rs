//! The state a pool's handles and its supervisors share: the hand-off
//! channel, the shutdown signal and its hard deadline, the counters and the
//! pid list, and the way to the spawner thread.

use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::handoff::Job;
use super::spawn::SpawnReply;
use super::{PoolConfig, RestartCause};

pub(super) struct Shared {
    pub(super) cfg: PoolConfig,
    pub(super) jobs_tx: mpsc::Sender<Job>,
    pub(super) jobs_rx: Mutex<mpsc::Receiver<Job>>,
    /// `Some(hard deadline)` once shutdown began.
    pub(super) shutdown: watch::Sender<Option<Instant>>,
    pub(super) closed: AtomicBool,
    pub(super) busy: AtomicUsize,
    pub(super) live: AtomicUsize,
    pub(super) restarts: [AtomicU64; RestartCause::ALL.len()],
    pub(super) pids: StdMutex<Vec<Option<u32>>>,
    pub(super) spawner: std::sync::mpsc::Sender<SpawnReply>,
    pub(super) tracker: TaskTracker,
}

impl Shared {
    pub(super) fn begin_shutdown(&self, deadline: Instant) {
        self.closed.store(true, Ordering::SeqCst);
        self.shutdown.send_modify(|current| {
            *current = Some(current.map_or(deadline, |d| d.min(deadline)));
        });
    }

    pub(super) fn is_shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    pub(super) async fn shutdown_started(&self) {
        let mut rx = self.shutdown.subscribe();
        // The sender lives in `self`, so this only returns once it is Some.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Resolves at the shutdown deadline (never, if no shutdown began).
    pub(super) async fn hard_deadline(&self) {
        let mut rx = self.shutdown.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            match deadline {
                None => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => return,
                        // The deadline can only move earlier; re-read it.
                        changed = rx.changed() => if changed.is_err() {
                            tokio::time::sleep_until(at).await;
                            return;
                        },
                    }
                }
            }
        }
    }

    pub(super) async fn next_job(&self) -> Option<Job> {
        self.jobs_rx.lock().await.recv().await
    }

    pub(super) fn count_restart(&self, cause: RestartCause) {
        self.restarts[cause.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.cfg.on_restart {
            hook(cause);
        }
    }

    pub(super) fn set_pid(&self, slot: usize, pid: Option<u32>) {
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids[slot] = pid;
    }
}
