//! Parent side: a fixed-size pool of supervised worker processes.
//!
//! Layout: one *supervisor task* per slot owns one child process at a time.
//! Callers of [`CpuPool::run`] put a job into a bounded channel (capacity 1,
//! so waiting callers queue in FIFO order on the channel's semaphore instead
//! of in an unbounded buffer); whichever supervisor is idle takes it, writes
//! the request frame, reads the response and answers through a oneshot.
//! Because the supervisor, not the caller, owns the child, a caller that is
//! cancelled mid-job can never leave a child half-way through a response in
//! the idle set: the supervisor notices the dropped oneshot, kills and
//! replaces the child.
//!
//! Children are forked from one dedicated long-lived thread (the *spawner*)
//! because `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//! exits, and tokio may retire the worker or blocking thread a supervisor
//! happens to run on.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::child::{CHILD_ENV, MAX_FRAME_ENV, NOOP_KIND, RAYON_THREADS_ENV, is_child_mode};
use crate::exit::describe_exit_status;
use crate::frame::{self, FrameError, PROTOCOL_VERSION, RequestHeader, Response};
use crate::registry::HandlerError;

/// Number of CPUs this process may use (`available_parallelism`, at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Callback invoked each time a worker process is replaced (for metrics).
/// It runs on a supervisor task: keep it quick and never panic in it.
pub type RestartHook = Arc<dyn Fn(RestartCause) + Send + Sync>;

/// Configuration of a [`CpuPool`].
///
/// Rule for rayon: `size × rayon_threads_per_child` should not exceed the
/// cores available, or CPU jobs fight each other for cores. The default is
/// one process per core with one rayon thread each.
#[derive(Clone)]
pub struct PoolConfig {
    /// Number of worker processes (default: available cores).
    pub size: usize,
    /// Retire a child after it served this many jobs (bounds slow leaks).
    pub max_jobs_per_child: Option<u64>,
    /// Retire a child whose resident set exceeds this after a job
    /// (read from `/proc/<pid>/status`, checked between jobs only).
    pub max_rss_per_child_bytes: Option<u64>,
    /// `RLIMIT_AS` for each child, set before exec: allocations beyond it fail
    /// (Rust then aborts the child, reported as a crash with SIGABRT). Address
    /// space is much larger than RSS (thread stacks, malloc arenas), so leave
    /// generous headroom.
    pub address_space_limit_bytes: Option<u64>,
    /// Threads in each child's global rayon pool
    /// (default: `max(1, cores / size)`).
    pub rayon_threads_per_child: usize,
    /// Time between SIGTERM and SIGKILL, and the time a retiring child gets to
    /// exit after its stdin is closed (default 500 ms).
    pub kill_grace: Duration,
    /// How long a new child may take to send its ready handshake (default 10 s).
    pub startup_timeout: Duration,
    /// Largest frame body accepted in either direction (default 64 MiB).
    pub max_frame_bytes: usize,
    /// Program to run (default: the current executable).
    pub program: PathBuf,
    /// Arguments for the program.
    pub args: Vec<OsString>,
    /// Extra environment variables for the children (the pool adds its own
    /// `TASKMILL_CPU_*` variables on top).
    pub envs: Vec<(OsString, OsString)>,
    /// Called on each replacement of a worker process, with its cause.
    pub on_restart: Option<RestartHook>,
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("size", &self.size)
            .field("max_jobs_per_child", &self.max_jobs_per_child)
            .field("max_rss_per_child_bytes", &self.max_rss_per_child_bytes)
            .field("address_space_limit_bytes", &self.address_space_limit_bytes)
            .field("rayon_threads_per_child", &self.rayon_threads_per_child)
            .field("kill_grace", &self.kill_grace)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("program", &self.program)
            .field("args", &self.args)
            .field("envs", &self.envs)
            .field("on_restart", &self.on_restart.is_some())
            .finish()
    }
}

