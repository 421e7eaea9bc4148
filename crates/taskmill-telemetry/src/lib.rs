//! Telemetry: Prometheus metrics, the HTTP endpoints operators and Kubernetes
//! probe, and log setup. No business logic lives here.
//!
//! Layout:
//! - [`metrics`]: [`Metrics`], every `taskmill_*` metric in one registry.
//! - [`health`]: [`Readiness`], named checks that together decide `/readyz`.
//! - [`http`]: the axum server for `/metrics`, `/healthz`, `/readyz`.
//! - [`logging`]: `tracing` subscriber setup (text or JSON lines, on stderr).

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;

pub use health::Readiness;
pub use metrics::Metrics;
