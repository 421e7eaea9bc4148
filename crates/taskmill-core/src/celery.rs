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

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::JobError;
use crate::wire::{
    CONTENT_TYPE, DeadReason, DecodeError, Envelope, H_FIRST_FAILED_AT_MS, H_REPLAY, H_TRACEPARENT,
    H_TRACESTATE, HeaderValue, MAX_KEY_LEN, MAX_KIND_LEN, int_header, is_json_content_type,
    str_header, too_large, valid_traceparent,
};

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

/// The canvas part of a v2 body; any of it set means a workflow taskmill does
/// not run.
#[derive(Debug, Default, Deserialize)]
struct Embed {
    #[serde(default)]
    callbacks: Option<serde_json::Value>,
    #[serde(default)]
    errbacks: Option<serde_json::Value>,
    #[serde(default)]
    chain: Option<serde_json::Value>,
    #[serde(default)]
    chord: Option<serde_json::Value>,
}

fn is_void(v: &HeaderValue) -> bool {
    matches!(v, HeaderValue::Other("void"))
}

/// A scalar header with Python's `None` treated as absent.
fn present(headers: &impl HeaderSource, name: &str) -> Option<HeaderValue> {
    headers.scalar(name).filter(|v| !is_void(v))
}

fn opt_str(headers: &impl HeaderSource, name: &str) -> Result<Option<String>, DecodeError> {
    present(headers, name)
        .map(|v| str_header(name, v))
        .transpose()
        .map(|s| s.filter(|s| !s.is_empty()))
}

fn serializer_name(content_type: &str) -> &str {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence.to_ascii_lowercase().as_str() {
        "application/x-python-serialize" => "pickle",
        "application/x-yaml" | "application/yaml" => "yaml",
        "application/x-msgpack" | "application/msgpack" => "msgpack",
        "application/data" => "raw bytes",
        _ => essence,
    }
}

/// The task id of a Celery message: the `id` header, else `correlation_id`.
fn task_id(
    props: &CeleryProperties<'_>,
    headers: &impl HeaderSource,
) -> Result<Option<String>, DecodeError> {
    Ok(opt_str(headers, H_ID)?.or_else(|| {
        props
            .correlation_id
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }))
}

/// Where a result goes, if the client asked for one.
fn reply_to(
    props: &CeleryProperties<'_>,
    headers: &impl HeaderSource,
    task_id: &str,
) -> Result<Option<ReplyTo>, DecodeError> {
    let ignore = match present(headers, H_IGNORE_RESULT) {
        None => false,
        Some(HeaderValue::Bool(b)) => b,
        Some(HeaderValue::Int(n)) => n != 0,
        Some(other) => {
            return Err(DecodeError::new(
                DeadReason::BadHeader,
                format!("header {H_IGNORE_RESULT} must be a boolean, got {other:?}"),
            ));
        }
    };
    let Some(queue) = props.reply_to.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    if ignore {
        return Ok(None);
    }
    Ok(Some(ReplyTo {
        task_id: task_id.to_string(),
        queue: queue.to_string(),
        group_id: opt_str(headers, H_GROUP)?,
        parent_id: opt_str(headers, H_PARENT_ID)?,
    }))
}

/// For a message refused at decode: where to report the refusal, when the
/// message says enough to know (a task id and a `reply_to`). Lenient: any
/// header that does not parse just means "no reply".
pub fn reply_hint(props: CeleryProperties<'_>, headers: &impl HeaderSource) -> Option<ReplyTo> {
    let id = task_id(&props, headers).ok()??;
    reply_to(&props, headers, &id).ok()?
}

fn time_header(headers: &impl HeaderSource, name: &str) -> Result<Option<u64>, DecodeError> {
    let Some(s) = opt_str(headers, name)? else {
        return Ok(None);
    };
    parse_iso8601(&s).map(Some).ok_or_else(|| {
        DecodeError::new(
            DeadReason::BadHeader,
            format!("header {name} is not an ISO 8601 date and time: {s:?}"),
        )
    })
}

