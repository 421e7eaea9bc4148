//! Processes: which children a pid has and whether they still run, read from
//! `/proc/PID/stat` (a killed child stays a zombie until it is reaped, so
//! "exists" is not "runs"); child processes that lead their own process
//! group and are killed with it; the end of a log file.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::Error;

/// State (`R`, `S`, `Z`, ...) and parent pid of `pid`, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces and ')'.
    let rest = text.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let parent = f.next()?.parse().ok()?;
    Some((state, parent))
}

/// Pids and states of the processes whose parent is `ppid`, zombies
/// included.
pub fn children_of(ppid: u32) -> Vec<(u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<(u32, char)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|pid| match stat(pid) {
            Some((state, parent)) if parent == ppid => Some((pid, state)),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out
}

/// Whether process `pid` runs: it exists and is neither a zombie nor dead.
pub fn is_running(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The last `n` lines of a log file, each cut at 300 characters.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(|l| match l.char_indices().nth(300) {
            Some((i, _)) => format!("{}...", &l[..i]),
            None => l.to_string(),
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process leading its own process group. The whole group is killed
/// when it is stopped or dropped (on error, or when Ctrl-C drops the run), so
/// no grandchild (a Celery pool, a worker's CPU processes) outlives it.
#[derive(Debug)]
pub struct ProcessGroup {
    /// The leader.
    pub child: tokio::process::Child,
    pgid: Option<Pid>,
}

impl ProcessGroup {
    /// Spawns `cmd` with stdout and stderr to the file `log`.
    pub fn spawn(mut cmd: tokio::process::Command, log: &Path) -> Result<ProcessGroup, Error> {
        let out = std::fs::File::create(log)?;
        cmd.stdout(out.try_clone()?);
        cmd.stderr(out);
        ProcessGroup::start(cmd)
    }

    /// Spawns `cmd` with stdout piped and stderr to the file `log`.
    pub fn spawn_piped(
        mut cmd: tokio::process::Command,
        log: &Path,
    ) -> Result<ProcessGroup, Error> {
        cmd.stdout(Stdio::piped());
        cmd.stderr(std::fs::File::create(log)?);
        ProcessGroup::start(cmd)
    }

    fn start(mut cmd: tokio::process::Command) -> Result<ProcessGroup, Error> {
        cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
        let child = cmd.spawn()?;
        let pgid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        Ok(ProcessGroup { child, pgid })
    }

    /// The leader exited and was reaped: kills what is left of its group.
    pub fn disarm(&mut self) {
        if let Some(pg) = self.pgid.take() {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }

    /// SIGTERM to the leader (so it can finish what it holds and exit),
    /// SIGKILL to the group after `grace` or once the leader is gone.
    pub async fn stop(mut self, name: &str, grace: Duration) -> Result<ExitStatus, Error> {
        if let Some(pid) = self.pgid {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let status = tokio::time::timeout(grace, self.child.wait()).await;
        self.disarm();
        match status {
            Ok(s) => Ok(s?),
            Err(_) => {
                let _ = self.child.wait().await;
                Err(Error::NotStopped {
                    name: name.to_string(),
                    grace,
                })
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_child_is_a_zombie_until_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(is_running(pid));
        assert!(
            children_of(std::process::id())
                .iter()
                .any(|(p, _)| *p == pid)
        );
        child.kill().unwrap();
        // Not reaped yet: the pid still exists, as a zombie.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while is_running(pid) {
            assert!(
                std::time::Instant::now() < until,
                "the killed child still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            children_of(std::process::id())
                .iter()
                .find(|(p, _)| *p == pid),
            Some(&(pid, 'Z'))
        );
        child.wait().unwrap();
        assert!(
            !children_of(std::process::id())
                .iter()
                .any(|(p, _)| *p == pid)
        );
    }

    #[test]
    fn a_tail_keeps_the_last_lines() {
        let dir = crate::TempDir::new("tail").unwrap();
        let log = dir.join("x.log");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&log, 2), "b\nc");
        assert_eq!(log_tail(&dir.join("none"), 2), "");
    }
}
