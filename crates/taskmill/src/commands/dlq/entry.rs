//! One dead letter, summarised the same way whoever dead-lettered it.

use std::time::Duration;

use serde_json::json;
use taskmill_broker::browse::{Browsed, XDeath};
use taskmill_core::wire::{H_ATTEMPT, H_KIND};
use taskmill_core::{DeadLetter, HeaderValue};

/// Who dead-lettered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A taskmill worker: `taskmill-dead-*` headers.
    Worker,
    /// RabbitMQ itself (e.g. a quorum queue's delivery limit): `x-death`.
    Broker,
    /// Neither set of headers (published to `Q.dead` by something else).
    Unknown,
}

impl Source {
    /// Its name in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Worker => "worker",
            Source::Broker => "broker",
            Source::Unknown => "unknown",
        }
    }
}

/// What `dlq list` shows about one dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Job id (`message_id`).
    pub id: Option<String>,
    /// `taskmill-kind`.
    pub kind: Option<String>,
    /// `taskmill-dead-reason`, else the broker's `x-death` reason
    /// (`delivery_limit`, `rejected`, ...), else `unknown`.
    pub reason: String,
    /// `taskmill-dead-error`, or a description of the broker's dead-lettering.
    pub error: Option<String>,
    /// The work queue it died in.
    pub queue: Option<String>,
    /// `taskmill-attempt` (1 when absent).
    pub attempts: i64,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub dead_at_ms: Option<u64>,
    /// `taskmill-dead-worker`.
    pub worker: Option<String>,
    /// Who dead-lettered it.
    pub source: Source,
}

impl Entry {
    /// Summarises a browsed message.
    pub fn of(msg: &Browsed) -> Entry {
        Entry::from_parts(msg.message_id(), &msg.headers(), &msg.x_death())
    }

