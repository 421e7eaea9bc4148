//! What the process environment supplies: the wall clock, fresh job ids and
//! the host name. `taskmill-core` is pure and takes these as arguments; they
//! live here because every crate that needs them (worker, client, binary)
//! already depends on this one, the crate that does IO.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// A fresh job id: a random UUIDv4 in its hyphenated form.
pub fn new_job_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The default worker id, `hostname-pid-xxxx` (four random hex digits), for
/// a worker whose configuration names none (see
/// [`taskmill_core::config::Config::worker_id`]). The random part keeps it
/// unique per process start: a container restarted in the same pod has the
/// same host name and often the same pid (1), and must not pass for its dead
/// predecessor in the worker registry.
pub fn default_worker_id() -> String {
    let nonce = uuid::Uuid::new_v4().as_u128() as u16;
    format!("{}-{}-{nonce:04x}", host_name(), std::process::id())
}

/// The machine's host name (the pod name on Kubernetes), `worker` when the
/// kernel does not say.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_fresh_uuids() {
        let (a, b) = (new_job_id(), new_job_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }

    #[test]
    fn clock_is_after_2020_and_worker_id_names_the_pid() {
        assert!(now_us() > 1_577_836_800_000_000);
        let id = default_worker_id();
        let (rest, nonce) = id.rsplit_once('-').unwrap();
        assert_eq!(nonce.len(), 4);
        assert!(rest.ends_with(&format!("-{}", std::process::id())));
        assert!(u16::from_str_radix(nonce, 16).is_ok());
    }
}
