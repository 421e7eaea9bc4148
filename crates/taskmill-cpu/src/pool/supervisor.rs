//! The per-slot supervisor: it owns one child at a time, waits for a job
//! while watching for the child's death, runs the job under its timeout, the
//! caller's cancellation and the shutdown deadline, and replaces the child
//! when it ends (crash, timeout, panic, recycling).

use std::io;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{debug, info, warn};

use super::handoff::{Job, Reply};
use super::kill::{Stop, reap};
use super::recycle::recycle_reason;
use super::shared::Shared;
use super::spawn::{respawn, spawn_worker};
use super::worker::{ExchangeError, Worker, exchange};
use super::{CpuError, RestartCause};
use crate::exit::describe_exit_status;
use crate::frame::{self, FrameError, Response};

/// What the supervisor does after a child's service ended.
enum Served {
    /// The child is reaped; count `cause`, replace it, then send `reply`.
    Replace {
        cause: RestartCause,
        reply: Option<(Reply, Result<Vec<u8>, CpuError>)>,
    },
    /// The pool is shutting down and the child is reaped: stop.
    Exit,
}

enum Idle {
    Shutdown,
    Died(io::Result<ExitStatus>),
    Job(Option<Job>),
}

enum Outcome {
    /// Result or handler error: the child is healthy.
    Reply(Result<Vec<u8>, CpuError>),
    Panicked(String),
    Gone(ExchangeError),
    TimedOut,
    Cancelled,
    Interrupted,
}

/// One child's life: wait for jobs while watching for its death, run them,
/// and report how it ended. `carry` holds a job that must run before taking
/// new ones (its previous child died before accepting it).
async fn serve(shared: &Shared, mut w: Worker, carry: &mut Option<Job>) -> Served {
    loop {
        let mut job = match carry.take() {
            Some(job) => job,
            None => {
                let event = tokio::select! {
                    biased;
                    () = shared.shutdown_started() => Idle::Shutdown,
                    status = w.child.wait() => Idle::Died(status),
                    job = shared.next_job() => Idle::Job(job),
                };
                match event {
                    Idle::Shutdown | Idle::Job(None) => {
                        reap(shared, w, Stop::Retire).await;
                        return Served::Exit;
                    }
                    Idle::Died(status) => {
                        let pid = w.pid;
                        let reaped = reap(shared, w, Stop::Expect).await;
                        let cause = match status {
                            Ok(status) => describe_exit_status(status),
                            Err(_) => reaped.cause(),
                        };
                        warn!(pid, %cause, "idle CPU worker process died; replacing it");
                        return Served::Replace {
                            cause: RestartCause::DiedIdle,
                            reply: None,
                        };
                    }
                    Idle::Job(Some(job)) => job,
                }
            }
        };
        if job.reply.is_closed() {
            // The caller gave up while the job was queued: never start it.
            continue;
        }
        // Cheap check that closes most of the window between the idle watch
        // and the hand-off; a child dying in the remaining window is caught by
        // the failed write below.
        if let Ok(Some(status)) = w.child.try_wait() {
            warn!(pid = w.pid, cause = %describe_exit_status(status), "CPU worker process died before taking a job; replacing it");
            *carry = Some(job);
            reap(shared, w, Stop::Expect).await;
            return Served::Replace {
                cause: RestartCause::DiedIdle,
                reply: None,
            };
        }

        shared.busy.fetch_add(1, Ordering::SeqCst);
        let outcome = run_job(shared, &mut w, &mut job).await;
        shared.busy.fetch_sub(1, Ordering::SeqCst);

        let pid = w.pid;
        match outcome {
            Outcome::Reply(result) => {
                let _ = job.reply.send(result);
                w.jobs_done += 1;
                if let Some(reason) = recycle_reason(&shared.cfg, &w) {
                    info!(pid, %reason, "recycling CPU worker process");
                    reap(shared, w, Stop::Retire).await;
                    return Served::Replace {
                        cause: RestartCause::Recycled,
                        reply: None,
                    };
                }
            }
            Outcome::Panicked(message) => {
                warn!(pid, %message, "CPU job handler panicked; replacing its worker process");
                reap(shared, w, Stop::Expect).await;
                return Served::Replace {
                    cause: RestartCause::Panicked,
                    reply: Some((job.reply, Err(CpuError::Panicked { message }))),
                };
            }
            Outcome::Gone(ExchangeError::Write(err)) if !job.redelivered => {
                let reaped = reap(shared, w, Stop::Expect).await;
                warn!(pid, %err, cause = %reaped.cause(), "CPU worker process was gone before taking a job; handing the job to its replacement");
                job.redelivered = true;
                *carry = Some(job);
                return Served::Replace {
                    cause: RestartCause::DiedIdle,
                    reply: None,
                };
            }
            Outcome::Gone(ExchangeError::Frame(err)) => {
                warn!(pid, %err, "CPU worker process sent an invalid frame; killing it");
                reap(shared, w, Stop::Kill).await;
                return Served::Replace {
                    cause: RestartCause::Crashed,
                    reply: Some((
                        job.reply,
                        Err(CpuError::Protocol {
                            message: err.to_string(),
                        }),
                    )),
                };
            }
            Outcome::Gone(_) => {
                let reaped = reap(shared, w, Stop::Expect).await;
                let cause = reaped.cause();
                warn!(pid, %cause, "CPU worker process died during a job; replacing it");
                return Served::Replace {
                    cause: RestartCause::Crashed,
                    reply: Some((job.reply, Err(CpuError::Crashed { cause }))),
                };
            }
            Outcome::TimedOut => {
                warn!(pid, timeout = ?job.timeout, "CPU job timed out; killing its worker process");
                reap(shared, w, Stop::Terminate).await;
                return Served::Replace {
                    cause: RestartCause::Timeout,
                    reply: Some((job.reply, Err(CpuError::Timeout { after: job.timeout }))),
                };
            }
            Outcome::Cancelled => {
                debug!(
                    pid,
                    "CPU job abandoned by its caller; killing its worker process"
                );
                reap(shared, w, Stop::Terminate).await;
                return Served::Replace {
                    cause: RestartCause::Cancelled,
                    reply: None,
                };
            }
            Outcome::Interrupted => {
                warn!(
                    pid,
                    "shutdown grace period over; killing a busy CPU worker process"
                );
                reap(shared, w, Stop::Kill).await;
                let _ = job.reply.send(Err(CpuError::Interrupted));
                return Served::Exit;
            }
        }
    }
}

