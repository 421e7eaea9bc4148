//! The first step of connecting: a short TCP exchange, owned by this crate,
//! that reads the broker's `connection.start` before lapin connects.
//!
//! Why a separate exchange: lapin runs its handshake on a thread of its own
//! and keeps no deadline, so a server that accepts TCP and never answers
//! (a blackholed address, a half-dead load balancer) would hang a connect for
//! ever, and cancelling the connect would leave that thread waiting. This
//! probe runs on tokio under the caller's deadline: dropping it closes its
//! socket, so it is cancel-safe, and only a server that answered it is handed
//! to lapin. It also yields what lapin does not expose: the broker's
//! `server_properties` (product, version, capabilities).
//!
//! The probe sends the protocol header and reads `connection.start`. Then,
//! so the broker does not log a client that vanished mid-handshake (RabbitMQ
//! warns "client unexpectedly closed TCP connection"), it logs in with the
//! URL's credentials (PLAIN), opens the vhost and closes the connection
//! cleanly. That part is best effort and briefly bounded: whatever goes wrong
//! in it (another mechanism, refused credentials) is left for lapin's own
//! handshake to report.

use std::io;
use std::time::Duration;

use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The AMQP 0-9-1 protocol header.
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type of a method frame.
const FRAME_METHOD: u8 = 1;
/// Every frame ends with this octet.
const FRAME_END: u8 = 0xCE;
/// `connection.start` is class 10, method 10.
const CONNECTION_START: (u16, u16) = (10, 10);
/// A `connection.start` larger than this is not from a broker (RabbitMQ's
/// is under 1 KiB; the bound keeps a hostile server from making us allocate).
const MAX_START_FRAME: u32 = 64 * 1024;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// How long the polite close after `connection.start` may take.
const CLOSE_BUDGET: Duration = Duration::from_secs(2);
/// Heartbeat frames, skipped while closing.
const FRAME_HEARTBEAT: u8 = 8;

/// Connects to `uri`'s host, sends the protocol header and returns the
/// `server_properties` of the broker's `connection.start`, then closes (see
/// the module doc). No deadline of its own for the part that matters: the
/// caller races it (see [`crate::Broker::connect_with`]).
pub(crate) async fn server_properties(uri: &AMQPUri, name: &str) -> io::Result<FieldTable> {
    let mut stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port)).await?;
    stream.write_all(PROTOCOL_HEADER).await?;
    let (props, mechanisms) = read_start(&mut stream).await?;
    if mechanisms.split_whitespace().any(|m| m == "PLAIN") {
        let _ = tokio::time::timeout(CLOSE_BUDGET, log_in_and_close(&mut stream, uri, name)).await;
    }
    // Best effort: the broker notices the close either way.
    let _ = stream.shutdown().await;
    Ok(props)
}

/// Reads `connection.start`: its `server_properties` and mechanisms.
async fn read_start(stream: &mut TcpStream) -> io::Result<(FieldTable, String)> {
    let mut header = [0u8; 7];
    stream.read_exact(&mut header).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid(
                "the server closed the connection before it said anything (not an AMQP broker?)",
            )
        } else {
            e
        }
    })?;
    if header.starts_with(b"AMQP") {
        // A broker answers an unsupported protocol header with its own.
        return Err(invalid("the server does not speak AMQP 0-9-1"));
    }
    let (kind, size) = frame_header(&header)?;
    if kind != FRAME_METHOD {
        return Err(invalid(format!(
            "expected connection.start, got a frame of type {kind}"
        )));
    }
    if size > MAX_START_FRAME {
        return Err(invalid(format!(
            "connection.start of {size} bytes is too large (not an AMQP broker?)"
        )));
    }
    let payload = read_payload(stream, size).await?;
    parse_start(&payload)
}

/// The rest of a frame of `size` bytes, without its frame end.
async fn read_payload(stream: &mut TcpStream, size: u32) -> io::Result<Vec<u8>> {
    let mut payload = vec![0u8; size as usize + 1];
    stream.read_exact(&mut payload).await?;
    if payload.pop() != Some(FRAME_END) {
        return Err(invalid("malformed frame from the server (no frame end)"));
    }
    Ok(payload)
}

