//! Reading a queue without losing anything: the dead-letter tooling's view of
//! `Q.dead`.
//!
//! A [`Browser`] owns one channel and takes messages with `basic.get` and
//! manual acknowledgement. Every message it returns stays *held*: unacked, so
//! invisible to other consumers, and still owned by the broker. A held message
//! leaves the queue only through [`Browser::ack`]; everything else goes back
//! with [`Browser::requeue_all`] (one `basic.nack multiple requeue`) or, if
//! the process dies or the connection drops, by the broker itself when the
//! channel closes. So a crash or Ctrl-C in the middle of a scan loses nothing.
//!
//! Order: a classic queue puts requeued messages back at its head in their
//! original order, so repeated scans show the same sequence. A quorum queue
//! (taskmill's default, dead-letter queues included) does not keep that
//! order: measured on RabbitMQ 3.10, a full scan comes back rotated or
//! shuffled. Callers that show a list should sort it themselves, and "the
//! first N" of a bounded scan is only "some N" on a quorum queue.
//!
//! Quorum queues also count returns as deliveries. On RabbitMQ 4.0 to 4.2,
//! where every quorum queue has a default `x-delivery-limit` of 20 and every
//! return counts, a dead-letter queue declared without its own limit drops a
//! message after about 20 scans; 4.3+ does not count `basic.nack` returns.
//!
//! `basic.nack` is used rather than `basic.reject` on purpose: RabbitMQ 4.3+
//! counts a reject (and not a nack) as a failed delivery towards a quorum
//! queue's `x-delivery-limit`, and browsing is not a failure.
//!
//! [`Browsed::replay_to`] turns a dead letter back into a job for its work
//! queue: same body, properties and `message_id`, `taskmill-attempt` reset to
//! 1, `taskmill-replay` set (so a worker lets a key that failed for good run
//! again), and the failure annotations removed ([`dropped_on_replay`]).

use std::collections::{BTreeMap, BTreeSet};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use taskmill_core::HeaderValue;
use taskmill_core::celery;
use taskmill_core::wire::{EXCHANGE, H_ATTEMPT, H_FIRST_FAILED_AT_MS, H_KIND, H_REPLAY};

use crate::connection::{Broker, BrokerError};
use crate::convert;
use crate::publisher::Outgoing;

/// How long [`Browser::requeue_all`] keeps the channel open after acks were
/// sent. A quorum queue can drop acks that are still buffered in the broker's
/// channel process when the channel closes (rabbitmq-server#10327): the
/// messages come back, so a replayed job would also stay in the DLQ. Measured
/// on RabbitMQ 3.10 with 100-message batches acked just before the close:
/// without a wait, 1 run in 4 brought 14 to 67 acked messages back; with
/// 300 ms or more, none in 20 runs. It is a mitigation, not a guarantee; what
/// slips through is a duplicate, never a loss.
pub const ACK_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Prefix of taskmill's own dead-letter headers (`taskmill-dead-reason`, ...).
pub const DEAD_HEADER_PREFIX: &str = "taskmill-dead-";

/// Headers RabbitMQ adds when it dead-letters a message itself, or counts
/// quorum-queue deliveries; a replay removes them with taskmill's own.
pub const BROKER_DEAD_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// Whether `name` is a dead-letter annotation: taskmill's `taskmill-dead-*`
/// or one of the broker's [`BROKER_DEAD_HEADERS`].
pub fn is_dead_letter_header(name: &str) -> bool {
    name.starts_with(DEAD_HEADER_PREFIX) || BROKER_DEAD_HEADERS.contains(&name)
}

/// Whether a replay drops the header `name`: the dead-letter annotations and
/// `taskmill-first-failed-at-ms` (a replay starts the job's history afresh,
/// as its attempt goes back to 1).
pub fn dropped_on_replay(name: &str) -> bool {
    is_dead_letter_header(name) || name == H_FIRST_FAILED_AT_MS
}

