//! [`Browsed::replay_to`]: a dead letter turned back into a job for its work
//! queue.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use taskmill_core::celery;
use taskmill_core::wire::{EXCHANGE, H_ATTEMPT, H_REPLAY};

use super::{Browsed, dropped_on_replay};
use crate::publisher::Outgoing;

impl Browsed {
    /// The job this dead letter came from, ready to publish again to the work
    /// queue `queue` through the `taskmill` exchange: same body, properties
    /// and `message_id`, persistent, `taskmill-replay` set to true, and the
    /// headers [`dropped_on_replay`] removed. A taskmill job gets
    /// `taskmill-attempt` 1; a Celery task gets `retries` 0 and loses its
    /// `eta` and `expires` (the time that may have dead-lettered it would
    /// dead-letter the replay again), and the per-message TTL with them.
    pub fn replay_to(&self, queue: &str) -> Outgoing {
        let celery = self.is_celery();
        let dropped = |name: &str| {
            dropped_on_replay(name)
                || (celery && (name == celery::H_ETA || name == celery::H_EXPIRES))
        };
        let kept: BTreeMap<ShortString, AMQPValue> = self
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter(|(k, _)| !dropped(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut headers = FieldTable::from(kept);
        if celery {
            headers.insert(
                ShortString::from(celery::H_RETRIES),
                AMQPValue::LongLongInt(0),
            );
        } else {
            headers.insert(ShortString::from(H_ATTEMPT), AMQPValue::LongLongInt(1));
        }
        headers.insert(ShortString::from(H_REPLAY), AMQPValue::Boolean(true));
        let mut properties = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        if celery {
            properties = crate::consumer::without_expiration(&properties);
        }
        Outgoing {
            exchange: EXCHANGE.to_string(),
            routing_key: queue.to_string(),
            properties,
            body: self.delivery.data.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::message::Delivery;
    use lapin::types::{FieldArray, LongString};
    use taskmill_core::HeaderValue;

    use crate::convert;

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v.as_bytes()))
    }

    #[test]
    fn replay_resets_attempt_and_drops_annotations() {
        let mut headers = FieldTable::default();
        headers.insert("taskmill-kind".into(), s("k"));
        headers.insert("taskmill-attempt".into(), AMQPValue::LongLongInt(4));
        headers.insert("taskmill-dead-reason".into(), s("handler_error"));
        headers.insert("taskmill-dead-at-ms".into(), AMQPValue::LongLongInt(5));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        headers.insert("traceparent".into(), s("tp"));
        headers.insert(
            "taskmill-first-failed-at-ms".into(),
            AMQPValue::LongLongInt(3),
        );
        let mut delivery =
            Delivery::mock(1, "taskmill".into(), "q.dead".into(), false, b"{}".to_vec());
        delivery.properties = lapin::BasicProperties::default()
            .with_message_id("job-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(7)
            .with_headers(headers);
        let out = Browsed { delivery }.replay_to("q");
        assert_eq!(out.exchange, EXCHANGE);
        assert_eq!(out.routing_key, "q");
        assert_eq!(out.body, b"{}");
        let p = &out.properties;
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("job-1"));
        assert_eq!(*p.timestamp(), Some(7));
        assert_eq!(*p.delivery_mode(), Some(2));
        let names: Vec<&str> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "taskmill-attempt",
                "taskmill-kind",
                "taskmill-replay",
                "traceparent"
            ]
        );
        assert_eq!(
            convert::lookup(p.headers().as_ref(), "taskmill-attempt"),
            Some(HeaderValue::Int(1))
        );
    }

    #[test]
    fn celery_replay_resets_retries_and_drops_eta_and_expires() {
        let mut headers = FieldTable::default();
        headers.insert("task".into(), s("reports.render"));
        headers.insert("id".into(), s("t-1"));
        headers.insert("retries".into(), AMQPValue::LongLongInt(3));
        headers.insert("eta".into(), s("2024-05-01T12:00:00+00:00"));
        headers.insert("expires".into(), s("2024-05-01T12:00:01+00:00"));
        headers.insert("taskmill-dead-reason".into(), s("expired"));
        headers.insert("taskmill-dead-attempts".into(), AMQPValue::LongLongInt(4));
        let mut delivery = Delivery::mock(
            1,
            "taskmill".into(),
            "celery.dead".into(),
            false,
            b"[[], {}, {}]".to_vec(),
        );
        delivery.properties = lapin::BasicProperties::default()
            .with_correlation_id("t-1".into())
            .with_content_type("application/json".into())
            .with_expiration("60000".into())
            .with_headers(headers);
        let msg = Browsed { delivery };
        assert!(msg.is_celery());
        assert_eq!(msg.kind().as_deref(), Some("reports.render"));
        let out = msg.replay_to("celery");
        let p = &out.properties;
        let names: Vec<&str> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(names, ["id", "retries", "task", "taskmill-replay"]);
        assert_eq!(
            convert::lookup(p.headers().as_ref(), "retries"),
            Some(HeaderValue::Int(0))
        );
        assert_eq!(p.expiration(), &None);
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("t-1"));
    }
}
