//! Credentials never reach logs, metrics, errors or `config show`: every URL that may
//! carry a password goes through [`redact_url`] before it is displayed, and any text a
//! driver produced while using such a URL can go through [`scrub`].
//!
//! One rule decides what a secret is ([`secret_spans`]), and both functions apply it:
//!
//! - the password of the userinfo in `scheme://user:password@host/...` (the userinfo ends
//!   at the last `@` before the query, so a password with a raw `@` or `/` is hidden whole);
//! - the value of a query parameter whose name says it is a secret (`password`,
//!   `sslpassword`, `passwd`, `pwd`, `secret`, `token`, `api_key`..., any case,
//!   `%`-encoded names decoded first);
//! - in a PostgreSQL key=value connection string (`host=db password='a b'`), the value of
//!   such a key, quoted or not.
//!
//! Redacting too much is harmless; too little leaks, so ambiguous text is hidden.

use std::ops::Range;

/// What replaces every secret.
const MASK: &str = "***";

/// Returns `url` with every secret (see the module doc) replaced by `***`. The scheme,
/// user, host, port, path and other parameters stay readable. Pure: no IO.
///
/// ```
/// use taskmill_core::redact::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@localhost:5672/%2f"), "amqp://guest:***@localhost:5672/%2f");
/// assert_eq!(redact_url("postgres://db/x?user=a&sslpassword=k"), "postgres://db/x?user=a&sslpassword=***");
/// assert_eq!(redact_url("host=db password=s3cret"), "host=db password=***");
/// assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut last = 0;
    for span in secret_spans(url) {
        out.push_str(&url[last..span.start]);
        out.push_str(MASK);
        last = span.end;
    }
    out.push_str(&url[last..]);
    out
}

/// Removes from `message` every secret of `url`, as written and `%`-decoded, for text that
/// is not ours (a driver error) but may echo the URL or its password.
///
/// ```
/// use taskmill_core::redact::scrub;
/// let url = "postgres://u:p%40ss@h/d";
/// assert_eq!(scrub("auth failed for p@ss (p%40ss)", url), "auth failed for *** (***)");
/// ```
pub fn scrub(message: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    for span in secret_spans(url) {
        let raw = &url[span];
        secrets.push(raw.to_owned());
        secrets.push(percent_decode(raw));
    }
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = message.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), MASK);
    }
    out
}

/// Byte ranges of the secrets in `url`, in order and not overlapping (possibly empty, e.g.
/// `password=` with no value, so that the mask still shows a value was there).
pub fn secret_spans(url: &str) -> Vec<Range<usize>> {
    match url.find("://") {
        Some(i) => url_spans(url, i + 3),
        None => dsn_spans(url),
    }
}

/// Spans in a `scheme://...` URL whose authority starts at byte `start`.
fn url_spans(url: &str, start: usize) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let query_at = url[start..].find(['?', '#']).map(|i| start + i);
    let before_query = &url[start..query_at.unwrap_or(url.len())];
    if let Some(at) = before_query.rfind('@') {
        let userinfo = &before_query[..at];
        if let Some(colon) = userinfo.find(':') {
            spans.push(start + colon + 1..start + at);
        }
    }
    if let Some(q) = query_at.filter(|&q| url.as_bytes()[q] == b'?') {
        let query_end = url[q..].find('#').map_or(url.len(), |i| q + i);
        let mut pos = q + 1;
        for pair in url[q + 1..query_end].split('&') {
            if let Some((k, _)) = pair.split_once('=')
                && is_secret_name(&percent_decode(k))
            {
                spans.push(pos + k.len() + 1..pos + pair.len());
            }
            pos += pair.len() + 1;
        }
    }
    spans
}

/// Spans in a libpq key=value string: `key = value` pairs separated by whitespace, values
/// optionally single-quoted with `\` escapes.
fn dsn_spans(s: &str) -> Vec<Range<usize>> {
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            continue; // a bare word: not key=value text, nothing to hide in it
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        if is_secret_name(key) {
            spans.push(value_start..i);
        }
    }
    spans
}

/// Whether a parameter of this name holds a secret.
fn is_secret_name(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    [
        "pass", "pwd", "secret", "token", "api_key", "apikey", "auth",
    ]
    .iter()
    .any(|word| n.contains(word))
}

