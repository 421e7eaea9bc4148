//! The Rust producer API.
//!
//! A publish is done only when the broker confirmed it: [`Client::enqueue`]
//! returns once the job is stored in its queue, and an unroutable (no such
//! queue) or refused publish is an error, never a silent drop.
//! [`Client::enqueue_many`] pipelines confirms for throughput.
//!
//! Delayed jobs ([`NewJob::delay`], [`NewJob::at`]) wait on the broker in the
//! delay ladder (precision 100 ms, rounded up), never in a held delivery.
//!
//! When the connection drops, the next call reconnects; a single
//! [`Client::enqueue`] whose publish failed on a dead channel is retried once
//! on the new connection (the job id stays the same, so a copy that did reach
//! the broker before the failure is the same job: at-least-once).
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
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use taskmill_broker::{Broker, BrokerError, Outgoing, PublishError, Publisher};
use taskmill_core::wire::DEFAULT_QUEUE;
use taskmill_core::{DecodeError, Envelope};
use taskmill_trace::spans::{self, Message, Server};
use taskmill_trace::{set_parent, traceparent_of};
use tracing::Instrument;

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
    /// A delayed job's queue does not exist: its delayed copy would have
    /// nowhere to go when it becomes due.
    #[error(
        "queue `{0}` does not exist (start a worker for it first): a delayed job needs its queue"
    )]
    NoSuchQueue(String),
    /// The exchange (or queue) the job goes through does not exist in the
    /// vhost: nothing declared taskmill's topology there yet.
    #[error(
        "exchange `{exchange}` or queue `{queue}` does not exist in this vhost: start a worker for queue `{queue}` first, it declares the topology ({source})"
    )]
    NoTopology {
        /// The exchange published to.
        exchange: String,
        /// The job's queue.
        queue: String,
        /// The broker's answer.
        source: Box<BrokerError>,
    },
    /// The delay is longer than the delay ladder can express.
    #[error("{0}")]
    Delay(String),
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
    delay: Duration,
    /// The payload came from `serde_json` (no need to parse it again).
    json_checked: bool,
}

impl NewJob {
    /// A job of `kind` with a serializable payload, for queue `default`.
    pub fn new(kind: &str, payload: &impl Serialize) -> Result<NewJob, EnqueueError> {
        let mut job = NewJob::raw(kind, serde_json::to_vec(payload)?);
        job.json_checked = true;
        Ok(job)
    }