/// The hard limit of `timelimit` (`[hard, soft]`, seconds, each may be null).
/// The soft limit has no equivalent (a taskmill handler gets no in-job
/// signal), so only the hard one is used.
fn hard_time_limit(headers: &impl HeaderSource) -> Result<Option<Duration>, DecodeError> {
    let bad = |what: String| {
        DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_TIMELIMIT} must be [hard, soft] in seconds: {what}"),
        )
    };
    let items = match headers.list(H_TIMELIMIT) {
        Some(items) => items,
        None => match present(headers, H_TIMELIMIT) {
            None => return Ok(None),
            Some(other) => return Err(bad(format!("got {other:?}"))),
        },
    };
    let Some(hard) = items.first() else {
        return Ok(None);
    };
    let secs = match hard {
        HeaderValue::Int(n) => *n as f64,
        HeaderValue::Float(f) => *f,
        v if is_void(v) => return Ok(None),
        other => return Err(bad(format!("hard limit is {other:?}"))),
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(bad(format!("hard limit {secs} is not a positive number")));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Decodes a Celery protocol v2 task message consumed from `queue`.
///
/// The body is read, not taken: a Celery message keeps its bytes, so its
/// dead-letter and retry copies stay Celery messages. Checks run in this
/// order: body size; the `task` header (protocol v2); the task name; the task
/// id; `content_type`, `content_encoding` and `compression` (JSON only);
/// `retries`, `eta`, `expires`, `timelimit`, `ignore_result`; the body's
/// shape; no canvas.
pub fn decode(
    queue: &str,
    props: CeleryProperties<'_>,
    headers: &impl HeaderSource,
    body: &[u8],
    max_payload_bytes: usize,
) -> Result<(Envelope, CeleryTask), DecodeError> {
    if body.len() > max_payload_bytes {
        return Err(too_large(body.len(), max_payload_bytes));
    }
    let name = match present(headers, H_TASK) {
        Some(v) => str_header(H_TASK, v)?,
        None => {
            let detail = if headers.scalar(crate::wire::H_KIND).is_some() {
                "a taskmill protocol message on a Celery queue: publish taskmill jobs to a taskmill queue".to_string()
            } else if looks_like_v1(body) {
                "Celery protocol v1 (task and id in the body) is not supported: use task_protocol = 2, Celery's default since 4.0".to_string()
            } else {
                format!("header {H_TASK} is missing: not a Celery protocol v2 task message")
            };
            return Err(DecodeError::new(DeadReason::UnsupportedProtocol, detail));
        }
    };
    if name.is_empty() || name.len() > MAX_KIND_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_TASK} (the task name) must be 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    let Some(id) = task_id(&props, headers)? else {
        return Err(DecodeError::new(
            DeadReason::MissingHeader,
            format!("header {H_ID} and property correlation_id (the task id) are missing"),
        ));
    };
    if id.len() > MAX_KEY_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_ID} (the task id) must be at most {MAX_KEY_LEN} bytes"),
        ));
    }
    match props.content_type {
        Some(ct) if is_json_content_type(ct) => {}
        Some(ct) => {
            return Err(DecodeError::new(
                DeadReason::UnsupportedSerializer,
                format!(
                    "content_type {ct:?} ({}) is refused: taskmill only decodes JSON; set task_serializer = \"json\"",
                    serializer_name(ct)
                ),
            ));
        }
        None => {
            return Err(DecodeError::new(
                DeadReason::MissingHeader,
                format!("property content_type is missing; expected {CONTENT_TYPE:?}"),
            ));
        }
    }
    if let Some(enc) = props.content_encoding
        && !(enc.is_empty()
            || enc.eq_ignore_ascii_case("utf-8")
            || enc.eq_ignore_ascii_case("utf8"))
    {
        return Err(DecodeError::new(
            DeadReason::UnsupportedSerializer,
            format!("content_encoding {enc:?} is refused: JSON bodies must be utf-8"),
        ));
    }
    if let Some(c) = opt_str(headers, H_COMPRESSION)? {
        return Err(DecodeError::new(
            DeadReason::UnsupportedSerializer,
            format!("compressed body ({c}) is refused: unset task_compression"),
        ));
    }
    let retries = match present(headers, H_RETRIES) {
        None => 0,
        Some(v) => {
            let n = int_header(H_RETRIES, v)?;
            u32::try_from(n)
                .ok()
                .filter(|n| *n < u32::MAX)
                .ok_or_else(|| {
                    DecodeError::new(
                        DeadReason::BadHeader,
                        format!("header {H_RETRIES} must be an integer >= 0, got {n}"),
                    )
                })?
        }
    };
    let eta_us = time_header(headers, H_ETA)?;
    let expires_us = time_header(headers, H_EXPIRES)?;
    let timeout = hard_time_limit(headers)?;
    let reply = reply_to(&props, headers, &id)?;
    let payload = call_payload(body)?;

    let traceparent = present(headers, H_TRACEPARENT)
        .and_then(|v| match v {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        })
        .filter(|s| valid_traceparent(s));
    let tracestate = traceparent
        .as_ref()
        .and(present(headers, H_TRACESTATE))
        .and_then(|v| match v {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        });
    let first_failed_at_ms = match present(headers, H_FIRST_FAILED_AT_MS) {
        None => None,
        Some(v) => u64::try_from(int_header(H_FIRST_FAILED_AT_MS, v)?).ok(),
    };
    let env = Envelope {
        job_id: id.clone(),
        kind: name.clone(),
        queue: queue.to_string(),
        attempt: retries + 1,
        idempotency_key: Some(id),
        timeout,
        // Queue wait counts from the eta when there is one: it was not due before.
        enqueued_at_us: eta_us.or(props.timestamp.map(|s| s.saturating_mul(1_000_000))),
        traceparent,
        tracestate,
        first_failed_at_ms,
        replay: headers.scalar(H_REPLAY).is_some(),
        payload,
    };
    let task = CeleryTask {
        name,
        reply,
        retries,
        eta_us,
        expires_us,
    };
    Ok((env, task))
}

