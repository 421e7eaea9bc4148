//! Telemetry: Prometheus metrics, the HTTP endpoints operators and Kubernetes
//! probe, log setup, and traces (OpenTelemetry over OTLP, W3C trace context
//! propagation, the span model). No business logic lives here.
//!
//! Layout:
//! - [`metrics`]: [`Metrics`], every `taskmill_*` metric in one registry.
//! - [`health`]: [`Readiness`], named checks that together decide `/readyz`.
//! - [`http`]: the axum server for `/metrics`, `/healthz`, `/readyz`.
//! - [`logging`]: the one-call setup the binary uses (logs, plus traces when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
//! - [`traces`]: the subscriber and OTLP pipeline ([`traces::init`]),
//!   propagation helpers ([`traces::current_traceparent`],
//!   [`traces::set_parent`]) and span helpers ([`traces::spans`]).

#![forbid(unsafe_code)]

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod traces;

pub use health::Readiness;
pub use metrics::Metrics;
pub use traces::{TelemetryGuard, TracingOptions};
