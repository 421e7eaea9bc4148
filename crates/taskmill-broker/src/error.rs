//! The crate's error type, apart from the modules that raise it, so that
//! `connection` and `publisher` both use it without importing each other.

use std::time::Duration;

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
    /// The TCP connection failed, or the server did not answer like an
    /// AMQP 0-9-1 broker, before the AMQP handshake started.
    #[error("cannot connect to the broker at {url}: {source}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// What the socket said.
        source: std::io::Error,
    },
    /// The broker accepted the TCP connection but did not complete the AMQP
    /// handshake in time: a blackholed address, a proxy that answers nothing,
    /// or a broker too overloaded to serve new connections.
    #[error(
        "cannot connect to the broker at {url}: no AMQP handshake within {after:?} (is a broker listening there, and reachable?)"
    )]
    HandshakeTimeout {
        /// The URL, password redacted.
        url: String,
        /// The handshake timeout that ran out.
        after: Duration,
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

    /// Whether the broker answered NOT_FOUND: a queue or exchange that does
    /// not exist, which no retry mends until something declares it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BrokerError::Op { source, .. }
            if is_soft_error(source, lapin::protocol::AMQPSoftError::NOTFOUND))
    }
}

/// Whether the broker refused an operation with the soft error `kind`
/// (the channel is closed by it; the connection stays up).
pub(crate) fn is_soft_error(e: &lapin::Error, kind: lapin::protocol::AMQPSoftError) -> bool {
    use lapin::protocol::AMQPErrorKind;
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(k) if *k == kind))
}
