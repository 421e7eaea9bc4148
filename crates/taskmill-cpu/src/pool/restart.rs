//! [`RestartCause`]: why a worker process was replaced, with stable labels
//! for metrics.

use std::fmt;

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
    /// Killed because the caller of [`CpuPool::run`](super::CpuPool::run)
    /// dropped the future mid-job.
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

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RestartCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
