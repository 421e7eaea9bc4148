//! Publishing with publisher confirms.
//!
//! Every publish is `mandatory`: a message no queue is bound for comes back as
//! [`PublishError::Unroutable`] instead of vanishing. A publish is only done when
//! the broker confirmed it; [`Publisher::send`] returns a [`PendingConfirm`] so
//! bulk producers can pipeline many publishes and await their confirms later.
//! A confirm that does not come within the publisher's confirm timeout is
//! [`PublishError::ConfirmTimeout`], never a hang.

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use taskmill_core::Envelope;
use taskmill_core::wire::{CONTENT_TYPE, EXCHANGE, dead_queue_name};

use crate::convert;
use crate::error::BrokerError;

/// A publish that did not reach a queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No queue is bound for the routing key (the queue does not exist).
    #[error(
        "unroutable: no queue is bound to exchange `{exchange}` with routing key `{routing_key}` (is a worker serving this queue, or was it declared?)"
    )]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key (the queue name).
        routing_key: String,
    },
    /// The broker refused the message (nack): it was not stored.
    #[error("the broker refused (nacked) the message for `{routing_key}`")]
    Nacked {
        /// Routing key.
        routing_key: String,
    },
    /// No confirm came within the publisher's confirm timeout (a broker
    /// blocking the connection, a stalled queue): the message may or may not
    /// be stored, as after [`PublishError::Broker`].
    #[error(
        "no confirm from the broker for `{routing_key}` within {after:?} (is the connection blocked by a resource alarm?)"
    )]
    ConfirmTimeout {
        /// Routing key.
        routing_key: String,
        /// The confirm timeout that ran out.
        after: Duration,
    },
    /// A Celery result was not sent: its `reply_to` is not a reply queue
    /// (see [`check_reply_queue`]).
    #[error("refusing to send a Celery result to `{queue}`: {reason}")]
    ReplyRefused {
        /// The `reply_to` queue.
        queue: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },
    /// The channel or connection failed before the confirm arrived: the
    /// message may or may not have been stored.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Whether `s` is a UUID in its text form (`8-4-4-4-12` hex digits, any case).
fn is_uuid_text(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The rule for where a Celery result may go, so a task message cannot make
/// the worker publish into an arbitrary queue of the vhost through the
/// default exchange (every queue is bound there under its own name):
///
/// 1. `queue` must be named like a kombu reply queue: a UUID in text form
///    (`rpc://` clients consume results from a queue named by their
///    `oid`, a UUID). Direct reply-to (`amq.rabbitmq.reply-to`) and any
///    other name are refused.
/// 2. `queue` must not be one of `served` (the queues the worker serves) or
///    their dead-letter queues, in case a work queue is named like a UUID.
///
/// A refused result is dropped by the caller; the job's outcome stands.
pub fn check_reply_queue(queue: &str, served: &[impl AsRef<str>]) -> Result<(), PublishError> {
    let refuse = |reason| {
        Err(PublishError::ReplyRefused {
            queue: queue.to_string(),
            reason,
        })
    };
    if !is_uuid_text(queue) {
        return refuse("a reply queue is named by a UUID, as Celery's rpc:// backend names it");
    }
    let served_or_dead = served.iter().any(|q| {
        let q = q.as_ref();
        q == queue || dead_queue_name(q) == queue
    });
    if served_or_dead {
        return refuse("it is a queue this worker serves");
    }
    Ok(())
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
}

/// The AMQP properties of a taskmill job (protocol v1).
fn job_properties(env: &Envelope) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_message_id(env.job_id.as_str().into())
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_headers(convert::table(&env.headers()));
    match env.enqueued_at_us {
        Some(us) => properties.with_timestamp(us / 1_000_000),
        None => properties,
    }
}

impl Outgoing {
    /// A job, per protocol v1: to exchange `taskmill`, routed by its queue.
    pub fn job(env: &Envelope) -> Outgoing {
        Outgoing {
            exchange: EXCHANGE.to_string(),
            routing_key: env.queue.clone(),
            properties: job_properties(env),
            body: env.payload.clone(),
        }
    }

