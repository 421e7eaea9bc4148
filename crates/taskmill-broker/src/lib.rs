//! The RabbitMQ adapter: the only crate that imports lapin.
//!
//! Layout:
//! - [`error`]: [`BrokerError`], shared by every module below.
//! - [`connection`]: [`Broker`], a consume connection and a publish
//!   connection (one and the same unless separated), the channels made from
//!   them, and bounded, cancel-safe connecting ([`ConnectOptions`]).
//! - `handshake`: the probe that reaches the broker before lapin does and
//!   reads its `server_properties`.
//! - [`broker_info`]: [`BrokerInfo`], the broker's product, version and
//!   capabilities, and the features they imply (pure).
//! - `flow`: `connection.blocked` / `unblocked` as a watch value
//!   ([`Broker::blocked`]).
//! - [`topology`]: declaring the `taskmill` exchange, work queues, their
//!   dead-letter queues and bindings, the delay ladder, and Celery queues
//!   the way kombu declares them (all idempotent; queues of older versions
//!   keep their arguments).
//! - [`publisher`]: [`Publisher`], a confirm-mode channel; a publish is done only
//!   when the broker confirmed it, within a timeout; an unroutable or nacked
//!   publish is an error; Celery results go only to reply queues.
//! - [`consumer`]: [`Consumer`] and [`Incoming`], a delivery with ack/nack and
//!   decoding into a [`taskmill_core::Envelope`].
//! - [`convert`]: protocol headers <-> AMQP field tables.
//! - `bounded`: the size bound on the headers a copy takes over from its original.
//! - [`browse`]: reading a queue without consuming it (dead-letter tooling).
//! - [`dlq`]: replaying dead letters, each removed only after its replacement
//!   is confirmed.
//! - [`ceiling`]: bare publish/consume loops, the benchmark's reference.
//! - [`system`]: the clock ([`now_us`]), fresh job ids ([`new_job_id`]) and
//!   the default worker id: the IO that `taskmill-core` takes as arguments.
//!
//! Nothing here knows about handlers: the worker decides, this crate carries out.

pub(crate) mod acks;
pub(crate) mod bounded;
pub mod broker_info;
pub mod browse;
pub mod ceiling;
pub mod connection;
pub mod consumer;
pub mod convert;
pub mod dlq;
pub mod error;
pub(crate) mod flow;
pub(crate) mod handshake;
pub mod parked;
pub mod publisher;
pub mod system;
pub mod topology;

pub use broker_info::BrokerInfo;
pub use connection::{Broker, ConnectOptions, Fetched};
pub use consumer::{Consumer, Incoming};
pub use error::BrokerError;
pub use parked::ParkedError;
pub use publisher::{Outgoing, PendingConfirm, PublishError, Publisher, check_reply_queue};
pub use system::{default_worker_id, host_name, new_job_id, now_ms, now_us};
pub use topology::{DeclareOptions, Declared, QueueSpec};
