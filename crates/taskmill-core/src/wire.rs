//! Wire protocol v1: what a producer publishes and what a worker accepts.
//!
//! `docs/protocol.md` is the user-facing description; this module is its
//! executable form. A message is:
//! - published to the durable direct exchange [`EXCHANGE`] with the target
//!   queue's name as routing key, persistent (`delivery_mode` 2);
//! - AMQP properties: `message_id` = job id (required), `content_type`
//!   `application/json` (required), `timestamp` (seconds, optional);
//! - headers: [`H_KIND`] (required), and optionally [`H_PROTOCOL`],
//!   [`H_ATTEMPT`], [`H_IDEMPOTENCY_KEY`], [`H_TIMEOUT_MS`],
//!   [`H_ENQUEUED_AT_US`], [`H_TRACEPARENT`], [`H_TRACESTATE`];
//! - body: the job's payload as JSON, exactly as the handler receives it.
//!
//! The decoder is pure: it sees headers through a lookup function, so the
//! broker adapter can hand in AMQP tables without this crate knowing them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: i64 = 1;
/// The exchange producers publish to (durable, direct).
pub const EXCHANGE: &str = "taskmill";
/// The queue a job goes to when the producer names none.
pub const DEFAULT_QUEUE: &str = "default";
/// The content type of every job body.
pub const CONTENT_TYPE: &str = "application/json";

/// Header: protocol version (integer, optional, must be 1 when present).
pub const H_PROTOCOL: &str = "taskmill-protocol";
/// Header: the job kind, the name its handler is registered under (string, required).
pub const H_KIND: &str = "taskmill-kind";
/// Header: 1-based attempt number (integer, optional, default 1).
pub const H_ATTEMPT: &str = "taskmill-attempt";
/// Header: idempotency key (string, optional, at most [`MAX_KEY_LEN`] bytes).
pub const H_IDEMPOTENCY_KEY: &str = "taskmill-idempotency-key";
/// Header: per-job hard timeout in milliseconds (integer > 0, optional); it can
/// only lower the kind's configured timeout.
pub const H_TIMEOUT_MS: &str = "taskmill-timeout-ms";
/// Header: enqueue time in microseconds since the Unix epoch (integer, optional).
/// Queue-wait time is measured from it; `timestamp` (seconds) is the fallback.
pub const H_ENQUEUED_AT_US: &str = "taskmill-enqueued-at-us";
/// Header: W3C trace context `traceparent` (string, optional).
pub const H_TRACEPARENT: &str = "traceparent";
/// Header: W3C trace context `tracestate` (string, optional).
pub const H_TRACESTATE: &str = "tracestate";

/// Header: when the job's first attempt failed, ms since the Unix epoch
/// (integer; set by the worker on retry copies, kept on dead letters).
pub const H_FIRST_FAILED_AT_MS: &str = "taskmill-first-failed-at-ms";
/// Header: set (any value) by `taskmill dlq replay` on a replayed job: a key
/// whose earlier run ended in final failure may run again.
pub const H_REPLAY: &str = "taskmill-replay";

/// Dead-letter header: the reason code (one of [`DeadReason`]).
pub const H_DEAD_REASON: &str = "taskmill-dead-reason";
/// Dead-letter header: the human-readable error.
pub const H_DEAD_ERROR: &str = "taskmill-dead-error";
/// Dead-letter header: the queue the job was consumed from.
pub const H_DEAD_QUEUE: &str = "taskmill-dead-queue";
/// Dead-letter header: when it was dead-lettered, ms since the Unix epoch.
pub const H_DEAD_AT_MS: &str = "taskmill-dead-at-ms";
/// Dead-letter header: the id of the worker that dead-lettered it.
pub const H_DEAD_WORKER: &str = "taskmill-dead-worker";

/// Longest accepted idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// Longest accepted kind name, in bytes.
pub const MAX_KIND_LEN: usize = 255;

/// The name of the dead-letter queue of `queue`.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Delays live on the broker as a binary ladder of delay queues: level `n`
/// holds messages for `DELAY_TICK × 2^n`. A delay is its number of ticks in
/// binary; the message visits exactly the levels of its set bits (see
/// `docs/protocol.md`, "Delayed jobs").
pub const DELAY_LEVELS: u32 = 25;
/// The delay precision: delays are rounded up to a whole number of ticks.
pub const DELAY_TICK: Duration = Duration::from_millis(100);
/// The longest expressible delay (about 38.8 days).
pub const MAX_DELAY: Duration = Duration::from_millis(100 * ((1u64 << DELAY_LEVELS) - 1));
/// Exchange of delay level `n` (topic).
pub fn delay_exchange(level: u32) -> String {
    format!("{EXCHANGE}.delay.{level}")
}
/// The exchange that takes expired delayed messages to their work queue (topic).
pub const DELAY_DELIVER_EXCHANGE: &str = "taskmill.delay.deliver";

