//! One AMQP connection.

use lapin::options::{
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use taskmill_core::redact::redact_url;

use crate::publisher::Publisher;

/// A broker operation that failed. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The connection could not be opened.
    #[error("cannot connect to the broker at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// lapin's error.
        source: lapin::Error,
    },
    /// A channel, consumer or connection was closed.
    #[error("{0}")]
    Closed(String),
    /// An AMQP operation failed (channel or connection closed, refused declare...).
    #[error("broker operation `{op}` failed: {source}")]
    Op {
        /// What was attempted.
        op: String,
        /// lapin's error.
        source: lapin::Error,
    },
}

impl BrokerError {
    pub(crate) fn op(op: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
        let op = op.into();
        move |source| BrokerError::Op { op, source }
    }
}

/// An open connection to RabbitMQ.
#[derive(Clone)]
pub struct Broker {
    conn: std::sync::Arc<Connection>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Broker {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`), naming the
    /// connection `name` in the management UI.
    pub async fn connect(url: &str, name: &str) -> Result<Broker, BrokerError> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn =
            Connection::connect(url, props)
                .await
                .map_err(|source| BrokerError::Connect {
                    url: redact_url(url),
                    source,
                })?;
        Ok(Broker {
            conn: std::sync::Arc::new(conn),
        })
    }

    /// Whether the connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    pub(crate) async fn channel(&self) -> Result<lapin::Channel, BrokerError> {
        self.conn
            .create_channel()
            .await
            .map_err(BrokerError::op("channel.open"))
    }

    /// A new publisher on its own confirm-mode channel.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        Publisher::open(self.channel().await?).await
    }

    /// Messages ready in `queue` (not counting unacknowledged ones), or an
    /// error if the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let ch = self.channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("queue.declare passive {queue}")))?;
        let _ = ch.close(200, "bye".into()).await;
        Ok(q.message_count())
    }

    /// Takes one message from `queue` (basic.get with manual ack), or `None`
    /// when it is empty. The message returns to the queue unless acked.
    pub async fn get(&self, queue: &str) -> Result<Option<Fetched>, BrokerError> {
        let ch = self.channel().await?;
        let msg = ch
            .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
            .await
            .map_err(BrokerError::op(format!("basic.get {queue}")))?;
        Ok(msg.map(|m| Fetched {
            channel: ch,
            delivery: m.delivery,
        }))
    }

    /// Removes every ready message from `queue`; returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u32, BrokerError> {
        let ch = self.channel().await?;
        let n = ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map_err(BrokerError::op(format!("queue.purge {queue}")))?;
        let _ = ch.close(200, "bye".into()).await;
        Ok(n)
    }

    /// Deletes `queue` and its messages (for tests and tooling).
    pub async fn delete_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        ch.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map_err(BrokerError::op(format!("queue.delete {queue}")))?;
        let _ = ch.close(200, "bye".into()).await;
        Ok(())
    }

    /// Deletes `exchange` (for tests and tooling, e.g. the exchange Celery
    /// declares per queue). Deleting one that does not exist succeeds.
    pub async fn delete_exchange(&self, exchange: &str) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .map_err(BrokerError::op(format!("exchange.delete {exchange}")))?;
        let _ = ch.close(200, "bye".into()).await;
        Ok(())
    }

    /// Closes the connection; unacknowledged deliveries return to their queues.
    pub async fn close(&self) {
        if self.is_connected() {
            let _ = self.conn.close(200, "shutdown".into()).await;
        }
    }
}

/// A message taken with [`Broker::get`].
pub struct Fetched {
    channel: lapin::Channel,
    delivery: lapin::message::Delivery,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("message_id", &self.message_id())
            .finish()
    }
}

impl Fetched {
    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    /// `message_id`.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// A header by name.
    pub fn header(&self, name: &str) -> Option<taskmill_core::HeaderValue> {
        crate::convert::lookup(self.delivery.properties.headers().as_ref(), name)
    }

    /// A string header by name.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            taskmill_core::HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Acknowledges (removes) the message.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .map_err(BrokerError::op("basic.ack"))?;
        let _ = self.channel.close(200, "bye".into()).await;
        Ok(())
    }
}
