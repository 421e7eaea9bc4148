//! Connecting is bounded and cancel-safe: a server that accepts TCP and never
//! answers gives a handshake timeout in time, a dropped connect closes its
//! socket, and a closed port or a server that is not AMQP fail at once.

use std::time::{Duration, Instant};

use taskmill_broker::{Broker, BrokerError, ConnectOptions};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

fn url(port: u16) -> String {
    format!("amqp://guest:secret@127.0.0.1:{port}/%2f")
}

fn with_timeout(handshake_timeout: Duration) -> ConnectOptions {
    ConnectOptions {
        handshake_timeout,
        ..ConnectOptions::default()
    }
}

/// A listener that accepts every connection and never writes a byte.
async fn blackhole() -> (u16, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            if tx.send(sock).is_err() {
                break;
            }
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_silent_server_is_a_handshake_timeout() {
    let (port, _held) = blackhole().await;
    let start = Instant::now();
    let err = Broker::connect_with(
        &url(port),
        "blackholed",
        &with_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, BrokerError::HandshakeTimeout { after, .. } if after == Duration::from_millis(300)),
        "{err}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let text = err.to_string();
    assert!(text.contains("cannot connect to the broker"), "{text}");
    assert!(!text.contains("secret"), "password leaked: {text}");
}

#[tokio::test]
async fn a_cancelled_connect_closes_its_socket() {
    let (port, mut held) = blackhole().await;
    // The connect itself would wait a minute; the caller gives up first, as
    // a worker racing it against SIGTERM does.
    let (url, options) = (url(port), with_timeout(Duration::from_secs(60)));
    let connect = Broker::connect_with(&url, "cancelled", &options);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), connect)
            .await
            .is_err()
    );
    let mut sock = tokio::time::timeout(Duration::from_secs(1), held.recv())
        .await
        .unwrap()
        .unwrap();
    let mut header = [0u8; 8];
    sock.read_exact(&mut header).await.unwrap();
    assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), sock.read_to_end(&mut rest))
        .await
        .expect("the socket of the dropped connect stayed open")
        .unwrap();
    assert_eq!(n, 0, "nothing more is sent after the header");
    // No second connection was attempted.
    assert!(held.try_recv().is_err());
}

#[tokio::test]
async fn a_closed_port_fails_at_once() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start = Instant::now();
    let err = Broker::connect(&url(port), "closed port")
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let text = err.to_string();
    assert!(text.contains("cannot connect to the broker"), "{text}");
    assert!(!text.contains("secret"), "password leaked: {text}");
}

#[tokio::test]
async fn a_server_that_is_not_amqp_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 8];
        let _ = sock.read_exact(&mut buf).await;
        let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    });
    let err = Broker::connect(&url(port), "http").await.unwrap_err();
    match &err {
        BrokerError::Unreachable { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidData, "{err}");
        }
        other => panic!("expected Unreachable, got {other}"),
    }
}