    /// [`Outgoing::job`] taking the envelope, so its payload and queue name
    /// move into the message instead of being copied.
    pub fn job_owned(env: Envelope) -> Outgoing {
        let properties = job_properties(&env);
        Outgoing {
            exchange: EXCHANGE.to_string(),
            routing_key: env.queue,
            properties,
            body: env.payload,
        }
    }

    /// A job that becomes ready in `queue` after `delay`, through the delay
    /// ladder (declare it with [`crate::Broker::declare_delays`]). Precision:
    /// rounded up to [`taskmill_core::wire::DELAY_TICK`].
    pub fn job_delayed(env: &Envelope, delay: std::time::Duration) -> Result<Outgoing, String> {
        let (exchange, routing_key) = taskmill_core::wire::delay_route(&env.queue, delay)?;
        let mut msg = Outgoing::job(env);
        msg.exchange = exchange;
        msg.routing_key = routing_key;
        Ok(msg)
    }

    /// A result message for a Celery client's `rpc://` backend: to the
    /// default exchange with routing key `reply.queue` (the task's
    /// `reply_to`), `correlation_id` = the task id, JSON `body` (see
    /// [`taskmill_core::celery::result_body`]). Non-persistent, as Celery
    /// sends results: the reply queue is the client's, auto-deleted with it.
    /// `served` are the worker's queues: a `reply_to` that breaks
    /// [`check_reply_queue`]'s rule is [`PublishError::ReplyRefused`].
    pub fn celery_result(
        reply: &taskmill_core::celery::ReplyTo,
        body: Vec<u8>,
        served: &[impl AsRef<str>],
    ) -> Result<Outgoing, PublishError> {
        check_reply_queue(&reply.queue, served)?;
        let properties = BasicProperties::default()
            .with_correlation_id(reply.task_id.as_str().into())
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1);
        Ok(Outgoing {
            exchange: String::new(),
            routing_key: reply.queue.clone(),
            properties,
            body,
        })
    }

    /// Any message, for tooling and tests that must send what a foreign or
    /// broken producer would: to `exchange` with `routing_key`, persistent,
    /// with the given properties and headers (nothing validated).
    pub fn raw(
        exchange: &str,
        routing_key: &str,
        message_id: Option<&str>,
        content_type: Option<&str>,
        headers: &[(&'static str, taskmill_core::HeaderValue)],
        body: Vec<u8>,
    ) -> Outgoing {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(ct) = content_type {
            properties = properties.with_content_type(ct.into());
        }
        if !headers.is_empty() {
            properties = properties.with_headers(convert::table(headers));
        }
        Outgoing {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            properties,
            body,
        }
    }

    /// The routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The exchange (`""`: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Size of the body in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

/// A publish that was sent and waits for the broker's confirm.
#[must_use = "a publish is not done until its confirm is awaited"]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
    /// When the wait gives up.
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

impl PendingConfirm {
    /// Waits for the broker's verdict, until the publisher's confirm timeout
    /// (counted from the send) runs out.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirmation = match tokio::time::timeout_at(self.deadline, self.confirm).await {
            Ok(c) => c.map_err(BrokerError::op(format!("confirm for {}", self.routing_key)))?,
            Err(_) => {
                return Err(PublishError::ConfirmTimeout {
                    routing_key: self.routing_key,
                    after: self.timeout,
                });
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(PublishError::Unroutable {
                exchange: self.exchange,
                routing_key: self.routing_key,
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                routing_key: self.routing_key,
            }),
            // confirm_select was called when the publisher was opened, so this
            // means the channel lost its confirm mode: never call that a success.
            Confirmation::NotRequested => Err(PublishError::Nacked {
                routing_key: self.routing_key,
            }),
        }
    }
}

/// A confirm-mode channel. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Publisher {
    channel: lapin::Channel,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish()
    }
}

