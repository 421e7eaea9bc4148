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
//!
//! Layout: `annotations` (the dead-letter headers and [`XDeath`], pure),
//! `browsed` ([`Browsed`] and its accessors), `replay`
//! ([`Browsed::replay_to`]), `browser` ([`Browser`],
//! [`Broker::browse`](crate::Broker::browse), [`ACK_GRACE`]).

mod annotations;
mod browsed;
mod browser;
mod replay;

pub use annotations::{
    BROKER_DEAD_HEADERS, DEAD_HEADER_PREFIX, XDeath, dropped_on_replay, is_dead_letter_header,
};
pub use browsed::Browsed;
pub use browser::{ACK_GRACE, Browser};
