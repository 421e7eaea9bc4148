//! Consuming with manual acks and a prefetch limit.

use std::sync::Arc;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use taskmill_core::wire::{EXCHANGE, H_ATTEMPT, H_FIRST_FAILED_AT_MS, Properties, dead_queue_name};
use taskmill_core::{DeadLetter, DeadReason, DecodeError, Envelope};

use taskmill_core::celery::{self, CeleryProperties, CeleryTask, ReplyTo};

use crate::acks::AckBatch;
use crate::bounded;
use crate::connection::{Broker, BrokerError};
use crate::convert::{self, CeleryHeaders};
use crate::publisher::Outgoing;

/// A consumer on its own channel. Deliveries not acked when the channel closes
/// return to the queue. Acks are coalesced (see [`crate::acks`]).
pub struct Consumer {
    channel: lapin::Channel,
    inner: lapin::Consumer,
    queue: String,
    tag: String,
    acks: Arc<AckBatch>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .finish()
    }
}

impl Broker {
    /// Starts consuming `queue` with manual acks and at most `prefetch`
    /// unacknowledged deliveries.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, BrokerError> {
        let channel = self.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(BrokerError::op("basic.qos"))?;
        let inner = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("basic.consume {queue}")))?;
        let acks = AckBatch::start(channel.clone());
        Ok(Consumer {
            channel,
            inner,
            queue: queue.to_string(),
            tag: tag.to_string(),
            acks,
        })
    }
}

impl Consumer {
    /// The next delivery; `None` when the consumer was cancelled or its
    /// channel closed, an error when the connection failed.
    pub async fn next(&mut self) -> Option<Result<Incoming, BrokerError>> {
        let item = self.inner.next().await?;
        Some(
            item.map(|delivery| {
                self.acks.received(delivery.delivery_tag);
                Incoming {
                    delivery,
                    queue: self.queue.clone(),
                    acks: self.acks.clone(),
                }
            })
            .map_err(|source| BrokerError::Op {
                op: format!("consume {}", self.queue),
                source,
            }),
        )
    }

    /// Asks the broker to stop sending deliveries. Deliveries already received
    /// stay valid for ack/nack until the channel closes.
    pub async fn cancel(&self) -> Result<(), BrokerError> {
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(BrokerError::op(format!("basic.cancel {}", self.queue)))
    }

    /// Sends the acks recorded so far, then closes the channel: every
    /// delivery not acked returns to the queue.
    pub async fn close(&self) {
        if let Err(e) = self.acks.close().await {
            tracing::warn!(queue = %self.queue, error = %e, "last acks not sent; the broker will redeliver those messages");
        }
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "closing".into()).await;
        }
    }
}