fn looks_like_v1(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct V1 {
        #[allow(dead_code)]
        task: String,
        #[allow(dead_code)]
        id: String,
    }
    serde_json::from_slice::<V1>(body).is_ok()
}

/// `[args, kwargs, embed]` -> `{"args": args, "kwargs": kwargs}`, keeping the
/// argument JSON byte for byte.
fn call_payload(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let parts: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => shape("it is not a JSON array"),
        _ => DecodeError::new(
            DeadReason::InvalidJson,
            format!("Celery body is not JSON: {e}"),
        ),
    })?;
    if !(2..=3).contains(&parts.len()) {
        return Err(shape(&format!("it has {} elements", parts.len())));
    }
    let (args, kwargs) = (parts[0].get(), parts[1].get());
    if !args.starts_with('[') {
        return Err(shape("args is not a list"));
    }
    if !kwargs.starts_with('{') {
        return Err(shape("kwargs is not a mapping"));
    }
    if let Some(embed) = parts.get(2) {
        let embed: Option<Embed> = serde_json::from_str(embed.get())
            .map_err(|e| shape(&format!("embed is not a mapping: {e}")))?;
        let embed = embed.unwrap_or_default();
        let used = |v: &Option<serde_json::Value>| match v {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        let canvas: Vec<&str> = [
            ("callbacks", &embed.callbacks),
            ("errbacks", &embed.errbacks),
            ("chain", &embed.chain),
            ("chord", &embed.chord),
        ]
        .into_iter()
        .filter(|(_, v)| used(v))
        .map(|(k, _)| k)
        .collect();
        if !canvas.is_empty() {
            return Err(DecodeError::new(
                DeadReason::UnsupportedProtocol,
                format!(
                    "Celery canvas is not supported (the message has {}): send the task alone",
                    canvas.join(", ")
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(args.len() + kwargs.len() + 20);
    out.extend_from_slice(b"{\"args\":");
    out.extend_from_slice(args.as_bytes());
    out.extend_from_slice(b",\"kwargs\":");
    out.extend_from_slice(kwargs.as_bytes());
    out.push(b'}');
    Ok(out)
}

fn shape(what: &str) -> DecodeError {
    DecodeError::new(
        DeadReason::InvalidPayload,
        format!("Celery body must be [args, kwargs, embed]: {what}"),
    )
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

/// A task state as Celery's result backends spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultStatus {
    /// Finished; `result` is the return value.
    Success,
    /// Failed for good; `result` is the exception.
    Failure,
    /// Failed and will run again; `result` is the exception. Not final.
    Retry,
    /// Not run (expired); `result` is `TaskRevokedError`.
    Revoked,
}

impl ResultStatus {
    /// The `status` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "SUCCESS",
            ResultStatus::Failure => "FAILURE",
            ResultStatus::Retry => "RETRY",
            ResultStatus::Revoked => "REVOKED",
        }
    }

    /// Whether the client stops waiting on it (Celery's READY_STATES).
    pub fn is_ready(self) -> bool {
        !matches!(self, ResultStatus::Retry)
    }
}

/// An exception as Celery's JSON result serialization carries it: the client
/// rebuilds `exc_module.exc_type(*exc_message)`. Celery 5 refuses a type
/// that is not an exception class, and falls back to a look-alike class when
/// the module is not loaded, so the types used here are builtins and the
/// `celery`/`billiard` exceptions a client has loaded anyway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeleryException {
    /// The class name.
    pub exc_type: String,
    /// Its module.
    pub exc_module: String,
    /// The constructor's arguments (Celery 5 expects a list).
    pub exc_message: Vec<serde_json::Value>,
}

impl CeleryException {
    fn new(module: &str, ty: &str, args: Vec<serde_json::Value>) -> Self {
        CeleryException {
            exc_type: ty.to_string(),
            exc_module: module.to_string(),
            exc_message: args,
        }
    }

    /// The exception a handler error becomes: `RuntimeError(message)` for
    /// handler errors (permanent, or retryable with no attempts left),
    /// `ValueError` for a body that is not JSON, `TypeError` for arguments
    /// that do not fit the handler (as Python raises for a bad call),
    /// `TimeLimitExceeded(seconds)` for a timeout and
    /// `WorkerLostError(cause)` for a crash, as a Celery worker reports them.
    pub fn from_job_error(err: &JobError) -> Self {
        let msg = |m: &str| vec![serde_json::Value::String(m.to_string())];
        match err {
            JobError::Retryable { message, .. } | JobError::Permanent { message } => {
                Self::new("builtins", "RuntimeError", msg(message))
            }
            JobError::InvalidJson { message } => Self::new("builtins", "ValueError", msg(message)),
            JobError::InvalidPayload { message } => {
                Self::new("builtins", "TypeError", msg(message))
            }
            JobError::Timeout { after } => Self::new(
                "billiard.exceptions",
                "TimeLimitExceeded",
                vec![serde_json::json!(after.as_secs_f64())],
            ),
            JobError::Crashed { cause } => {
                Self::new("billiard.exceptions", "WorkerLostError", msg(cause))
            }
        }
    }

    /// The exception for a message refused before it ran: `NotRegistered(name)`
    /// for an unknown task, `ContentDisallowed` for a refused serializer,
    /// `TypeError` for arguments that do not fit, `ValueError` otherwise.
    pub fn from_refusal(reason: DeadReason, detail: &str, task_name: Option<&str>) -> Self {
        let msg = vec![serde_json::Value::String(detail.to_string())];
        match (reason, task_name) {
            (DeadReason::UnknownKind, Some(name)) => Self::new(
                "celery.exceptions",
                "NotRegistered",
                vec![serde_json::Value::String(name.to_string())],
            ),
            (DeadReason::UnsupportedSerializer, _) => {
                Self::new("kombu.exceptions", "ContentDisallowed", msg)
            }
            (DeadReason::InvalidPayload, _) => Self::new("builtins", "TypeError", msg),
            (DeadReason::Expired, _) => Self::revoked("expired"),
            _ => Self::new("builtins", "ValueError", msg),
        }
    }

    /// `TaskRevokedError(reason)`, what Celery reports for an expired task.
    pub fn revoked(reason: &str) -> Self {
        Self::new(
            "celery.exceptions",
            "TaskRevokedError",
            vec![serde_json::Value::String(reason.to_string())],
        )
    }

    /// As the `result` of a result message.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The body of a result message for the `rpc://` backend, published to the
/// default exchange with routing key [`ReplyTo::queue`] and `correlation_id`
/// = the task id: `{"task_id", "status", "result", "traceback", "children",
/// "date_done"}` (`date_done` null until the state is final), plus
/// `group_id` and `parent_id` when the task had them.
pub fn result_body(
    reply: &ReplyTo,
    status: ResultStatus,
    result: &serde_json::Value,
    traceback: Option<&str>,
    now_us: u64,
) -> Vec<u8> {
    let mut meta = serde_json::Map::with_capacity(8);
    meta.insert("status".into(), status.as_str().into());
    meta.insert("result".into(), result.clone());
    meta.insert(
        "traceback".into(),
        traceback.map_or(serde_json::Value::Null, Into::into),
    );
    meta.insert("children".into(), serde_json::Value::Array(Vec::new()));
    meta.insert(
        "date_done".into(),
        if status.is_ready() {
            format_iso8601(now_us).into()
        } else {
            serde_json::Value::Null
        },
    );
    if let Some(g) = &reply.group_id {
        meta.insert("group_id".into(), g.as_str().into());
    }
    if let Some(p) = &reply.parent_id {
        meta.insert("parent_id".into(), p.as_str().into());
    }
    meta.insert("task_id".into(), reply.task_id.as_str().into());
    serde_json::to_vec(&serde_json::Value::Object(meta)).unwrap_or_default()
}

// ---- ISO 8601, as Python's datetime.isoformat() writes it ----

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number from [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]][Z|±HH[:MM[:SS]]]` into
/// microseconds since the Unix epoch (0 for earlier times). No offset means
/// UTC, as Celery's protocol v2 says.
pub fn parse_iso8601(s: &str) -> Option<u64> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 16 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)? as u32, num(8, 2)? as u32);
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return None;
    }
    let (h, mi) = (num(11, 2)?, num(14, 2)?);
    if b[13] != b':' || h > 23 || mi > 59 {
        return None;
    }
    let mut i = 16;
    let mut sec = 0;
    let mut micros = 0i64;
    if b.get(i) == Some(&b':') {
        sec = num(i + 1, 2)?;
        if sec > 60 {
            return None;
        }
        i += 3;
        if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start {
                return None;
            }
            let digits = &s[start..end.min(start + 6)];
            micros = digits.parse::<i64>().ok()? * 10i64.pow(6 - digits.len() as u32);
            i = end;
        }
    }
    let offset_s = match &s[i..] {
        "" | "Z" | "z" => 0,
        rest => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let r = rest[1..].replace(':', "");
            if !(r.len() == 2 || r.len() == 4 || r.len() == 6)
                || !r.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            let oh: i64 = r[0..2].parse().ok()?;
            let om: i64 = r.get(2..4).map_or(Some(0), |x| x.parse().ok())?;
            let os: i64 = r.get(4..6).map_or(Some(0), |x| x.parse().ok())?;
            if oh > 23 || om > 59 || os > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60 + os)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    let us = secs.checked_mul(1_000_000)?.checked_add(micros)?;
    Some(u64::try_from(us).unwrap_or(0))
}

/// Formats microseconds since the Unix epoch as Python's
/// `datetime.isoformat()` does for an aware UTC time:
/// `2024-05-01T12:00:00.123456+00:00`.
pub fn format_iso8601(us: u64) -> String {
    let secs = (us / 1_000_000) as i64;
    let micros = us % 1_000_000;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default, Clone)]
    struct Table {
        scalars: HashMap<&'static str, HeaderValue>,
        lists: HashMap<&'static str, Vec<HeaderValue>>,
    }

    impl HeaderSource for Table {
        fn scalar(&self, name: &str) -> Option<HeaderValue> {
            if self.lists.contains_key(name) {
                return Some(HeaderValue::Other("array"));
            }
            self.scalars.get(name).cloned()
        }
        fn list(&self, name: &str) -> Option<Vec<HeaderValue>> {
            self.lists.get(name).cloned()
        }
    }

    const VOID: HeaderValue = HeaderValue::Other("void");

    fn s(v: &str) -> HeaderValue {
        HeaderValue::Str(v.to_string())
    }

    /// Headers as Celery 5's `as_task_v2` writes them for
    /// `send_task("reports.render", args=[1, "a"], kwargs={"k": 2})`.
    fn celery_headers() -> Table {
        let mut t = Table::default();
        for (k, v) in [
            ("lang", s("py")),
            (H_TASK, s("reports.render")),
            (H_ID, s("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001")),
            ("shadow", VOID),
            (H_ETA, VOID),
            (H_EXPIRES, VOID),
            (H_GROUP, VOID),
            ("group_index", VOID),
            (H_RETRIES, HeaderValue::Int(0)),
            (H_ROOT_ID, s("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001")),
            (H_PARENT_ID, VOID),
            ("argsrepr", s("[1, 'a']")),
            ("kwargsrepr", s("{'k': 2}")),
            ("origin", s("gen1@host")),
            (H_IGNORE_RESULT, HeaderValue::Bool(false)),
            ("replaced_task_nesting", HeaderValue::Int(0)),
            ("stamped_headers", VOID),
            ("stamps", HeaderValue::Other("table")),
        ] {
            t.scalars.insert(k, v);
        }
        t.lists.insert(H_TIMELIMIT, vec![VOID, VOID]);
        t
    }

    fn props() -> CeleryProperties<'static> {
        CeleryProperties {
            correlation_id: Some("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001"),
            content_type: Some("application/json"),
            content_encoding: Some("utf-8"),
            reply_to: Some("a1b2c3d4-reply"),
            timestamp: None,
        }
    }

    const BODY: &[u8] =
        br#"[[1, "a"], {"k": 2}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

    #[test]
    fn decodes_what_celery_sends() {
        let (env, task) = decode("celery", props(), &celery_headers(), BODY, 1024).unwrap();
        assert_eq!(env.kind, "reports.render");
        assert_eq!(env.job_id, "6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001");
        assert_eq!(env.idempotency_key.as_deref(), Some(env.job_id.as_str()));
        assert_eq!(env.attempt, 1);
        assert_eq!(env.timeout, None);
        assert_eq!(env.queue, "celery");
        let call: CeleryCall = serde_json::from_slice(&env.payload).unwrap();
        assert_eq!(
            call.args,
            vec![serde_json::json!(1), serde_json::json!("a")]
        );
        assert_eq!(call.kwargs["k"], 2);
        let reply = task.reply.unwrap();
        assert_eq!(reply.queue, "a1b2c3d4-reply");
        assert_eq!(reply.task_id, env.job_id);
        assert_eq!(reply.group_id, None);
        assert_eq!(
            (task.retries, task.eta_us, task.expires_us),
            (0, None, None)
        );
    }

    #[test]
    fn retries_eta_expires_timelimit_and_trace() {
        let mut h = celery_headers();
        h.scalars.insert(H_RETRIES, HeaderValue::Int(2));
        h.scalars
            .insert(H_ETA, s("2024-05-01T12:00:02.500000+00:00"));
        h.scalars.insert(H_EXPIRES, s("2024-05-01T14:00:00+02:00"));
        h.lists.insert(
            H_TIMELIMIT,
            vec![HeaderValue::Float(1.5), HeaderValue::Int(1)],
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.scalars.insert(H_TRACEPARENT, s(tp));
        h.scalars.insert(H_GROUP, s("g-1"));
        let (env, task) = decode("q", props(), &h, BODY, 1024).unwrap();
        assert_eq!(env.attempt, 3);
        assert_eq!(task.retries, 2);
        assert_eq!(env.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(env.traceparent.as_deref(), Some(tp));
        let eta = parse_iso8601("2024-05-01T12:00:02.5Z").unwrap();
        assert_eq!(task.eta_us, Some(eta));
        assert_eq!(env.enqueued_at_us, Some(eta));
        assert_eq!(task.expires_us, parse_iso8601("2024-05-01T12:00:00Z"));
        assert!(task.expired_at(eta));
        assert_eq!(task.wait_at(eta - 1_000), Some(Duration::from_millis(1)));
        assert_eq!(task.wait_at(eta), None);
        assert_eq!(task.reply.unwrap().group_id.as_deref(), Some("g-1"));
    }

    #[test]
    fn no_reply_without_reply_to_or_with_ignore_result() {
        let p = CeleryProperties {
            reply_to: Some(""),
            ..props()
        };
        assert_eq!(
            decode("q", p, &celery_headers(), BODY, 1024)
                .unwrap()
                .1
                .reply,
            None
        );
        let mut h = celery_headers();
        h.scalars.insert(H_IGNORE_RESULT, HeaderValue::Bool(true));
        assert_eq!(decode("q", props(), &h, BODY, 1024).unwrap().1.reply, None);
    }

    #[test]
    fn refusals_name_their_reason() {
        let v1 = br#"{"task": "reports.render", "id": "x", "args": [], "kwargs": {}}"#;
        let mut no_task = celery_headers();
        no_task.scalars.remove(H_TASK);
        let mut taskmill_msg = Table::default();
        taskmill_msg.scalars.insert(crate::wire::H_KIND, s("noop"));
        let mut no_id = celery_headers();
        no_id.scalars.remove(H_ID);
        let mut compressed = celery_headers();
        compressed
            .scalars
            .insert(H_COMPRESSION, s("application/x-gzip"));
        let mut bad_eta = celery_headers();
        bad_eta.scalars.insert(H_ETA, s("tomorrow"));
        let mut bad_retries = celery_headers();
        bad_retries.scalars.insert(H_RETRIES, HeaderValue::Int(-1));
        let mut bad_limit = celery_headers();
        bad_limit.lists.insert(H_TIMELIMIT, vec![s("ten"), VOID]);
        let ct = |c: &'static str| CeleryProperties {
            content_type: Some(c),
            ..props()
        };
        let chain = br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": [{"task": "next"}], "chord": null}]"#;
        type Case<'a> = (Table, CeleryProperties<'a>, &'a [u8], DeadReason, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                no_task.clone(),
                props(),
                v1,
                DeadReason::UnsupportedProtocol,
                "v1",
            ),
            (
                no_task,
                props(),
                BODY,
                DeadReason::UnsupportedProtocol,
                "task is missing",
            ),
            (
                taskmill_msg,
                props(),
                b"{}",
                DeadReason::UnsupportedProtocol,
                "taskmill",
            ),
            (
                no_id,
                CeleryProperties {
                    correlation_id: None,
                    ..props()
                },
                BODY,
                DeadReason::MissingHeader,
                "task id",
            ),
            (
                celery_headers(),
                ct("application/x-python-serialize"),
                b"\x80\x04\x95",
                DeadReason::UnsupportedSerializer,
                "pickle",
            ),
            (
                celery_headers(),
                ct("application/x-yaml"),
                b"- 1",
                DeadReason::UnsupportedSerializer,
                "yaml",
            ),
            (
                celery_headers(),
                ct("application/x-msgpack"),
                b"\x93",
                DeadReason::UnsupportedSerializer,
                "msgpack",
            ),
            (
                celery_headers(),
                CeleryProperties {
                    content_encoding: Some("binary"),
                    ..props()
                },
                BODY,
                DeadReason::UnsupportedSerializer,
                "binary",
            ),
            (
                compressed,
                props(),
                b"x",
                DeadReason::UnsupportedSerializer,
                "compressed",
            ),
            (bad_eta, props(), BODY, DeadReason::BadHeader, "eta"),
            (bad_retries, props(), BODY, DeadReason::BadHeader, "retries"),
            (bad_limit, props(), BODY, DeadReason::BadHeader, "timelimit"),
            (
                celery_headers(),
                props(),
                b"[[1], {}",
                DeadReason::InvalidJson,
                "not JSON",
            ),
            (
                celery_headers(),
                props(),
                b"{\"a\": 1}",
                DeadReason::InvalidPayload,
                "array",
            ),
            (
                celery_headers(),
                props(),
                b"[{}, {}, null]",
                DeadReason::InvalidPayload,
                "args",
            ),
            (
                celery_headers(),
                props(),
                b"[[], [], null]",
                DeadReason::InvalidPayload,
                "kwargs",
            ),
            (
                celery_headers(),
                props(),
                chain,
                DeadReason::UnsupportedProtocol,
                "chain",
            ),
            (
                celery_headers(),
                props(),
                &[b' '; 2000],
                DeadReason::PayloadTooLarge,
                "limit",
            ),
        ];
        for (i, (h, p, body, want, says)) in cases.into_iter().enumerate() {
            let err =
                decode("q", p, &h, body, 1024).expect_err(&format!("case {i} must be refused"));
            assert_eq!(err.reason, want, "case {i}: {err}");
            assert!(err.detail.contains(says), "case {i}: {err}");
        }
    }

    #[test]
    fn two_element_body_and_null_embed_are_accepted() {
        let (env, _) = decode(
            "q",
            props(),
            &celery_headers(),
            br#"[[], {"a": 1.50}]"#,
            1024,
        )
        .unwrap();
        // Arguments are kept byte for byte (no float reformatting).
        assert_eq!(env.payload, br#"{"args":[],"kwargs":{"a": 1.50}}"#);
        assert!(decode("q", props(), &celery_headers(), b"[[], {}, null]", 1024).is_ok());
        let empty_lists =
            br#"[[], {}, {"callbacks": [], "errbacks": [], "chain": [], "chord": null}]"#;
        assert!(decode("q", props(), &celery_headers(), empty_lists, 1024).is_ok());
    }

    #[test]
    fn reply_hint_of_a_refused_message() {
        let p = CeleryProperties {
            content_type: Some("application/x-python-serialize"),
            ..props()
        };
        let hint = reply_hint(p, &celery_headers()).unwrap();
        assert_eq!(hint.task_id, "6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001");
        assert_eq!(hint.queue, "a1b2c3d4-reply");
        assert_eq!(
            reply_hint(p, &Table::default()).map(|r| r.task_id),
            Some("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001".into())
        );
        let no_reply = CeleryProperties {
            reply_to: None,
            ..p
        };
        assert_eq!(reply_hint(no_reply, &celery_headers()), None);
    }

    #[test]
    fn result_bodies_match_the_rpc_backend() {
        let reply = ReplyTo {
            task_id: "t-1".into(),
            queue: "r".into(),
            group_id: Some("g".into()),
            parent_id: None,
        };
        let now = parse_iso8601("2024-05-01T12:00:00.000001+00:00").unwrap();
        let body = result_body(
            &reply,
            ResultStatus::Success,
            &serde_json::json!({"n": 1}),
            None,
            now,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "status": "SUCCESS", "result": {"n": 1}, "traceback": null, "children": [],
                "date_done": "2024-05-01T12:00:00.000001+00:00", "group_id": "g", "task_id": "t-1"
            })
        );
        let exc = CeleryException::from_job_error(&JobError::permanent("boom"));
        let body = result_body(&reply, ResultStatus::Retry, &exc.to_json(), Some("tb"), now);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], "RETRY");
        assert_eq!(v["date_done"], serde_json::Value::Null);
        assert_eq!(
            v["result"],
            serde_json::json!({"exc_type": "RuntimeError", "exc_module": "builtins", "exc_message": ["boom"]})
        );
    }

    #[test]
    fn exceptions_are_ones_a_client_rebuilds() {
        let t = CeleryException::from_job_error(&JobError::Timeout {
            after: Duration::from_millis(1500),
        });
        assert_eq!(
            (t.exc_module.as_str(), t.exc_type.as_str()),
            ("billiard.exceptions", "TimeLimitExceeded")
        );
        assert_eq!(t.exc_message, vec![serde_json::json!(1.5)]);
        let n = CeleryException::from_refusal(DeadReason::UnknownKind, "x", Some("reports.nope"));
        assert_eq!(n.exc_type, "NotRegistered");
        assert_eq!(n.exc_message, vec![serde_json::json!("reports.nope")]);
        let r = CeleryException::from_refusal(DeadReason::Expired, "x", None);
        assert_eq!(
            (r.exc_type.as_str(), r.exc_message[0].as_str()),
            ("TaskRevokedError", Some("expired"))
        );
        let p = CeleryException::from_refusal(DeadReason::UnsupportedSerializer, "pickle", None);
        assert_eq!(p.exc_module, "kombu.exceptions");
    }

    #[test]
    fn iso8601_as_python_writes_it() {
        let base = 1_714_564_800_000_000; // 2024-05-01T12:00:00Z
        for (text, want) in [
            ("2024-05-01T12:00:00+00:00", base),
            ("2024-05-01T12:00:00", base),
            ("2024-05-01 12:00:00Z", base),
            ("2024-05-01T14:00:00.250000+02:00", base + 250_000),
            ("2024-05-01T11:30:00.5-0030", base + 500_000),
            ("2024-05-01T12:00", base),
            ("2024-05-01T12:00:00.123456789+00:00", base + 123_456),
            ("1969-12-31T23:59:59Z", 0),
        ] {
            assert_eq!(parse_iso8601(text), Some(want), "{text}");
        }
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00",
            "2023-02-29T00:00:00",
            "2024-05-01T24:00:00",
            "2024-05-01T12:00:00+5",
            "2024-05-01T12:00:00.+00:00",
            "yesterday-at-noon",
        ] {
            assert_eq!(parse_iso8601(bad), None, "{bad}");
        }
        assert_eq!(format_iso8601(base + 7), "2024-05-01T12:00:00.000007+00:00");
        assert_eq!(format_iso8601(0), "1970-01-01T00:00:00.000000+00:00");
    }

    proptest::proptest! {
        #[test]
        fn iso8601_round_trips(us in 0u64..(253_402_300_799 * 1_000_000)) {
            proptest::prop_assert_eq!(parse_iso8601(&format_iso8601(us)), Some(us));
        }

        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode("q", props(), &celery_headers(), &body, 1024);
        }
    }
}
