//! Broker flow control seen from a connection: `connection.blocked` and
//! `connection.unblocked`, as a [`watch`] value the worker can turn into
//! readiness.
//!
//! RabbitMQ blocks a connection that publishes while a resource alarm (memory,
//! disk) is raised: nothing more is read from it, acks included. So the
//! worker publishes on a connection of its own (see
//! [`crate::ConnectOptions::separate_publish_connection`]) and its consumers'
//! acks keep flowing while publishing waits.

use futures_lite::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::watch;

/// The blocked state after `event`: `Some(Some(reason))` when it blocks,
/// `Some(None)` when it unblocks (or a fresh connection starts unblocked),
/// `None` when it says nothing about flow.
pub(crate) fn after_event(event: &Event) -> Option<Option<String>> {
    match event {
        Event::ConnectionBlocked(reason) => Some(Some(if reason.is_empty() {
            "blocked by the broker".to_string()
        } else {
            reason.clone()
        })),
        Event::ConnectionUnblocked | Event::Connected => Some(None),
        _ => None,
    }
}

/// Follows `conn`'s events into a watch value (`Some(reason)` while
/// blocked). The task ends when every receiver is gone.
pub(crate) fn watch_blocked(conn: &Connection) -> watch::Receiver<Option<String>> {
    // Listen before reading the status: lapin only queues events while a
    // listener exists, so a block between the two is seen either way.
    let mut events = conn.events_listener();
    let initial = conn
        .status()
        .blocked()
        .then(|| "blocked by the broker".to_string());
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => break,
                event = events.next() => match event {
                    Some(event) => {
                        if let Some(state) = after_event(&event) {
                            tx.send_if_modified(|now| {
                                let changed = *now != state;
                                *now = state;
                                changed
                            });
                        }
                    }
                    None => break,
                },
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_and_unblocked_map_to_the_watch_value() {
        assert_eq!(
            after_event(&Event::ConnectionBlocked("low on memory".into())),
            Some(Some("low on memory".to_string()))
        );
        assert_eq!(
            after_event(&Event::ConnectionBlocked(String::new())),
            Some(Some("blocked by the broker".to_string()))
        );
        assert_eq!(after_event(&Event::ConnectionUnblocked), Some(None));
        assert_eq!(after_event(&Event::Connected), Some(None));
        assert_eq!(after_event(&Event::SendFlow(false)), None);
    }
}
