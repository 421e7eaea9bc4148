//! The dead-letter header codec: what a worker writes on the copy it puts in
//! `Q.dead`, and what the DLQ tools read back. One struct, one encoder, one
//! decoder, so writer and reader cannot drift apart.

use crate::bounds::{MAX_DETAIL_BYTES, truncate_text};
use crate::wire::{DeadReason, H_FIRST_FAILED_AT_MS, HeaderValue, MAX_ID_LEN};

/// Header: the reason code (one of [`DeadReason`]).
pub const H_DEAD_REASON: &str = "taskmill-dead-reason";
/// Header: the human-readable error, at most [`MAX_DETAIL_BYTES`].
pub const H_DEAD_ERROR: &str = "taskmill-dead-error";
/// Header: the queue the job was consumed from.
pub const H_DEAD_QUEUE: &str = "taskmill-dead-queue";
/// Header: when it was dead-lettered, ms since the Unix epoch.
pub const H_DEAD_AT_MS: &str = "taskmill-dead-at-ms";
/// Header: the id of the worker that dead-lettered it.
pub const H_DEAD_WORKER: &str = "taskmill-dead-worker";
/// Header: how many attempts ran before it was dead-lettered.
pub const H_DEAD_ATTEMPTS: &str = "taskmill-dead-attempts";

/// What a worker records about a message it dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The reason code ([`DeadReason::as_str`]); kept as text so that a code
    /// written by a newer worker still reads.
    pub reason: String,
    /// What went wrong (bounded by [`MAX_DETAIL_BYTES`] when written).
    pub detail: Option<String>,
    /// The work queue it was consumed from.
    pub queue: Option<String>,
    /// The worker that dead-lettered it.
    pub worker: Option<String>,
    /// When, ms since the Unix epoch.
    pub dead_at_ms: Option<u64>,
    /// Attempts run (1 for a message refused before it ran).
    pub attempts: Option<u32>,
    /// When its first attempt failed, ms since the Unix epoch.
    pub first_failed_at_ms: Option<u64>,
}

impl DeadLetter {
    /// A dead letter written now (`dead_at_ms`, from the caller's clock). The
    /// detail is cut to [`MAX_DETAIL_BYTES`] and the worker id to
    /// [`MAX_ID_LEN`], so no error text can make the copy too large.
    pub fn new(
        reason: DeadReason,
        detail: &str,
        queue: &str,
        worker: &str,
        dead_at_ms: u64,
    ) -> Self {
        DeadLetter {
            reason: reason.as_str().to_string(),
            detail: Some(truncate_text(detail, MAX_DETAIL_BYTES).into_owned()),
            queue: Some(queue.to_string()),
            worker: Some(truncate_text(worker, MAX_ID_LEN).into_owned()),
            dead_at_ms: Some(dead_at_ms),
            attempts: None,
            first_failed_at_ms: None,
        }
    }

    /// The known reason, when the code is one this version defines.
    pub fn dead_reason(&self) -> Option<DeadReason> {
        DeadReason::from_code(&self.reason)
    }

    /// The headers to set on the dead-letter copy. Texts are bounded again
    /// here (a no-op for what [`DeadLetter::new`] made).
    pub fn to_headers(&self) -> Vec<(&'static str, HeaderValue)> {
        let text = |s: &str, max| HeaderValue::Str(truncate_text(s, max).into_owned());
        let int = |n: u64| HeaderValue::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let mut h = vec![(H_DEAD_REASON, text(&self.reason, MAX_ID_LEN))];
        if let Some(d) = &self.detail {
            h.push((H_DEAD_ERROR, text(d, MAX_DETAIL_BYTES)));
        }
        if let Some(q) = &self.queue {
            h.push((H_DEAD_QUEUE, text(q, MAX_ID_LEN)));
        }
        if let Some(w) = &self.worker {
            h.push((H_DEAD_WORKER, text(w, MAX_ID_LEN)));
        }
        if let Some(ms) = self.dead_at_ms {
            h.push((H_DEAD_AT_MS, int(ms)));
        }
        if let Some(n) = self.attempts {
            h.push((H_DEAD_ATTEMPTS, int(u64::from(n))));
        }
        if let Some(ms) = self.first_failed_at_ms {
            h.push((H_FIRST_FAILED_AT_MS, int(ms)));
        }
        h
    }

    /// Reads the dead-letter headers through `header`; `None` when the
    /// message has no [`H_DEAD_REASON`] (a taskmill worker did not
    /// dead-letter it). A header of the wrong type reads as absent.
    pub fn from_headers(header: impl Fn(&str) -> Option<HeaderValue>) -> Option<DeadLetter> {
        let text = |name: &str| match header(name) {
            Some(HeaderValue::Str(s)) => Some(s),
            _ => None,
        };
        let uint = |name: &str| match header(name) {
            Some(HeaderValue::Int(n)) => u64::try_from(n).ok(),
            _ => None,
        };
        Some(DeadLetter {
            reason: text(H_DEAD_REASON)?,
            detail: text(H_DEAD_ERROR),
            queue: text(H_DEAD_QUEUE),
            worker: text(H_DEAD_WORKER),
            dead_at_ms: uint(H_DEAD_AT_MS),
            attempts: uint(H_DEAD_ATTEMPTS).and_then(|n| u32::try_from(n).ok()),
            first_failed_at_ms: uint(H_FIRST_FAILED_AT_MS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::TRUNCATED_MARKER;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn read(h: Vec<(&'static str, HeaderValue)>) -> Option<DeadLetter> {
        let map: HashMap<&str, HeaderValue> = h.into_iter().collect();
        DeadLetter::from_headers(|n| map.get(n).cloned())
    }

    #[test]
    fn details_are_bounded_and_reasons_known() {
        let d = DeadLetter::new(DeadReason::HandlerError, &"e".repeat(100_000), "q", "w", 5);
        let detail = d.detail.as_deref().unwrap();
        assert!(detail.len() <= MAX_DETAIL_BYTES && detail.ends_with(TRUNCATED_MARKER));
        assert_eq!(d.dead_reason(), Some(DeadReason::HandlerError));
        assert_eq!(read(d.to_headers()), Some(d));
        assert_eq!(
            read(vec![(H_DEAD_ERROR, HeaderValue::Str("x".into()))]),
            None
        );
    }

    fn small_text() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    proptest! {
        #[test]
        fn headers_round_trip(
            reason in small_text(),
            detail in proptest::option::of("\\PC{0,600}"),
            queue in proptest::option::of(small_text()),
            worker in proptest::option::of(small_text()),
            dead_at_ms in proptest::option::of(0u64..=i64::MAX as u64),
            attempts in proptest::option::of(any::<u32>()),
            first_failed_at_ms in proptest::option::of(0u64..=i64::MAX as u64),
        ) {
            let d = DeadLetter { reason, detail, queue, worker, dead_at_ms, attempts, first_failed_at_ms };
            prop_assert_eq!(read(d.to_headers()), Some(d));
        }

        #[test]
        fn written_headers_stay_small(detail in "\\PC{0,5000}", worker in "\\PC{0,400}") {
            let d = DeadLetter::new(DeadReason::Crashed, &detail, "q", &worker, u64::MAX);
            let bytes: usize = d.to_headers().iter().map(|(k, v)| k.len() + match v {
                HeaderValue::Str(s) => s.len(),
                _ => 8,
            }).sum();
            prop_assert!(bytes <= MAX_DETAIL_BYTES + 4 * MAX_ID_LEN + 200);
        }
    }
}
