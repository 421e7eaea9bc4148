//! The one-call setup the binary uses: logs to stderr (text or JSON lines
//! with trace ids) and, when `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set,
//! span export over OTLP. A thin wrapper over [`crate::traces::init`] that
//! keeps the guard itself; call [`shutdown`] before the process exits so the
//! last spans are sent.

use std::sync::Mutex;

use crate::traces::{self, TelemetryGuard, TracingError, TracingOptions};

static GUARD: Mutex<Option<TelemetryGuard>> = Mutex::new(None);

/// Installs the global subscriber. `filter` is an env-filter directive such
/// as `info` or `taskmill=debug,lapin=warn`; `RUST_LOG` wins when set.
/// Returns an error when a directive or an `OTEL_*` variable is unusable.
/// A subscriber already installed (tests, embedding apps) is not an error.
pub fn init(json: bool, filter: &str) -> Result<(), String> {
    let opts = TracingOptions::from_env(json, filter).map_err(|e| e.to_string())?;
    match traces::init(opts) {
        Ok(guard) => {
            *GUARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
            Ok(())
        }
        Err(TracingError::AlreadyInstalled) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Flushes and stops the span export [`init`] started (a no-op without one).
/// Blocks until the last batch is sent or 5 s pass.
pub fn shutdown() {
    let guard = GUARD.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(Err(e)) = guard.map(TelemetryGuard::shutdown) {
        eprintln!("taskmill: trace export shutdown: {e}");
    }
}
