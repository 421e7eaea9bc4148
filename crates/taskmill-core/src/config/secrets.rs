//! Secrets from files, the Kubernetes and Docker secrets convention:
//!
//! - `TASKMILL_AMQP_URL_FILE` / `TASKMILL_STORE_URL_FILE`: a file holding the
//!   whole URL, instead of `TASKMILL_AMQP_URL` / `TASKMILL_STORE_URL`;
//! - `amqp_password_file` / `store_password_file` (keys, and their
//!   `TASKMILL_*` variables): a file holding only the password, put into the
//!   URL's user-info (`%`-encoded) by [`Config::resolve_secrets`], so the URL
//!   itself can sit in a ConfigMap.
//!
//! Core does no IO: the caller passes the function that reads a file. A
//! file's trailing line break is dropped (`echo pw > file` and most secret
//! stores write one); nothing else of its text is changed. Errors name the
//! variable or key and the file, never the file's content.

use std::path::Path;

use super::{Config, ConfigError};
use crate::redact::redact_url;

/// Reads a file's text: `std::fs::read_to_string` in the binary, a map in
/// tests.
pub type ReadFile<'a> = &'a dyn Fn(&Path) -> std::io::Result<String>;

/// The `*_FILE` variables, each with the variable whose value its file holds.
pub const FILE_ENV: &[(&str, &str)] = &[
    ("TASKMILL_AMQP_URL_FILE", "TASKMILL_AMQP_URL"),
    ("TASKMILL_STORE_URL_FILE", "TASKMILL_STORE_URL"),
];

/// The text of a secret file, its trailing line break dropped. `what` names
/// the variable or key in errors.
pub(super) fn read_secret(
    read: ReadFile<'_>,
    path: &Path,
    what: &str,
) -> Result<String, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: what.to_string(),
        message,
    };
    let text = read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let value = text.strip_suffix('\n').unwrap_or(&text);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(invalid(format!("{} is empty", path.display())));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(invalid(format!(
            "{} holds more than one line; a secret file holds one value",
            path.display()
        )));
    }
    Ok(value.to_string())
}

/// `%`-encodes everything in `s` but RFC 3986's unreserved characters, as
/// the user-info of a URL needs (`/ ? # @ :` and `%` included).
fn encode_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `url` with `password` put into its user-info. The URL must name a user
/// and carry no password already (two sources of one secret would leave the
/// reader guessing which wins).
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let Some(scheme_end) = url.find("://") else {
        return Err(format!("`{}` is not a URL with a user", redact_url(url)));
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return Err(format!(
            "`{}` names no user: write it as scheme://USER@host/...",
            redact_url(url)
        ));
    };
    let user = &authority[..at];
    if user.contains(':') {
        return Err(format!(
            "`{}` already has a password; give it in one place only",
            redact_url(url)
        ));
    }
    if user.is_empty() {
        return Err(format!("`{}` has an empty user name", redact_url(url)));
    }
    let mut out = String::with_capacity(url.len() + password.len() * 3 + 1);
    out.push_str(&url[..start]);
    out.push_str(user);
    out.push(':');
    out.push_str(&encode_userinfo(password));
    out.push_str(&url[start + at..]);
    Ok(out)
}

impl Config {
    /// Puts the passwords of `amqp_password_file` and `store_password_file`
    /// into their URLs. Call once, after the file, the environment and the
    /// flags are applied; `config show` still shows the file keys and
    /// redacts the URLs.
    pub fn resolve_secrets(&mut self, read: ReadFile<'_>) -> Result<(), ConfigError> {
        if let Some(path) = self.amqp_password_file.clone() {
            let password = read_secret(read, &path, "amqp_password_file")?;
            self.amqp_url = with_password(&self.amqp_url, &password).map_err(|message| {
                ConfigError::Invalid {
                    key: "amqp_password_file".into(),
                    message: format!("cannot apply it to amqp_url: {message}"),
                }
            })?;
        }
        if let Some(path) = self.store_password_file.clone() {
            let invalid = |message: String| ConfigError::Invalid {
                key: "store_password_file".into(),
                message,
            };
            let Some(url) = self.store_url.as_deref() else {
                return Err(invalid("needs a postgres:// store_url".into()));
            };
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid(format!(
                    "needs a postgres:// store_url, got `{}`",
                    redact_url(url)
                )));
            }
            let password = read_secret(read, &path, "store_password_file")?;
            let url = with_password(url, &password)
                .map_err(|m| invalid(format!("cannot apply it to store_url: {m}")))?;
            self.store_url = Some(url);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use proptest::prelude::*;

    use super::*;

