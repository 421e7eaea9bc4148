//! [`PoolConfig`]: the pool's size, limits, timeouts and program, with the
//! defaults that follow the rayon rule (`size × rayon_threads_per_child ≤
//! cores`).

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{PoolError, RestartCause};
use crate::frame;

/// Number of CPUs this process may use (`available_parallelism`, at least 1).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Callback invoked each time a worker process is replaced (for metrics).
/// It runs on a supervisor task: keep it quick and never panic in it.
pub type RestartHook = Arc<dyn Fn(RestartCause) + Send + Sync>;

/// Configuration of a [`CpuPool`](super::CpuPool).
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
    /// [`is_child_mode`](crate::is_child_mode) is true. Falls back to
    /// `/proc/self/exe` if the executable path cannot be determined.
    pub fn for_current_exe(size: usize) -> Self {
        let program = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        Self::new(program, size)
    }

    pub(super) fn validate(&self) -> Result<(), PoolError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
