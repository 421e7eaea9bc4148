//! Connecting: [`Broker`], one connection to consume on and one to publish
//! on (the same one unless [`ConnectOptions::separate_publish_connection`]),
//! what the broker said about itself ([`BrokerInfo`]) and whether it blocks
//! the publishing connection ([`Broker::blocked`]).
//!
//! A connect is bounded by [`ConnectOptions::handshake_timeout`] and safe to
//! cancel (drop) at any point: see [`crate::handshake`] for how.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use taskmill_core::redact::redact_url;
use tokio::sync::watch;

use crate::broker_info::BrokerInfo;
pub use crate::error::BrokerError;
use crate::error::is_soft_error;
use crate::publisher::Publisher;

/// How [`Broker::connect_with`] connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// How long the whole connect may take, from the TCP connect to the
    /// opened connection(s). A server that accepts and never answers gives
    /// [`BrokerError::HandshakeTimeout`] after this. Default 10 s.
    pub handshake_timeout: Duration,
    /// How long a publisher from this broker waits for a confirm before
    /// [`crate::PublishError::ConfirmTimeout`]. Default 30 s.
    pub confirm_timeout: Duration,
    /// Publish on a second connection of its own, as RabbitMQ advises: when
    /// the broker blocks a publishing connection (a memory or disk alarm) it
    /// stops reading from it, so acks sent on it would stall too. Default
    /// false (one connection, for tools and producers).
    pub separate_publish_connection: bool,
}

/// [`ConnectOptions::handshake_timeout`]'s default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// [`ConnectOptions::confirm_timeout`]'s default.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            separate_publish_connection: false,
        }
    }
}

/// One lapin connection and its flow-control state.
struct Link {
    conn: Connection,
    blocked: watch::Receiver<Option<String>>,
}

impl Link {
    fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    async fn close(&self) {
        if self.is_connected() {
            let _ = self.conn.close(200, "shutdown".into()).await;
        }
    }
}

/// An open connection to RabbitMQ (or two: see
/// [`ConnectOptions::separate_publish_connection`]). Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    /// Consumers, acks, declarations and tooling.
    main: Arc<Link>,
    /// Publishers; the same link as `main` unless separated.
    publish: Arc<Link>,
    info: Arc<BrokerInfo>,
    confirm_timeout: Duration,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connected", &self.is_connected())
            .field(
                "separate_publish_connection",
                &self.has_publish_connection(),
            )
            .field("info", &self.info.to_string())
            .finish()
    }
}

/// Opens one lapin connection named `name`.
async fn open_link(url: &str, name: &str) -> Result<Link, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = Connection::connect(url, props)
        .await
        .map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        })?;
    let blocked = crate::flow::watch_blocked(&conn);
    Ok(Link { conn, blocked })
}