    fn files(entries: &[(&str, &str)]) -> impl Fn(&Path) -> std::io::Result<String> {
        let map: HashMap<PathBuf, String> = entries
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        move |p: &Path| {
            map.get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn a_password_with_url_characters_is_encoded_and_redacted() {
        let url = with_password("amqp://app@rabbit:5671/prod", "p/a?s#s@w:o%rd").unwrap();
        assert_eq!(
            url,
            "amqp://app:p%2Fa%3Fs%23s%40w%3Ao%25rd@rabbit:5671/prod"
        );
        assert_eq!(redact_url(&url), "amqp://app:***@rabbit:5671/prod");
    }

    #[test]
    fn a_url_without_user_or_with_a_password_is_refused() {
        assert!(
            with_password("amqp://rabbit/x", "pw")
                .unwrap_err()
                .contains("names no user")
        );
        let e = with_password("amqp://app:old@rabbit/x", "pw").unwrap_err();
        assert!(
            e.contains("already has a password") && !e.contains("old"),
            "{e}"
        );
        assert!(with_password("rabbit", "pw").is_err());
    }

    #[test]
    fn resolve_reads_both_password_files() {
        let mut c = Config {
            amqp_url: "amqps://app@mq.example/%2f".into(),
            amqp_password_file: Some("/run/secrets/amqp".into()),
            store_url: Some("postgres://jobs@db/jobs?sslmode=verify-full".into()),
            store_password_file: Some("/run/secrets/pg".into()),
            ..Config::default()
        };
        let read = files(&[
            ("/run/secrets/amqp", "s3cr@t\n"),
            ("/run/secrets/pg", "pg pw\r\n"),
        ]);
        c.resolve_secrets(&read).unwrap();
        assert_eq!(c.amqp_url, "amqps://app:s3cr%40t@mq.example/%2f");
        assert_eq!(
            c.store_url.as_deref(),
            Some("postgres://jobs:pg%20pw@db/jobs?sslmode=verify-full")
        );
        let shown = c.to_redacted_toml();
        assert!(
            !shown.contains("s3cr") && !shown.contains("pg%20pw"),
            "{shown}"
        );
        assert!(shown.contains("/run/secrets/amqp"), "{shown}");
    }

    #[test]
    fn resolve_errors_name_the_key_and_file_not_the_secret() {
        let read = files(&[
            ("/s/multi", "line1\nline2\n"),
            ("/s/empty", "\n"),
            ("/s/pw", "hunter2"),
        ]);
        let cases = [
            (
                Some("/s/missing"),
                None,
                "amqp_password_file",
                "cannot read /s/missing",
            ),
            (
                Some("/s/empty"),
                None,
                "amqp_password_file",
                "/s/empty is empty",
            ),
            (
                Some("/s/multi"),
                None,
                "amqp_password_file",
                "more than one line",
            ),
            (
                None,
                Some("/s/pw"),
                "store_password_file",
                "needs a postgres:// store_url",
            ),
        ];
        for (amqp, store, key, want) in cases {
            let mut c = Config {
                amqp_url: "amqp://app@h/".into(),
                amqp_password_file: amqp.map(PathBuf::from),
                store_password_file: store.map(PathBuf::from),
                ..Config::default()
            };
            let e = c.resolve_secrets(&read).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(want), "{e}");
            assert!(!e.contains("line1") && !e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn url_file_variables_set_the_url_and_exclude_the_plain_variable() {
        let read = files(&[
            ("/run/secrets/url", "amqps://app:pw@mq:5671/%2f\n"),
            ("/run/secrets/pg", "postgres://u:p@db/x"),
        ]);
        let mut c = Config::default();
        c.apply_env(
            [
                (
                    "TASKMILL_AMQP_URL_FILE".to_string(),
                    "/run/secrets/url".to_string(),
                ),
                (
                    "TASKMILL_STORE_URL_FILE".to_string(),
                    "/run/secrets/pg".to_string(),
                ),
                (
                    "TASKMILL_AMQP_PASSWORD_FILE".to_string(),
                    "/run/secrets/amqp".to_string(),
                ),
            ],
            &read,
        )
        .unwrap();
        assert_eq!(c.amqp_url, "amqps://app:pw@mq:5671/%2f");
        assert_eq!(c.store_url.as_deref(), Some("postgres://u:p@db/x"));
        assert_eq!(
            c.amqp_password_file,
            Some(PathBuf::from("/run/secrets/amqp"))
        );

        let both = Config::default()
            .apply_env(
                [
                    (
                        "TASKMILL_AMQP_URL_FILE".to_string(),
                        "/run/secrets/url".to_string(),
                    ),
                    ("TASKMILL_AMQP_URL".to_string(), "amqp://h".to_string()),
                ],
                &read,
            )
            .unwrap_err()
            .to_string();
        assert!(
            both.contains("TASKMILL_AMQP_URL_FILE") && both.contains("only one"),
            "{both}"
        );
        let missing = Config::default()
            .apply_env(
                [("TASKMILL_STORE_URL_FILE".to_string(), "/nope".to_string())],
                &read,
            )
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("TASKMILL_STORE_URL_FILE") && missing.contains("/nope"),
            "{missing}"
        );
    }

    proptest! {
        /// Any password survives the trip into the URL: the user-info decodes
        /// back to it, the host and path are untouched, and redaction hides
        /// all of it.
        #[test]
        fn any_password_round_trips_and_is_hidden(pw in "[ -~]{1,24}") {
            let url = with_password("amqp://app@rabbit:5672/vh?heartbeat=10", &pw).unwrap();
            let (userinfo, tail) = url["amqp://".len()..].rsplit_once('@').unwrap();
            prop_assert_eq!(tail, "rabbit:5672/vh?heartbeat=10");
            let encoded = userinfo.strip_prefix("app:").unwrap();
            prop_assert_eq!(crate::redact::percent_decode(encoded), pw.clone());
            prop_assert_eq!(redact_url(&url), "amqp://app:***@rabbit:5672/vh?heartbeat=10");
        }
    }
}
