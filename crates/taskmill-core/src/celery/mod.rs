//! Celery protocol v2: decoding the task messages Celery producers publish,
//! and encoding the result messages its `rpc://` backend reads.
//!
//! `docs/protocol.md` ("Celery producers") is the user-facing description.
//! A queue the worker serves in Celery mode (`celery_queues`) accepts only
//! what this module decodes:
//!
//! - protocol v2 (the `task` header marks it; protocol v1 keeps `task` and
//!   `id` in the body and is refused with `unsupported_protocol`);
//! - a JSON body (`content_type` `application/json`, no compression):
//!   `[args, kwargs, embed]`. Pickle, YAML, msgpack and compressed bodies are
//!   refused with `unsupported_serializer` and never decoded;
//! - no canvas: `embed` with callbacks, errbacks, a chain or a chord is
//!   refused with `unsupported_protocol` (running the task without them would
//!   silently drop the rest of the workflow).
//!
//! A decoded task becomes an ordinary [`Envelope`]: kind = Celery task name,
//! job id and idempotency key = Celery task id, attempt = `retries` + 1,
//! timeout = the hard `timelimit`, and payload
//! `{"args": [...], "kwargs": {...}}` (see [`CeleryCall`]). What only Celery
//! needs (where to send the result, `eta`, `expires`) travels beside it in a
//! [`CeleryTask`].
//!
//! Like [`crate::wire`], the decoder is pure: it sees headers through
//! [`HeaderSource`], so the broker adapter hands in AMQP tables without this
//! crate knowing them.
//!
//! Layout: `decode` (a task message -> [`Envelope`] +
//! [`CeleryTask`]), [`result`] (the `rpc://` backend's result messages and
//! exceptions), `body` (the `[args, kwargs, embed]` body), [`datetime`] (ISO 8601 as Python writes it), and here the
//! header names, the types both sides share, and the redelivery headers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::wire::Envelope;
use crate::wire::{H_FIRST_FAILED_AT_MS, HeaderValue};

mod body;
pub mod datetime;
mod decode;
pub mod result;

pub use datetime::{format_iso8601, parse_iso8601};
pub use decode::{decode, reply_hint};
pub use result::{CeleryException, ResultStatus, result_body};

/// Header: the task name; its presence marks protocol v2.
pub const H_TASK: &str = "task";
/// Header: the task id (a UUID); also the `correlation_id` property.
pub const H_ID: &str = "id";
/// Header: how many times the task was retried (0 on the first run).
pub const H_RETRIES: &str = "retries";
/// Header: ISO 8601 time before which the task must not run.
pub const H_ETA: &str = "eta";
/// Header: ISO 8601 time after which the task must not run.
pub const H_EXPIRES: &str = "expires";
/// Header: `[hard, soft]` time limits in seconds (each may be null).
pub const H_TIMELIMIT: &str = "timelimit";
/// Header: the first task of the workflow.
pub const H_ROOT_ID: &str = "root_id";
/// Header: the task that sent this one.
pub const H_PARENT_ID: &str = "parent_id";
/// Header: the group this task belongs to.
pub const H_GROUP: &str = "group";
/// Header: when true, no result is sent.
pub const H_IGNORE_RESULT: &str = "ignore_result";
/// Header: the compression kombu applied to the body (refused when set).
pub const H_COMPRESSION: &str = "compression";

/// A header table as the Celery decoder sees it: scalars, plus the one list
/// header (`timelimit`).
pub trait HeaderSource {
    /// A scalar header; `None` when absent. AMQP void (Python `None`) is
    /// reported as `Some(HeaderValue::Other("void"))`.
    fn scalar(&self, name: &str) -> Option<HeaderValue>;
    /// A list header, its items as scalars; `None` when absent or not a list.
    fn list(&self, name: &str) -> Option<Vec<HeaderValue>>;
}

/// The AMQP properties a Celery message carries that the decoder reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct CeleryProperties<'a> {
    /// `correlation_id`: the task id.
    pub correlation_id: Option<&'a str>,
    /// `content_type`: must be JSON.
    pub content_type: Option<&'a str>,
    /// `content_encoding`: `utf-8` (or absent).
    pub content_encoding: Option<&'a str>,
    /// `reply_to`: the client's result queue (`rpc://` backend); empty
    /// when the client has no result backend.
    pub reply_to: Option<&'a str>,
    /// `timestamp`, seconds since the Unix epoch (Celery does not set it).
    pub timestamp: Option<u64>,
}

/// Where the outcome of a Celery task is reported: the client's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The task id, sent as `correlation_id` and `task_id`.
    pub task_id: String,
    /// The queue named by `reply_to`, published to through the default exchange.
    pub queue: String,
    /// The task's group, echoed as `group_id`.
    pub group_id: Option<String>,
    /// The task's parent, echoed as `parent_id`.
    pub parent_id: Option<String>,
}

/// What a Celery task carries beyond the [`Envelope`].
#[derive(Debug, Clone, PartialEq)]
pub struct CeleryTask {
    /// The Celery task name (also the envelope's kind).
    pub name: String,
    /// Where to send results; `None` without `reply_to` or with `ignore_result`.
    pub reply: Option<ReplyTo>,
    /// Celery's retry count (the envelope's attempt minus one).
    pub retries: u32,
    /// Not before this time, microseconds since the Unix epoch.
    pub eta_us: Option<u64>,
    /// Not after this time, microseconds since the Unix epoch.
    pub expires_us: Option<u64>,
}

impl CeleryTask {
    /// Whether the task expired at `now_us`.
    pub fn expired_at(&self, now_us: u64) -> bool {
        self.expires_us.is_some_and(|e| e <= now_us)
    }

    /// How long until its `eta`, when that is still ahead of `now_us`.
    pub fn wait_at(&self, now_us: u64) -> Option<Duration> {
        self.eta_us
            .filter(|eta| *eta > now_us)
            .map(|eta| Duration::from_micros(eta - now_us))
    }
}

/// The payload a handler of a Celery task receives: `{"args": [...],
/// "kwargs": {...}}`. Use it as the handler's payload type, with the
/// positional arguments as a tuple or a struct, or stay with
/// `serde_json::Value`.
///
/// ```
/// use taskmill_core::celery::CeleryCall;
/// let call: CeleryCall<(i64, i64)> =
///     serde_json::from_str(r#"{"args": [2, 3], "kwargs": {}}"#).unwrap();
/// assert_eq!(call.args, (2, 3));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeleryCall<A = Vec<serde_json::Value>, K = serde_json::Map<String, serde_json::Value>> {
    /// Positional arguments (`args=` of `send_task`/`apply_async`).
    pub args: A,
    /// Keyword arguments (`kwargs=`).
    pub kwargs: K,
}

/// The headers that turn a Celery message into its delayed copy: `retries`
/// (kept for a deferral, + 1 for a retry) and `eta` (when it is due), plus
/// when the first attempt failed, as taskmill jobs carry it.
pub fn redelivery_headers(
    retries: u32,
    eta_us: u64,
    first_failed_at_ms: Option<u64>,
) -> Vec<(&'static str, HeaderValue)> {
    let mut h = vec![
        (H_RETRIES, HeaderValue::Int(i64::from(retries))),
        (H_ETA, HeaderValue::Str(format_iso8601(eta_us))),
    ];
    if let Some(ms) = first_failed_at_ms {
        h.push((
            H_FIRST_FAILED_AT_MS,
            HeaderValue::Int(i64::try_from(ms).unwrap_or(i64::MAX)),
        ));
    }
    h
}