/// One entry of RabbitMQ's `x-death` header: the broker dead-lettered the
/// message from `queue` for `reason`, `count` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XDeath {
    /// Why: `delivery_limit`, `rejected`, `expired` or `maxlen`.
    pub reason: String,
    /// The queue the message was dead-lettered from.
    pub queue: String,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: i64,
    /// When it was (last) dead-lettered, seconds since the Unix epoch.
    pub time: Option<u64>,
    /// The exchange the message had been published to.
    pub exchange: Option<String>,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<String>,
}

impl XDeath {
    /// Decodes an `x-death` header value (an array of tables); entries that
    /// are not tables are skipped. The broker keeps the most recent first.
    pub fn decode(v: &AMQPValue) -> Vec<XDeath> {
        let AMQPValue::FieldArray(entries) = v else {
            return Vec::new();
        };
        entries
            .as_slice()
            .iter()
            .filter_map(|e| match e {
                AMQPValue::FieldTable(t) => Some(XDeath::from_table(t)),
                _ => None,
            })
            .collect()
    }

    fn from_table(t: &FieldTable) -> XDeath {
        let get = |k: &str| t.inner().get(k);
        let string = |k: &str| match get(k).map(convert::from_amqp) {
            Some(HeaderValue::Str(s)) => Some(s),
            _ => None,
        };
        let count = match get("count").map(convert::from_amqp) {
            Some(HeaderValue::Int(n)) => n,
            _ => 0,
        };
        let time = match get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            Some(other) => match convert::from_amqp(other) {
                HeaderValue::Int(n) => u64::try_from(n).ok(),
                _ => None,
            },
            None => None,
        };
        let routing_keys = match get("routing-keys") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .filter_map(|v| match convert::from_amqp(v) {
                    HeaderValue::Str(s) => Some(s),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        XDeath {
            reason: string("reason").unwrap_or_default(),
            queue: string("queue").unwrap_or_default(),
            count,
            time,
            exchange: string("exchange"),
            routing_keys,
        }
    }
}

/// A message taken by a [`Browser`]; held (unacked) until the browser acks or
/// requeues it.
pub struct Browsed {
    delivery: Delivery,
}

impl std::fmt::Debug for Browsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browsed")
            .field("message_id", &self.message_id())
            .field("tag", &self.delivery.delivery_tag)
            .finish()
    }
}