impl Default for PoolConfig {
    /// [`PoolConfig::for_current_exe(0)`](PoolConfig::for_current_exe): one
    /// process per core, one rayon thread each.
    fn default() -> Self {
        Self::for_current_exe(0)
    }
}

impl PoolConfig {
    /// A configuration running `program` with `size` processes (0 means one
    /// per available core) and defaults for everything else.
    pub fn new(program: impl Into<PathBuf>, size: usize) -> Self {
        let cores = available_cores();
        let size = if size == 0 { cores } else { size };
        Self {
            size,
            max_jobs_per_child: None,
            max_rss_per_child_bytes: None,
            address_space_limit_bytes: None,
            rayon_threads_per_child: (cores / size).max(1),
            kill_grace: Duration::from_millis(500),
            startup_timeout: Duration::from_secs(10),
            max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES,
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            on_restart: None,
        }
    }

    /// Like [`new`](Self::new) with the current executable as the program,
    /// which must call [`run_child`](crate::run_child) when
    /// [`is_child_mode`] is true. Falls back to
    /// `/proc/self/exe` if the executable path cannot be determined.
    pub fn for_current_exe(size: usize) -> Self {
        let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        Self::new(program, size)
    }

    fn validate(&self) -> Result<(), PoolError> {
        let bad = |m: &str| Err(PoolError::InvalidConfig(m.to_owned()));
        if self.size == 0 {
            return bad("size must be at least 1");
        }
        if self.rayon_threads_per_child == 0 {
            return bad("rayon_threads_per_child must be at least 1");
        }
        if self.max_jobs_per_child == Some(0) {
            return bad("max_jobs_per_child must be at least 1");
        }
        if self.max_frame_bytes < 64 || self.max_frame_bytes > u32::MAX as usize {
            return bad("max_frame_bytes must be between 64 and u32::MAX");
        }
        Ok(())
    }
}

/// Why a worker process was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartCause {
    /// Killed because a job exceeded its timeout.
    Timeout,
    /// Died during a job (signal, unexpected exit, protocol violation).
    Crashed,
    /// A handler panicked; the child exits since its state may be corrupt.
    Panicked,
    /// Retired after `max_jobs_per_child` jobs or above `max_rss_per_child_bytes`.
    Recycled,
    /// Died while idle (killed from outside, OOM killer, ...).
    DiedIdle,
    /// Killed because the caller of [`CpuPool::run`] dropped the future mid-job.
    Cancelled,
}

impl RestartCause {
    /// Every cause, e.g. to pre-register metric label values.
    pub const ALL: [RestartCause; 6] = [
        Self::Timeout,
        Self::Crashed,
        Self::Panicked,
        Self::Recycled,
        Self::DiedIdle,
        Self::Cancelled,
    ];

