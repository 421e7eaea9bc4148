//! A plain HTTP GET on loopback, and free ports for a worker's HTTP server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// How long one GET may take: a worker's endpoints answer in milliseconds, so
/// a hung server fails the caller instead of stalling it.
pub const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// A plain HTTP/1.0 GET (so no server chunks the body) with
/// `Connection: close`; returns (status, body). Status 0: the answer was not
/// HTTP.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(GET_TIMEOUT, fetch)
        .await
        .map_err(|_| Error::HttpTimeout {
            path: path.to_string(),
            timeout: GET_TIMEOUT,
        })??;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The body of a GET that must answer 200.
pub async fn get_ok(addr: SocketAddr, path: &str) -> Result<String, Error> {
    match get(addr, path).await? {
        (200, body) => Ok(body),
        (status, _) => Err(Error::HttpStatus {
            path: path.to_string(),
            status,
        }),
    }
}

/// Whether `/readyz` answers 200 right now.
pub async fn is_ready(addr: SocketAddr) -> bool {
    matches!(get(addr, "/readyz").await, Ok((200, _)))
}

/// A loopback address with a port free right now.
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A TCP port on 127.0.0.1 free right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(free_local_addr()?.port())
}

/// Polls `/readyz` every 50 ms until it answers 200 (true) or `timeout`
/// passes (false).
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if is_ready(addr).await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
