//! The wire format between the pool (parent) and a worker process (child).
//!
//! Pure encode/decode functions plus a blocking [`read_frame`] for the child;
//! the parent has its own async reader in `pool.rs` built on [`parse_len`] and
//! [`decode_response`], so both sides share every rule about lengths and tags.
//!
//! Every frame is `u32 little-endian body length` followed by the body.
//!
//! * **Request** body (parent -> child): `u32 LE header length`, a small JSON
//!   [`RequestHeader`], then the raw payload bytes. The payload is passed through
//!   untouched so the child parses the job's JSON exactly once.
//! * **Response** body (child -> parent): one tag byte, then
//!   * [`TAG_OK`]: the handler's result bytes (JSON),
//!   * [`TAG_ERROR`]: the JSON of a [`HandlerError`],
//!   * [`TAG_PANICKED`]: the panic message as UTF-8,
//!   * [`TAG_READY`]: the JSON of a [`Hello`] (sent once, right after start-up).
//!
//! Bodies larger than a configurable maximum are rejected *before* allocating,
//! so a corrupt length prefix cannot make either side allocate gigabytes.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::registry::HandlerError;

/// Default upper bound for one frame body (64 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Version of this frame protocol, exchanged in the [`Hello`] handshake so a
/// parent never talks to a child built from an incompatible library version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Response tag: the handler succeeded; the rest of the body is its result.
pub const TAG_OK: u8 = 0;
/// Response tag: the handler returned a [`HandlerError`] (JSON follows).
pub const TAG_ERROR: u8 = 1;
/// Response tag: the handler panicked; the UTF-8 message follows.
pub const TAG_PANICKED: u8 = 2;
/// Response tag: start-up handshake; a JSON [`Hello`] follows.
pub const TAG_READY: u8 = 3;

/// The small JSON header in front of a request payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHeader {
    /// Job id, for logs and tracing inside the child.
    pub job_id: String,
    /// Job kind: selects the handler in the child's registry.
    pub kind: String,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// W3C trace context of the parent span, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The handshake a child sends once it is ready to take jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the child.
    pub protocol: u32,
    /// Process id as the child sees it.
    pub pid: u32,
    /// Threads in the child's global rayon pool.
    pub rayon_threads: usize,
}

/// A decoded response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Handler result (JSON bytes).
    Ok(Vec<u8>),
    /// Handler error.
    Error(HandlerError),
    /// Handler panicked with this message; the child exits after sending it.
    Panicked(String),
    /// Start-up handshake.
    Ready(Hello),
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The body is larger than the configured maximum.
    #[error("frame body of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Body length announced or needed.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The body ended before a field it announced.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    UnexpectedEof,
    /// The request header is not valid JSON for [`RequestHeader`].
    #[error("invalid request header: {0}")]
    BadHeader(#[source] serde_json::Error),
    /// A JSON response body (error or hello) is invalid.
    #[error("invalid response body: {0}")]
    BadBody(#[source] serde_json::Error),
    /// The panic message is not UTF-8.
    #[error("panic message is not valid UTF-8")]
    BadUtf8,
    /// The response tag is unknown.
    #[error("unknown response tag {0}")]
    UnknownTag(u8),
    /// The body is empty (a response needs at least its tag byte).
    #[error("empty response body")]
    Empty,
    /// Reading the underlying stream failed.
    #[error("I/O error on frame stream: {0}")]
    Io(#[from] io::Error),
}

/// Checks a body length against `max` and the `u32` prefix range.
fn check_len(len: usize, max: usize) -> Result<u32, FrameError> {
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: u32::MAX as usize,
    })
}

/// Parses a 4-byte length prefix, rejecting bodies above `max`.
pub fn parse_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Encodes everything of a request frame except the payload bytes:
/// `[body len][header len][header JSON]`. Write the payload right after it.
///
/// Splitting it this way lets the parent write a large payload straight from
/// its `Bytes` without copying it into a fresh buffer.
pub fn encode_request_prefix(
    header: &RequestHeader,
    payload_len: usize,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    encode_request_prefix_with_capacity(header, payload_len, max, 0)
}

