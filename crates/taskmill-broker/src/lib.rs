//! The RabbitMQ adapter: the only crate that imports lapin.
//!
//! Layout:
//! - [`connection`]: [`Broker`], one AMQP connection, and the channels made from it.
//! - [`topology`]: declaring the `taskmill` exchange, work queues, their
//!   dead-letter queues and bindings, the delay ladder, and Celery queues
//!   the way kombu declares them (all idempotent).
//! - [`publisher`]: [`Publisher`], a confirm-mode channel; a publish is done only
//!   when the broker confirmed it, and an unroutable or nacked publish is an error.
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
pub mod browse;
pub mod ceiling;
pub mod connection;
pub mod consumer;
pub mod convert;
pub mod dlq;
pub mod publisher;
pub mod system;
pub mod topology;

pub use connection::{Broker, BrokerError, Fetched};
pub use consumer::{Consumer, Incoming};
pub use publisher::{Outgoing, PendingConfirm, PublishError, Publisher};
pub use system::{default_worker_id, new_job_id, now_ms, now_us};
pub use topology::QueueSpec;
