//! Error type of the store. URLs in its messages are redacted by `taskmill_core::redact`.

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

    /// An argument the database cannot store (a NUL character in a key, owner or job id).
    /// Permanent: the same input can never succeed, so do not retry it.
    #[error("invalid {what} for the store: {reason}")]
    InvalidInput {
        /// Which argument (`"idempotency key"`, `"owner"`, `"job id"`, ...).
        what: &'static str,
        /// Why it was refused.
        reason: String,
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
    pub(crate) fn db(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
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

#[cfg(test)]
mod tests {
    // The redaction lives in taskmill-core; these keep the store's own expectations of it.
    use proptest::prelude::*;
    use taskmill_core::redact::{redact_url, scrub};

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
