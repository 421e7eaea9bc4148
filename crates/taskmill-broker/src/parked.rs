//! A delivery kept as bytes: how a long job's message survives its early
//! ack. The worker acks the delivery of a job that may run past the broker's
//! consumer timeout only after parking this copy with the job's claim in the
//! store; if the worker dies, a sweeper on another worker turns the bytes
//! back into a message ([`Outgoing::from_parked`]) and republishes it.
//!
//! Format: `TMP1`, the AMQP content-header properties as the protocol
//! encodes them (every property and header survives, nested tables
//! included), then the body. The `expiration` property is dropped, as on
//! every copy.

use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};

use crate::consumer::without_expiration;
use crate::{Incoming, Outgoing};

const MAGIC: &[u8; 4] = b"TMP1";

/// A parked message that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("parked message is not readable: {0}")]
pub struct ParkedError(String);

/// Encodes `properties` and `body`.
pub(crate) fn encode(properties: &BasicProperties, body: &[u8]) -> Vec<u8> {
    let (props, _) = cookie_factory::r#gen(gen_properties(properties), Vec::new())
        .expect("writing into a Vec cannot fail");
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + props.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(props.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&props);
    out.extend_from_slice(body);
    out
}

/// Decodes what [`encode`] wrote.
pub(crate) fn decode(bytes: &[u8]) -> Result<(BasicProperties, Vec<u8>), ParkedError> {
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| ParkedError("unknown format".into()))?;
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| ParkedError("truncated".into()))?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(ParkedError("truncated properties".into()));
    }
    let (props, body) = rest.split_at(len);
    let (left, properties) =
        parse_properties(props).map_err(|e| ParkedError(format!("properties: {e:?}")))?;
    if !left.is_empty() {
        return Err(ParkedError("trailing bytes after the properties".into()));
    }
    Ok((properties, body.to_vec()))
}

impl Incoming {
    /// This delivery as bytes to park in the store. `body` is the payload when
    /// the caller took it out by decoding; `None` uses the delivery's own body.
    pub fn parked(&self, body: Option<&[u8]>) -> Vec<u8> {
        encode(
            &without_expiration(self.properties()),
            body.unwrap_or(self.body()),
        )
    }
}

impl Outgoing {
    /// The message a parked delivery of `queue` was, to publish to the queue
    /// again (persistent, through the work exchange).
    pub fn from_parked(queue: &str, bytes: &[u8]) -> Result<Outgoing, ParkedError> {
        let (properties, body) = decode(bytes)?;
        Ok(Outgoing {
            exchange: taskmill_core::wire::EXCHANGE.to_string(),
            routing_key: queue.to_string(),
            properties: properties.with_delivery_mode(2),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    #[test]
    fn properties_headers_and_body_survive() {
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("n"), AMQPValue::LongLongInt(-7));
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("taskmill-kind"),
            AMQPValue::LongString(LongString::from("io.sleep")),
        );
        headers.insert(ShortString::from("nested"), AMQPValue::FieldTable(inner));
        let props = BasicProperties::default()
            .with_message_id(ShortString::from("job-1"))
            .with_content_type(ShortString::from("application/json"))
            .with_timestamp(1_700_000_000)
            .with_headers(headers);
        let bytes = encode(&props, b"{\"ms\":1}");
        let (back, body) = decode(&bytes).unwrap();
        assert_eq!(back, props);
        assert_eq!(body, b"{\"ms\":1}");
        let out = Outgoing::from_parked("q", &bytes).unwrap();
        assert_eq!(out.routing_key, "q");
        assert_eq!(*out.properties.delivery_mode(), Some(2));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(b"nope").is_err());
        assert!(decode(b"TMP1\0\0\0\x09abc").is_err());
        let mut bytes = encode(&BasicProperties::default(), b"");
        bytes.truncate(6);
        assert!(decode(&bytes).is_err());
    }
}
