//! The [`Envelope`]: a job as protocol v1 carries it, its headers, and the
//! decoding of a delivered message with a reason for every refusal.

use std::time::Duration;

use super::headers::{
    check_id, check_key, check_kind, int_header, str_header, too_large, trace_context,
};
use super::*;

/// The AMQP properties of a message that protocol v1 reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Properties<'a> {
    /// `message_id`.
    pub message_id: Option<&'a str>,
    /// `content_type`.
    pub content_type: Option<&'a str>,
    /// `timestamp`, seconds since the Unix epoch.
    pub timestamp: Option<u64>,
}

/// A job as it travels: everything protocol v1 carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Job id (`message_id`), unique per job; kept across retries.
    pub job_id: String,
    /// Kind: the handler's registered name.
    pub kind: String,
    /// The queue it is routed to (routing key).
    pub queue: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Idempotency key: a completed key never runs again.
    pub idempotency_key: Option<String>,
    /// Per-job hard timeout; can only lower the kind's configured timeout.
    pub timeout: Option<Duration>,
    /// Enqueue time, microseconds since the Unix epoch.
    pub enqueued_at_us: Option<u64>,
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
    /// W3C `tracestate`.
    pub tracestate: Option<String>,
    /// When the first attempt failed (ms since the Unix epoch), on retries.
    pub first_failed_at_ms: Option<u64>,
    /// Whether an operator replayed it from the dead-letter queue.
    pub replay: bool,
    /// The JSON payload, as bytes: parsed once, by the handler's deserializer.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// A new job with id `job_id`, attempt 1. The id and the enqueue time
    /// come from the caller (`taskmill_broker::new_job_id` and `now_us`), so
    /// this crate draws no random numbers and reads no clock; set
    /// [`Envelope::enqueued_at_us`] to measure queue wait.
    pub fn new(
        job_id: impl Into<String>,
        kind: impl Into<String>,
        queue: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Envelope {
            job_id: job_id.into(),
            kind: kind.into(),
            queue: queue.into(),
            attempt: 1,
            idempotency_key: None,
            timeout: None,
            enqueued_at_us: None,
            traceparent: None,
            tracestate: None,
            first_failed_at_ms: None,
            replay: false,
            payload,
        }
    }

    /// The headers protocol v1 writes for this envelope.
    pub fn headers(&self) -> Vec<(&'static str, HeaderValue)> {
        let mut h = Vec::with_capacity(8);
        h.push((H_PROTOCOL, HeaderValue::Int(PROTOCOL_VERSION)));
        h.push((H_KIND, HeaderValue::Str(self.kind.clone())));
        h.push((H_ATTEMPT, HeaderValue::Int(i64::from(self.attempt))));
        if let Some(k) = &self.idempotency_key {
            h.push((H_IDEMPOTENCY_KEY, HeaderValue::Str(k.clone())));
        }
        if let Some(t) = self.timeout {
            h.push((
                H_TIMEOUT_MS,
                HeaderValue::Int(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            ));
        }
        if let Some(us) = self.enqueued_at_us {
            h.push((
                H_ENQUEUED_AT_US,
                HeaderValue::Int(i64::try_from(us).unwrap_or(i64::MAX)),
            ));
        }
        if let Some(tp) = &self.traceparent {
            h.push((H_TRACEPARENT, HeaderValue::Str(tp.clone())));
        }
        if let Some(ts) = &self.tracestate {
            h.push((H_TRACESTATE, HeaderValue::Str(ts.clone())));
        }
        if let Some(ms) = self.first_failed_at_ms {
            h.push((
                H_FIRST_FAILED_AT_MS,
                HeaderValue::Int(i64::try_from(ms).unwrap_or(i64::MAX)),
            ));
        }
        if self.replay {
            h.push((H_REPLAY, HeaderValue::Bool(true)));
        }
        h
    }

    /// Checks what a producer is about to publish, so a bad job is an error to
    /// the caller instead of a dead letter later.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), DecodeError> {
        self.validate_except_json(max_payload_bytes)?;
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&self.payload) {
            return Err(DecodeError::new(
                DeadReason::InvalidJson,
                format!("payload is not JSON: {e}"),
            ));
        }
        Ok(())
    }

    /// [`Envelope::validate`] without parsing the payload: for a payload that
    /// `serde_json` itself produced.
    pub fn validate_except_json(&self, max_payload_bytes: usize) -> Result<(), DecodeError> {
        check_kind(&self.kind)?;
        if self.job_id.is_empty() {
            return Err(DecodeError::new(
                DeadReason::MissingHeader,
                "job id (message_id) is empty",
            ));
        }
        check_id("job id (message_id)", &self.job_id)?;
        if let Some(k) = &self.idempotency_key {
            check_key(k)?;
        }
        if self.attempt == 0 {
            return Err(DecodeError::new(
                DeadReason::BadHeader,
                "attempt must be at least 1",
            ));
        }
        if self.payload.len() > max_payload_bytes {
            return Err(too_large(self.payload.len(), max_payload_bytes));
        }
        Ok(())
    }

    /// Decodes a delivered message. The payload is only size-checked here; its
    /// JSON is parsed once, by the handler's deserializer.
    ///
    /// `header` looks a header up by name. The body is moved out of `body` only
    /// on success, so a refused message keeps its bytes for the dead-letter copy.
    pub fn decode(
        queue: &str,
        props: Properties<'_>,
        header: impl Fn(&str) -> Option<HeaderValue>,
        body: &mut Vec<u8>,
        max_payload_bytes: usize,
    ) -> Result<Envelope, DecodeError> {
        if body.len() > max_payload_bytes {
            return Err(too_large(body.len(), max_payload_bytes));
        }
        if let Some(v) = header(H_PROTOCOL) {
            let v = int_header(H_PROTOCOL, v)?;
            if v != PROTOCOL_VERSION {
                return Err(DecodeError::new(
                    DeadReason::UnsupportedProtocol,
                    format!("{H_PROTOCOL} is {v}; this worker speaks {PROTOCOL_VERSION}"),
                ));
            }
        }
        let kind = match header(H_KIND) {
            None => {
                return Err(DecodeError::new(
                    DeadReason::MissingHeader,
                    format!("header {H_KIND} is missing"),
                ));
            }
            Some(v) => str_header(H_KIND, v)?,
        };
        check_kind(&kind)?;
        let job_id = match props.message_id {
            Some(id) if !id.is_empty() => {
                check_id("property message_id (the job id)", id)?;
                id.to_string()
            }
            _ => {
                return Err(DecodeError::new(
                    DeadReason::MissingHeader,
                    "property message_id (the job id) is missing",
                ));
            }
        };
        match props.content_type {
            Some(ct) if is_json_content_type(ct) => {}
            Some(ct) => {
                return Err(DecodeError::new(
                    DeadReason::BadHeader,
                    format!("property content_type is {ct:?}; expected {CONTENT_TYPE:?}"),
                ));
            }
            None => {
                return Err(DecodeError::new(
                    DeadReason::MissingHeader,
                    format!("property content_type is missing; expected {CONTENT_TYPE:?}"),
                ));
            }
        }
        let attempt = match header(H_ATTEMPT) {
            None => 1,
            Some(v) => {
                let n = int_header(H_ATTEMPT, v)?;
                u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                    DecodeError::new(
                        DeadReason::BadHeader,
                        format!("header {H_ATTEMPT} must be an integer >= 1, got {n}"),
                    )
                })?
            }
        };
        let idempotency_key = match header(H_IDEMPOTENCY_KEY) {
            None => None,
            Some(v) => {
                let k = str_header(H_IDEMPOTENCY_KEY, v)?;
                check_key(&k)?;
                Some(k)
            }
        };
        let timeout = match header(H_TIMEOUT_MS) {
            None => None,
            Some(v) => {
                let ms = int_header(H_TIMEOUT_MS, v)?;
                let ms = u64::try_from(ms).ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    DecodeError::new(
                        DeadReason::BadHeader,
                        format!("header {H_TIMEOUT_MS} must be a positive integer, got {ms}"),
                    )
                })?;
                Some(Duration::from_millis(ms))
            }
        };
        let enqueued_at_us = match header(H_ENQUEUED_AT_US) {
            None => props.timestamp.map(|s| s.saturating_mul(1_000_000)),
            Some(v) => {
                let us = int_header(H_ENQUEUED_AT_US, v)?;
                Some(u64::try_from(us).map_err(|_| {
                    DecodeError::new(
                        DeadReason::BadHeader,
                        format!("header {H_ENQUEUED_AT_US} must not be negative"),
                    )
                })?)
            }
        };
        // Trace context is advisory: W3C says an invalid traceparent is ignored,
        // so a bad one starts a new trace instead of refusing the job.
        let (traceparent, tracestate) =
            trace_context(header(H_TRACEPARENT), || header(H_TRACESTATE));
        let first_failed_at_ms = match header(H_FIRST_FAILED_AT_MS) {
            None => None,
            Some(v) => u64::try_from(int_header(H_FIRST_FAILED_AT_MS, v)?).ok(),
        };
        let replay = matches!(header(H_REPLAY), Some(HeaderValue::Bool(true)))
            || matches!(header(H_REPLAY), Some(HeaderValue::Int(n)) if n != 0)
            || matches!(header(H_REPLAY), Some(HeaderValue::Str(s)) if s == "true");
        Ok(Envelope {
            job_id,
            kind,
            queue: queue.to_string(),
            attempt,
            idempotency_key,
            timeout,
            enqueued_at_us,
            traceparent,
            tracestate,
            first_failed_at_ms,
            replay,
            payload: std::mem::take(body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn decode_with(
        headers: Vec<(&'static str, HeaderValue)>,
        props: Properties<'_>,
        body: &[u8],
    ) -> Result<Envelope, DecodeError> {
        let map: HashMap<&str, HeaderValue> = headers.into_iter().collect();
        let original = body.to_vec();
        let mut body = body.to_vec();
        let r = Envelope::decode("q", props, |n| map.get(n).cloned(), &mut body, 1024);
        if r.is_err() {
            assert_eq!(body, original, "a refused message keeps its body");
        }
        r
    }

    fn good_props() -> Properties<'static> {
        Properties {
            message_id: Some("id-1"),
            content_type: Some("application/json"),
            timestamp: Some(1_700_000_000),
        }
    }

    #[test]
    fn round_trip_through_headers() {
        let mut e = Envelope::new("id-1", "io.sleep", "q", b"{\"ms\":1}".to_vec());
        e.idempotency_key = Some("k1".into());
        e.enqueued_at_us = Some(1_700_000_000_123_456);
        e.timeout = Some(Duration::from_millis(250));
        e.attempt = 3;
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let props = Properties {
            message_id: Some(&e.job_id),
            content_type: Some(CONTENT_TYPE),
            timestamp: None,
        };
        let back = decode_with(e.headers(), props, &e.payload).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn minimal_foreign_message_is_accepted() {
        let e = decode_with(
            vec![(H_KIND, HeaderValue::Str("noop".into()))],
            good_props(),
            b"{}",
        )
        .unwrap();
        assert_eq!(e.attempt, 1);
        assert_eq!(e.enqueued_at_us, Some(1_700_000_000_000_000));
        assert_eq!(e.job_id, "id-1");
    }

    #[test]
    fn refusals_name_their_reason() {
        let kind = || (H_KIND, HeaderValue::Str("noop".into()));
        type Case<'a> = (
            Vec<(&'static str, HeaderValue)>,
            Properties<'a>,
            &'a [u8],
            DeadReason,
        );
        let cases: Vec<Case<'_>> = vec![
            (vec![], good_props(), b"{}", DeadReason::MissingHeader),
            (
                vec![(H_KIND, HeaderValue::Int(3))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![(H_KIND, HeaderValue::Bytes(vec![0xff]))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind(), (H_ATTEMPT, HeaderValue::Str("2".into()))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind(), (H_ATTEMPT, HeaderValue::Int(0))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind(), (H_PROTOCOL, HeaderValue::Int(2))],
                good_props(),
                b"{}",
                DeadReason::UnsupportedProtocol,
            ),
            (
                vec![kind(), (H_TIMEOUT_MS, HeaderValue::Int(-5))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind(), (H_IDEMPOTENCY_KEY, HeaderValue::Str(String::new()))],
                good_props(),
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind()],
                Properties {
                    message_id: None,
                    ..good_props()
                },
                b"{}",
                DeadReason::MissingHeader,
            ),
            (
                vec![kind()],
                Properties {
                    content_type: Some("application/x-python-serialize"),
                    ..good_props()
                },
                b"{}",
                DeadReason::BadHeader,
            ),
            (
                vec![kind()],
                Properties {
                    content_type: None,
                    ..good_props()
                },
                b"{}",
                DeadReason::MissingHeader,
            ),
            (
                vec![kind()],
                good_props(),
                &[b'x'; 2000],
                DeadReason::PayloadTooLarge,
            ),
        ];
        for (i, (h, p, body, want)) in cases.into_iter().enumerate() {
            let err = decode_with(h, p, body).expect_err(&format!("case {i} must be refused"));
            assert_eq!(err.reason, want, "case {i}: {err}");
            assert!(!err.detail.is_empty());
        }
    }

    #[test]
    fn hostile_ids_and_keys_are_refused_at_decode() {
        let kind = || (H_KIND, HeaderValue::Str("noop".into()));
        let long = "i".repeat(MAX_ID_LEN + 1);
        for id in ["job\0one", "job\r\nX-Injected: 1", long.as_str()] {
            let p = Properties {
                message_id: Some(id),
                ..good_props()
            };
            let err = decode_with(vec![kind()], p, b"{}").expect_err(id);
            assert_eq!(err.reason, DeadReason::BadHeader);
            assert!(err.detail.contains("message_id"), "{err}");
        }
        for key in ["k\0", "k\u{1b}[31m", &"k".repeat(MAX_KEY_LEN + 1)] {
            let h = vec![
                kind(),
                (H_IDEMPOTENCY_KEY, HeaderValue::Str(key.to_string())),
            ];
            let err = decode_with(h, good_props(), b"{}").expect_err(key);
            assert_eq!(err.reason, DeadReason::BadHeader);
            assert!(err.detail.contains(H_IDEMPOTENCY_KEY), "{err}");
        }
        let mut e = Envelope::new("a\0b", "noop", "q", b"{}".to_vec());
        assert_eq!(e.validate(1024).unwrap_err().reason, DeadReason::BadHeader);
        e.job_id = "ok".into();
        e.idempotency_key = Some("k\u{0}".into());
        assert_eq!(e.validate(1024).unwrap_err().reason, DeadReason::BadHeader);
    }

    #[test]
    fn oversized_tracestate_is_dropped() {
        let e = decode_with(
            vec![
                (H_KIND, HeaderValue::Str("noop".into())),
                (
                    H_TRACEPARENT,
                    HeaderValue::Str(
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                    ),
                ),
                (H_TRACESTATE, HeaderValue::Str("a=".repeat(40_000))),
            ],
            good_props(),
            b"{}",
        )
        .unwrap();
        assert!(e.traceparent.is_some());
        assert_eq!(e.tracestate, None);
    }

    #[test]
    fn content_type_parameters_are_allowed() {
        let p = Properties {
            content_type: Some("Application/JSON; charset=utf-8"),
            ..good_props()
        };
        assert!(decode_with(vec![(H_KIND, HeaderValue::Str("noop".into()))], p, b"{}").is_ok());
    }

    #[test]
    fn invalid_traceparent_is_ignored_not_refused() {
        let e = decode_with(
            vec![
                (H_KIND, HeaderValue::Str("noop".into())),
                (H_TRACEPARENT, HeaderValue::Str("garbage".into())),
                (H_TRACESTATE, HeaderValue::Str("a=b".into())),
            ],
            good_props(),
            b"{}",
        )
        .unwrap();
        assert_eq!(e.traceparent, None);
        assert_eq!(e.tracestate, None);
    }

    #[test]
    fn validate_refuses_bad_jobs_before_publish() {
        let e = Envelope::new("id-1", "noop", "q", b"not json".to_vec());
        assert_eq!(
            e.validate(1024).unwrap_err().reason,
            DeadReason::InvalidJson
        );
        let e = Envelope::new("id-1", "noop", "q", b"[1,2]".to_vec());
        assert_eq!(
            e.validate(3).unwrap_err().reason,
            DeadReason::PayloadTooLarge
        );
        let e = Envelope::new("id-1", "", "q", b"{}".to_vec());
        assert_eq!(e.validate(1024).unwrap_err().reason, DeadReason::BadHeader);
        assert!(
            Envelope::new("id-1", "noop", "q", b"{}".to_vec())
                .validate(1024)
                .is_ok()
        );
    }
}
