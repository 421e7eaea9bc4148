//! Durations in the config file and the environment: every `*_ms` key takes
//! an integer of milliseconds (`30000`) or a humantime string (`"30s"`,
//! `"5m"`, `"1h 30m"`, `"250ms"`), and can also be written without its
//! `_ms` suffix (`shutdown_grace = "30s"`). `config show` prints the
//! milliseconds.

use serde::Deserializer;
use serde::de::{self, Visitor};

/// Milliseconds from `"1500"` or a humantime duration (`"1.5s"` is not
/// humantime; `"1s 500ms"` is).
pub fn parse_ms(v: &str) -> Result<u64, String> {
    let v = v.trim();
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n);
    }
    let d = humantime::parse_duration(v).map_err(|e| {
        format!(
            "invalid duration `{v}`: {e} (write milliseconds, or e.g. \"30s\", \"5m\", \"250ms\")"
        )
    })?;
    u64::try_from(d.as_millis()).map_err(|_| format!("duration `{v}` is too long"))
}

struct Ms;

impl Visitor<'_> for Ms {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("milliseconds, or a duration such as \"30s\" or \"5m\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("a duration cannot be negative, got {v}")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_ms(v).map_err(E::custom)
    }
}

/// `#[serde(deserialize_with)]` for a `u64` of milliseconds.
pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Ms)
}

/// `#[serde(deserialize_with)]` for an `Option<u64>` of milliseconds (the
/// key, when present, always has a value in TOML).
pub fn opt_ms<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Ms).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_environment_take_both_forms() {
        let c = crate::config::Config::from_toml(
            "shutdown_grace = \"45s\"\njob_timeout_ms = 1000\nlease_ms = \"20s\"\n\n[kind.\"k\"]\ntimeout = \"2m\"\nbackoff_max_ms = 500\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(
            (c.shutdown_grace_ms, c.job_timeout_ms, c.lease_ms),
            (45_000, 1000, 20_000)
        );
        assert_eq!(c.kind["k"].timeout_ms, Some(120_000));
        assert_eq!(c.kind["k"].backoff_max_ms, Some(500));
        assert_eq!(c.kind["k"].backoff_base_ms, None);
        let shown = c.to_redacted_toml();
        assert!(shown.contains("shutdown_grace_ms = 45000"), "{shown}");

        let e = crate::config::Config::from_toml(
            "heartbeat = \"often\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("often") && e.contains("line 1"), "{e}");

        let mut c = crate::config::Config::default();
        c.apply_env(
            [("TASKMILL_SHUTDOWN_GRACE_MS".to_string(), "1m".to_string())],
            &crate::config::no_files,
        )
        .unwrap();
        assert_eq!(c.shutdown_grace_ms, 60_000);
    }

    #[test]
    fn parses_integers_and_humantime() {
        assert_eq!(parse_ms("1500"), Ok(1500));
        assert_eq!(parse_ms("30s"), Ok(30_000));
        assert_eq!(parse_ms("5m"), Ok(300_000));
        assert_eq!(parse_ms("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_ms(" 250ms "), Ok(250));
        let e = parse_ms("soon").unwrap_err();
        assert!(e.contains("`soon`") && e.contains("\"30s\""), "{e}");
        assert!(parse_ms("-5").is_err());
    }
}
