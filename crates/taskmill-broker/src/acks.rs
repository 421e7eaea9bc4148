//! Coalesced acknowledgements for one consumer channel.
//!
//! A job's ack is recorded here ([`AckBatch::ack`]) and sent by a flusher task
//! shortly after, together with every other ack recorded by then: the longest
//! run of settled deliveries at the front of the channel's window goes out as
//! one `basic.ack(multiple = true)` on its highest acked tag, and acks behind a
//! delivery that is still running go out one by one (so a long job never holds
//! back the acks of the jobs after it, which would fill the prefetch window).
//!
//! The invariant that keeps this safe: **a `multiple` ack never covers a
//! delivery whose outcome is not durable yet.** It is sent only for a tag `T`
//! when every delivery of this channel with a tag below `T` is either acked
//! here (same fate) or already settled by a nack/requeue sent before (the
//! broker no longer holds it as unacknowledged, so `multiple` skips it).
//! Deliveries dropped without settling (a panicking job) stay open forever:
//! nothing before them is ever acked by `multiple` past them, and their
//! messages return to the queue when the channel closes.
//!
//! Under load many jobs finish between two runs of the flusher and one frame
//! acks them all; the broker's per-ack work drops with it. With a single job
//! in flight the flusher runs at once (one `yield`), so an ack is not delayed
//! by a timer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use lapin::options::BasicAckOptions;
use tokio::sync::Notify;

use crate::connection::BrokerError;

/// How often an idle flusher checks that its channel is still open.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// What is known about one delivery of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Received; its job has not finished.
    Open,
    /// Its outcome is durable: ack it.
    Ack,
    /// Nacked or requeued already (sent by its job).
    Done,
}

#[derive(Debug, Default)]
struct State {
    /// Every delivery not yet acked here, by delivery tag.
    window: BTreeMap<u64, Settle>,
    /// How many entries of `window` are [`Settle::Ack`].
    acks: usize,
    closed: bool,
}

/// The ack state of one consumer channel, shared by its deliveries and its
/// flusher task.
#[derive(Debug)]
pub(crate) struct AckBatch {
    channel: lapin::Channel,
    state: Mutex<State>,
    wake: Notify,
    /// Serializes flushes so the acks leave in the order they were decided.
    sending: tokio::sync::Mutex<()>,
}