/// A copy of `p` without the per-message TTL (`expiration`). A copy the
/// worker publishes (dead letter, retry, deferral) must not carry it: it
/// would make a dead letter vanish from `Q.dead`, and make a delayed copy
/// leave its delay queue early (RabbitMQ drops the property itself when it
/// dead-letters a message, for the same reason). Celery sets it for
/// `expires`, which the worker checks from the header instead.
pub(crate) fn without_expiration(p: &lapin::BasicProperties) -> lapin::BasicProperties {
    let mut out = lapin::BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(v) = p.$get() {
                out = out.$set(v.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// How many attempts a message had run when it was dead-lettered: its
/// `taskmill-attempt`, or a Celery message's `retries` + 1.
fn attempts_of(headers: Option<&FieldTable>) -> Option<u32> {
    let int = |name| match convert::lookup(headers, name) {
        Some(taskmill_core::HeaderValue::Int(n)) => u32::try_from(n).ok(),
        _ => None,
    };
    int(H_ATTEMPT).or_else(|| int(celery::H_RETRIES).map(|r| r.saturating_add(1)))
}

/// The copy of a message (`props`, `body`, consumed from `queue`) that
/// comes back to `queue` after `delay`, with `overrides` set.
fn delayed_copy_of(
    props: &lapin::BasicProperties,
    body: &[u8],
    queue: &str,
    overrides: &[(&'static str, taskmill_core::HeaderValue)],
    delay: std::time::Duration,
) -> Result<Outgoing, String> {
    let (exchange, routing_key) = taskmill_core::wire::delay_route(queue, delay)?;
    let mut headers = bounded::copied_headers(props.headers().as_ref());
    bounded::set_own(&mut headers, overrides);
    let properties = without_expiration(props)
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(2);
    Ok(Outgoing {
        exchange,
        routing_key,
        properties,
        body: body.to_vec(),
    })
}

/// The dead-letter copy of a message (`props`, `body`) consumed from `queue`.
fn dead_letter_of(
    props: &lapin::BasicProperties,
    body: &[u8],
    queue: &str,
    dl: &DeadLetter,
    extra: &[(&'static str, taskmill_core::HeaderValue)],
) -> Outgoing {
    let mut headers = bounded::copied_headers(props.headers().as_ref());
    bounded::set_own(&mut headers, &dl.to_headers());
    bounded::set_own(&mut headers, extra);
    let properties = without_expiration(props)
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(2);
    Outgoing {
        exchange: EXCHANGE.to_string(),
        routing_key: dead_queue_name(queue),
        properties,
        body: body.to_vec(),
    }
}

/// One delivery.
pub struct Incoming {
    delivery: Delivery,
    queue: String,
    acks: Arc<AckBatch>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("queue", &self.queue)
            .field("tag", &self.delivery.delivery_tag)
            .finish()
    }
}

impl Incoming {
    /// The queue it was consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Its AMQP properties and headers.
    pub(crate) fn properties(&self) -> &lapin::BasicProperties {
        &self.delivery.properties
    }

    /// Its body (empty once a taskmill decode moved it into the envelope).
    pub(crate) fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    /// The exchange it was published to (`""`: the default exchange).
    pub fn exchange(&self) -> &str {
        self.delivery.exchange.as_str()
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.delivery.routing_key.as_str()
    }

    /// The body's size in bytes (0 once a taskmill decode moved it into the
    /// envelope: read it first).
    pub fn body_len(&self) -> usize {
        self.delivery.data.len()
    }

    /// Whether the broker delivered it before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// The job id (`message_id`), if any, for logs.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// Decodes the delivery per protocol v1. On success the body moves into the
    /// envelope (no copy); on failure it stays for [`Incoming::dead_letter`].
    pub fn decode(&mut self, max_payload_bytes: usize) -> Result<Envelope, DecodeError> {
        let p = &self.delivery.properties;
        let props = Properties {
            message_id: p.message_id().as_ref().map(|s| s.as_str()),
            content_type: p.content_type().as_ref().map(|s| s.as_str()),
            timestamp: *p.timestamp(),
        };
        let headers = p.headers().as_ref();
        Envelope::decode(
            &self.queue,
            props,
            |name| convert::lookup(headers, name),
            &mut self.delivery.data,
            max_payload_bytes,
        )
    }

    /// The delivery's properties as the Celery decoder reads them.
    fn celery_properties(&self) -> CeleryProperties<'_> {
        let p = &self.delivery.properties;
        CeleryProperties {
            correlation_id: p.correlation_id().as_ref().map(|s| s.as_str()),
            content_type: p.content_type().as_ref().map(|s| s.as_str()),
            content_encoding: p.content_encoding().as_ref().map(|s| s.as_str()),
            reply_to: p.reply_to().as_ref().map(|s| s.as_str()),
            timestamp: *p.timestamp(),
        }
    }

    /// Decodes the delivery as a Celery protocol v2 task (see
    /// [`taskmill_core::celery::decode`]). The body stays in the delivery, so
    /// dead-letter and retry copies ([`Incoming::delayed_copy`]) remain
    /// Celery messages.
    pub fn decode_celery(
        &self,
        max_payload_bytes: usize,
    ) -> Result<(Envelope, CeleryTask), DecodeError> {
        celery::decode(
            &self.queue,
            self.celery_properties(),
            &CeleryHeaders(self.delivery.properties.headers().as_ref()),
            &self.delivery.data,
            max_payload_bytes,
        )
    }

    /// For a Celery message refused at decode: where its client waits for a
    /// result, when the message says (task id and `reply_to`).
    pub fn celery_reply_hint(&self) -> Option<ReplyTo> {
        celery::reply_hint(
            self.celery_properties(),
            &CeleryHeaders(self.delivery.properties.headers().as_ref()),
        )
    }

    /// A copy of this delivery (body, properties, headers) with `overrides`
    /// set, that becomes ready again in its queue after `delay`, through the
    /// delay ladder: how a Celery task is deferred or retried as a Celery
    /// message. Copied headers are bounded (see [`taskmill_core::bounds`]). Fails
    /// only for a delay beyond [`taskmill_core::wire::MAX_DELAY`].
    pub fn delayed_copy(
        &self,
        overrides: &[(&'static str, taskmill_core::HeaderValue)],
        delay: std::time::Duration,
    ) -> Result<Outgoing, String> {
        delayed_copy_of(
            &self.delivery.properties,
            &self.delivery.data,
            &self.queue,
            overrides,
            delay,
        )
    }

    /// A copy of this delivery for `Q.dead`: original body, properties and
    /// (bounded) headers, plus the dead-letter headers of a [`DeadLetter`]
    /// written now by `worker_id`, and `extra`. `body` is the payload when
    /// the caller took it out by decoding; `None` uses the delivery's own body.
    pub fn dead_letter(
        &self,
        reason: DeadReason,
        error: &str,
        worker_id: &str,
        body: Option<&[u8]>,
        extra: &[(&'static str, taskmill_core::HeaderValue)],
    ) -> Outgoing {
        let mut dl = DeadLetter::new(
            reason,
            error,
            &self.queue,
            worker_id,
            crate::system::now_ms(),
        );
        let headers = self.delivery.properties.headers().as_ref();
        dl.attempts = attempts_of(headers);
        dl.first_failed_at_ms = extra.iter().find_map(|(k, v)| match v {
            taskmill_core::HeaderValue::Int(ms) if *k == H_FIRST_FAILED_AT_MS => {
                u64::try_from(*ms).ok()
            }
            _ => None,
        });
        self.dead_letter_copy(&dl, body, extra)
    }

    /// [`Incoming::dead_letter`] with the dead letter's record given.
    pub fn dead_letter_copy(
        &self,
        dl: &DeadLetter,
        body: Option<&[u8]>,
        extra: &[(&'static str, taskmill_core::HeaderValue)],
    ) -> Outgoing {
        dead_letter_of(
            &self.delivery.properties,
            body.unwrap_or(&self.delivery.data),
            &self.queue,
            dl,
            extra,
        )
    }

    /// Acknowledges the delivery: the broker forgets the message. The ack is
    /// coalesced with others of the same channel and leaves within one
    /// scheduler pass (see [`crate::acks`]); it fails at once when the
    /// channel is already closed.
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acks.ack(self.delivery.delivery_tag)
    }

    /// Returns the delivery to its queue for another consumer.
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        let res = self
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(BrokerError::op("basic.nack"));
        // Sent (or the channel is gone): a later multiple ack may pass over it.
        self.acks.settled(self.delivery.delivery_tag);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, LongString, ShortString};
    use taskmill_core::HeaderValue;
    use taskmill_core::bounds::{H_DROPPED_HEADERS, MAX_COPY_HEADER_BYTES};

    /// A Celery task message whose `eta` is 70 KB: more than half the
    /// broker's default frame_max on its own.
    fn hostile_celery() -> lapin::BasicProperties {
        let mut h = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes()));
        h.insert(ShortString::from("task"), s("reports.render"));
        h.insert(ShortString::from("id"), s("t-1"));
        h.insert(ShortString::from("retries"), AMQPValue::LongLongInt(4));
        h.insert(
            ShortString::from("eta"),
            s(&format!("2024-05-01T12:00:00.{}+00:00", "0".repeat(70_000))),
        );
        h.insert(ShortString::from("kwargsrepr"), s(&"k".repeat(60_000)));
        lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id("t-1".into())
            .with_expiration("1000".into())
            .with_headers(h)
    }

    fn header_bytes(out: &Outgoing) -> usize {
        bounded::table_len(out.properties.headers().as_ref().unwrap().inner())
    }

    #[test]
    fn dead_letter_copy_of_a_hostile_celery_message_is_bounded() {
        let props = hostile_celery();
        let mut dl = DeadLetter::new(
            DeadReason::BadHeader,
            &"why ".repeat(50_000),
            "celery",
            "w-1",
            7,
        );
        dl.attempts = attempts_of(props.headers().as_ref());
        let out = dead_letter_of(&props, b"[[], {}, {}]", "celery", &dl, &[]);
        assert!(
            header_bytes(&out) <= MAX_COPY_HEADER_BYTES,
            "{}",
            header_bytes(&out)
        );
        assert_eq!(out.routing_key, "celery.dead");
        assert_eq!(out.properties.expiration(), &None);
        let headers = out.properties.headers().as_ref();
        let back = DeadLetter::from_headers(|n| convert::lookup(headers, n)).unwrap();
        assert_eq!(back.reason, "bad_header");
        assert_eq!(back.attempts, Some(5), "Celery retries + 1");
        assert_eq!(back.queue.as_deref(), Some("celery"));
        assert!(convert::lookup(headers, "task").is_some());
    }

    #[test]
    fn retry_copy_of_a_hostile_celery_message_is_bounded() {
        let props = hostile_celery();
        let overrides = [
            ("retries", HeaderValue::Int(5)),
            (
                "eta",
                HeaderValue::Str("2024-05-01T12:00:02.000000+00:00".into()),
            ),
        ];
        let out = delayed_copy_of(
            &props,
            b"[[], {}, {}]",
            "celery",
            &overrides,
            std::time::Duration::from_secs(2),
        )
        .unwrap();
        assert!(
            header_bytes(&out) <= MAX_COPY_HEADER_BYTES,
            "{}",
            header_bytes(&out)
        );
        let headers = out.properties.headers().as_ref();
        assert_eq!(
            convert::lookup(headers, "eta"),
            Some(HeaderValue::Str("2024-05-01T12:00:02.000000+00:00".into()))
        );
        assert_eq!(
            convert::lookup(headers, "retries"),
            Some(HeaderValue::Int(5))
        );
        assert!(convert::lookup(headers, H_DROPPED_HEADERS).is_none());
        assert_eq!(out.properties.expiration(), &None);
    }

    #[test]
    fn copies_keep_every_property_but_the_ttl() {
        let full = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_headers(FieldTable::default())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_message_id("m".into())
            .with_timestamp(7)
            .with_type("t".into())
            .with_user_id("u".into())
            .with_app_id("a".into())
            .with_cluster_id("k".into());
        let with_ttl = full.clone().with_expiration("0".into());
        assert_eq!(without_expiration(&with_ttl), full);
        assert_eq!(
            without_expiration(&lapin::BasicProperties::default()),
            lapin::BasicProperties::default()
        );
    }
}
