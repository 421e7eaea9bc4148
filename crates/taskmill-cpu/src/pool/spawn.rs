//! Starting children: the spawner thread that forks every one of them (so
//! `PR_SET_PDEATHSIG` is tied to a thread that lives as long as the pool),
//! the command and its pre-exec hook, the ready handshake, and respawning
//! with backoff.

use std::io;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::kill::{Stop, stop};
use super::shared::Shared;
use super::worker::{ExchangeError, Worker, read_response};
use super::{PoolConfig, PoolError};
use crate::child::{CHILD_ENV, MAX_FRAME_ENV, RAYON_THREADS_ENV};
use crate::frame::{PROTOCOL_VERSION, Response};

pub(super) type SpawnReply = oneshot::Sender<io::Result<Child>>;

/// Builds the command for one child. Runs on the spawner thread.
fn build_command(cfg: &PoolConfig) -> Command {
    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args);
    for (key, value) in &cfg.envs {
        cmd.env(key, value);
    }
    cmd.env(CHILD_ENV, "1")
        .env(RAYON_THREADS_ENV, cfg.rayon_threads_per_child.to_string())
        .env(MAX_FRAME_ENV, cfg.max_frame_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        // Own process group: a Ctrl-C in the terminal reaches only the parent,
        // which drains in-flight jobs, instead of killing every child at once;
        // and a timeout kill can take the whole group down.
        .process_group(0);
    install_pre_exec(&mut cmd, cfg.address_space_limit_bytes);
    cmd
}

/// Makes the child die with its parent (PR_SET_PDEATHSIG = SIGKILL, so even a
/// `kill -9` of the parent leaves no orphan) and applies RLIMIT_AS.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn install_pre_exec(cmd: &mut Command, address_space_limit: Option<u64>) {
    let parent = std::process::id() as libc::pid_t;
    let hook = move || -> io::Result<()> {
        // SAFETY: this closure runs in the forked child before exec, where only
        // async-signal-safe operations are allowed. It calls only the raw
        // syscalls prctl(2), getppid(2) and setrlimit(2), reads errno via
        // `last_os_error`, and builds errors with `from_raw_os_error`; none of
        // them allocates, locks or touches state shared with other threads.
        // The `rlimit` value is a plain stack struct.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; the death
            // signal would then never come, so check we were not reparented.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(limit) = address_space_limit {
                let rlim = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &rlim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    };
    // SAFETY: the hook only performs async-signal-safe work (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[cfg(not(target_os = "linux"))]
fn install_pre_exec(_cmd: &mut Command, _address_space_limit: Option<u64>) {}

/// Starts the spawner thread, which forks every child of the pool.
pub(super) fn start_spawner(
    cfg: PoolConfig,
    runtime: tokio::runtime::Handle,
) -> io::Result<std::sync::mpsc::Sender<SpawnReply>> {
    let (tx, rx) = std::sync::mpsc::channel::<SpawnReply>();
    std::thread::Builder::new()
        .name("taskmill-cpu-spawner".into())
        .spawn(move || {
            // tokio::process needs the runtime's reactor to register the pipes
            // and the child-exit watcher.
            let _guard = runtime.enter();
            // Ends when the pool's shared state (and with it `tx`) is dropped,
            // which only happens after every child was reaped.
            for reply in rx {
                let _ = reply.send(build_command(&cfg).spawn());
            }
        })?;
    Ok(tx)
}

/// Spawns one child and waits for its ready handshake.
pub(super) async fn spawn_worker(shared: &Shared, slot: usize) -> Result<Worker, PoolError> {
    let program = shared.cfg.program.clone();
    let spawn_error = |source: io::Error| PoolError::Spawn {
        program: program.clone(),
        source,
    };
    let (tx, rx) = oneshot::channel();
    shared
        .spawner
        .send(tx)
        .map_err(|_| spawn_error(io::Error::other("spawner thread is gone")))?;
    let mut child = rx
        .await
        .map_err(|_| spawn_error(io::Error::other("spawner thread is gone")))?
        .map_err(&spawn_error)?;
    let pid = child.id().unwrap_or_default();
    let stdin = child.stdin.take();
    let Some(stdout) = child.stdout.take() else {
        return Err(spawn_error(io::Error::other("child stdout not piped")));
    };
    let mut worker = Worker {
        slot,
        pid,
        child,
        stdin,
        stdout: BufReader::with_capacity(64 * 1024, stdout),
        jobs_done: 0,
    };
    let hello = tokio::time::timeout(
        shared.cfg.startup_timeout,
        read_response(&mut worker.stdout, shared.cfg.max_frame_bytes),
    )
    .await;
    let reason = match hello {
        Ok(Ok(Response::Ready(hello))) if hello.protocol == PROTOCOL_VERSION => {
            debug!(
                pid,
                slot,
                rayon_threads = hello.rayon_threads,
                "CPU worker process ready"
            );
            if hello.rayon_threads != shared.cfg.rayon_threads_per_child {
                // The program touched rayon before calling run_child, so the
                // global pool was already built with another size.
                warn!(
                    pid,
                    configured = shared.cfg.rayon_threads_per_child,
                    actual = hello.rayon_threads,
                    "CPU worker process runs a different number of rayon threads"
                );
            }
            // Only ready children count as live: one still starting up cannot
            // take a job yet.
            shared.live.fetch_add(1, Ordering::SeqCst);
            shared.set_pid(slot, Some(pid));
            return Ok(worker);
        }
        Ok(Ok(Response::Ready(hello))) => format!(
            "protocol version {} but the pool speaks {PROTOCOL_VERSION}",
            hello.protocol
        ),
        Ok(Ok(other)) => format!("unexpected first frame {other:?}"),
        Ok(Err(ExchangeError::Eof)) => {
            let reaped = stop(shared.cfg.kill_grace, worker, Stop::Expect).await;
            return Err(PoolError::Handshake {
                program,
                reason: format!(
                    "it closed stdout before the handshake ({}); does main() call \
                     taskmill_cpu::run_child when is_child_mode() is true?",
                    reaped.cause()
                ),
            });
        }
        Ok(Err(ExchangeError::Frame(err))) => format!(
            "invalid handshake frame ({err}); does main() call taskmill_cpu::run_child \
             before writing anything to stdout?"
        ),
        Ok(Err(ExchangeError::Read(err) | ExchangeError::Write(err))) => err.to_string(),
        Err(_elapsed) => format!(
            "no handshake within {:?}; does main() call taskmill_cpu::run_child when \
             is_child_mode() is true?",
            shared.cfg.startup_timeout
        ),
    };
    stop(shared.cfg.kill_grace, worker, Stop::Kill).await;
    Err(PoolError::Handshake { program, reason })
}

/// Keeps trying to spawn a replacement, backing off, until it works or the
/// pool shuts down (then `None`).
pub(super) async fn respawn(shared: &Shared, slot: usize) -> Option<Worker> {
    let mut delay = Duration::from_millis(100);
    loop {
        if shared.is_shutting_down() {
            return None;
        }
        match spawn_worker(shared, slot).await {
            Ok(worker) => return Some(worker),
            Err(err) => warn!(%err, slot, retry_in = ?delay, "cannot replace CPU worker process"),
        }
        tokio::select! {
            () = shared.shutdown_started() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