/// The next method frame on channel 0 as (class, method, arguments).
async fn read_method(stream: &mut TcpStream) -> io::Result<(u16, u16, Vec<u8>)> {
    loop {
        let mut header = [0u8; 7];
        stream.read_exact(&mut header).await?;
        let (kind, size) = frame_header(&header)?;
        if size > MAX_START_FRAME {
            return Err(invalid("frame too large"));
        }
        let payload = read_payload(stream, size).await?;
        match kind {
            FRAME_METHOD if payload.len() >= 4 => {
                let class = u16::from_be_bytes([payload[0], payload[1]]);
                let method = u16::from_be_bytes([payload[2], payload[3]]);
                return Ok((class, method, payload[4..].to_vec()));
            }
            FRAME_HEARTBEAT => continue,
            _ => return Err(invalid(format!("unexpected frame of type {kind}"))),
        }
    }
}

/// Waits for method `want` of class `connection`.
async fn expect(stream: &mut TcpStream, want: u16) -> io::Result<Vec<u8>> {
    match read_method(stream).await? {
        (10, m, args) if m == want => Ok(args),
        (class, method, _) => Err(invalid(format!(
            "expected connection method {want}, got {class}.{method}"
        ))),
    }
}

/// Sends one method frame on channel 0.
async fn send_method(stream: &mut TcpStream, method: u16, args: &[u8]) -> io::Result<()> {
    let mut frame = vec![FRAME_METHOD, 0, 0];
    frame.extend_from_slice(&(args.len() as u32 + 4).to_be_bytes());
    frame.extend_from_slice(&10u16.to_be_bytes());
    frame.extend_from_slice(&method.to_be_bytes());
    frame.extend_from_slice(args);
    frame.push(FRAME_END);
    stream.write_all(&frame).await
}