/// [`encode_request_prefix`] into a buffer with room for `extra` more bytes,
/// so a caller can append a small payload without a second allocation and
/// send the whole frame with one write.
pub fn encode_request_prefix_with_capacity(
    header: &RequestHeader,
    payload_len: usize,
    max: usize,
    extra: usize,
) -> Result<Vec<u8>, FrameError> {
    // Serialize the header in place after two length slots, then fill them:
    // one allocation instead of a JSON buffer plus a copy.
    let mut out = Vec::with_capacity(8 + 96 + extra);
    out.extend_from_slice(&[0u8; 8]);
    serde_json::to_writer(&mut out, header).map_err(FrameError::BadHeader)?;
    let header_json_len = out.len() - 8;
    let body_len = check_len(4 + header_json_len + payload_len, max)?;
    let header_len = u32::try_from(header_json_len).map_err(|_| FrameError::TooLarge {
        len: header_json_len,
        max,
    })?;
    out[..4].copy_from_slice(&body_len.to_le_bytes());
    out[4..8].copy_from_slice(&header_len.to_le_bytes());
    Ok(out)
}

/// Encodes a whole request frame (prefix included) into one buffer.
pub fn encode_request(
    header: &RequestHeader,
    payload: &[u8],
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut out = encode_request_prefix_with_capacity(header, payload.len(), max, payload.len())?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes a request body (without its length prefix) into header and payload.
pub fn decode_request(body: &[u8]) -> Result<(RequestHeader, &[u8]), FrameError> {
    let (len_bytes, rest) = body
        .split_first_chunk::<4>()
        .ok_or(FrameError::Truncated("request header length"))?;
    let header_len = u32::from_le_bytes(*len_bytes) as usize;
    if rest.len() < header_len {
        return Err(FrameError::Truncated("request header"));
    }
    let (header_json, payload) = rest.split_at(header_len);
    let header = serde_json::from_slice(header_json).map_err(FrameError::BadHeader)?;
    Ok((header, payload))
}

/// Encodes a whole response frame (length prefix included).
pub fn encode_response(response: &Response, max: usize) -> Result<Vec<u8>, FrameError> {
    let (tag, body): (u8, std::borrow::Cow<'_, [u8]>) = match response {
        Response::Ok(bytes) => (TAG_OK, bytes.as_slice().into()),
        Response::Error(err) => (
            TAG_ERROR,
            serde_json::to_vec(err).map_err(FrameError::BadBody)?.into(),
        ),
        Response::Panicked(message) => (TAG_PANICKED, message.as_bytes().into()),
        Response::Ready(hello) => (
            TAG_READY,
            serde_json::to_vec(hello)
                .map_err(FrameError::BadBody)?
                .into(),
        ),
    };
    let body_len = check_len(1 + body.len(), max)?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&body_len.to_le_bytes());
    out.push(tag);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a response body (without its length prefix).
pub fn decode_response(body: &[u8]) -> Result<Response, FrameError> {
    let (&tag, rest) = body.split_first().ok_or(FrameError::Empty)?;
    match tag {
        TAG_OK => Ok(Response::Ok(rest.to_vec())),
        TAG_ERROR => serde_json::from_slice(rest)
            .map(Response::Error)
            .map_err(FrameError::BadBody),
        TAG_PANICKED => std::str::from_utf8(rest)
            .map(|s| Response::Panicked(s.to_owned()))
            .map_err(|_| FrameError::BadUtf8),
        TAG_READY => serde_json::from_slice(rest)
            .map(Response::Ready)
            .map_err(FrameError::BadBody),
        other => Err(FrameError::UnknownTag(other)),
    }
}

/// Blocking read of one frame body from `reader`.
///
/// Returns `Ok(None)` on a clean end of stream *between* frames (the parent
/// closed the pipe: time to exit), and [`FrameError::UnexpectedEof`] when the
/// stream ends inside a frame.
pub fn read_frame<R: Read>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::UnexpectedEof),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = parse_len(prefix, max)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::UnexpectedEof
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn header() -> RequestHeader {
        RequestHeader {
            job_id: "j-1".into(),
            kind: "echo".into(),
            attempt: 2,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn request_round_trip_keeps_payload_bytes_verbatim() {
        let payload = br#"{"a": [1, 2 ,3]}"#;
        let frame = encode_request(&header(), payload, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let body = read_frame(&mut Cursor::new(&frame), DEFAULT_MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        let (h, p) = decode_request(&body).unwrap();
        assert_eq!(h, header());
        assert_eq!(p, payload);
    }

    #[test]
    fn prefix_plus_payload_equals_whole_frame() {
        let payload = b"xyz";
        let mut split = encode_request_prefix(&header(), payload.len(), 1024).unwrap();
        split.extend_from_slice(payload);
        assert_eq!(split, encode_request(&header(), payload, 1024).unwrap());
    }

    #[test]
    fn response_round_trips() {
        let cases = [
            Response::Ok(b"{\"x\":1}".to_vec()),
            Response::Ok(Vec::new()),
            Response::Error(HandlerError::Retryable {
                message: "later".into(),
                retry_after_ms: Some(5),
            }),
            Response::Error(HandlerError::Permanent {
                message: "no".into(),
            }),
            Response::Panicked("boom \u{1F4A5}".into()),
            Response::Ready(Hello {
                protocol: PROTOCOL_VERSION,
                pid: 42,
                rayon_threads: 3,
            }),
        ];
        for case in cases {
            let frame = encode_response(&case, 1024).unwrap();
            let body = read_frame(&mut Cursor::new(&frame), 1024).unwrap().unwrap();
            assert_eq!(decode_response(&body).unwrap(), case);
        }
    }

    #[test]
    fn oversized_frames_are_rejected_on_both_sides() {
        let err = encode_request(&header(), &[0u8; 100], 64).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 64, .. }), "{err}");
        let err = encode_response(&Response::Ok(vec![0; 64]), 64).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 65, max: 64 }));
        // A reader never allocates for an announced length above the limit.
        let mut stream = Cursor::new(u32::MAX.to_le_bytes().to_vec());
        let err = read_frame(&mut stream, 1024).unwrap_err();
        assert!(
            err.to_string()
                .contains("exceeds the maximum of 1024 bytes")
        );
    }

    #[test]
    fn eof_between_frames_is_clean_and_inside_a_frame_is_an_error() {
        assert!(
            read_frame(&mut Cursor::new(Vec::new()), 16)
                .unwrap()
                .is_none()
        );
        let err = read_frame(&mut Cursor::new(vec![1u8, 0]), 16).unwrap_err();
        assert!(matches!(err, FrameError::UnexpectedEof));
        let err = read_frame(&mut Cursor::new(vec![8u8, 0, 0, 0, 1]), 16).unwrap_err();
        assert!(matches!(err, FrameError::UnexpectedEof));
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        assert!(matches!(
            decode_request(&[1, 0]),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_request(&[10, 0, 0, 0, b'{']),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode_request(&[1, 0, 0, 0, b'{']),
            Err(FrameError::BadHeader(_))
        ));
        assert!(matches!(decode_response(&[]), Err(FrameError::Empty)));
        assert!(matches!(
            decode_response(&[9, 1]),
            Err(FrameError::UnknownTag(9))
        ));
        assert!(matches!(
            decode_response(&[TAG_PANICKED, 0xff]),
            Err(FrameError::BadUtf8)
        ));
        assert!(matches!(
            decode_response(&[TAG_ERROR, b'x']),
            Err(FrameError::BadBody(_))
        ));
    }

    proptest! {
        #[test]
        fn request_round_trip(
            job_id in ".{0,40}",
            kind in "[a-z_.]{1,20}",
            attempt in any::<u32>(),
            traceparent in proptest::option::of("[0-9a-f-]{0,60}"),
            payload in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let h = RequestHeader { job_id, kind, attempt, traceparent };
            let frame = encode_request(&h, &payload, DEFAULT_MAX_FRAME_BYTES).unwrap();
            let mut stream = Cursor::new(&frame);
            let body = read_frame(&mut stream, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
            let (h2, p2) = decode_request(&body).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(p2, &payload[..]);
            // Nothing left over, and the next read sees a clean EOF.
            prop_assert!(read_frame(&mut stream, DEFAULT_MAX_FRAME_BYTES).unwrap().is_none());
        }

        #[test]
        fn response_round_trip(
            tag in 0u8..4,
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            text in ".{0,80}",
            retry in proptest::option::of(any::<u64>()),
        ) {
            let resp = match tag {
                0 => Response::Ok(bytes),
                1 => Response::Error(HandlerError::Retryable { message: text, retry_after_ms: retry }),
                2 => Response::Panicked(text),
                _ => Response::Error(HandlerError::Permanent { message: text }),
            };
            let frame = encode_response(&resp, DEFAULT_MAX_FRAME_BYTES).unwrap();
            let body = read_frame(&mut Cursor::new(&frame), DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
            prop_assert_eq!(decode_response(&body).unwrap(), resp);
        }

        #[test]
        fn decoders_never_panic_on_garbage(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&body);
            let _ = decode_response(&body);
            let _ = read_frame(&mut Cursor::new(&body), 128);
        }
    }
}
