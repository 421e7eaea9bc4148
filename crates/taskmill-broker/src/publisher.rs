//! Publishing with publisher confirms.
//!
//! Every publish is `mandatory`: a message no queue is bound for comes back as
//! [`PublishError::Unroutable`] instead of vanishing. A publish is only done when
//! the broker confirmed it; [`Publisher::send`] returns a [`PendingConfirm`] so
//! bulk producers can pipeline many publishes and await their confirms later.

use std::time::Instant;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use taskmill_core::Envelope;
use taskmill_core::wire::{CONTENT_TYPE, EXCHANGE};

use crate::connection::BrokerError;
use crate::convert;

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
    /// The channel or connection failed before the confirm arrived: the
    /// message may or may not have been stored.
    #[error(transparent)]
    Broker(#[from] BrokerError),
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
    pub fn celery_result(reply: &taskmill_core::celery::ReplyTo, body: Vec<u8>) -> Outgoing {
        let properties = BasicProperties::default()
            .with_correlation_id(reply.task_id.as_str().into())
            .with_content_type(CONTENT_TYPE.into())
            .with_content_encoding("utf-8".into())
            .with_delivery_mode(1);
        Outgoing {
            exchange: String::new(),
            routing_key: reply.queue.clone(),
            properties,
            body,
        }
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
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

impl PendingConfirm {
    /// Waits for the broker's verdict.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirmation = self
            .confirm
            .await
            .map_err(BrokerError::op(format!("confirm for {}", self.routing_key)))?;
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
        Ok(Publisher { channel })
    }

    /// Sends `msg`; the returned [`PendingConfirm`] resolves when the broker
    /// confirms it.
    pub async fn send(&self, msg: &Outgoing) -> Result<PendingConfirm, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                msg.exchange.as_str().into(),
                msg.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.body,
                msg.properties.clone(),
            )
            .await
            .map_err(|source| BrokerError::Op {
                op: format!("basic.publish to {}", msg.routing_key),
                source,
            })?;
        Ok(PendingConfirm {
            confirm,
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
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