impl Broker {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`), naming the
    /// connection `name` in the management UI, with the default
    /// [`ConnectOptions`] (one connection, 10 s handshake timeout).
    pub async fn connect(url: &str, name: &str) -> Result<Broker, BrokerError> {
        Broker::connect_with(url, name, &ConnectOptions::default()).await
    }

    /// Connects to `url` as `options` say. With a separate publish
    /// connection, it is named `"{name} publisher"`.
    ///
    /// Bounded by `options.handshake_timeout` and cancel-safe: the broker is
    /// first reached by a probe this crate owns (a dropped connect closes its
    /// socket), which also reads [`BrokerInfo`]; only then does lapin open the
    /// connection(s). A lapin handshake cut off by the timeout or a cancel
    /// after that point is closed by lapin when the broker answers.
    pub async fn connect_with(
        url: &str,
        name: &str,
        options: &ConnectOptions,
    ) -> Result<Broker, BrokerError> {
        let after = options.handshake_timeout;
        match tokio::time::timeout(after, Broker::connect_unbounded(url, name, options)).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::HandshakeTimeout {
                url: redact_url(url),
                after,
            }),
        }
    }

    async fn connect_unbounded(
        url: &str,
        name: &str,
        options: &ConnectOptions,
    ) -> Result<Broker, BrokerError> {
        let unreachable = |source| BrokerError::Unreachable {
            url: redact_url(url),
            source,
        };
        let uri: AMQPUri = url.parse().map_err(|_| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a valid amqp:// URL",
            ))
        })?;
        // TLS is lapin's to speak; over amqps the broker stays unprobed and
        // every version-gated feature off.
        let info = match uri.scheme {
            AMQPScheme::AMQP => {
                let props = crate::handshake::server_properties(&uri, name)
                    .await
                    .map_err(unreachable)?;
                BrokerInfo::from_server_properties(&props)
            }
            AMQPScheme::AMQPS => BrokerInfo::default(),
        };
        let main = Arc::new(open_link(url, name).await?);
        let publish = if options.separate_publish_connection {
            match open_link(url, &format!("{name} publisher")).await {
                Ok(link) => Arc::new(link),
                Err(e) => {
                    main.close().await;
                    return Err(e);
                }
            }
        } else {
            main.clone()
        };
        Ok(Broker {
            main,
            publish,
            info: Arc::new(info),
            confirm_timeout: options.confirm_timeout,
        })
    }

    /// What the broker said about itself at connect: product, version,
    /// capabilities, and the features that follow.
    pub fn info(&self) -> &BrokerInfo {
        &self.info
    }

    /// Whether publishing has a connection of its own.
    pub fn has_publish_connection(&self) -> bool {
        !Arc::ptr_eq(&self.main, &self.publish)
    }

    /// The publishing connection's flow state: `Some(reason)` while the
    /// broker blocks it (`connection.blocked`, e.g. "low on memory"), `None`
    /// otherwise. Publishes (and, on a shared connection, acks) wait while
    /// blocked; a worker should report itself not ready meanwhile.
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.publish.blocked.clone()
    }

    /// Whether the connection (both, when separate) is open.
    pub fn is_connected(&self) -> bool {
        self.main.is_connected() && self.publish.is_connected()
    }

    /// A channel on the main connection (consumers, declarations, tooling).
    pub(crate) async fn channel(&self) -> Result<lapin::Channel, BrokerError> {
        self.main
            .conn
            .create_channel()
            .await
            .map_err(BrokerError::op("channel.open"))
    }

    /// A new publisher on its own confirm-mode channel, on the publishing
    /// connection, waiting at most [`ConnectOptions::confirm_timeout`] for
    /// each confirm.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let channel = self
            .publish
            .conn
            .create_channel()
            .await
            .map_err(BrokerError::op("channel.open"))?;
        Ok(Publisher::open(channel)
            .await?
            .with_confirm_timeout(self.confirm_timeout))
    }

    /// Messages ready in `queue` (not counting unacknowledged ones), or an
    /// error if the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let ch = self.channel().await?;
        let q = declare_passive(&ch, queue).await?;
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

    /// Closes the connection(s); unacknowledged deliveries return to their
    /// queues. The publishing connection closes first, so confirms still
    /// awaited fail before the consumers' channels go.
    pub async fn close(&self) {
        if self.has_publish_connection() {
            self.publish.close().await;
        }
        self.main.close().await;
    }
}

/// `queue.declare passive` of `queue` on `ch`: its counts, or an error if it
/// does not exist. A missing queue is [`BrokerError::Closed`] saying so (the
/// broker closed `ch` with NOT_FOUND); any other failure is
/// [`BrokerError::Op`]. The one passive declare of the crate.
pub(crate) async fn declare_passive(
    ch: &lapin::Channel,
    queue: &str,
) -> Result<lapin::Queue, BrokerError> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|source| {
        if is_soft_error(&source, AMQPSoftError::NOTFOUND) {
            BrokerError::Closed(format!("queue `{queue}` does not exist"))
        } else {
            BrokerError::Op {
                op: format!("queue.declare passive {queue}"),
                source,
            }
        }
    })
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
