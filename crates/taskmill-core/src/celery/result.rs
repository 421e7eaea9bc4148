//! The result messages of Celery's `rpc://` backend, and the exceptions a
//! Celery client rebuilds from them.

use serde::{Deserialize, Serialize};

use super::ReplyTo;
use super::datetime::format_iso8601;
use crate::error::JobError;
use crate::wire::DeadReason;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::celery::parse_iso8601;
    use std::time::Duration;

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
}