    /// A stable snake_case label (`"timeout"`, `"died_idle"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Crashed => "crashed",
            Self::Panicked => "panicked",
            Self::Recycled => "recycled",
            Self::DiedIdle => "died_idle",
            Self::Cancelled => "cancelled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RestartCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One CPU job for [`CpuPool::run`].
#[derive(Debug, Clone)]
pub struct CpuRequest {
    /// Job id (passed to the handler).
    pub job_id: String,
    /// Kind: selects the handler in the child's [`CpuRegistry`](crate::CpuRegistry).
    pub kind: String,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// W3C trace context to continue in the child.
    pub traceparent: Option<String>,
    /// Payload bytes, handed to the child verbatim.
    pub payload: Bytes,
    /// Hard limit on the job once a child has taken it (the wait for an idle
    /// child is not included: bound that by dropping the `run` future).
    pub timeout: Duration,
}

impl CpuRequest {
    /// A first-attempt request without trace context.
    pub fn new(
        job_id: impl Into<String>,
        kind: impl Into<String>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Self {
        Self {
            job_id: job_id.into(),
            kind: kind.into(),
            attempt: 1,
            traceparent: None,
            payload: payload.into(),
            timeout,
        }
    }
}

/// Why a CPU job did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    /// The job ran past its timeout; its process was killed and replaced.
    #[error("CPU job timed out after {after:?}; its worker process was killed")]
    Timeout {
        /// The timeout that was exceeded.
        after: Duration,
    },
    /// The worker process died during the job.
    #[error("CPU worker process died during the job: {cause}")]
    Crashed {
        /// How it ended, e.g. `"killed by signal 6 (SIGABRT)"`.
        cause: String,
    },
    /// The handler panicked; the process was replaced.
    #[error("CPU job handler panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The handler returned an error.
    #[error("CPU job handler returned a {0}")]
    Handler(#[from] HandlerError),
    /// The payload does not fit in one frame.
    #[error("CPU job payload of {size} bytes exceeds the frame limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// Configured `max_frame_bytes` (minus the frame header).
        max: usize,
    },
    /// The pool is shut down (or shutting down); the job was never started.
    #[error("CPU pool is shut down; the job was not started")]
    PoolClosed,
    /// The pool shut down while the job ran and its grace period ran out; the
    /// process was killed. Leave the message unacked so another worker runs it.
    #[error("CPU job interrupted by pool shutdown; its worker process was killed")]
    Interrupted,
    /// The child sent something that is not a valid frame; it was killed and
    /// replaced.
    #[error("protocol error from CPU worker process: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
}

impl CpuError {
    /// Whether running the job again may succeed: true for timeouts, crashes,
    /// panics, protocol errors, shutdown and retryable handler errors; false
    /// for permanent handler errors and oversized payloads.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Handler(err) => err.is_retryable(),
            Self::PayloadTooLarge { .. } => false,
            Self::Timeout { .. }
            | Self::Crashed { .. }
            | Self::Panicked { .. }
            | Self::PoolClosed
            | Self::Interrupted
            | Self::Protocol { .. } => true,
        }
    }

    /// Whether the job failed only because the pool is shutting down: the
    /// caller should leave the message unacked (redelivered, attempt not
    /// counted) rather than schedule a retry.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Self::PoolClosed | Self::Interrupted)
    }

    /// The retry delay the handler asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Handler(HandlerError::Retryable {
                retry_after_ms: Some(ms),
                ..
            }) => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

/// Why [`CpuPool::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A configuration value is out of range.
    #[error("invalid CPU pool configuration: {0}")]
    InvalidConfig(String),
    /// The worker program could not be started.
    #[error("cannot start CPU worker process {program:?}: {source}")]
    Spawn {
        /// The configured program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program started but did not complete the ready handshake.
    #[error("CPU worker process {program:?} failed its start-up handshake: {reason}")]
    Handshake {
        /// The configured program.
        program: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// [`CpuPool::start`] was called inside a worker process.
    #[error(
        "refusing to start a CPU pool inside a CPU worker process; \
         main() must call taskmill_cpu::run_child when is_child_mode() is true"
    )]
    NestedPool,
}

/// Payloads up to this size are copied behind the frame header so a request
/// costs one `write`; larger ones are written from their own buffer. 64 KiB
/// is the default pipe buffer: a bigger write would block part-way anyway.
const INLINE_PAYLOAD_MAX: usize = 64 * 1024;

type Reply = oneshot::Sender<Result<Vec<u8>, CpuError>>;
type SpawnReply = oneshot::Sender<io::Result<Child>>;

/// A job on its way to a child.
struct Job {
    /// Length prefix + header frame part, encoded by the caller, followed by
    /// the payload when it is small.
    prefix: Vec<u8>,
    /// The payload when it is too large to inline in `prefix`, else empty.
    payload: Bytes,
    timeout: Duration,
    reply: Reply,
    /// Set once the job went back to the queue because its child was found
    /// dead before it could accept it; a second such failure is a crash.
    redelivered: bool,
}

