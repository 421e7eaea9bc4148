//! The Rust producer API.
//!
//! A publish is done only when the broker confirmed it: [`Client::enqueue`]
//! returns once the job is stored in its queue, and an unroutable (no such
//! queue) or refused publish is an error, never a silent drop.
//! [`Client::enqueue_many`] pipelines confirms for throughput.
//!
//! ```no_run
//! # async fn demo() -> Result<(), taskmill_client::EnqueueError> {
//! use taskmill_client::{Client, NewJob};
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let id = client
//!     .enqueue(NewJob::new("io.sleep", &serde_json::json!({"ms": 10}))?.idempotency_key("order-42"))
//!     .await?;
//! println!("enqueued {id}");
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use taskmill_broker::{Broker, BrokerError, Outgoing, PublishError, Publisher};
use taskmill_core::wire::DEFAULT_QUEUE;
use taskmill_core::{DecodeError, Envelope};

/// Default payload limit, the worker's default `max_payload_bytes`.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Confirms awaited at most at once by [`Client::enqueue_many`].
const PIPELINE_WINDOW: usize = 2048;

/// A job that could not be enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The broker could not be reached or the channel failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker did not accept the message (unroutable or nacked).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The job is invalid (bad kind or key, payload not JSON or too large).
    #[error("invalid job: {0}")]
    Invalid(#[from] DecodeError),
    /// The payload could not be serialized to JSON.
    #[error("payload is not serializable to JSON: {0}")]
    Payload(#[from] serde_json::Error),
    /// One job of a bulk enqueue failed; the ones before it were confirmed.
    #[error("job {index} of the batch: {source} ({confirmed} jobs before it were confirmed)")]
    Batch {
        /// 0-based index of the failed job.
        index: usize,
        /// Jobs confirmed before it (in order).
        confirmed: usize,
        /// Why it failed.
        source: Box<EnqueueError>,
    },
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    env: Envelope,
}

impl NewJob {
    /// A job of `kind` with a serializable payload, for queue `default`.
    pub fn new(kind: &str, payload: &impl Serialize) -> Result<NewJob, EnqueueError> {
        Ok(NewJob::raw(kind, serde_json::to_vec(payload)?))
    }

    /// A job whose payload is already JSON bytes (checked at enqueue).
    pub fn raw(kind: &str, payload_json: Vec<u8>) -> NewJob {
        NewJob {
            env: Envelope::new(kind, DEFAULT_QUEUE, payload_json),
        }
    }

    /// Routes it to `queue`.
    pub fn queue(mut self, queue: &str) -> Self {
        self.env.queue = queue.to_string();
        self
    }

    /// Sets its idempotency key: once a job with this key completed, copies
    /// with the same key are skipped.
    pub fn idempotency_key(mut self, key: &str) -> Self {
        self.env.idempotency_key = Some(key.to_string());
        self
    }

    /// Lowers its hard timeout below the kind's configured one.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.env.timeout = Some(t);
        self
    }

    /// Sets the W3C trace context it continues.
    pub fn traceparent(mut self, tp: &str) -> Self {
        self.env.traceparent = Some(tp.to_string());
        self
    }

    /// Uses a given job id instead of a fresh UUID.
    pub fn job_id(mut self, id: &str) -> Self {
        self.env.job_id = id.to_string();
        self
    }

    /// Its job id.
    pub fn id(&self) -> &str {
        &self.env.job_id
    }
}

/// A producer connection with a confirm-mode channel.
#[derive(Debug)]
pub struct Client {
    broker: Broker,
    publisher: Publisher,
    max_payload_bytes: usize,
}

impl Client {
    /// Connects to the broker at `url`.
    pub async fn connect(url: &str) -> Result<Client, EnqueueError> {
        let broker = Broker::connect(url, "taskmill producer").await?;
        let publisher = broker.publisher().await?;
        Ok(Client {
            broker,
            publisher,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        })
    }

    /// Refuses payloads above `bytes` (match the workers' `max_payload_bytes`).
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// The underlying connection (for tooling: queue depth, purge).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    fn prepare(&self, job: &NewJob) -> Result<Outgoing, EnqueueError> {
        job.env.validate(self.max_payload_bytes)?;
        Ok(Outgoing::job(&job.env))
    }

    /// Publishes one job and returns its id once the broker confirmed it.
    pub async fn enqueue(&self, job: NewJob) -> Result<String, EnqueueError> {
        let msg = self.prepare(&job)?;
        self.publisher.publish(&msg).await?;
        Ok(job.env.job_id)
    }

    /// Publishes many jobs with pipelined confirms; returns their ids in order
    /// once every one was confirmed. On failure, the error says which job
    /// failed and how many before it were confirmed.
    pub async fn enqueue_many(
        &self,
        jobs: impl IntoIterator<Item = NewJob>,
    ) -> Result<Vec<String>, EnqueueError> {
        let mut ids = Vec::new();
        let mut pending = VecDeque::with_capacity(PIPELINE_WINDOW);
        let mut confirmed = 0usize;
        let fail = |index: usize, confirmed: usize, e: EnqueueError| EnqueueError::Batch {
            index,
            confirmed,
            source: Box::new(e),
        };
        for (index, job) in jobs.into_iter().enumerate() {
            let msg = self.prepare(&job).map_err(|e| fail(index, confirmed, e))?;
            if pending.len() == PIPELINE_WINDOW {
                let p: taskmill_broker::PendingConfirm =
                    pending.pop_front().expect("window is full");
                p.wait()
                    .await
                    .map_err(|e| fail(confirmed, confirmed, e.into()))?;
                confirmed += 1;
            }
            let p = self
                .publisher
                .send(&msg)
                .await
                .map_err(|e| fail(index, confirmed, e.into()))?;
            pending.push_back(p);
            ids.push(job.env.job_id);
        }
        while let Some(p) = pending.pop_front() {
            p.wait()
                .await
                .map_err(|e| fail(confirmed, confirmed, e.into()))?;
            confirmed += 1;
        }
        Ok(ids)
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.broker.close().await;
    }
}