impl Publisher {
    pub(crate) async fn open(channel: lapin::Channel) -> Result<Publisher, BrokerError> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::op("confirm.select"))?;
        Ok(Publisher {
            channel,
            confirm_timeout: crate::connection::DEFAULT_CONFIRM_TIMEOUT,
        })
    }

    /// The same publisher, waiting at most `timeout` for each confirm.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Publisher {
        self.confirm_timeout = timeout;
        self
    }

    /// How long a confirm is waited for.
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    /// Sends `msg`; the returned [`PendingConfirm`] resolves when the broker
    /// confirms it. Sending itself counts against the confirm timeout: a
    /// publish lapin cannot hand to the broker in time (the connection is
    /// blocked) is [`PublishError::ConfirmTimeout`] too.
    pub async fn send(&self, msg: &Outgoing) -> Result<PendingConfirm, PublishError> {
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let timed_out = || PublishError::ConfirmTimeout {
            routing_key: msg.routing_key.clone(),
            after: self.confirm_timeout,
        };
        let publish = self.channel.basic_publish(
            msg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &msg.body,
            msg.properties.clone(),
        );
        let confirm = tokio::time::timeout_at(deadline, publish)
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| BrokerError::Op {
                op: format!("basic.publish to {}", msg.routing_key),
                source,
            })?;
        Ok(PendingConfirm {
            confirm,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            deadline,
            timeout: self.confirm_timeout,
        })
    }

    /// Publishes `msg` and waits for its confirm. Returns how long the confirm took.
    pub async fn publish(&self, msg: &Outgoing) -> Result<std::time::Duration, PublishError> {
        let start = Instant::now();
        self.send(msg).await?.wait().await?;
        Ok(start.elapsed())
    }

    /// Whether the channel is still usable.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmill_core::celery::ReplyTo;

    const KOMBU_OID: &str = "9f1c5a8e-3b7d-3c2a-8e4f-1a2b3c4d5e6f";

    fn reply(queue: &str) -> ReplyTo {
        ReplyTo {
            task_id: "t-1".to_string(),
            queue: queue.to_string(),
            group_id: None,
            parent_id: None,
        }
    }

    fn refused(queue: &str, served: &[&str]) -> &'static str {
        match check_reply_queue(queue, served) {
            Err(PublishError::ReplyRefused { reason, .. }) => reason,
            other => panic!("{queue}: expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn kombu_reply_queues_are_accepted() {
        let served = ["default", "celery"];
        assert!(check_reply_queue(KOMBU_OID, &served).is_ok());
        assert!(check_reply_queue(&KOMBU_OID.to_uppercase(), &served).is_ok());
        let msg = Outgoing::celery_result(&reply(KOMBU_OID), b"{}".to_vec(), &served).unwrap();
        assert_eq!(msg.routing_key(), KOMBU_OID);
        assert_eq!(msg.exchange, "");
    }

    #[test]
    fn work_and_other_queues_are_refused() {
        let served = ["default", "celery"];
        for queue in [
            "default",
            "default.dead",
            "celery",
            "taskmill.delay.3",
            "amq.rabbitmq.reply-to",
            "",
            "9f1c5a8e3b7d3c2a8e4f1a2b3c4d5e6f",
            "9f1c5a8e-3b7d-3c2a-8e4f-1a2b3c4d5e6g",
            "9f1c5a8e-3b7d-3c2a-8e4f-1a2b3c4d5e6f.dead",
        ] {
            assert!(refused(queue, &served).contains("UUID"), "{queue}");
        }
        let err = Outgoing::celery_result(&reply("default"), Vec::new(), &served).unwrap_err();
        assert!(err.to_string().contains("`default`"), "{err}");
    }

    #[test]
    fn served_queues_named_like_uuids_are_refused() {
        let dead = format!("{KOMBU_OID}.dead");
        assert!(refused(KOMBU_OID, &[KOMBU_OID]).contains("serves"));
        // Its dead-letter queue fails the name rule already; a served queue
        // whose dead-letter queue would be the UUID cannot exist.
        assert!(refused(&dead, &[KOMBU_OID]).contains("UUID"));
    }
}