async fn run_job(shared: &Shared, w: &mut Worker, job: &mut Job) -> Outcome {
    let max = shared.cfg.max_frame_bytes;
    tokio::select! {
        response = exchange(w, &job.prefix, &job.payload, max) => match response {
            Ok(Response::Ok(bytes)) => Outcome::Reply(Ok(bytes)),
            Ok(Response::Error(err)) => Outcome::Reply(Err(CpuError::Handler(err))),
            Ok(Response::Panicked(message)) => Outcome::Panicked(message),
            Ok(Response::Ready(_)) => Outcome::Gone(ExchangeError::Frame(FrameError::UnknownTag(
                frame::TAG_READY,
            ))),
            Err(err) => Outcome::Gone(err),
        },
        () = tokio::time::sleep(job.timeout) => Outcome::TimedOut,
        () = job.reply.closed() => Outcome::Cancelled,
        () = shared.hard_deadline() => Outcome::Interrupted,
    }
}

/// Owns one slot for the whole life of the pool.
pub(super) async fn supervise(shared: Arc<Shared>, slot: usize, first: Worker) {
    let mut next = Some(first);
    // A job whose child died before accepting it; it runs on the replacement.
    // Dropping it (on shutdown) answers the caller with `PoolClosed`.
    let mut carry: Option<Job> = None;
    loop {
        let worker = match next.take() {
            Some(worker) => worker,
            None => match respawn(&shared, slot).await {
                Some(worker) => worker,
                None => return,
            },
        };
        match serve(&shared, worker, &mut carry).await {
            Served::Exit => return,
            Served::Replace { cause, reply } => {
                shared.count_restart(cause);
                // Replace before answering, so a caller that sees the error
                // also sees the pool back at full strength.
                if !shared.is_shutting_down() {
                    match spawn_worker(&shared, slot).await {
                        Ok(worker) => next = Some(worker),
                        Err(err) => warn!(%err, slot, "cannot replace CPU worker process"),
                    }
                }
                if let Some((tx, result)) = reply {
                    let _ = tx.send(result);
                }
            }
        }
    }
}