/// Where to publish a job for `queue` so it arrives after `delay`: the
/// exchange and the routing key. A delay under one tick goes straight to the
/// work exchange. Delays above [`MAX_DELAY`] are refused.
pub fn delay_route(queue: &str, delay: Duration) -> Result<(String, String), String> {
    if delay > MAX_DELAY {
        return Err(format!(
            "delay {delay:?} exceeds the maximum of {MAX_DELAY:?}"
        ));
    }
    let tick = DELAY_TICK.as_nanos();
    let ticks = delay.as_nanos().div_ceil(tick) as u64;
    if ticks == 0 {
        return Ok((EXCHANGE.to_string(), queue.to_string()));
    }
    Ok((
        delay_exchange(DELAY_LEVELS - 1),
        delay_routing_key(queue, ticks),
    ))
}

/// The routing key of a message delayed `ticks`: one word per level, most
/// significant first (`1` = wait at that level), then the queue name.
pub fn delay_routing_key(queue: &str, ticks: u64) -> String {
    let mut key = String::with_capacity(2 * DELAY_LEVELS as usize + queue.len());
    for level in (0..DELAY_LEVELS).rev() {
        key.push(if (ticks >> level) & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// The binding pattern at delay level `level` selecting messages whose bit
/// for that level is `bit`.
pub fn delay_level_pattern(level: u32, bit: bool) -> String {
    let before = (DELAY_LEVELS - 1 - level) as usize;
    let mut p = "*.".repeat(before);
    p.push(if bit { '1' } else { '0' });
    p.push_str(".#");
    p
}

/// The binding pattern from [`DELAY_DELIVER_EXCHANGE`] to work queue `queue`.
pub fn delay_deliver_pattern(queue: &str) -> String {
    format!("{}{queue}", "*.".repeat(DELAY_LEVELS as usize))
}

/// A header value, independent of the AMQP library.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    /// A string (AMQP long or short string).
    Str(String),
    /// Any AMQP integer type, widened.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A float or double.
    Float(f64),
    /// Bytes that are not valid UTF-8, or an AMQP byte array.
    Bytes(Vec<u8>),
    /// Any other AMQP type (table, array, decimal, timestamp, void), by name.
    Other(&'static str),
}

impl HeaderValue {
    fn type_name(&self) -> &'static str {
        match self {
            HeaderValue::Str(_) => "string",
            HeaderValue::Int(_) => "integer",
            HeaderValue::Bool(_) => "boolean",
            HeaderValue::Float(_) => "float",
            HeaderValue::Bytes(_) => "bytes",
            HeaderValue::Other(name) => name,
        }
    }
}

/// Why a message was dead-lettered. A bounded set: it labels metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The body is not valid JSON.
    InvalidJson,
    /// The body is JSON but does not fit the kind's payload type.
    InvalidPayload,
    /// No handler is registered for the kind.
    UnknownKind,
    /// A required header or property is missing.
    MissingHeader,
    /// A header or property has the wrong type or an invalid value.
    BadHeader,
    /// The `taskmill-protocol` header names a version this worker does not speak.
    UnsupportedProtocol,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// The handler returned a permanent error.
    HandlerError,
    /// The job failed with retryable errors on every allowed attempt.
    AttemptsExhausted,
    /// The job overran its timeout.
    Timeout,
    /// The job's task or process crashed.
    Crashed,
    /// A Celery message in a serialization other than JSON (pickle, YAML,
    /// msgpack), or compressed: taskmill never decodes it.
    UnsupportedSerializer,
    /// A Celery task whose `expires` time had passed before it could run.
    Expired,
}

impl DeadReason {
    /// The code written in the `taskmill-dead-reason` header and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::InvalidJson => "invalid_json",
            DeadReason::InvalidPayload => "invalid_payload",
            DeadReason::UnknownKind => "unknown_kind",
            DeadReason::MissingHeader => "missing_header",
            DeadReason::BadHeader => "bad_header",
            DeadReason::UnsupportedProtocol => "unsupported_protocol",
            DeadReason::PayloadTooLarge => "payload_too_large",
            DeadReason::HandlerError => "handler_error",
            DeadReason::AttemptsExhausted => "attempts_exhausted",
            DeadReason::Timeout => "timeout",
            DeadReason::Crashed => "crashed",
            DeadReason::UnsupportedSerializer => "unsupported_serializer",
            DeadReason::Expired => "expired",
        }
    }
}

/// A message the worker refuses, with the reason it is dead-lettered for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct DecodeError {
    /// The reason code.
    pub reason: DeadReason,
    /// What exactly is wrong, naming the header or property.
    pub detail: String,
}

