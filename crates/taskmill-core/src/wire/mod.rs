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
//!
//! Layout: `envelope` (the [`Envelope`] and its decoding), `headers`
//! (header values, the refusal reasons and the checks every decoder shares),
//! `delay` (the delay ladder's routing).

mod delay;
mod envelope;
mod headers;

pub use delay::{
    DELAY_DELIVER_EXCHANGE, DELAY_LEVELS, DELAY_TICK, MAX_DELAY, deadline_us,
    delay_deliver_pattern, delay_exchange, delay_level_pattern, delay_route, delay_routing_key,
};
pub use envelope::{Envelope, Properties};
pub use headers::{
    DeadReason, DecodeError, HeaderValue, trace_context, valid_traceparent, valid_tracestate,
};
pub(crate) use headers::{check_id, int_header, is_json_content_type, str_header, too_large};

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
/// Header: idempotency key (string, optional, at most [`MAX_KEY_LEN`] bytes,
/// no control characters).
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

/// The dead-letter headers, defined with their codec in [`crate::dead_letter`].
pub use crate::dead_letter::{
    H_DEAD_AT_MS, H_DEAD_ATTEMPTS, H_DEAD_ERROR, H_DEAD_QUEUE, H_DEAD_REASON, H_DEAD_WORKER,
};

/// Longest accepted idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// Longest accepted kind name, in bytes.
pub const MAX_KIND_LEN: usize = 255;
/// Longest accepted job id (`message_id`, Celery task id), in bytes.
pub const MAX_ID_LEN: usize = 255;
/// Longest `tracestate` carried on, in bytes (the W3C limit); a longer one
/// is dropped.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// The name of the dead-letter queue of `queue`.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}