    /// A job whose payload is already JSON bytes (checked at enqueue).
    pub fn raw(kind: &str, payload_json: Vec<u8>) -> NewJob {
        NewJob {
            env: Envelope {
                enqueued_at_us: Some(taskmill_broker::now_us()),
                ..Envelope::new(
                    taskmill_broker::new_job_id(),
                    kind,
                    DEFAULT_QUEUE,
                    payload_json,
                )
            },
            delay: Duration::ZERO,
            json_checked: false,
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

    /// Makes the job ready only after `delay` (rounded up to 100 ms).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Makes the job ready at `at` (now, if `at` is past).
    pub fn at(self, at: SystemTime) -> Self {
        let delay = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        self.delay(delay)
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

/// One connection and its confirm-mode channel.
#[derive(Debug)]
struct Conn {
    broker: Broker,
    publisher: Publisher,
}

impl Conn {
    async fn open(url: &str) -> Result<Conn, EnqueueError> {
        let broker = Broker::connect(url, "taskmill producer").await?;
        let publisher = broker.publisher().await?;
        Ok(Conn { broker, publisher })
    }

    fn is_open(&self) -> bool {
        self.broker.is_connected() && self.publisher.is_open()
    }
}

/// A producer: a connection with a confirm-mode channel, reopened when it
/// drops. Share it between tasks (`&Client` is enough).
#[derive(Debug)]
pub struct Client {
    url: String,
    /// The broker's host and port, for the producer spans.
    server: Option<Server>,
    conn: tokio::sync::RwLock<Arc<Conn>>,
    delays_declared: tokio::sync::OnceCell<()>,
    max_payload_bytes: usize,
}

impl Client {
    /// Connects to the broker at `url`.
    pub async fn connect(url: &str) -> Result<Client, EnqueueError> {
        let conn = Conn::open(url).await?;
        Ok(Client {
            url: url.to_string(),
            server: Server::from_url(url),
            conn: tokio::sync::RwLock::new(Arc::new(conn)),
            delays_declared: tokio::sync::OnceCell::new(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        })
    }

    /// Refuses payloads above `bytes` (match the workers' `max_payload_bytes`).
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// The current connection, reopened if it dropped (for tooling: queue
    /// depth, purge).
    pub async fn broker(&self) -> Result<Broker, EnqueueError> {
        Ok(self.conn().await?.broker.clone())
    }

    /// The open connection, reconnecting when the current one dropped.
    async fn conn(&self) -> Result<Arc<Conn>, EnqueueError> {
        {
            let c = self.conn.read().await;
            if c.is_open() {
                return Ok(c.clone());
            }
        }
        let mut c = self.conn.write().await;
        if !c.is_open() {
            tracing::warn!("producer connection lost; reconnecting");
            *c = Arc::new(Conn::open(&self.url).await?);
        }
        Ok(c.clone())
    }

    /// The producer span of `job`; its context goes into the job's headers
    /// (continuing a context the caller set with [`NewJob::traceparent`]).
    fn span(&self, job: &mut NewJob) -> tracing::Span {
        let route = if job.delay.is_zero() {
            None
        } else {
            taskmill_core::wire::delay_route(&job.env.queue, job.delay).ok()
        };
        let env = &mut job.env;
        let (exchange, routing_key) = match &route {
            Some((exchange, key)) => (exchange.as_str(), key.as_str()),
            None => (taskmill_core::wire::EXCHANGE, env.queue.as_str()),
        };
        let msg = Message {
            exchange,
            routing_key,
            message_id: &env.job_id,
            body_size: env.payload.len(),
        };
        let span = spans::enqueue_span(&msg, &env.kind, self.server.as_ref());
        set_parent(&span, env.traceparent.as_deref(), env.tracestate.as_deref());
        if let Some((tp, ts)) = traceparent_of(&span) {
            env.traceparent = Some(tp);
            env.tracestate = ts;
        }
        span
    }

    fn check(&self, job: &NewJob) -> Result<(), EnqueueError> {
        if job.json_checked {
            job.env.validate_except_json(self.max_payload_bytes)?;
        } else {
            job.env.validate(self.max_payload_bytes)?;
        }
        Ok(())
    }

    /// Checks `job` and turns it into its message (moving the payload, not
    /// copying it); also returns the job id.
    async fn prepare(&self, job: NewJob, conn: &Conn) -> Result<(String, Outgoing), EnqueueError> {
        self.check(&job)?;
        let NewJob { mut env, delay, .. } = job;
        let id = env.job_id.clone();
        if delay.is_zero() {
            return Ok((id, Outgoing::job_owned(env)));
        }
        self.delays_declared
            .get_or_try_init(|| async { conn.broker.declare_delays().await })
            .await?;
        // Published to the ladder, the copy is "routed" even if its queue
        // does not exist, and would be dropped when due: check now.
        conn.broker
            .queue_depth(&env.queue)
            .await
            .map_err(|_| EnqueueError::NoSuchQueue(env.queue.clone()))?;
        env.enqueued_at_us = Some(taskmill_core::wire::deadline_us(
            taskmill_broker::now_us(),
            delay,
        ));
        let msg = Outgoing::job_delayed(&env, delay).map_err(EnqueueError::Delay)?;
        Ok((id, msg))
    }

    /// Publishes one job and returns its id once the broker confirmed it.
    pub async fn enqueue(&self, mut job: NewJob) -> Result<String, EnqueueError> {
        let span = self.span(&mut job);
        let result = self.enqueue_in_span(job).instrument(span.clone()).await;
        if let Err(e) = &result {
            spans::record_outcome(&span, "error", Some(&e.to_string()));
        }
        result
    }

    async fn enqueue_in_span(&self, job: NewJob) -> Result<String, EnqueueError> {
        let conn = self.conn().await?;
        let queue = job.env.queue.clone();
        let (id, msg) = self.prepare(job, &conn).await?;
        match conn.publisher.publish(&msg).await {
            Ok(_) => Ok(id),
            Err(PublishError::Broker(e)) if e.is_not_found() => Err(EnqueueError::NoTopology {
                exchange: msg.exchange().to_string(),
                queue: queue.clone(),
                source: Box::new(e),
            }),
            Err(PublishError::Broker(e)) => {
                // The channel died before the confirm: the broker may or may
                // not have the message. Publish again on a new connection;
                // the job id is the same.
                tracing::warn!(error = %e, job_id = %id, "publish failed; retrying once on a new connection");
                let conn = self.conn().await?;
                conn.publisher.publish(&msg).await?;
                Ok(id)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes many jobs with pipelined confirms; returns their ids in order
    /// once every one was confirmed. On failure, the error says which job
    /// failed and how many before it were confirmed; nothing after it is
    /// reported as confirmed.
    pub async fn enqueue_many(
        &self,
        jobs: impl IntoIterator<Item = NewJob>,
    ) -> Result<Vec<String>, EnqueueError> {
        let conn = self.conn().await?;
        let mut ids = Vec::new();
        let mut pending = VecDeque::with_capacity(PIPELINE_WINDOW);
        let mut confirmed = 0usize;
        let fail = |index: usize, confirmed: usize, e: EnqueueError| EnqueueError::Batch {
            index,
            confirmed,
            source: Box::new(e),
        };
        for (index, mut job) in jobs.into_iter().enumerate() {
            // One producer span per job, covering its publish (the confirms
            // are pipelined, so the span does not wait for its own).
            let span = self.span(&mut job);
            let (id, msg) = self
                .prepare(job, &conn)
                .instrument(span.clone())
                .await
                .map_err(|e| fail(index, confirmed, e))?;
            ids.push(id);
            if pending.len() == PIPELINE_WINDOW {
                let p: taskmill_broker::PendingConfirm =
                    pending.pop_front().expect("window is full");
                p.wait()
                    .await
                    .map_err(|e| fail(confirmed, confirmed, e.into()))?;
                confirmed += 1;
            }
            let p = conn
                .publisher
                .send(&msg)
                .instrument(span)
                .await
                .map_err(|e| fail(index, confirmed, e.into()))?;
            pending.push_back(p);
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
        self.conn.read().await.broker.close().await;
    }
}
