//! Protocol headers <-> AMQP field tables.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use taskmill_core::HeaderValue;

/// Converts an AMQP value into the protocol's neutral header value.
pub fn from_amqp(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::ShortUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongUInt(n) => HeaderValue::Int(i64::from(*n)),
        AMQPValue::LongLongInt(n) => HeaderValue::Int(*n),
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_string()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => HeaderValue::Str(s.to_string()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::DecimalValue(_) => HeaderValue::Other("decimal"),
        AMQPValue::FieldArray(_) => HeaderValue::Other("array"),
        AMQPValue::Timestamp(_) => HeaderValue::Other("timestamp"),
        AMQPValue::FieldTable(_) => HeaderValue::Other("table"),
        AMQPValue::Void => HeaderValue::Other("void"),
    }
}

/// Converts a protocol header value into an AMQP value.
pub fn to_amqp(v: &HeaderValue) -> AMQPValue {
    match v {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Int(n) => AMQPValue::LongLongInt(*n),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bytes(b) => AMQPValue::LongString(LongString::from(b.as_slice())),
        HeaderValue::Other(_) => AMQPValue::Void,
    }
}

/// Builds a field table from protocol headers.
pub fn table(headers: &[(&'static str, HeaderValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(ShortString::from(*k), to_amqp(v));
    }
    t
}

/// Looks a header up in an optional field table.
pub fn lookup(t: Option<&FieldTable>, name: &str) -> Option<HeaderValue> {
    t?.inner().get(name).map(from_amqp)
}

/// A message's headers as the Celery decoder reads them (scalars, and the
/// items of a list header such as `timelimit`).
#[derive(Debug, Clone, Copy)]
pub struct CeleryHeaders<'a>(pub Option<&'a FieldTable>);

impl taskmill_core::celery::HeaderSource for CeleryHeaders<'_> {
    fn scalar(&self, name: &str) -> Option<HeaderValue> {
        lookup(self.0, name)
    }

    fn list(&self, name: &str) -> Option<Vec<HeaderValue>> {
        match self.0?.inner().get(name)? {
            AMQPValue::FieldArray(items) => Some(items.as_slice().iter().map(from_amqp).collect()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for v in [
            HeaderValue::Str("héllo".into()),
            HeaderValue::Int(-42),
            HeaderValue::Bool(true),
            HeaderValue::Float(1.5),
        ] {
            assert_eq!(from_amqp(&to_amqp(&v)), v);
        }
        assert_eq!(
            from_amqp(&AMQPValue::LongString(LongString::from(
                &[0xffu8, 0xfe][..]
            ))),
            HeaderValue::Bytes(vec![0xff, 0xfe])
        );
        assert_eq!(from_amqp(&AMQPValue::LongUInt(7)), HeaderValue::Int(7));
    }

    #[test]
    fn celery_list_headers() {
        use taskmill_core::celery::HeaderSource;
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("timelimit"),
            AMQPValue::FieldArray(vec![AMQPValue::Double(2.5), AMQPValue::Void].into()),
        );
        t.insert(
            ShortString::from("task"),
            to_amqp(&HeaderValue::Str("a".into())),
        );
        let h = CeleryHeaders(Some(&t));
        assert_eq!(
            h.list("timelimit"),
            Some(vec![HeaderValue::Float(2.5), HeaderValue::Other("void")])
        );
        assert_eq!(h.list("task"), None);
        assert_eq!(h.scalar("task"), Some(HeaderValue::Str("a".into())));
        assert_eq!(CeleryHeaders(None).list("timelimit"), None);
    }
}
