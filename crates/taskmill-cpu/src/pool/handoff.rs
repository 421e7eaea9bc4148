//! The bounded hand-off between callers of [`CpuPool::run`](super::CpuPool::run)
//! and the supervisors: a [`Job`] is the request frame encoded by the caller
//! plus the oneshot its answer goes back through; the channel itself (capacity
//! 1) lives in [`Shared`](super::shared::Shared).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{CpuError, CpuRequest};
use crate::frame::{self, FrameError, RequestHeader};

/// Payloads up to this size are copied behind the frame header so a request
/// costs one `write`; larger ones are written from their own buffer. 64 KiB
/// is the default pipe buffer: a bigger write would block part-way anyway.
const INLINE_PAYLOAD_MAX: usize = 64 * 1024;

pub(super) type Reply = oneshot::Sender<Result<Vec<u8>, CpuError>>;

/// A job on its way to a child.
pub(super) struct Job {
    /// Length prefix + header frame part, encoded by the caller, followed by
    /// the payload when it is small.
    pub(super) prefix: Vec<u8>,
    /// The payload when it is too large to inline in `prefix`, else empty.
    pub(super) payload: Bytes,
    pub(super) timeout: Duration,
    pub(super) reply: Reply,
    /// Set once the job went back to the queue because its child was found
    /// dead before it could accept it; a second such failure is a crash.
    pub(super) redelivered: bool,
}

/// The caller's side of a [`Job`]: where its answer arrives. A dropped sender
/// means the job was discarded unstarted (shutdown).
pub(super) type Answer = oneshot::Receiver<Result<Vec<u8>, CpuError>>;

impl Job {
    /// Encodes `req` for a child (frames of at most `max` bytes) on the
    /// caller's task, so a supervisor only writes bytes.
    pub(super) fn encode(req: CpuRequest, max: usize) -> Result<(Job, Answer), CpuError> {
        let header = RequestHeader {
            job_id: req.job_id,
            kind: req.kind,
            attempt: req.attempt,
            traceparent: req.traceparent,
        };
        // A small payload goes into the same buffer as the frame header, so
        // the supervisor sends the whole request with one write; a large one
        // is written straight from its `Bytes` afterwards instead of copied.
        let inline = req.payload.len() <= INLINE_PAYLOAD_MAX;
        let extra = if inline { req.payload.len() } else { 0 };
        let mut prefix =
            frame::encode_request_prefix_with_capacity(&header, req.payload.len(), max, extra)
                .map_err(|err| match err {
                    FrameError::TooLarge { .. } => CpuError::PayloadTooLarge {
                        size: req.payload.len(),
                        max,
                    },
                    other => CpuError::Protocol {
                        message: other.to_string(),
                    },
                })?;
        let payload = if inline {
            prefix.extend_from_slice(&req.payload);
            Bytes::new()
        } else {
            req.payload
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            prefix,
            payload,
            timeout: req.timeout,
            reply,
            redelivered: false,
        };
        Ok((job, answer))
    }
}
