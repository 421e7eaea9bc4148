//! Header values, the reasons a message is refused, and the checks every
//! decoder (protocol v1 and Celery) shares.

use super::{
    CONTENT_TYPE, H_IDEMPOTENCY_KEY, H_KIND, MAX_ID_LEN, MAX_KEY_LEN, MAX_KIND_LEN,
    MAX_TRACESTATE_LEN,
};

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
    /// Every reason, in declaration order.
    pub const ALL: [DeadReason; 13] = [
        DeadReason::InvalidJson,
        DeadReason::InvalidPayload,
        DeadReason::UnknownKind,
        DeadReason::MissingHeader,
        DeadReason::BadHeader,
        DeadReason::UnsupportedProtocol,
        DeadReason::PayloadTooLarge,
        DeadReason::HandlerError,
        DeadReason::AttemptsExhausted,
        DeadReason::Timeout,
        DeadReason::Crashed,
        DeadReason::UnsupportedSerializer,
        DeadReason::Expired,
    ];

    /// The reason whose [`DeadReason::as_str`] code is `code`.
    pub fn from_code(code: &str) -> Option<DeadReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == code)
    }

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
    check_printable(&format!("header {H_IDEMPOTENCY_KEY}"), key)
}

/// Checks a job id (`message_id`, a Celery task id): at most [`MAX_ID_LEN`]
/// bytes, no control characters. An id ends up in store rows, log lines and
/// the headers of every copy; a NUL in it makes PostgreSQL refuse the claim
/// forever, so such a message is refused once, at decode.
pub(crate) fn check_id(what: &str, id: &str) -> Result<(), DecodeError> {
    if id.len() > MAX_ID_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("{what} is {} bytes; the limit is {MAX_ID_LEN}", id.len()),
        ));
    }
    check_printable(what, id)
}

/// Refuses NUL and every other control character (C0, DEL, C1).
fn check_printable(what: &str, s: &str) -> Result<(), DecodeError> {
    match s.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(()),
        Some((at, c)) => Err(DecodeError::new(
            DeadReason::BadHeader,
            format!(
                "{what} contains the control character U+{:04X} at byte {at}",
                u32::from(c)
            ),
        )),
    }
}

/// The W3C trace context of a message from its two headers: a
/// `traceparent` that is not valid is ignored (a new trace starts instead of
/// the job being refused), and a `tracestate` only counts with a valid
/// `traceparent` and within its bounds. One rule for taskmill and Celery
/// messages.
pub fn trace_context(
    traceparent: Option<HeaderValue>,
    tracestate: impl FnOnce() -> Option<HeaderValue>,
) -> (Option<String>, Option<String>) {
    let text = |v: HeaderValue| match v {
        HeaderValue::Str(s) => Some(s),
        _ => None,
    };
    let traceparent = traceparent.and_then(text).filter(|s| valid_traceparent(s));
    let tracestate = traceparent
        .as_ref()
        .and_then(|_| tracestate())
        .and_then(text)
        .filter(|s| valid_tracestate(s));
    (traceparent, tracestate)
}

/// Whether a W3C `tracestate` is short enough to carry on: the
/// specification caps it at [`MAX_TRACESTATE_LEN`] characters, and a longer
/// one is dropped (trace context is advisory) instead of copied onto every
/// retry.
pub fn valid_tracestate(s: &str) -> bool {
    s.len() <= MAX_TRACESTATE_LEN && !s.chars().any(char::is_control)
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

    #[test]
    fn reason_codes_read_back() {
        for r in DeadReason::ALL {
            assert_eq!(DeadReason::from_code(r.as_str()), Some(r));
        }
        assert_eq!(DeadReason::from_code("nope"), None);
    }

    #[test]
    fn ids_and_keys_refuse_control_bytes_and_overlong_text() {
        for bad in ["a\0b", "tab\there", "bell\u{7}", "del\u{7f}", "c1\u{85}"] {
            let e = check_id("property message_id", bad).unwrap_err();
            assert_eq!(e.reason, DeadReason::BadHeader);
            assert!(e.detail.contains("control character"), "{e}");
            assert_eq!(check_key(bad).unwrap_err().reason, DeadReason::BadHeader);
        }
        let long = "k".repeat(MAX_ID_LEN + 1);
        assert!(
            check_id("id", &long)
                .unwrap_err()
                .detail
                .contains("limit is 255")
        );
        assert_eq!(check_key(&long).unwrap_err().reason, DeadReason::BadHeader);
        assert!(check_id("id", &"é".repeat(MAX_ID_LEN / 2)).is_ok());
        assert!(check_key("order-42/ünïcode").is_ok());
        assert!(valid_tracestate("a=b,c=d"));
        assert!(!valid_tracestate(&"a".repeat(MAX_TRACESTATE_LEN + 1)));
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
