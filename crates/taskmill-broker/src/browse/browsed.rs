//! [`Browsed`]: one message a [`Browser`](super::Browser) holds, and what it
//! says about itself (properties, headers, `x-death`, its kind).

use lapin::message::Delivery;
use taskmill_core::HeaderValue;
use taskmill_core::celery;
use taskmill_core::wire::H_KIND;

use super::XDeath;
use crate::convert;

/// A message taken by a [`Browser`](super::Browser); held (unacked) until
/// the browser acks or requeues it.
pub struct Browsed {
    pub(super) delivery: Delivery,
}

impl std::fmt::Debug for Browsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browsed")
            .field("message_id", &self.message_id())
            .field("tag", &self.delivery.delivery_tag)
            .finish()
    }
}

impl Browsed {
    /// `message_id` (the job id).
    pub fn message_id(&self) -> Option<&str> {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `content_type`.
    pub fn content_type(&self) -> Option<&str> {
        self.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// `timestamp`, seconds since the Unix epoch.
    pub fn timestamp(&self) -> Option<u64> {
        *self.delivery.properties.timestamp()
    }

    /// `delivery_mode` (2: persistent).
    pub fn delivery_mode(&self) -> Option<u8> {
        *self.delivery.properties.delivery_mode()
    }

    /// Whether the broker delivered this message before (a previous scan that
    /// requeued it counts).
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    /// The exchange it was published to (for a taskmill dead letter,
    /// `taskmill`; for a broker dead letter, the dead-letter exchange).
    pub fn exchange(&self) -> &str {
        self.delivery.exchange.as_str()
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        self.delivery.routing_key.as_str()
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    /// Every header, sorted by name. Tables and arrays (such as `x-death`)
    /// appear as [`HeaderValue::Other`]; see [`Browsed::x_death`].
    pub fn headers(&self) -> Vec<(String, HeaderValue)> {
        match self.delivery.properties.headers() {
            Some(t) => t
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), convert::from_amqp(v)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// A header by name.
    pub fn header(&self, name: &str) -> Option<HeaderValue> {
        convert::lookup(self.delivery.properties.headers().as_ref(), name)
    }

    /// A string header by name.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer header by name.
    pub fn header_int(&self, name: &str) -> Option<i64> {
        match self.header(name)? {
            HeaderValue::Int(n) => Some(n),
            _ => None,
        }
    }

    /// RabbitMQ's `x-death` entries, most recent first; empty when the broker
    /// did not dead-letter this message itself.
    pub fn x_death(&self) -> Vec<XDeath> {
        self.delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get("x-death"))
            .map(XDeath::decode)
            .unwrap_or_default()
    }

    /// Whether this is a Celery task message (protocol v2: a `task` header,
    /// no `taskmill-kind`).
    pub fn is_celery(&self) -> bool {
        let headers = self.delivery.properties.headers().as_ref();
        convert::lookup(headers, celery::H_TASK).is_some()
            && convert::lookup(headers, H_KIND).is_none()
    }

    /// The kind of job it holds: `taskmill-kind`, or a Celery task's name.
    pub fn kind(&self) -> Option<String> {
        self.header_str(H_KIND)
            .or_else(|| self.is_celery().then(|| self.header_str(celery::H_TASK))?)
    }
}
