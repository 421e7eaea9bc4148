//! Error type of the store and the URL redaction used by every message that mentions a URL.

/// Everything that can go wrong in the store.
///
/// Only [`StoreError::LeaseLost`] is part of the normal protocol (the caller lost the race
/// and must not ack as if it had recorded the outcome); the other variants are faults.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The claim named by a [`ClaimToken`](crate::ClaimToken) is no longer held by its owner at
    /// its fencing epoch: the lease expired and another worker took it over, or the key was
    /// released, failed, completed or forgotten meanwhile. Nothing was written.
    #[error(
        "lease lost for idempotency key {key:?}: the claim was taken over, released or forgotten; nothing was written"
    )]
    LeaseLost {
        /// The idempotency key whose lease was lost.
        key: String,
    },

    /// A database operation failed. `op` names the store operation (`"claim"`, `"commit"`, ...).
    #[error("store database error during {op}: {source}")]
    Database {
        /// The store operation that failed.
        op: &'static str,
        /// The underlying driver error.
        #[source]
        source: sqlx::Error,
    },

    /// Applying the embedded schema migrations failed.
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The store URL is not usable. The message names the accepted schemes and never contains
    /// a password.
    #[error("{0}")]
    BadUrl(String),

    /// A JSON column (`result` or `error`) holds text that is not valid JSON (hand-edited row?).
    #[error("stored {column} for idempotency key {key:?} is not valid JSON: {source}")]
    CorruptJson {
        /// The idempotency key of the row.
        key: String,
        /// `"result"` or `"error"`.
        column: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A row holds a value the store never writes (unknown state, negative attempts...).
    #[error("store row for idempotency key {key:?} is inconsistent: {detail}")]
    Corrupt {
        /// The idempotency key of the row.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

impl StoreError {
    /// Wraps a driver error with the name of the operation that failed.
    pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Database { op, source }
    }

    /// True for errors that may go away by themselves (connection trouble, pool timeouts,
    /// SQLite busy/locked, PostgreSQL serialization failure, deadlock or shutdown): the caller
    /// should treat the job as retryable rather than failed.
    pub fn is_transient(&self) -> bool {
        let StoreError::Database { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // SQLite primary result codes 5 (BUSY) and 6 (LOCKED) and their extended
                // codes (low byte); PostgreSQL SQLSTATE classes 08 (connection), 40
                // (transaction rollback: serialization, deadlock), 53 (resources),
                // 57P0x (shutdown / crash recovery).
                if let Ok(n) = code.parse::<i64>() {
                    matches!(n & 0xff, 5 | 6)
                } else {
                    code.starts_with("08")
                        || code.starts_with("40")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                }
            }
            _ => false,
        }
    }
}

/// The message for an unsupported or malformed URL. `url` must already be redacted.
pub(crate) fn bad_url(redacted_url: &str, why: &str) -> StoreError {
    StoreError::BadUrl(format!(
        "invalid store URL {redacted_url:?}: {why}; expected sqlite://path/to/file.db \
         (created if missing), sqlite::memory: (tests only), or \
         postgres://user@host:port/database (also postgresql://)"
    ))
}

/// Returns `url` with any password removed, so it can be logged or put in an error.
///
/// `scheme://user:secret@host/db` becomes `scheme://user:***@host/db`, and the value of a
/// `password=` query parameter becomes `***`. Text that does not look like a URL is returned
/// unchanged apart from the same query-parameter rule.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (before_query, query) = match url.find('?') {
        Some(i) => (&url[..i], Some(&url[i + 1..])),
        None => (url, None),
    };
    match before_query.find("://") {
        Some(i) => {
            let (scheme, rest) = (&before_query[..i + 3], &before_query[i + 3..]);
            out.push_str(scheme);
            // The authority ends at the first '/'; the user info ends at the last '@' in it
            // (a password may itself contain an unescaped '@').
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            match authority.rfind('@') {
                Some(at) => {
                    let userinfo = &authority[..at];
                    match userinfo.find(':') {
                        Some(colon) => {
                            out.push_str(&userinfo[..colon]);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push_str(&authority[at..]);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

/// Removes every occurrence of the secrets found in `url` from `message`.
///
/// Driver errors are not ours; this is the belt to [`redact_url`]'s braces for any message
/// produced while connecting with a URL that holds a password.
pub(crate) fn scrub(message: &str, url: &str) -> String {
    let mut out = message.to_owned();
    for secret in secrets_in(url) {
        if !secret.is_empty() {
            out = out.replace(&secret, "***");
        }
    }
    out
}

fn secrets_in(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let before_query = url.split('?').next().unwrap_or(url);
    if let Some(i) = before_query.find("://") {
        let rest = &before_query[i + 3..];
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@')
            && let Some((_, pass)) = authority[..at].split_once(':')
        {
            secrets.push(pass.to_owned());
            secrets.push(percent_decode(pass));
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for kv in query.split('&') {
            if let Some((k, v)) = kv.split_once('=')
                && k.eq_ignore_ascii_case("password")
            {
                secrets.push(v.to_owned());
                secrets.push(percent_decode(v));
            }
        }
    }
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redacts_password_keeps_user_host_db() {
        assert_eq!(
            redact_url("postgres://alice:s3cr3t@db.example:5432/jobs?sslmode=disable"),
            "postgres://alice:***@db.example:5432/jobs?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://alice@db/jobs"),
            "postgres://alice@db/jobs"
        );
        assert_eq!(
            redact_url("postgres://db/jobs?user=a&password=hunter2"),
            "postgres://db/jobs?user=a&password=***"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(redact_url("p://u:a@b@h/d"), "p://u:***@h/d");
    }

    #[test]
    fn scrub_removes_raw_and_decoded_password() {
        let url = "postgres://u:p%40ss@h/d";
        assert_eq!(scrub("x p%40ss y p@ss z", url), "x *** y *** z");
    }

    proptest! {
        #[test]
        fn redacted_url_never_contains_the_password(
            user in "[a-z]{1,8}",
            pass in "[A-Z0-9@:!%_.~-]{6,20}",
            host in "[a-z]{1,10}",
            db in "[a-z]{1,10}",
        ) {
            let url = format!("postgres://{user}:{pass}@{host}:5432/{db}");
            let red = redact_url(&url);
            prop_assert!(!red.contains(&pass), "{red}");
            prop_assert!(red.contains(&host) && red.contains(&db) && red.starts_with("postgres://"));
            let msg = format!("connecting to {url} failed: password {pass} rejected");
            prop_assert!(!scrub(&msg, &url).contains(&pass));
        }
    }
}
