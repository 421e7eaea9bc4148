//! The raw broker ceiling, for `taskmill bench`.
//!
//! What RabbitMQ and lapin can do on their own, with no taskmill logic in the
//! path: persistent messages of a given size published to a queue with
//! pipelined publisher confirms, and consumed with manual acks (one ack per
//! message) under a prefetch limit. The benchmark runs these loops in the same
//! process and the same run as taskmill, on a queue of the same type, and
//! reports taskmill's figures as a ratio of them, so the figures hold on a
//! noisy machine.
//!
//! Every loop here is bounded: by a message count and by a deadline.
//!
//! ```no_run
//! # async fn demo() -> Result<(), taskmill_broker::BrokerError> {
//! use std::time::Duration;
//! use taskmill_broker::ceiling::Ceiling;
//! use taskmill_core::config::QueueType;
//! let c = Ceiling::open("amqp://guest:guest@127.0.0.1:5672/%2f", "bench-ceiling-x", QueueType::Quorum).await?;
//! let published = c.publish(10_000, &[b'x'; 1024], 2048).await?;
//! let consumed = c.consume(10_000, 100, Duration::from_secs(60)).await?;
//! println!("{:.0} msg/s in, {:.0} msg/s out", published.per_second(), consumed.per_second());
//! c.delete().await;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use taskmill_core::config::QueueType;
use taskmill_core::redact::redact_url;

use crate::connection::BrokerError;

/// How long one bounded phase took, for `count` messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    /// Messages that went through.
    pub count: u64,
    /// First publish (or first delivery) to last confirm (or last ack).
    pub elapsed: Duration,
}

impl Phase {
    /// Messages per second (0 when nothing was timed).
    pub fn per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.count as f64 / s } else { 0.0 }
    }
}

/// The outcome of an open-loop run: publish-to-delivery latencies.
#[derive(Debug, Clone, Default)]
pub struct OpenLoop {
    /// Messages the schedule called for.
    pub scheduled: u64,
    /// Time from publish to delivery, one sample per message received.
    pub latencies: Vec<Duration>,
    /// How late each publish was against its schedule (the publisher's own
    /// stalls; timer granularity is about 1 ms).
    pub publish_lag: Vec<Duration>,
}

/// Dedicated connections and a queue for ceiling measurements: one
/// connection publishes, another consumes, as a producer and a worker would.
/// Delete it with [`Ceiling::delete`] when done.
pub struct Ceiling {
    publishing: Connection,
    consuming: Connection,
    queue: String,
}

impl std::fmt::Debug for Ceiling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ceiling")
            .field("queue", &self.queue)
            .finish()
    }
}

fn op(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    BrokerError::op(what)
}

/// A persistent message, like every taskmill job.
fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

