//! taskmill's span model and W3C trace context, on the `tracing` and
//! OpenTelemetry APIs only.
//!
//! - [`spans`]: the producer span (`publish taskmill`), the consumer span
//!   (`process QUEUE`) and its steps, the CPU child's span, with the
//!   OpenTelemetry messaging conventions' attributes.
//! - [`propagation`]: `traceparent`/`tracestate` into and out of spans.
//!
//! A producer (`taskmill-client`) links only this crate for tracing: no
//! OpenTelemetry SDK, exporter or HTTP stack. Without an OpenTelemetry layer
//! installed every function is a cheap no-op; `taskmill-telemetry` installs
//! the layer and exports.

pub mod propagation;
pub mod spans;

pub use propagation::{context_from_traceparent, current_traceparent, set_parent, traceparent_of};
