//! How the CLI reports a failure: one line, each cause once, with the remedy
//! where one is known, and the exit status.
//!
//! Exit statuses: 0 ok; 1 a runtime failure (the broker, the store, a refused
//! job); 2 a usage error (clap's own, and a configuration that does not
//! parse or validate); 130 a second Ctrl-C / SIGTERM during a drain.

use std::process::ExitCode;

use taskmill_core::config::ConfigError;

/// Exit status of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a usage or configuration error (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// The error's message and its causes on one line, each cause once: an
/// error whose own message already includes its source (`X: {source}`) is
/// not followed by that source again.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

/// What to do about a failure, where it is known.
pub fn remedy(line: &str) -> Option<String> {
    if line.contains("start a worker") {
        // The error already says what to do.
        return None;
    }
    if let Some(rest) = line.split("no exchange '").nth(1) {
        let exchange = rest.split('\'').next().unwrap_or("taskmill");
        let vhost = rest
            .split("in vhost '")
            .nth(1)
            .and_then(|v| v.split('\'').next())
            .unwrap_or("/");
        return Some(format!(
            "exchange `{exchange}` does not exist in vhost `{vhost}`: start a worker for the queue \
             first, it declares the topology"
        ));
    }
    if line.contains("vhost") && line.contains("not found") {
        return Some(
            "the vhost in the URL does not exist: fix the URL's path (`%2f` is `/`) or create it \
             with `rabbitmqctl add_vhost NAME`"
                .into(),
        );
    }
    if line.contains("ACCESS_REFUSED") || line.contains("ACCESS-REFUSED") {
        return Some(
            "the broker refused the user or password: check them (TASKMILL_AMQP_URL_FILE, \
             amqp_password_file) and the user's permissions on the vhost"
                .into(),
        );
    }
    if line.contains("Connection refused") {
        return Some(
            "nothing listens there: is RabbitMQ running, and do amqp_url / TASKMILL_AMQP_URL name \
             its host and port?"
                .into(),
        );
    }
    None
}

/// Prints the failure to stderr (`error: ...`, then `hint: ...` where a
/// remedy is known) and returns its exit status.
pub fn report(e: &anyhow::Error) -> ExitCode {
    let line = one_line(e);
    eprintln!("error: {line}");
    if let Some(hint) = remedy(&line) {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(exit_status(e))
}

/// 2 for a configuration error, 1 for anything else.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    if e.chain()
        .any(|c| c.is::<ConfigError>() || c.is::<UsageError>())
    {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

/// A usage error found after clap parsed the arguments (a config file that
/// cannot be read, say): reported with exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to the broker at amqp://h: {source}")]
    struct Outer {
        #[source]
        source: Middle,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("protocol error: {source}")]
    struct Middle {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = anyhow::Error::new(Outer {
            source: Middle {
                source: std::io::Error::other("Connection refused (os error 111)"),
            },
        });
        assert_eq!(
            one_line(&e),
            "cannot connect to the broker at amqp://h: protocol error: Connection refused (os error 111)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }

    #[test]
    fn known_failures_have_a_remedy() {
        let r = remedy("publish failed: NOT_FOUND - no exchange 'taskmill' in vhost 'x'").unwrap();
        assert!(
            r.starts_with("exchange `taskmill` does not exist in vhost `x`: start a worker"),
            "{r}"
        );
        assert!(
            remedy("NOT_ALLOWED - vhost nosuch not found")
                .unwrap()
                .contains("add_vhost")
        );
        assert!(
            remedy("ACCESS_REFUSED - Login was refused")
                .unwrap()
                .contains("password")
        );
        assert!(
            remedy("Connection refused (os error 111)")
                .unwrap()
                .contains("RabbitMQ running")
        );
        assert_eq!(remedy("something else"), None);
    }

    #[test]
    fn config_errors_are_usage_errors() {
        let config = anyhow::Error::new(ConfigError::Invalid {
            key: "prefetch".into(),
            message: "bad".into(),
        });
        assert_eq!(exit_status(&config), EXIT_USAGE);
        assert_eq!(
            exit_status(&anyhow::Error::new(UsageError("x".into()))),
            EXIT_USAGE
        );
        assert_eq!(exit_status(&anyhow::anyhow!("broker down")), EXIT_FAILURE);
    }
}