struct Shared {
    cfg: PoolConfig,
    jobs_tx: mpsc::Sender<Job>,
    jobs_rx: Mutex<mpsc::Receiver<Job>>,
    /// `Some(hard deadline)` once shutdown began.
    shutdown: watch::Sender<Option<Instant>>,
    closed: AtomicBool,
    busy: AtomicUsize,
    live: AtomicUsize,
    restarts: [AtomicU64; RestartCause::ALL.len()],
    pids: StdMutex<Vec<Option<u32>>>,
    spawner: std::sync::mpsc::Sender<SpawnReply>,
    tracker: TaskTracker,
}

impl Shared {
    fn begin_shutdown(&self, deadline: Instant) {
        self.closed.store(true, Ordering::SeqCst);
        self.shutdown.send_modify(|current| {
            *current = Some(current.map_or(deadline, |d| d.min(deadline)));
        });
    }

    fn is_shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    async fn shutdown_started(&self) {
        let mut rx = self.shutdown.subscribe();
        // The sender lives in `self`, so this only returns once it is Some.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Resolves at the shutdown deadline (never, if no shutdown began).
    async fn hard_deadline(&self) {
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

    async fn next_job(&self) -> Option<Job> {
        self.jobs_rx.lock().await.recv().await
    }

    fn count_restart(&self, cause: RestartCause) {
        self.restarts[cause.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.cfg.on_restart {
            hook(cause);
        }
    }

    fn set_pid(&self, slot: usize, pid: Option<u32>) {
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids[slot] = pid;
    }
}

/// A running worker process.
struct Worker {
    slot: usize,
    pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    jobs_done: u64,
}

/// How to stop a worker process.
#[derive(Clone, Copy, Debug)]
enum Stop {
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
struct Reaped {
    status: Option<ExitStatus>,
    /// Whether we had to signal it (so a SIGKILL status is ours, not the OOM killer's).
    signalled_by_us: bool,
}

impl Reaped {
    fn cause(&self) -> String {
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
    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id() {
            let pid = Pid::from_raw(pid as i32);
            if killpg(pid, signal).is_err() {
                let _ = kill(pid, signal);
            }
        }
    }

    async fn wait_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(err)) => {
                warn!(pid = self.pid, %err, "cannot wait for CPU worker process");
                None
            }
            Err(_elapsed) => None,
        }
    }

    async fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGKILL);
        let _ = self.child.start_kill();
        self.child.wait().await.ok()
    }

    async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        match self.wait_within(grace).await {
            Some(status) => Some(status),
            None => self.kill_and_wait().await,
        }
    }
}

/// Stops and reaps a worker that was serving, and removes it from the live
/// count and the pid list.
async fn reap(shared: &Shared, w: Worker, how: Stop) -> Reaped {
    let slot = w.slot;
    let reaped = stop(shared.cfg.kill_grace, w, how).await;
    shared.live.fetch_sub(1, Ordering::SeqCst);
    shared.set_pid(slot, None);
    reaped
}

/// Stops and reaps a worker process.
async fn stop(grace: Duration, mut w: Worker, how: Stop) -> Reaped {
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
fn start_spawner(
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

enum ExchangeError {
    /// Writing the request failed: the child was gone before it got the job.
    Write(io::Error),
    /// The child's stdout ended (it died or closed it).
    Eof,
    Read(io::Error),
    Frame(FrameError),
}

fn read_error(err: io::Error) -> ExchangeError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ExchangeError::Eof
    } else {
        ExchangeError::Read(err)
    }
}

async fn read_response(
    stdout: &mut BufReader<ChildStdout>,
    max: usize,
) -> Result<Response, ExchangeError> {
    let mut prefix = [0u8; 4];
    stdout.read_exact(&mut prefix).await.map_err(read_error)?;
    let len = frame::parse_len(prefix, max).map_err(ExchangeError::Frame)?;
    let mut body = vec![0u8; len];
    stdout.read_exact(&mut body).await.map_err(read_error)?;
    frame::decode_response(&body).map_err(ExchangeError::Frame)
}