impl AckBatch {
    /// A batch for `channel` with its flusher task running.
    pub(crate) fn start(channel: lapin::Channel) -> Arc<AckBatch> {
        let batch = Arc::new(AckBatch {
            channel,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            sending: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(flusher(batch.clone()));
        batch
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a delivery as it arrives (tags of a channel only grow).
    pub(crate) fn received(&self, tag: u64) {
        self.state().window.insert(tag, Settle::Open);
    }

    /// Records that `tag`'s outcome is durable; the flusher sends the ack.
    /// Fails when the channel is already closed (the broker will redeliver).
    pub(crate) fn ack(&self, tag: u64) -> Result<(), BrokerError> {
        if !self.channel.status().connected() {
            return Err(BrokerError::Closed(
                "the consumer channel closed before the ack".into(),
            ));
        }
        let mut st = self.state();
        let st = &mut *st;
        if let Some(s) = st.window.get_mut(&tag)
            && *s == Settle::Open
        {
            *s = Settle::Ack;
            st.acks += 1;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Records that `tag` was nacked or requeued by its job (already sent).
    pub(crate) fn settled(&self, tag: u64) {
        let mut st = self.state();
        let st = &mut *st;
        if let Some(s) = st.window.get_mut(&tag) {
            if *s == Settle::Ack {
                st.acks -= 1;
            }
            *s = Settle::Done;
        }
        self.wake.notify_one();
    }

    /// Sends every ack recorded so far.
    pub(crate) async fn flush(&self) -> Result<(), BrokerError> {
        let _order = self.sending.lock().await;
        let (prefix, singles) = take(&mut self.state());
        if let Some(tag) = prefix {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(BrokerError::op("basic.ack"))?;
        }
        for tag in singles {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await
                .map_err(BrokerError::op("basic.ack"))?;
        }
        Ok(())
    }

    /// Sends what is recorded and stops the flusher; later acks fail.
    pub(crate) async fn close(&self) -> Result<(), BrokerError> {
        let res = self.flush().await;
        self.state().closed = true;
        self.wake.notify_one();
        res
    }
}

/// Decides which acks to send now and forgets them: the highest tag of the
/// settled prefix of the window (if that prefix holds an ack), and every ack
/// behind the first open delivery, to be sent one by one.
fn take(st: &mut State) -> (Option<u64>, Vec<u64>) {
    let mut prefix = None;
    while let Some(entry) = st.window.first_entry() {
        match *entry.get() {
            Settle::Open => break,
            Settle::Ack => {
                prefix = Some(*entry.key());
                entry.remove();
                st.acks -= 1;
            }
            Settle::Done => {
                entry.remove();
            }
        }
    }
    let mut singles = Vec::new();
    if st.acks > 0 {
        singles.reserve(st.acks);
        st.window.retain(|&tag, s| {
            if *s == Settle::Ack {
                singles.push(tag);
                false
            } else {
                true
            }
        });
        st.acks = 0;
    }
    (prefix, singles)
}

/// Sends recorded acks until the batch is closed or its channel is gone
/// (checked at least every [`IDLE_CHECK`], so a session lost without
/// `Consumer::close` does not leave this task behind). After a wake-up it
/// yields once, so the jobs that finish in the same scheduler pass join the
/// batch.
async fn flusher(batch: Arc<AckBatch>) {
    loop {
        if tokio::time::timeout(IDLE_CHECK, batch.wake.notified())
            .await
            .is_err()
        {
            if !batch.channel.status().connected() {
                return; // nothing recorded now can be sent any more
            }
            continue;
        }
        if batch.state().closed {
            return;
        }
        tokio::task::yield_now().await;
        if let Err(e) = batch.flush().await {
            // The channel is gone: the broker redelivers every unacked message.
            tracing::debug!(error = %e, "ack flush failed");
            if !batch.channel.status().connected() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(entries: &[(u64, Settle)]) -> State {
        let window: BTreeMap<u64, Settle> = entries.iter().copied().collect();
        let acks = window.values().filter(|s| **s == Settle::Ack).count();
        State {
            window,
            acks,
            closed: false,
        }
    }

    #[test]
    fn a_settled_prefix_becomes_one_multiple_ack() {
        use Settle::*;
        let mut st = state(&[
            (1, Ack),
            (2, Done),
            (3, Ack),
            (4, Open),
            (5, Ack),
            (6, Open),
        ]);
        let (prefix, singles) = take(&mut st);
        assert_eq!(prefix, Some(3));
        assert_eq!(singles, vec![5]);
        assert_eq!(
            st.window.into_iter().collect::<Vec<_>>(),
            vec![(4, Open), (6, Open)]
        );
        assert_eq!(st.acks, 0);
    }

    #[test]
    fn a_prefix_ending_in_a_nack_acks_up_to_the_last_ack() {
        use Settle::*;
        let mut st = state(&[(7, Ack), (8, Ack), (9, Done)]);
        assert_eq!(take(&mut st), (Some(8), vec![]));
        assert!(st.window.is_empty());
    }

    #[test]
    fn nothing_is_acked_past_an_open_delivery() {
        use Settle::*;
        let mut st = state(&[(1, Open), (2, Done), (3, Ack)]);
        let (prefix, singles) = take(&mut st);
        assert_eq!(prefix, None);
        assert_eq!(singles, vec![3], "acked one by one, never by multiple");
        assert_eq!(
            st.window.into_iter().collect::<Vec<_>>(),
            vec![(1, Open), (2, Done)]
        );
    }

    #[test]
    fn only_nacks_send_nothing() {
        use Settle::*;
        let mut st = state(&[(1, Done), (2, Done)]);
        assert_eq!(take(&mut st), (None, vec![]));
        assert!(st.window.is_empty());
    }
}
