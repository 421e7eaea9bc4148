//! Log setup: `tracing` to stderr, as text or JSON lines.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `filter` is an env-filter directive such
/// as `info` or `taskmill=debug,lapin=warn`; `RUST_LOG` wins when set.
/// Returns an error when the directive does not parse.
pub fn init(json: bool, filter: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(filter).map_err(|e| format!("log_level `{filter}`: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
    // A subscriber already installed (tests, embedding apps) is not an error.
    let _ = result;
    Ok(())
}