fn put_short(out: &mut Vec<u8>, s: &str) {
    // Short strings are at most 255 bytes; the names sent here are ours.
    let b = &s.as_bytes()[..s.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn put_long(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// `connection.start-ok` (PLAIN), `tune-ok`, `open`, `close`: a complete,
/// clean connection the broker logs as opened and closed.
async fn log_in_and_close(stream: &mut TcpStream, uri: &AMQPUri, name: &str) -> io::Result<()> {
    let user = &uri.authority.userinfo;
    let mut props = Vec::new();
    put_short(&mut props, "connection_name");
    props.push(b'S');
    put_long(&mut props, format!("{name} (probe)").as_bytes());
    let mut start_ok = Vec::new();
    put_long(&mut start_ok, &props);
    put_short(&mut start_ok, "PLAIN");
    let response = format!("\0{}\0{}", user.username, user.password);
    put_long(&mut start_ok, response.as_bytes());
    put_short(&mut start_ok, "en_US");
    send_method(stream, 11, &start_ok).await?;

    let tune = expect(stream, 30).await?;
    if tune.len() < 8 {
        return Err(invalid("connection.tune too short"));
    }
    // Echo channel-max and frame-max; heartbeat 0: the probe lives briefly.
    let mut tune_ok = tune[..6].to_vec();
    tune_ok.extend_from_slice(&[0, 0]);
    send_method(stream, 31, &tune_ok).await?;

    let mut open = Vec::new();
    put_short(&mut open, &uri.vhost);
    put_short(&mut open, "");
    open.push(0);
    send_method(stream, 40, &open).await?;
    expect(stream, 41).await?;

    let mut close = 200u16.to_be_bytes().to_vec();
    put_short(&mut close, "probe done");
    close.extend_from_slice(&[0, 0, 0, 0]);
    send_method(stream, 50, &close).await?;
    expect(stream, 51).await?;
    Ok(())
}

/// Type and payload size of a frame header (type, channel, size).
fn frame_header(h: &[u8; 7]) -> io::Result<(u8, u32)> {
    let channel = u16::from_be_bytes([h[1], h[2]]);
    if channel != 0 {
        return Err(invalid(format!(
            "expected a frame on channel 0, got channel {channel}"
        )));
    }
    Ok((h[0], u32::from_be_bytes([h[3], h[4], h[5], h[6]])))
}

/// The `server_properties` and mechanisms of a `connection.start` method
/// payload: class, method, version major and minor, the field table, the
/// mechanisms (space-separated).
pub(crate) fn parse_start(payload: &[u8]) -> io::Result<(FieldTable, String)> {
    if payload.len() < 6 {
        return Err(invalid("connection.start too short"));
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    if (class, method) != CONNECTION_START {
        return Err(invalid(format!(
            "expected connection.start, got method {class}.{method}"
        )));
    }
    let (major, minor) = (payload[4], payload[5]);
    if (major, minor) != (0, 9) {
        return Err(invalid(format!(
            "the server speaks AMQP {major}-{minor}, not 0-9-1"
        )));
    }
    let (rest, table) = lapin::types::parsing::parse_field_table(&payload[6..])
        .map_err(|e| invalid(format!("unreadable server_properties: {e}")))?;
    let mechanisms = lapin::types::parsing::parse_long_string(rest)
        .map(|(_, m)| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    Ok((table, mechanisms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shortstr(out: &mut Vec<u8>, s: &str) {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    fn longstr_value(out: &mut Vec<u8>, s: &str) {
        out.push(b'S');
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A `connection.start` payload as RabbitMQ sends it (fewer fields).
    fn start_payload(major: u8, minor: u8) -> Vec<u8> {
        let mut caps = Vec::new();
        shortstr(&mut caps, "connection.blocked");
        caps.extend_from_slice(b"t\x01");
        let mut table = Vec::new();
        shortstr(&mut table, "product");
        longstr_value(&mut table, "RabbitMQ");
        shortstr(&mut table, "version");
        longstr_value(&mut table, "3.12.4");
        shortstr(&mut table, "capabilities");
        table.push(b'F');
        table.extend_from_slice(&(caps.len() as u32).to_be_bytes());
        table.extend_from_slice(&caps);
        let mut p = vec![0, 10, 0, 10, major, minor];
        p.extend_from_slice(&(table.len() as u32).to_be_bytes());
        p.extend_from_slice(&table);
        // mechanisms and locales follow; the parser ignores them.
        p.extend_from_slice(&5u32.to_be_bytes());
        p.extend_from_slice(b"PLAIN");
        p.extend_from_slice(&5u32.to_be_bytes());
        p.extend_from_slice(b"en_US");
        p
    }

    #[test]
    fn start_payload_yields_server_properties() {
        let (table, mechanisms) = parse_start(&start_payload(0, 9)).unwrap();
        assert_eq!(mechanisms, "PLAIN");
        let info = crate::BrokerInfo::from_server_properties(&table);
        assert_eq!(info.product, "RabbitMQ");
        assert_eq!(info.version, (3, 12, 4));
        assert!(info.sends_connection_blocked());
    }

    #[test]
    fn other_methods_and_versions_are_refused() {
        let mut tune = start_payload(0, 9);
        tune[3] = 30;
        assert!(
            parse_start(&tune)
                .unwrap_err()
                .to_string()
                .contains("10.30")
        );
        let old = start_payload(8, 0);
        assert!(parse_start(&old).unwrap_err().to_string().contains("8-0"));
        assert!(parse_start(&[0, 10]).is_err());
        let mut cut = start_payload(0, 9);
        cut.truncate(20);
        assert!(parse_start(&cut).is_err());
    }

    #[test]
    fn frames_off_channel_zero_are_refused() {
        assert!(frame_header(&[1, 0, 1, 0, 0, 0, 9]).is_err());
        assert_eq!(frame_header(&[1, 0, 0, 0, 0, 1, 0]).unwrap(), (1, 256));
    }
}