impl Ceiling {
    /// Connects to `url` and declares the durable queue `queue` of
    /// `queue_type` (purging it if it already held messages).
    pub async fn open(
        url: &str,
        queue: &str,
        queue_type: QueueType,
    ) -> Result<Ceiling, BrokerError> {
        let connect = |name: &str| {
            let props = ConnectionProperties::default().with_connection_name(name.into());
            async move {
                Connection::connect(url, props)
                    .await
                    .map_err(|source| BrokerError::Connect {
                        url: redact_url(url),
                        source,
                    })
            }
        };
        let publishing = connect("taskmill bench ceiling publisher").await?;
        let consuming = connect("taskmill bench ceiling consumer").await?;
        let ch = publishing
            .create_channel()
            .await
            .map_err(op("channel.open"))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type.as_str().as_bytes())),
        );
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(op(format!("queue.declare {queue}")))?;
        ch.queue_purge(queue.into(), Default::default())
            .await
            .map_err(op(format!("queue.purge {queue}")))?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(Ceiling {
            publishing,
            consuming,
            queue: queue.to_string(),
        })
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn confirm_channel(&self) -> Result<Channel, BrokerError> {
        let ch = self
            .publishing
            .create_channel()
            .await
            .map_err(op("channel.open"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(op("confirm.select"))?;
        Ok(ch)
    }

    /// Publishes `count` persistent copies of `body` with at most `window`
    /// confirms outstanding; returns first publish to last confirm.
    pub async fn publish(
        &self,
        count: u64,
        body: &[u8],
        window: usize,
    ) -> Result<Phase, BrokerError> {
        let ch = self.confirm_channel().await?;
        let elapsed = publish_on(&ch, &self.queue, count, body, window).await?;
        let _ = ch.close(200, "done".into()).await;
        Ok(Phase { count, elapsed })
    }

    /// Consumes `count` messages with manual acks and `prefetch`; returns
    /// first delivery to last ack. Fails when `deadline` passes first.
    pub async fn consume(
        &self,
        count: u64,
        prefetch: u16,
        deadline: Duration,
    ) -> Result<Phase, BrokerError> {
        let (ch, consumer) = self.consumer(prefetch).await?;
        let result = consume_on(consumer, count, deadline, |_| {}).await;
        let _ = ch.close(200, "done".into()).await;
        let (first, last) = result?;
        Ok(Phase {
            count,
            elapsed: last.saturating_duration_since(first),
        })
    }

    /// Publishes `count` copies of `body` (pipelined confirms, `window`) while
    /// a consumer acks them (`prefetch`); returns first publish to last ack.
    pub async fn round_trip(
        &self,
        count: u64,
        body: &[u8],
        window: usize,
        prefetch: u16,
        deadline: Duration,
    ) -> Result<Phase, BrokerError> {
        let (cch, consumer) = self.consumer(prefetch).await?;
        let pch = self.confirm_channel().await?;
        let consuming = tokio::spawn(consume_on(consumer, count, deadline, |_| {}));
        let start = Instant::now();
        let published = publish_on(&pch, &self.queue, count, body, window).await;
        let consumed = consuming
            .await
            .map_err(|e| BrokerError::Closed(format!("ceiling consumer task failed: {e}")));
        let _ = pch.close(200, "done".into()).await;
        let _ = cch.close(200, "done".into()).await;
        published?;
        let (_, last) = consumed??;
        Ok(Phase {
            count,
            elapsed: last.saturating_duration_since(start),
        })
    }

    /// Publishes at `rate` messages per second for `duration`, on schedule
    /// whatever the confirms do (they are awaited by another task), while a
    /// consumer acks them; returns each message's publish-to-delivery time.
    /// `body_len` (at least 8) is the message size; the first 8 bytes carry
    /// the send time.
    pub async fn open_loop(
        &self,
        rate: f64,
        duration: Duration,
        body_len: usize,
        prefetch: u16,
        deadline: Duration,
    ) -> Result<OpenLoop, BrokerError> {
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let (cch, consumer) = self.consumer(prefetch).await?;
        let pch = self.confirm_channel().await?;
        let base = Instant::now();
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
        let sink = latencies.clone();
        let consuming = tokio::spawn(consume_on(consumer, total, deadline, move |data| {
            if let Some(sent) = data.get(..8) {
                let sent = u64::from_le_bytes(sent.try_into().expect("8 bytes"));
                let now = base.elapsed().as_micros() as u64;
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Duration::from_micros(now.saturating_sub(sent)));
            }
        }));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<lapin::PublisherConfirm>();
        let confirming = tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                check_confirm(c.await)?;
            }
            Ok::<(), BrokerError>(())
        });
        let mut body = vec![b'x'; body_len.max(8)];
        let mut publish_lag = Vec::with_capacity(total as usize);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut failure = None;
        'schedule: while sent < total {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            // Send everything that is due by now (the timer ticks in ms).
            let now = Instant::now();
            while sent < total {
                let due = start + Duration::from_secs_f64(sent as f64 / rate);
                if due > now {
                    break;
                }
                let at = base.elapsed().as_micros() as u64;
                body[..8].copy_from_slice(&at.to_le_bytes());
                publish_lag.push(Instant::now().saturating_duration_since(due));
                let confirm = pch
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        persistent(),
                    )
                    .await;
                match confirm {
                    Ok(c) => {
                        let _ = tx.send(c);
                    }
                    Err(e) => {
                        failure = Some(op("basic.publish")(e));
                        break 'schedule;
                    }
                }
                sent += 1;
            }
        }
        drop(tx);
        let confirmed = confirming
            .await
            .map_err(|e| BrokerError::Closed(format!("ceiling confirm task failed: {e}")));
        let consumed = consuming
            .await
            .map_err(|e| BrokerError::Closed(format!("ceiling consumer task failed: {e}")));
        let _ = pch.close(200, "done".into()).await;
        let _ = cch.close(200, "done".into()).await;
        if let Some(e) = failure {
            return Err(e);
        }
        confirmed??;
        consumed??;
        let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(OpenLoop {
            scheduled: total,
            latencies,
            publish_lag,
        })
    }

    async fn consumer(&self, prefetch: u16) -> Result<(Channel, lapin::Consumer), BrokerError> {
        let ch = self
            .consuming
            .create_channel()
            .await
            .map_err(op("channel.open"))?;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(op("basic.qos"))?;
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "taskmill-bench-ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(op(format!("basic.consume {}", self.queue)))?;
        Ok((ch, consumer))
    }

    /// Deletes the queue and closes the connection.
    pub async fn delete(self) {
        if let Ok(ch) = self.publishing.create_channel().await {
            let _ = ch
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "bye".into()).await;
        }
        let _ = self.consuming.close(200, "bye".into()).await;
        let _ = self.publishing.close(200, "bye".into()).await;
    }
}

