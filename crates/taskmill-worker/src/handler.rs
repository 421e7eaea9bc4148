//! Handlers: what a job kind runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmill_core::JobError;
use taskmill_store::CompletionTx;

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

/// A boxed transactional handler future: returns the result and hands the
/// completion transaction back so the runtime commits both together.
pub type TxHandlerFuture =
    Pin<Box<dyn Future<Output = Result<(serde_json::Value, CompletionTx), JobError>> + Send>>;

/// A type-erased transactional IO handler.
pub type IoTxHandler =
    Arc<dyn Fn(JobContext, &[u8], CompletionTx) -> TxHandlerFuture + Send + Sync>;

/// Wraps a typed transactional handler. The handler writes its rows through
/// the [`CompletionTx`] and returns it with its result; the runtime then
/// records the completion in the same transaction and commits. An error (or a
/// panic, or a timeout) drops the transaction: nothing it wrote is kept.
pub fn erase_tx<P, R, F, Fut>(kind: &str, f: F) -> IoTxHandler
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(JobContext, P, CompletionTx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(R, CompletionTx), JobError>> + Send + 'static,
{
    let f = Arc::new(f);
    let kind = kind.to_string();
    Arc::new(move |ctx: JobContext, payload: &[u8], tx: CompletionTx| {
        let parsed = serde_json::from_slice::<P>(payload);
        let f = f.clone();
        let kind = kind.clone();
        Box::pin(async move {
            let p = parsed.map_err(|e| JobError::from_payload_error(&kind, &e))?;
            let (r, tx) = f(ctx, p, tx).await?;
            let value = serde_json::to_value(r).map_err(|e| JobError::Permanent {
                message: format!("handler result is not serializable to JSON: {e}"),
            })?;
            Ok((value, tx))
        })
    })
}

/// What runs a kind.
#[derive(Clone)]
pub(crate) enum Handler {
    /// Inline async handler.
    Io(IoHandler),
    /// Inline async handler writing inside the completion transaction.
    IoTx(IoTxHandler),
    /// Runs in the CPU worker-process pool.
    Cpu,
}

impl Handler {
    pub(crate) fn class(&self) -> &'static str {
        match self {
            Handler::Io(_) | Handler::IoTx(_) => "io",
            Handler::Cpu => "cpu",
        }
    }
}
