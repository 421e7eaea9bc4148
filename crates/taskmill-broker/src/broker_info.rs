//! What the broker says about itself at connect (`connection.start`'s
//! `server_properties`), and the features that follow from its version.
//!
//! Pure: [`BrokerInfo::from_server_properties`] reads a field table, the
//! feature methods compare versions. The bytes come from
//! [`crate::handshake`].

use std::collections::BTreeSet;

use lapin::types::{AMQPValue, FieldTable};

/// The broker's product, version and capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BrokerInfo {
    /// `product`, e.g. `RabbitMQ`; empty when the broker did not say.
    pub product: String,
    /// `version` as (major, minor, patch); (0, 0, 0) when missing or unreadable,
    /// which turns every version-gated feature off.
    pub version: (u32, u32, u32),
    /// `version` as sent (e.g. `3.13.0-rc.2`).
    pub version_text: String,
    /// `platform`, e.g. `Erlang/OTP 26.2`.
    pub platform: Option<String>,
    /// `cluster_name`.
    pub cluster_name: Option<String>,
    /// The `capabilities` the broker set to true (`publisher_confirms`,
    /// `connection.blocked`, `consumer_cancel_notify`, ...).
    pub capabilities: BTreeSet<String>,
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// `3.13.0-rc.2` -> (3, 13, 0); `4.1` -> (4, 1, 0). The leading digits of
/// each of the first three dot-separated parts count; a part with none
/// ends the version (`3.x` -> (3, 0, 0)). `None` without a major number.
pub fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.trim().split('.');
    let mut nums = [0u32; 3];
    for (i, slot) in nums.iter_mut().enumerate() {
        let Some(part) = parts.next() else { break };
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        match digits.parse() {
            Ok(n) => *slot = n,
            Err(_) if i == 0 => return None,
            Err(_) => break,
        }
        if digits.len() != part.len() {
            // `0-rc` or `0+build`: what follows is not a version part.
            break;
        }
    }
    Some((nums[0], nums[1], nums[2]))
}

impl BrokerInfo {
    /// Reads `server_properties`. Unknown or missing fields give the
    /// conservative default (no feature assumed).
    pub fn from_server_properties(props: &FieldTable) -> BrokerInfo {
        let inner = props.inner();
        let get = |k: &str| inner.get(k).and_then(text);
        let version_text = get("version").unwrap_or_default();
        let capabilities = match inner.get("capabilities") {
            Some(AMQPValue::FieldTable(caps)) => caps
                .inner()
                .iter()
                .filter(|(_, v)| matches!(v, AMQPValue::Boolean(true)))
                .map(|(k, _)| k.as_str().to_string())
                .collect(),
            _ => BTreeSet::new(),
        };
        BrokerInfo {
            product: get("product").unwrap_or_default(),
            version: parse_version(&version_text).unwrap_or((0, 0, 0)),
            version_text,
            platform: get("platform"),
            cluster_name: get("cluster_name"),
            capabilities,
        }
    }

    /// Whether the broker is RabbitMQ: the version rules below are
    /// RabbitMQ's, so another product gets none of the gated features.
    pub fn is_rabbitmq(&self) -> bool {
        self.product.eq_ignore_ascii_case("rabbitmq")
    }

    fn at_least(&self, v: (u32, u32, u32)) -> bool {
        self.is_rabbitmq() && self.version >= v
    }

    /// Whether the broker advertised `capability` as true.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.contains(capability)
    }

    /// Whether the broker tells clients it blocks them for flow control
    /// (`connection.blocked`); without it a blocked publisher just stalls.
    pub fn sends_connection_blocked(&self) -> bool {
        self.has_capability("connection.blocked")
    }

    /// RabbitMQ 3.12+: `x-consumer-timeout` on a queue (or the
    /// `consumer-timeout` policy) overrides the broker-wide consumer timeout.
    /// Older brokers ignore the argument.
    pub fn supports_per_queue_consumer_timeout(&self) -> bool {
        self.at_least((3, 12, 0))
    }

    /// The delivery limit a quorum queue has when none is declared:
    /// 20 from RabbitMQ 4.0 (a message returned more often is dropped or
    /// dead-lettered), none before.
    pub fn quorum_delivery_limit_default(&self) -> Option<u32> {
        self.at_least((4, 0, 0)).then_some(20)
    }

    /// RabbitMQ 4.0+: quorum queues honour message priorities without
    /// `x-max-priority`.
    pub fn quorum_native_priorities(&self) -> bool {
        self.at_least((4, 0, 0))
    }

    /// RabbitMQ 3.10+: quorum queues dead-letter at-least-once
    /// (`x-dead-letter-strategy: at-least-once` with `x-overflow:
    /// reject-publish`), so a dead letter is never dropped on the way.
    pub fn supports_at_least_once_dead_lettering(&self) -> bool {
        self.at_least((3, 10, 0))
    }
}