impl Browsed {
    /// `message_id` (the job id).
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `content_type`.
    pub fn content_type(&self) -> Option<&str> {
        self.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `timestamp`, seconds since the Unix epoch.
    pub fn timestamp(&self) -> Option<u64> {
        *self.delivery.properties.timestamp()
    }

    /// `delivery_mode` (2: persistent).
    pub fn delivery_mode(&self) -> Option<u8> {
        *self.delivery.properties.delivery_mode()
    }

    /// Whether the broker delivered this message before (a previous scan that
    /// requeued it counts).
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// The exchange it was published to (for a taskmill dead letter,
    /// `taskmill`; for a broker dead letter, the dead-letter exchange).
    pub fn exchange(&self) -> &str {
        self.delivery.exchange.as_str()
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.delivery.routing_key.as_str()
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    /// Every header, sorted by name. Tables and arrays (such as `x-death`)
    /// appear as [`HeaderValue::Other`]; see [`Browsed::x_death`].
    pub fn headers(&self) -> Vec<(String, HeaderValue)> {
        match self.delivery.properties.headers() {
            Some(t) => t
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), convert::from_amqp(v)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// A header by name.
    pub fn header(&self, name: &str) -> Option<HeaderValue> {
        convert::lookup(self.delivery.properties.headers().as_ref(), name)
    }

    /// A string header by name.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer header by name.
    pub fn header_int(&self, name: &str) -> Option<i64> {
        match self.header(name)? {
            HeaderValue::Int(n) => Some(n),
            _ => None,
        }
    }

    /// RabbitMQ's `x-death` entries, most recent first; empty when the broker
    /// did not dead-letter this message itself.
    pub fn x_death(&self) -> Vec<XDeath> {
        self.delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get("x-death"))
            .map(XDeath::decode)
            .unwrap_or_default()
    }

    /// Whether this is a Celery task message (protocol v2: a `task` header,
    /// no `taskmill-kind`).
    pub fn is_celery(&self) -> bool {
        let headers = self.delivery.properties.headers().as_ref();
        convert::lookup(headers, celery::H_TASK).is_some()
            && convert::lookup(headers, H_KIND).is_none()
    }

    /// The kind of job it holds: `taskmill-kind`, or a Celery task's name.
    pub fn kind(&self) -> Option<String> {
        self.header_str(H_KIND)
            .or_else(|| self.is_celery().then(|| self.header_str(celery::H_TASK))?)
    }

    /// The job this dead letter came from, ready to publish again to the work
    /// queue `queue` through the `taskmill` exchange: same body, properties
    /// and `message_id`, persistent, `taskmill-replay` set to true, and the
    /// headers [`dropped_on_replay`] removed. A taskmill job gets
    /// `taskmill-attempt` 1; a Celery task gets `retries` 0 and loses its
    /// `eta` and `expires` (the time that may have dead-lettered it would
    /// dead-letter the replay again), and the per-message TTL with them.
    pub fn replay_to(&self, queue: &str) -> Outgoing {
        let celery = self.is_celery();
        let dropped = |name: &str| {
            dropped_on_replay(name)
                || (celery && (name == celery::H_ETA || name == celery::H_EXPIRES))
        };
        let kept: BTreeMap<ShortString, AMQPValue> = self
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter(|(k, _)| !dropped(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut headers = FieldTable::from(kept);
        if celery {
            headers.insert(
                ShortString::from(celery::H_RETRIES),
                AMQPValue::LongLongInt(0),
            );
        } else {
            headers.insert(ShortString::from(H_ATTEMPT), AMQPValue::LongLongInt(1));
        }
        headers.insert(ShortString::from(H_REPLAY), AMQPValue::Boolean(true));
        let mut properties = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        if celery {
            properties = crate::consumer::without_expiration(&properties);
        }
        Outgoing {
            exchange: EXCHANGE.to_string(),
            routing_key: queue.to_string(),
            properties,
            body: self.delivery.data.clone(),
        }
    }
}

/// A channel that reads a queue with `basic.get`, holding what it read until
/// it acks or requeues it. Dropping it without [`Browser::requeue_all`] is
/// safe too: the held messages return when the channel or connection closes.
pub struct Browser {
    channel: lapin::Channel,
    queue: String,
    ready_at_open: u32,
    /// Delivery tags taken and neither acked nor returned yet.
    held: BTreeSet<u64>,
    /// Whether any ack was sent (then closing waits `ACK_GRACE`).
    acked: bool,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("queue", &self.queue)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Broker {
    /// Opens a [`Browser`] on `queue`. If the queue does not exist the error
    /// is [`BrokerError::Closed`] (the broker closed the channel) saying so.
    pub async fn browse(&self, queue: &str) -> Result<Browser, BrokerError> {
        let channel = self.channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| {
                if is_not_found(&source) {
                    BrokerError::Closed(format!("queue `{queue}` does not exist"))
                } else {
                    BrokerError::Op {
                        op: format!("queue.declare passive {queue}"),
                        source,
                    }
                }
            })?;
        Ok(Browser {
            channel,
            queue: queue.to_string(),
            ready_at_open: q.message_count(),
            held: BTreeSet::new(),
            acked: false,
        })
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

impl Browser {
    /// The queue being read.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Messages that were ready in the queue when the browser opened.
    pub fn ready_at_open(&self) -> u32 {
        self.ready_at_open
    }

    /// How many messages this browser holds unacked now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes the next ready message, or `None` when no message is ready (every
    /// other one is held by this or another reader, or the queue is empty).
    pub async fn next(&mut self) -> Result<Option<Browsed>, BrokerError> {
        let msg = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::op(format!("basic.get {}", self.queue)))?;
        Ok(msg.map(|m| {
            self.held.insert(m.delivery.delivery_tag);
            Browsed {
                delivery: m.delivery,
            }
        }))
    }

    /// Removes `msg` from the queue for good. Only call it once whatever
    /// replaces the message is durable (e.g. its replay was confirmed).
    pub async fn ack(&mut self, msg: Browsed) -> Result<(), BrokerError> {
        let sent = msg
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(BrokerError::op(format!("basic.ack on {}", self.queue)))?;
        if !sent {
            return Err(BrokerError::Closed(format!(
                "cannot ack on {}: the channel was closed (the message stays in the queue)",
                self.queue
            )));
        }
        self.held.remove(&msg.delivery.delivery_tag);
        self.acked = true;
        Ok(())
    }

    /// Removes every message of `msgs` for good, with as few frames as
    /// possible: one `basic.ack multiple` for the part of `msgs` that is a
    /// prefix of the held messages (the usual case: a batch with nothing
    /// skipped before it), single acks for the rest. Only call it once
    /// whatever replaces the messages is durable.
    pub async fn ack_many(&mut self, msgs: Vec<Browsed>) -> Result<(), BrokerError> {
        let mut tags: Vec<u64> = msgs.iter().map(|m| m.delivery.delivery_tag).collect();
        tags.sort_unstable();
        let prefix = self
            .held
            .iter()
            .zip(&tags)
            .take_while(|(held, tag)| held == tag)
            .count();
        if prefix > 0 {
            let last = tags[prefix - 1];
            self.channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(BrokerError::op(format!(
                    "basic.ack multiple on {}",
                    self.queue
                )))?;
            for t in &tags[..prefix] {
                self.held.remove(t);
            }
            self.acked = true;
        }
        for t in &tags[prefix..] {
            self.channel
                .basic_ack(*t, BasicAckOptions { multiple: false })
                .await
                .map_err(BrokerError::op(format!("basic.ack on {}", self.queue)))?;
            self.held.remove(t);
            self.acked = true;
        }
        Ok(())
    }

    /// Returns every held message to the queue (at its head; in order for a
    /// classic queue, see the module docs for quorum queues) and closes the
    /// channel, after [`ACK_GRACE`] if anything was acked. Closing alone
    /// would return them too; the explicit nack makes the return independent
    /// of how the channel ends.
    pub async fn requeue_all(self) -> Result<(), BrokerError> {
        // `multiple` covers every outstanding tag up to this one; it must be
        // a tag still held (an acked one is unknown to the broker, which
        // would close the channel).
        let result = match self.held.last() {
            Some(&tag) => self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(BrokerError::op(format!("basic.nack on {}", self.queue))),
            None => Ok(()),
        };
        // close-ok comes after the broker's channel handled every earlier
        // frame (acks, the nack). A quorum queue applies them through Raft a
        // moment later, so its ready count can lag for a few milliseconds,
        // and acks still buffered in the channel when it closes are dropped
        // (rabbitmq-server#10327): give them time to reach the queue.
        if self.acked {
            tokio::time::sleep(ACK_GRACE).await;
        }
        let closed = self
            .channel
            .close(200, "browse done".into())
            .await
            .map_err(BrokerError::op(format!("channel.close on {}", self.queue)));
        result.and(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v.as_bytes()))
    }

    #[test]
    fn x_death_is_decoded() {
        let mut t = FieldTable::default();
        t.insert("reason".into(), s("delivery_limit"));
        t.insert("queue".into(), s("q"));
        t.insert("count".into(), AMQPValue::LongLongInt(2));
        t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("exchange".into(), s("taskmill"));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![s("q")])),
        );
        let v = AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(t),
            AMQPValue::Boolean(true),
        ]));
        assert_eq!(
            XDeath::decode(&v),
            vec![XDeath {
                reason: "delivery_limit".into(),
                queue: "q".into(),
                count: 2,
                time: Some(1_700_000_000),
                exchange: Some("taskmill".into()),
                routing_keys: vec!["q".into()],
            }]
        );
        assert!(XDeath::decode(&s("nope")).is_empty());
    }

    #[test]
    fn replay_resets_attempt_and_drops_annotations() {
        let mut headers = FieldTable::default();
        headers.insert("taskmill-kind".into(), s("k"));
        headers.insert("taskmill-attempt".into(), AMQPValue::LongLongInt(4));
        headers.insert("taskmill-dead-reason".into(), s("handler_error"));
        headers.insert("taskmill-dead-at-ms".into(), AMQPValue::LongLongInt(5));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        headers.insert("traceparent".into(), s("tp"));
        headers.insert(
            "taskmill-first-failed-at-ms".into(),
            AMQPValue::LongLongInt(3),
        );
        let mut delivery =
            Delivery::mock(1, "taskmill".into(), "q.dead".into(), false, b"{}".to_vec());
        delivery.properties = lapin::BasicProperties::default()
            .with_message_id("job-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(7)
            .with_headers(headers);
        let out = Browsed { delivery }.replay_to("q");
        assert_eq!(out.exchange, EXCHANGE);
        assert_eq!(out.routing_key, "q");
        assert_eq!(out.body, b"{}");
        let p = &out.properties;
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("job-1"));
        assert_eq!(*p.timestamp(), Some(7));
        assert_eq!(*p.delivery_mode(), Some(2));
        let names: Vec<&str> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "taskmill-attempt",
                "taskmill-kind",
                "taskmill-replay",
                "traceparent"
            ]
        );
        assert_eq!(
            convert::lookup(p.headers().as_ref(), "taskmill-attempt"),
            Some(HeaderValue::Int(1))
        );
    }

    #[test]
    fn celery_replay_resets_retries_and_drops_eta_and_expires() {
        let mut headers = FieldTable::default();
        headers.insert("task".into(), s("reports.render"));
        headers.insert("id".into(), s("t-1"));
        headers.insert("retries".into(), AMQPValue::LongLongInt(3));
        headers.insert("eta".into(), s("2024-05-01T12:00:00+00:00"));
        headers.insert("expires".into(), s("2024-05-01T12:00:01+00:00"));
        headers.insert("taskmill-dead-reason".into(), s("expired"));
        headers.insert("taskmill-dead-attempts".into(), AMQPValue::LongLongInt(4));
        let mut delivery = Delivery::mock(
            1,
            "taskmill".into(),
            "celery.dead".into(),
            false,
            b"[[], {}, {}]".to_vec(),
        );
        delivery.properties = lapin::BasicProperties::default()
            .with_correlation_id("t-1".into())
            .with_content_type("application/json".into())
            .with_expiration("60000".into())
            .with_headers(headers);
        let msg = Browsed { delivery };
        assert!(msg.is_celery());
        assert_eq!(msg.kind().as_deref(), Some("reports.render"));
        let out = msg.replay_to("celery");
        let p = &out.properties;
        let names: Vec<&str> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(names, ["id", "retries", "task", "taskmill-replay"]);
        assert_eq!(
            convert::lookup(p.headers().as_ref(), "retries"),
            Some(HeaderValue::Int(0))
        );
        assert_eq!(p.expiration(), &None);
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("t-1"));
    }

    #[test]
    fn dead_letter_headers_are_recognised() {
        for h in [
            "taskmill-dead-reason",
            "taskmill-dead-at-ms",
            "x-death",
            "x-first-death-queue",
            "x-delivery-count",
        ] {
            assert!(is_dead_letter_header(h), "{h}");
        }
        for h in [
            "taskmill-kind",
            "taskmill-attempt",
            "taskmill-idempotency-key",
            "traceparent",
        ] {
            assert!(!is_dead_letter_header(h), "{h}");
        }
    }
}
