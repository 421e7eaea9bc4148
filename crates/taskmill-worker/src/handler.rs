//! Handlers: what a job kind runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmill_core::JobError;

/// What a handler knows about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// Job id (AMQP `message_id`), the same across retries.
    pub job_id: String,
    /// Kind.
    pub kind: String,
    /// Queue it was consumed from.
    pub queue: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Idempotency key; pass it downstream so effects outside taskmill can be
    /// deduplicated too.
    pub idempotency_key: Option<String>,
    /// W3C traceparent of the producer, if any.
    pub traceparent: Option<String>,
    /// When the hard timeout stops this attempt.
    pub deadline: Instant,
}

impl JobContext {
    /// Time left before the hard timeout.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value, JobError>> + Send>>;

/// A type-erased IO handler: takes the raw JSON payload and parses it once,
/// before returning its future, so the caller keeps the bytes without a copy.
pub type IoHandler = Arc<dyn Fn(JobContext, &[u8]) -> HandlerFuture + Send + Sync>;

/// Wraps a typed async handler into an [`IoHandler`]. A payload that does not
/// deserialize into `P` fails the job permanently (dead-lettered with reason
/// `invalid_json` or `invalid_payload`), without calling the handler.
pub fn erase<P, R, F, Fut>(kind: &str, f: F) -> IoHandler
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(JobContext, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, JobError>> + Send + 'static,
{
    let f = Arc::new(f);
    let kind = kind.to_string();
    Arc::new(move |ctx: JobContext, payload: &[u8]| {
        let parsed = serde_json::from_slice::<P>(payload);
        let f = f.clone();
        let kind = kind.clone();
        Box::pin(async move {
            let p = parsed.map_err(|e| JobError::from_payload_error(&kind, &e))?;
            let r = f(ctx, p).await?;
            serde_json::to_value(r).map_err(|e| JobError::Permanent {
                message: format!("handler result is not serializable to JSON: {e}"),
            })
        })
    })
}