    /// Summarises a message from its id, headers and decoded `x-death`.
    /// taskmill's headers win when both are present.
    pub fn from_parts(
        message_id: Option<&str>,
        headers: &[(String, HeaderValue)],
        x_death: &[XDeath],
    ) -> Entry {
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let string = |name: &str| match get(name) {
            Some(HeaderValue::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let int = |name: &str| match get(name) {
            Some(HeaderValue::Int(n)) => Some(*n),
            _ => None,
        };
        // The worker's record, read with the codec the worker wrote it with.
        let dl = DeadLetter::from_headers(|name| get(name).cloned());
        let first = x_death.first();
        let source = match (&dl, first) {
            (Some(_), _) => Source::Worker,
            (None, Some(_)) => Source::Broker,
            (None, None) => Source::Unknown,
        };
        let dl = dl.unwrap_or(DeadLetter {
            reason: first.map_or_else(|| "unknown".to_string(), |d| d.reason.clone()),
            detail: None,
            queue: None,
            worker: None,
            dead_at_ms: None,
            attempts: None,
            first_failed_at_ms: None,
        });
        let error = dl.detail.or_else(|| {
            first.map(|d| {
                format!(
                    "dead-lettered by the broker from `{}` ({}, {} time{})",
                    d.queue,
                    d.reason,
                    d.count,
                    if d.count == 1 { "" } else { "s" }
                )
            })
        });
        let dead_at_ms = dl
            .dead_at_ms
            .or_else(|| first.and_then(|d| d.time).map(|s| s.saturating_mul(1000)));
        Entry {
            id: message_id.map(str::to_string),
            kind: string(H_KIND),
            reason: dl.reason,
            error,
            queue: dl.queue.or_else(|| first.map(|d| d.queue.clone())),
            attempts: dl
                .attempts
                .map(i64::from)
                .or_else(|| int(H_ATTEMPT))
                .unwrap_or(1),
            dead_at_ms,
            worker: dl.worker,
            source,
        }
    }

    /// How long ago it was dead-lettered.
    pub fn age(&self, now_ms: u64) -> Option<Duration> {
        self.dead_at_ms
            .map(|at| Duration::from_millis(now_ms.saturating_sub(at)))
    }

    /// One JSON object (a line of `dlq list --json`).
    pub fn to_json(&self, now_ms: u64) -> serde_json::Value {
        json!({
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "error": self.error,
            "queue": self.queue,
            "attempts": self.attempts,
            "dead_at_ms": self.dead_at_ms,
            "age_s": self.age(now_ms).map(|a| a.as_secs()),
            "worker": self.worker,
            "source": self.source.as_str(),
        })
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    taskmill_broker::now_ms()
}

/// A short age: `42s`, `7m3s`, `5h12m`, `3d4h`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m{}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmill_core::DeadReason;
    use taskmill_core::wire::{H_DEAD_AT_MS, H_DEAD_ERROR, H_DEAD_QUEUE, H_DEAD_REASON};

    fn h(name: &str, v: HeaderValue) -> (String, HeaderValue) {
        (name.to_string(), v)
    }

    #[test]
    fn worker_dead_letter() {
        let e = Entry::from_parts(
            Some("j1"),
            &[
                h(H_KIND, HeaderValue::Str("k".into())),
                h(H_ATTEMPT, HeaderValue::Int(3)),
                h(H_DEAD_REASON, HeaderValue::Str("handler_error".into())),
                h(H_DEAD_ERROR, HeaderValue::Str("boom".into())),
                h(H_DEAD_QUEUE, HeaderValue::Str("q".into())),
                h(H_DEAD_AT_MS, HeaderValue::Int(1_000)),
            ],
            &[],
        );
        assert_eq!(e.source, Source::Worker);
        assert_eq!(e.reason, "handler_error");
        assert_eq!(e.attempts, 3);
        assert_eq!(e.age(61_000), Some(Duration::from_secs(60)));
        let j = e.to_json(61_000);
        assert_eq!(j["id"], "j1");
        assert_eq!(j["age_s"], 60);
        assert_eq!(j["source"], "worker");
    }

    #[test]
    fn reads_what_the_worker_codec_writes() {
        let mut dl = DeadLetter::new(DeadReason::Timeout, "slow", "q", "w-9", 2_000);
        dl.attempts = Some(4);
        let headers: Vec<(String, HeaderValue)> = dl
            .to_headers()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let e = Entry::from_parts(Some("j3"), &headers, &[]);
        assert_eq!(e.source, Source::Worker);
        assert_eq!(
            (e.reason.as_str(), e.error.as_deref(), e.queue.as_deref()),
            ("timeout", Some("slow"), Some("q"))
        );
        assert_eq!(
            (e.attempts, e.dead_at_ms, e.worker.as_deref()),
            (4, Some(2_000), Some("w-9"))
        );
    }

    #[test]
    fn broker_dead_letter_uses_x_death() {
        let d = XDeath {
            reason: "delivery_limit".into(),
            queue: "q".into(),
            count: 1,
            time: Some(10),
            exchange: Some("taskmill".into()),
            routing_keys: vec!["q".into()],
        };
        let e = Entry::from_parts(Some("j2"), &[h(H_KIND, HeaderValue::Str("k".into()))], &[d]);
        assert_eq!(e.source, Source::Broker);
        assert_eq!(e.reason, "delivery_limit");
        assert_eq!(e.attempts, 1, "attempt defaults to 1");
        assert_eq!(e.queue.as_deref(), Some("q"));
        assert_eq!(e.dead_at_ms, Some(10_000));
        assert!(e.error.unwrap().contains("delivery_limit"));
    }

    #[test]
    fn bare_message() {
        let e = Entry::from_parts(None, &[], &[]);
        assert_eq!(e.reason, "unknown");
        assert_eq!(e.source, Source::Unknown);
        assert_eq!(e.age(5), None);
    }

    #[test]
    fn ages() {
        assert_eq!(format_age(Duration::from_secs(42)), "42s");
        assert_eq!(format_age(Duration::from_secs(423)), "7m3s");
        assert_eq!(format_age(Duration::from_secs(5 * 3600 + 720)), "5h12m");
        assert_eq!(
            format_age(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d4h"
        );
    }
}
