//! Recycling: whether a healthy child should be retired after a job (job
//! count or resident set size, read from `/proc`).

use super::PoolConfig;
use super::worker::Worker;

/// Why a healthy child should be retired now, if it should.
pub(super) fn recycle_reason(cfg: &PoolConfig, w: &Worker) -> Option<String> {
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
}
