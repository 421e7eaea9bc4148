//! [`Browser`]: a channel that reads a queue with `basic.get` and holds what it
//! took until it acks or returns it; opened by [`Broker::browse`].

use std::collections::BTreeSet;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};

use super::Browsed;
use crate::connection::{Broker, BrokerError, declare_passive};

/// How long [`Browser::requeue_all`] keeps the channel open after acks were
/// sent. A quorum queue can drop acks that are still buffered in the broker's
/// channel process when the channel closes (rabbitmq-server#10327): the
/// messages come back, so a replayed job would also stay in the DLQ. Measured
/// on RabbitMQ 3.10 with 100-message batches acked just before the close:
/// without a wait, 1 run in 4 brought 14 to 67 acked messages back; with
/// 300 ms or more, none in 20 runs. It is a mitigation, not a guarantee; what
/// slips through is a duplicate, never a loss.
pub const ACK_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

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
        let q = declare_passive(&channel, queue).await?;
        Ok(Browser {
            channel,
            queue: queue.to_string(),
            ready_at_open: q.message_count(),
            held: BTreeSet::new(),
            acked: false,
        })
    }
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
    /// classic queue, see the [`browse`](crate::browse) docs for quorum
    /// queues) and closes the
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