async fn exchange(
    w: &mut Worker,
    prefix: &[u8],
    payload: &[u8],
    max: usize,
) -> Result<Response, ExchangeError> {
    let stdin = w
        .stdin
        .as_mut()
        .ok_or_else(|| ExchangeError::Write(io::ErrorKind::BrokenPipe.into()))?;
    stdin
        .write_all(prefix)
        .await
        .map_err(ExchangeError::Write)?;
    if !payload.is_empty() {
        stdin
            .write_all(payload)
            .await
            .map_err(ExchangeError::Write)?;
    }
    stdin.flush().await.map_err(ExchangeError::Write)?;
    read_response(&mut w.stdout, max).await
}

/// Spawns one child and waits for its ready handshake.
async fn spawn_worker(shared: &Shared, slot: usize) -> Result<Worker, PoolError> {
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
async fn respawn(shared: &Shared, slot: usize) -> Option<Worker> {
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

/// Why a healthy child should be retired now, if it should.
fn recycle_reason(cfg: &PoolConfig, w: &Worker) -> Option<String> {
    if let Some(max) = cfg.max_jobs_per_child
        && w.jobs_done >= max
    {
        return Some(format!("served {} jobs (limit {max})", w.jobs_done));
    }
    if let Some(limit) = cfg.max_rss_per_child_bytes
        && let Some(rss) = rss_bytes(w.pid)
        && rss > limit
    {
        return Some(format!("resident set {rss} bytes above limit {limit}"));
    }
    None
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    // A procfs read does not block on disk; it is fine on a runtime thread.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// Extracts `VmRSS` (in kB) from the text of `/proc/<pid>/status`, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Owns one slot for the whole life of the pool.
async fn supervise(shared: Arc<Shared>, slot: usize, first: Worker) {
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

/// Dropping the last [`CpuPool`] handle starts an immediate shutdown.
struct PoolHandle {
    shared: Arc<Shared>,
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.shared.begin_shutdown(Instant::now());
    }
}

/// A pool of worker processes for CPU-bound jobs. Cheap to clone; all clones
/// share the same processes. Dropping the last clone kills and reaps the
/// children in the background; call [`shutdown`](Self::shutdown) to drain.
#[derive(Clone)]
pub struct CpuPool {
    inner: Arc<PoolHandle>,
}

impl fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPool")
            .field("size", &self.size())
            .field("live", &self.live())
            .field("busy", &self.busy())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl CpuPool {
    /// Starts `cfg.size` worker processes and waits until each one completed
    /// its ready handshake. Must be called inside a tokio runtime.
    pub async fn start(cfg: PoolConfig) -> Result<CpuPool, PoolError> {
        if is_child_mode() {
            return Err(PoolError::NestedPool);
        }
        cfg.validate()?;
        let spawner =
            start_spawner(cfg.clone(), tokio::runtime::Handle::current()).map_err(|source| {
                PoolError::Spawn {
                    program: cfg.program.clone(),
                    source,
                }
            })?;
        let (jobs_tx, jobs_rx) = mpsc::channel(1);
        let size = cfg.size;
        let shared = Arc::new(Shared {
            cfg,
            jobs_tx,
            jobs_rx: Mutex::new(jobs_rx),
            shutdown: watch::Sender::new(None),
            closed: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            restarts: Default::default(),
            pids: StdMutex::new(vec![None; size]),
            spawner,
            tracker: TaskTracker::new(),
        });

        let mut starting = JoinSet::new();
        for slot in 0..size {
            let shared = Arc::clone(&shared);
            starting.spawn(async move { (slot, spawn_worker(&shared, slot).await) });
        }
        let mut workers = Vec::with_capacity(size);
        let mut first_error = None;
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((slot, Ok(worker))) => workers.push((slot, worker)),
                Ok((_, Err(err))) => {
                    first_error.get_or_insert(err);
                }
                Err(join_error) => {
                    first_error.get_or_insert(PoolError::Spawn {
                        program: shared.cfg.program.clone(),
                        source: io::Error::other(join_error.to_string()),
                    });
                }
            }
        }
        if let Some(err) = first_error {
            for (_, worker) in workers {
                reap(&shared, worker, Stop::Kill).await;
            }
            return Err(err);
        }
        for (slot, worker) in workers {
            shared
                .tracker
                .spawn(supervise(Arc::clone(&shared), slot, worker));
        }
        info!(
            size,
            rayon_threads_per_child = shared.cfg.rayon_threads_per_child,
            program = ?shared.cfg.program,
            "CPU pool started"
        );
        Ok(CpuPool {
            inner: Arc::new(PoolHandle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Runs one job on an idle worker process, waiting for one if all are busy.
    ///
    /// Cancellation-safe: dropping the future before a child took the job
    /// means it never starts; dropping it mid-job kills and replaces the child
    /// (counted as [`RestartCause::Cancelled`]).
    pub async fn run(&self, req: CpuRequest) -> Result<Vec<u8>, CpuError> {
        let shared = self.shared();
        if shared.closed.load(Ordering::SeqCst) {
            return Err(CpuError::PoolClosed);
        }
        let header = RequestHeader {
            job_id: req.job_id,
            kind: req.kind,
            attempt: req.attempt,
            traceparent: req.traceparent,
        };
        let max = shared.cfg.max_frame_bytes;
        // A small payload goes into the same buffer as the frame header, so
        // the supervisor sends the whole request with one write; a large one
        // is written straight from its `Bytes` afterwards instead of copied.
        let inline = req.payload.len() <= INLINE_PAYLOAD_MAX;
        let extra = if inline { req.payload.len() } else { 0 };
        let mut prefix =
            frame::encode_request_prefix_with_capacity(&header, req.payload.len(), max, extra)
                .map_err(|err| match err {
                    FrameError::TooLarge { .. } => CpuError::PayloadTooLarge {
                        size: req.payload.len(),
                        max,
                    },
                    other => CpuError::Protocol {
                        message: other.to_string(),
                    },
                })?;
        let payload = if inline {
            prefix.extend_from_slice(&req.payload);
            Bytes::new()
        } else {
            req.payload
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            prefix,
            payload,
            timeout: req.timeout,
            reply,
            redelivered: false,
        };
        tokio::select! {
            biased;
            () = shared.shutdown_started() => return Err(CpuError::PoolClosed),
            sent = shared.jobs_tx.send(job) => if sent.is_err() {
                return Err(CpuError::PoolClosed);
            },
        }
        // A dropped reply sender means the job was discarded unstarted by a
        // shutdown.
        answer.await.unwrap_or(Err(CpuError::PoolClosed))
    }

    /// Stops accepting jobs (new and queued ones get [`CpuError::PoolClosed`]),
    /// lets running jobs finish within `grace`, then kills the children still
    /// busy (their callers get [`CpuError::Interrupted`]) and reaps every
    /// child. Returns when no child process is left.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = self.shared();
        shared.begin_shutdown(Instant::now() + grace);
        {
            // Idle supervisors release the queue as soon as they see the
            // shutdown; busy ones never take another job. Closing and draining
            // answers every queued caller now instead of after the grace.
            let mut queue = shared.jobs_rx.lock().await;
            queue.close();
            while queue.try_recv().is_ok() {}
        }
        shared.tracker.close();
        shared.tracker.wait().await;
        info!("CPU pool shut down");
    }

    /// Configured number of worker processes.
    pub fn size(&self) -> usize {
        self.shared().cfg.size
    }

    /// Worker processes currently running a job.
    pub fn busy(&self) -> usize {
        self.shared().busy.load(Ordering::SeqCst)
    }

    /// Worker processes currently alive and ready (handshake done, not yet
    /// reaped). Equal to [`size`](Self::size) except while one is being
    /// replaced, and 0 after [`shutdown`](Self::shutdown).
    pub fn live(&self) -> usize {
        self.shared().live.load(Ordering::SeqCst)
    }

    /// Process ids of the live worker processes.
    pub fn pids(&self) -> Vec<u32> {
        let pids = self.shared().pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.iter().flatten().copied().collect()
    }

    /// How many worker processes were replaced for `cause` so far.
    pub fn restarts(&self, cause: RestartCause) -> u64 {
        self.shared().restarts[cause.index()].load(Ordering::Relaxed)
    }

    /// Replacements for all causes.
    pub fn restarts_total(&self) -> u64 {
        RestartCause::ALL.iter().map(|&c| self.restarts(c)).sum()
    }

    /// Whether [`shutdown`](Self::shutdown) began.
    pub fn is_closed(&self) -> bool {
        self.shared().closed.load(Ordering::SeqCst)
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared().cfg
    }
}

/// Measures `n` sequential round trips of a no-op job through `pool` (frame
/// encode, hand-off to an idle child, pipe write, child dispatch, response):
/// the fixed cost a CPU job pays on top of its own work. For the benchmark
/// tool; not a test.
///
/// The calls are made from a task spawned on the current runtime, as the
/// worker runs each job in its own task. Called straight from `block_on`,
/// every answer would also have to wake the thread blocked outside the
/// runtime, a cost no job in a worker pays.
pub async fn measure_handoff(pool: &CpuPool, n: usize) -> Result<Vec<Duration>, CpuError> {
    let pool = pool.clone();
    let timed = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            let req = CpuRequest::new(
                format!("handoff-{i}"),
                NOOP_KIND,
                Bytes::new(),
                Duration::from_secs(10),
            );
            let started = std::time::Instant::now();
            pool.run(req).await?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    });
    match timed.await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            std::panic::resume_unwind(join_error.into_panic())
        }
        // Only a runtime shutting down cancels the task.
        Err(_) => Err(CpuError::PoolClosed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_parsing() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name: kthread\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn retryability() {
        assert!(
            CpuError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(CpuError::Crashed { cause: "x".into() }.is_retryable());
        assert!(
            CpuError::Panicked {
                message: "x".into()
            }
            .is_retryable()
        );
        assert!(CpuError::Handler(HandlerError::retryable("x")).is_retryable());
        assert!(!CpuError::Handler(HandlerError::permanent("x")).is_retryable());
        assert!(!CpuError::PayloadTooLarge { size: 2, max: 1 }.is_retryable());
        assert!(CpuError::Interrupted.is_shutdown() && CpuError::PoolClosed.is_shutdown());
        let e = CpuError::Handler(HandlerError::Retryable {
            message: "busy".into(),
            retry_after_ms: Some(1500),
        });
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(
            e.to_string(),
            "CPU job handler returned a retryable error: busy"
        );
        assert_eq!(
            CpuError::Crashed {
                cause: "killed by signal 6 (SIGABRT)".into()
            }
            .to_string(),
            "CPU worker process died during the job: killed by signal 6 (SIGABRT)"
        );
    }

    #[test]
    fn config_defaults_follow_the_rayon_rule() {
        let cores = available_cores();
        let cfg = PoolConfig::for_current_exe(0);
        assert_eq!(cfg.size, cores);
        assert_eq!(cfg.rayon_threads_per_child, 1);
        let cfg = PoolConfig::for_current_exe(1);
        assert_eq!(cfg.rayon_threads_per_child, cores);
        assert!(cfg.size * cfg.rayon_threads_per_child <= cores.max(1));
        let mut bad = PoolConfig::for_current_exe(1);
        bad.rayon_threads_per_child = 0;
        assert!(matches!(bad.validate(), Err(PoolError::InvalidConfig(_))));
    }

    #[test]
    fn restart_cause_labels_are_unique() {
        let labels: std::collections::HashSet<_> =
            RestartCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels.len(), RestartCause::ALL.len());
        for (i, c) in RestartCause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }
}