/// Decodes `%XX` escapes (invalid ones are kept as written).
pub(crate) fn percent_decode(s: &str) -> String {
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
    use super::{redact_url, scrub};
    use proptest::prelude::*;

    #[test]
    fn hides_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/jobs?sslmode=require"),
            "postgres://app:***@db:5432/jobs?sslmode=require"
        );
        assert_eq!(redact_url("amqp://user@host/vh"), "amqp://user@host/vh");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("amqp://h/v?x=a:b@c"), "amqp://h/v?x=a:b@c");
    }

    #[test]
    fn every_url_form() {
        let table = [
            // userinfo with and without password, empty user, empty password
            (
                "amqp://guest:guest@h:5672/%2f",
                "amqp://guest:***@h:5672/%2f",
            ),
            ("amqp://guest@h/", "amqp://guest@h/"),
            ("redis://:pw@localhost:6379", "redis://:***@localhost:6379"),
            ("postgres://u:@h/d", "postgres://u:***@h/d"),
            // raw '@' and '/' inside a password: hidden whole
            ("p://u:a@b@h/d", "p://u:***@h/d"),
            ("postgres://u:ab/cd+e=@h/d", "postgres://u:***@h/d"),
            // %-encoded password and user
            ("postgres://a%40b:p%3Ass@h/d", "postgres://a%40b:***@h/d"),
            // query parameters, any case, encoded names, with fragment
            (
                "postgres://db/jobs?user=a&password=hunter2",
                "postgres://db/jobs?user=a&password=***",
            ),
            (
                "postgres://db/j?sslpassword=k&sslmode=verify-full",
                "postgres://db/j?sslpassword=***&sslmode=verify-full",
            ),
            (
                "x://h/?PassWord=a&pass%77ord=b#f",
                "x://h/?PassWord=***&pass%77ord=***#f",
            ),
            ("x://h/?token=abc&api_key=z", "x://h/?token=***&api_key=***"),
            ("x://u:p@h/?password=", "x://u:***@h/?password=***"),
            // key=value connection strings
            (
                "host=db user=app password=s3cret dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db password = 'a b\\'c' port=5432",
                "host=db password = *** port=5432",
            ),
            // nothing secret
            ("sqlite://data/x.db", "sqlite://data/x.db"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("", ""),
        ];
        for (input, want) in table {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    #[test]
    fn scrub_removes_raw_and_decoded_secrets() {
        let url = "postgres://u:p%40ss@h/d?sslpassword=k3y";
        assert_eq!(scrub("x p%40ss y p@ss z k3y", url), "x *** y *** z ***");
        assert_eq!(scrub("nothing here", "sqlite://x.db"), "nothing here");
    }

    proptest! {
        #[test]
        fn userinfo_password_never_shown(
            user in "[a-z%0-9]{0,8}",
            pass in "[A-Za-z0-9@:!%_.~/+=-]{1,20}",
            host in "[a-z]{1,10}",
            db in "[a-z]{1,10}",
        ) {
            let url = format!("postgres://{user}:{pass}@{host}:5432/{db}?sslmode=require");
            let red = redact_url(&url);
            prop_assert_eq!(
                &red,
                &format!("postgres://{user}:***@{host}:5432/{db}?sslmode=require")
            );
            let msg = format!("connecting to {url} failed: password {pass} rejected");
            prop_assert!(!scrub(&msg, &url).contains(&pass));
        }

        #[test]
        fn secret_parameters_never_shown(
            name in "(password|sslpassword|PASSWD|pwd|token)",
            value in "[A-Za-z0-9:@/%!_.~+-]{1,20}",
            other in "[xyz]{1,6}",
        ) {
            let url = format!("postgres://h/d?{other}=1&{name}={value}&x=2");
            prop_assert_eq!(redact_url(&url), format!("postgres://h/d?{other}=1&{name}=***&x=2"));
            let dsn = format!("host=h {name}={value} dbname=d");
            prop_assert_eq!(redact_url(&dsn), format!("host=h {name}=*** dbname=d"));
        }

        #[test]
        fn text_without_secrets_is_unchanged(s in "[a-z0-9:/._-]{0,40}") {
            prop_assert_eq!(redact_url(&s), s);
        }
    }
}
