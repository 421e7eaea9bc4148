//! Traces: the subscriber setup (logs and OpenTelemetry export), W3C trace
//! context propagation, and the span model taskmill wires into the client,
//! the worker and the CPU child.
//!
//! Layout:
//! - [`setup`]: [`init`] / [`build`], [`TracingOptions`], [`TelemetryGuard`].
//! - [`otlp`]: [`OtlpOptions`]: endpoint, protocol (gRPC or HTTP/protobuf),
//!   service name and batch settings, from the standard `OTEL_*` variables.
//! - [`drops`]: the drop-counting wrappers around the batch processor and the
//!   exporter, and `taskmill_trace_spans_dropped_total{reason}`.
//! - [`json`]: JSON log lines carrying `trace_id` and `span_id`.
//! - [`propagation`] and [`spans`]: re-exported from `taskmill-trace` (the
//!   span model and W3C propagation on the APIs alone, which the producer
//!   client links without this crate).
//!
//! ```no_run
//! use taskmill_telemetry::traces::{self, spans, TracingOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let _guard = traces::init(TracingOptions::from_env(false, "info")?)?;
//! // Producer: the span around the publish, and the header values.
//! let msg = spans::Message { exchange: "taskmill", routing_key: "default", message_id: "job-1", body_size: 2 };
//! let span = spans::enqueue_span(&msg, "io.sleep", None);
//! let headers = traces::traceparent_of(&span); // Some((traceparent, tracestate))
//! // Worker: the consumer span continues the producer's trace.
//! let (tp, ts) = headers.unwrap_or_default();
//! let delivery = spans::Delivery { queue: "default", message: msg, kind: "io.sleep", attempt: 1,
//!     traceparent: Some(&tp), tracestate: ts.as_deref() };
//! let job = spans::job_span(&delivery, None);
//! let _entered = job.enter();
//! // ... run; the CPU child gets traces::current_traceparent() in its frame.
//! spans::record_outcome(&job, "ok", None);
//! # Ok(()) }
//! ```
//!
//! Export never slows jobs down: a finished span goes into a bounded queue
//! with a non-blocking send; a full queue, a failed export or a span ended
//! after shutdown drops the span and counts it in
//! `taskmill_trace_spans_dropped_total{reason}`.

pub mod drops;
pub mod json;
pub mod otlp;
pub mod setup;

pub use taskmill_trace::{propagation, spans};

pub use drops::{DropReason, spans_dropped_total};
pub use otlp::{DEFAULT_SERVICE_NAME, OtlpOptions, OtlpProtocol};
pub use propagation::{context_from_traceparent, current_traceparent, set_parent, traceparent_of};
pub use setup::{TelemetryGuard, TracingError, TracingOptions, build, flush, init};
