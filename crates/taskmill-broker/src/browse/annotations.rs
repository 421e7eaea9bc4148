//! The annotations a dead letter carries: taskmill's `taskmill-dead-*` headers,
//! the broker's own (`x-death` and its family), and the decoding of `x-death`
//! entries ([`XDeath`]). Pure: no channel involved.

use lapin::types::{AMQPValue, FieldTable};
use taskmill_core::HeaderValue;
use taskmill_core::wire::H_FIRST_FAILED_AT_MS;

use crate::convert;

/// Prefix of taskmill's own dead-letter headers (`taskmill-dead-reason`, ...).
pub const DEAD_HEADER_PREFIX: &str = "taskmill-dead-";

/// Headers RabbitMQ adds when it dead-letters a message itself, or counts
/// quorum-queue deliveries; a replay removes them with taskmill's own.
pub const BROKER_DEAD_HEADERS: &[&str] = &[
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
    "x-delivery-count",
];

/// Whether `name` is a dead-letter annotation: taskmill's `taskmill-dead-*`
/// or one of the broker's [`BROKER_DEAD_HEADERS`].
pub fn is_dead_letter_header(name: &str) -> bool {
    name.starts_with(DEAD_HEADER_PREFIX) || BROKER_DEAD_HEADERS.contains(&name)
}

/// Whether a replay drops the header `name`: the dead-letter annotations and
/// `taskmill-first-failed-at-ms` (a replay starts the job's history afresh,
/// as its attempt goes back to 1).
pub fn dropped_on_replay(name: &str) -> bool {
    is_dead_letter_header(name) || name == H_FIRST_FAILED_AT_MS
}

/// One entry of RabbitMQ's `x-death` header: the broker dead-lettered the
/// message from `queue` for `reason`, `count` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XDeath {
    /// Why: `delivery_limit`, `rejected`, `expired` or `maxlen`.
    pub reason: String,
    /// The queue the message was dead-lettered from.
    pub queue: String,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: i64,
    /// When it was (last) dead-lettered, seconds since the Unix epoch.
    pub time: Option<u64>,
    /// The exchange the message had been published to.
    pub exchange: Option<String>,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<String>,
}

impl XDeath {
    /// Decodes an `x-death` header value (an array of tables); entries that
    /// are not tables are skipped. The broker keeps the most recent first.
    pub fn decode(v: &AMQPValue) -> Vec<XDeath> {
        let AMQPValue::FieldArray(entries) = v else {
            return Vec::new();
        };
        entries
            .as_slice()
            .iter()
            .filter_map(|e| match e {
                AMQPValue::FieldTable(t) => Some(XDeath::from_table(t)),
                _ => None,
            })
            .collect()
    }

    fn from_table(t: &FieldTable) -> XDeath {
        let get = |k: &str| t.inner().get(k);
        let string = |k: &str| match get(k).map(convert::from_amqp) {
            Some(HeaderValue::Str(s)) => Some(s),
            _ => None,
        };
        let count = match get("count").map(convert::from_amqp) {
            Some(HeaderValue::Int(n)) => n,
            _ => 0,
        };
        let time = match get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            Some(other) => match convert::from_amqp(other) {
                HeaderValue::Int(n) => u64::try_from(n).ok(),
                _ => None,
            },
            None => None,
        };
        let routing_keys = match get("routing-keys") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .filter_map(|v| match convert::from_amqp(v) {
                    HeaderValue::Str(s) => Some(s),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        XDeath {
            reason: string("reason").unwrap_or_default(),
            queue: string("queue").unwrap_or_default(),
            count,
            time,
            exchange: string("exchange"),
            routing_keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v.as_bytes()))
    }

    #[test]
    fn x_death_is_decoded() {
        let mut t = FieldTable::default();
        t.insert("reason".into(), s("delivery_limit"));
        t.insert("queue".into(), s("q"));
        t.insert("count".into(), AMQPValue::LongLongInt(2));
        t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("exchange".into(), s("taskmill"));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![s("q")])),
        );
        let v = AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(t),
            AMQPValue::Boolean(true),
        ]));
        assert_eq!(
            XDeath::decode(&v),
            vec![XDeath {
                reason: "delivery_limit".into(),
                queue: "q".into(),
                count: 2,
                time: Some(1_700_000_000),
                exchange: Some("taskmill".into()),
                routing_keys: vec!["q".into()],
            }]
        );
        assert!(XDeath::decode(&s("nope")).is_empty());
    }

    #[test]
    fn dead_letter_headers_are_recognised() {
        for h in [
            "taskmill-dead-reason",
            "taskmill-dead-at-ms",
            "x-death",
            "x-first-death-queue",
            "x-delivery-count",
        ] {
            assert!(is_dead_letter_header(h), "{h}");
        }
        for h in [
            "taskmill-kind",
            "taskmill-attempt",
            "taskmill-idempotency-key",
            "traceparent",
        ] {
            assert!(!is_dead_letter_header(h), "{h}");
        }
    }
}
