//! Turning a child's exit status into a cause an operator can act on.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Describes how a worker process ended, e.g. `"killed by signal 6 (SIGABRT)"`
/// or `"exited with status 101"`. SIGKILL that we did not send ourselves is
/// almost always the kernel OOM killer (or a container memory limit), so the
/// text says so.
pub fn describe_exit_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(signal) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(signal)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        let mut text = format!("killed by signal {signal} ({name})");
        if status.core_dumped() {
            text.push_str(", core dumped");
        }
        if signal == libc::SIGKILL {
            text.push_str(", possibly OOM-killed");
        }
        return text;
    }
    format!("ended with wait status {:#x}", status.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_signals_and_codes() {
        // Raw wait statuses: low 7 bits = signal, bit 7 = core, code << 8.
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(6)),
            "killed by signal 6 (SIGABRT)"
        );
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(11 | 0x80)),
            "killed by signal 11 (SIGSEGV), core dumped"
        );
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL), possibly OOM-killed"
        );
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(101 << 8)),
            "exited with status 101"
        );
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(0)),
            "exited with status 0"
        );
    }
}