impl DecodeError {
    pub(crate) fn new(reason: DeadReason, detail: impl Into<String>) -> Self {
        DecodeError {
            reason,
            detail: detail.into(),
        }
    }
}

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

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Envelope {
    /// A new job with a fresh UUIDv4 id, attempt 1, enqueued now.
    pub fn new(kind: impl Into<String>, queue: impl Into<String>, payload: Vec<u8>) -> Self {
        Envelope {
            job_id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            queue: queue.into(),
            attempt: 1,
            idempotency_key: None,
            timeout: None,
            enqueued_at_us: Some(now_us()),
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
            Some(id) if !id.is_empty() => id.to_string(),
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
        let traceparent = header(H_TRACEPARENT)
            .and_then(|v| match v {
                HeaderValue::Str(s) => Some(s),
                _ => None,
            })
            .filter(|s| valid_traceparent(s));
        let tracestate = traceparent
            .as_ref()
            .and(header(H_TRACESTATE))
            .and_then(|v| match v {
                HeaderValue::Str(s) => Some(s),
                _ => None,
            });
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

pub(crate) fn too_large(len: usize, max: usize) -> DecodeError {
    DecodeError::new(
        DeadReason::PayloadTooLarge,
        format!("payload is {len} bytes; the limit is {max}"),
    )
}

pub(crate) fn is_json_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(CONTENT_TYPE)
}

pub(crate) fn check_kind(kind: &str) -> Result<(), DecodeError> {
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_KIND} must be 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn check_key(key: &str) -> Result<(), DecodeError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_IDEMPOTENCY_KEY} must be 1 to {MAX_KEY_LEN} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn str_header(name: &str, v: HeaderValue) -> Result<String, DecodeError> {
    match v {
        HeaderValue::Str(s) => Ok(s),
        HeaderValue::Bytes(_) => Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {name} is not valid UTF-8"),
        )),
        other => Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {name} must be a string, got {}", other.type_name()),
        )),
    }
}

pub(crate) fn int_header(name: &str, v: HeaderValue) -> Result<i64, DecodeError> {
    match v {
        HeaderValue::Int(n) => Ok(n),
        other => Err(DecodeError::new(
            DeadReason::BadHeader,
            format!(
                "header {name} must be an integer, got {}",
                other.type_name()
            ),
        )),
    }
}

/// Whether `s` is a W3C `traceparent` of version 00 with non-zero ids.
pub fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
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
        let mut e = Envelope::new("io.sleep", "q", b"{\"ms\":1}".to_vec());
        e.idempotency_key = Some("k1".into());
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
        let e = Envelope::new("noop", "q", b"not json".to_vec());
        assert_eq!(
            e.validate(1024).unwrap_err().reason,
            DeadReason::InvalidJson
        );
        let e = Envelope::new("noop", "q", b"[1,2]".to_vec());
        assert_eq!(
            e.validate(3).unwrap_err().reason,
            DeadReason::PayloadTooLarge
        );
        let e = Envelope::new("", "q", b"{}".to_vec());
        assert_eq!(e.validate(1024).unwrap_err().reason, DeadReason::BadHeader);
        assert!(
            Envelope::new("noop", "q", b"{}".to_vec())
                .validate(1024)
                .is_ok()
        );
    }

    #[test]
    fn delay_routes_visit_the_set_bits() {
        let (ex, key) = delay_route("jobs.cpu", Duration::from_millis(1_250)).unwrap();
        assert_eq!(ex, "taskmill.delay.24");
        // 1.25 s = 13 ticks = 0b1101
        let bits: Vec<&str> = key.split('.').take(DELAY_LEVELS as usize).collect();
        assert_eq!(bits[(DELAY_LEVELS - 1) as usize], "1");
        assert_eq!(bits[(DELAY_LEVELS - 2) as usize], "0");
        assert_eq!(bits[(DELAY_LEVELS - 3) as usize], "1");
        assert_eq!(bits[(DELAY_LEVELS - 4) as usize], "1");
        assert!(key.ends_with(".jobs.cpu"));
        assert_eq!(
            delay_route("q", Duration::ZERO).unwrap(),
            ("taskmill".to_string(), "q".to_string())
        );
        assert_eq!(
            delay_route("q", Duration::from_millis(1)).unwrap().1,
            delay_routing_key("q", 1)
        );
        assert!(delay_route("q", MAX_DELAY + DELAY_TICK).is_err());
        assert_eq!(delay_level_pattern(DELAY_LEVELS - 1, true), "1.#");
        assert_eq!(
            delay_level_pattern(0, false),
            format!("{}0.#", "*.".repeat(24))
        );
    }

    proptest::proptest! {
        #[test]
        fn delay_key_encodes_the_tick_count(ticks in 1u64..(1 << DELAY_LEVELS)) {
            let key = delay_routing_key("q", ticks);
            let mut back = 0u64;
            for (i, w) in key.split('.').take(DELAY_LEVELS as usize).enumerate() {
                let level = DELAY_LEVELS - 1 - i as u32;
                if w == "1" { back |= 1 << level; }
            }
            proptest::prop_assert_eq!(back, ticks);
        }
    }

    #[test]
    fn traceparent_validation() {
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"
        ));
        assert!(!valid_traceparent(
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
    }
}