/// Ack tasks not yet joined, at most (they finish in about delivery order).
const MAX_PENDING_ACKS: usize = 4096;

fn check_confirm(c: lapin::Result<Confirmation>) -> Result<(), BrokerError> {
    match c.map_err(op("confirm"))? {
        Confirmation::Ack(_) => Ok(()),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::Closed(
            "the broker refused a ceiling message".to_string(),
        )),
    }
}

/// The bare publish loop: publish, keep at most `window` confirms pending,
/// await the oldest when full.
async fn publish_on(
    ch: &Channel,
    queue: &str,
    count: u64,
    body: &[u8],
    window: usize,
) -> Result<Duration, BrokerError> {
    let window = window.max(1);
    let mut pending = VecDeque::with_capacity(window);
    let start = Instant::now();
    for _ in 0..count {
        if pending.len() == window {
            let oldest: lapin::PublisherConfirm = pending.pop_front().expect("window is full");
            check_confirm(oldest.await)?;
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await
            .map_err(op("basic.publish"))?;
        pending.push_back(confirm);
    }
    while let Some(c) = pending.pop_front() {
        check_confirm(c.await)?;
    }
    Ok(start.elapsed())
}

async fn join_ack(h: tokio::task::JoinHandle<lapin::Result<bool>>) -> Result<(), BrokerError> {
    h.await
        .map_err(|e| BrokerError::Closed(format!("ack task failed: {e}")))?
        .map_err(op("basic.ack"))?;
    Ok(())
}

/// The bare consume loop: take a delivery, look at its body, ack it (from a
/// spawned task), never more than the prefetch unacked. Returns
/// (first delivery, last ack) once `count` messages were acked.
async fn consume_on(
    mut consumer: lapin::Consumer,
    count: u64,
    deadline: Duration,
    mut on_body: impl FnMut(&[u8]) + Send,
) -> Result<(Instant, Instant), BrokerError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut first = None;
    let mut acked = 0u64;
    let mut acks = VecDeque::new();
    while acked < count {
        let next = tokio::time::timeout_at(until, consumer.next())
            .await
            .map_err(|_| {
                BrokerError::Closed(format!(
                    "ceiling consumer: {acked} of {count} messages within {deadline:?}"
                ))
            })?;
        let delivery = match next {
            Some(d) => d.map_err(op("consume"))?,
            None => return Err(BrokerError::Closed("ceiling consumer closed".to_string())),
        };
        first.get_or_insert_with(Instant::now);
        on_body(&delivery.data);
        // The ack is sent from its own task, as a worker acks from the job's
        // task: awaiting each ack's write inline would cap the loop below
        // what taskmill does (lapin hands every ack to its internal task).
        if acks.len() >= MAX_PENDING_ACKS {
            let oldest = acks.pop_front().expect("not empty");
            join_ack(oldest).await?;
        }
        let acker = delivery.acker;
        acks.push_back(tokio::spawn(async move {
            acker.ack(BasicAckOptions::default()).await
        }));
        acked += 1;
    }
    while let Some(a) = acks.pop_front() {
        join_ack(a).await?;
    }
    let last = Instant::now();
    Ok((first.unwrap_or(last), last))
}