impl std::fmt::Display for BrokerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let product = if self.product.is_empty() {
            "unknown broker"
        } else {
            &self.product
        };
        f.write_str(product)?;
        if !self.version_text.is_empty() {
            write!(f, " {}", self.version_text)?;
        }
        if let Some(p) = &self.platform {
            write!(f, " on {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    fn rabbit(version: &str) -> BrokerInfo {
        let mut caps = FieldTable::default();
        caps.insert("publisher_confirms".into(), AMQPValue::Boolean(true));
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        caps.insert("direct_reply_to".into(), AMQPValue::Boolean(false));
        let mut props = FieldTable::default();
        props.insert("product".into(), long("RabbitMQ"));
        props.insert("version".into(), long(version));
        props.insert("platform".into(), long("Erlang/OTP 26.2"));
        props.insert("cluster_name".into(), long("rabbit@host"));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        BrokerInfo::from_server_properties(&props)
    }

    #[test]
    fn versions_parse_with_suffixes_and_missing_parts() {
        assert_eq!(parse_version("3.10.8"), Some((3, 10, 8)));
        assert_eq!(parse_version("3.13.0-rc.2"), Some((3, 13, 0)));
        assert_eq!(parse_version("4.0.0+1.g1234"), Some((4, 0, 0)));
        assert_eq!(parse_version("4.1"), Some((4, 1, 0)));
        assert_eq!(parse_version("4"), Some((4, 0, 0)));
        assert_eq!(parse_version("3.x"), Some((3, 0, 0)));
        assert_eq!(parse_version(" 3.12.1 "), Some((3, 12, 1)));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn server_properties_are_read() {
        let info = rabbit("3.12.4");
        assert_eq!(info.product, "RabbitMQ");
        assert_eq!(info.version, (3, 12, 4));
        assert_eq!(info.version_text, "3.12.4");
        assert_eq!(info.platform.as_deref(), Some("Erlang/OTP 26.2"));
        assert_eq!(info.cluster_name.as_deref(), Some("rabbit@host"));
        assert!(info.has_capability("publisher_confirms"));
        assert!(info.sends_connection_blocked());
        assert!(
            !info.has_capability("direct_reply_to"),
            "false is not a capability"
        );
        assert_eq!(info.to_string(), "RabbitMQ 3.12.4 on Erlang/OTP 26.2");
    }

    #[test]
    fn features_follow_the_version() {
        let v310 = rabbit("3.10.8");
        assert!(v310.supports_at_least_once_dead_lettering());
        assert!(!v310.supports_per_queue_consumer_timeout());
        assert_eq!(v310.quorum_delivery_limit_default(), None);
        assert!(!v310.quorum_native_priorities());

        assert!(!rabbit("3.9.29").supports_at_least_once_dead_lettering());
        assert!(!rabbit("3.11.28").supports_per_queue_consumer_timeout());
        assert!(rabbit("3.12.0").supports_per_queue_consumer_timeout());
        assert_eq!(rabbit("3.13.7").quorum_delivery_limit_default(), None);

        let v40 = rabbit("4.0.0-beta.1");
        assert_eq!(v40.quorum_delivery_limit_default(), Some(20));
        assert!(v40.quorum_native_priorities());
        assert!(v40.supports_per_queue_consumer_timeout());
        assert!(v40.supports_at_least_once_dead_lettering());
    }

    #[test]
    fn unknown_brokers_get_no_gated_feature() {
        let mut props = FieldTable::default();
        props.insert("product".into(), long("LavinMQ"));
        props.insert("version".into(), long("4.2.0"));
        let other = BrokerInfo::from_server_properties(&props);
        assert!(!other.is_rabbitmq());
        assert_eq!(other.quorum_delivery_limit_default(), None);
        assert!(!other.supports_at_least_once_dead_lettering());

        let empty = BrokerInfo::from_server_properties(&FieldTable::default());
        assert_eq!(empty, BrokerInfo::default());
        assert_eq!(empty.version, (0, 0, 0));
        assert!(!empty.supports_per_queue_consumer_timeout());
        assert_eq!(empty.to_string(), "unknown broker");
    }
}
