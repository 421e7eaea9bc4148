//! Credentials never reach logs, metrics or `config show`: every URL that may
//! carry a password goes through [`redact_url`] before it is displayed.

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
///
/// Strings without a password are returned unchanged.
///
/// ```
/// use taskmill_core::redact::redact_url;
/// assert_eq!(redact_url("amqp://guest:guest@localhost:5672/%2f"), "amqp://guest:***@localhost:5672/%2f");
/// assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    // The authority ends at the first '/', '?' or '#'; userinfo is before its last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_string();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::redact_url;

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
}
