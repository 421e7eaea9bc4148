//! The span model: which spans taskmill creates, their OpenTelemetry kind and
//! attributes, and one helper per span so wiring is one call each.
//!
//! ```text
//! producer process      taskmill.enqueue   (producer)  -- traceparent in AMQP headers -->
//! worker process          taskmill.job     (consumer)  parent: the enqueue span
//!                           taskmill.claim / taskmill.run / taskmill.ack /
//!                           taskmill.retry / taskmill.dead_letter   (internal steps)
//!                           -- traceparent in the CPU frame header -->
//! CPU child process           taskmill.cpu.run (internal) parent: the job (or run) span
//! ```
//!
//! All spans are at level INFO with target [`TARGET`], so the default trace
//! filter (`info`) exports them and a log filter can mute them in logs
//! (`taskmill::spans=off`) without touching traces (traces have their own
//! filter, [`super::OtlpOptions::filter`]).

use tracing::Span;
use tracing::field::Empty;

use super::propagation;

/// The `tracing` target of every span below.
pub const TARGET: &str = "taskmill::spans";

/// Producer span: one publish of one job. Kind `producer`.
pub const ENQUEUE: &str = "taskmill.enqueue";
/// Consumer span: one delivery of one job, decode to ack. Kind `consumer`,
/// child of the producer's span (from the message's `traceparent`).
pub const JOB: &str = "taskmill.job";
/// The run of a CPU job inside the child process. Kind `internal`, child of
/// the worker's job span (from the frame header's `traceparent`).
pub const CPU_RUN: &str = "taskmill.cpu.run";

/// Attribute keys.
pub mod attr {
    /// Always `rabbitmq`.
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    /// The queue a job is published to or consumed from.
    pub const MESSAGING_DESTINATION: &str = "messaging.destination.name";
    /// `send` (enqueue) or `process` (job).
    pub const MESSAGING_OPERATION: &str = "messaging.operation.type";
    /// The job kind.
    pub const KIND: &str = "taskmill.kind";
    /// The job id (AMQP `message_id`).
    pub const JOB_ID: &str = "taskmill.job_id";
    /// The queue (consumer side).
    pub const QUEUE: &str = "taskmill.queue";
    /// 1-based attempt number.
    pub const ATTEMPT: &str = "taskmill.attempt";
    /// The outcome (`ok`, `retried`, `dead`, `duplicate`, `deferred`, `timeout`,
    /// `crashed`; `error` on a CPU run), set when known.
    pub const OUTCOME: &str = "taskmill.outcome";
    /// The child's process id (CPU run).
    pub const PID: &str = "process.pid";
}

/// The producer span of one publish: `taskmill.enqueue`, kind producer.
///
/// Create it around the publish (including the confirm wait), and take the
/// headers from it with [`propagation::traceparent_of`] (or
/// [`propagation::current_traceparent`] inside it).
pub fn enqueue_span(queue: &str, kind: &str, job_id: &str) -> Span {
    tracing::info_span!(
        target: TARGET,
        "taskmill.enqueue",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = queue,
        taskmill.kind = kind,
        taskmill.job_id = job_id,
        otel.status_code = Empty,
        otel.status_description = Empty,
    )
}

/// The consumer span of one delivery: `taskmill.job`, kind consumer, child of
/// the producer span the message's `traceparent`/`tracestate` name (a new
/// trace when they are missing or invalid). `taskmill.outcome` is empty until
/// [`record_outcome`].
pub fn job_span(
    queue: &str,
    kind: &str,
    job_id: &str,
    attempt: u32,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "taskmill.job",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = queue,
        taskmill.queue = queue,
        taskmill.kind = kind,
        taskmill.job_id = job_id,
        // i64: the OpenTelemetry layer would turn a u64 into a string.
        taskmill.attempt = i64::from(attempt),
        taskmill.outcome = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    propagation::set_parent(&span, traceparent, tracestate);
    span
}

/// A step of the job span, as a child span of kind internal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `taskmill.decode`: headers and body checked.
    Decode,
    /// `taskmill.claim`: the idempotency claim in the store.
    Claim,
    /// `taskmill.run`: the handler (inline, or the hand-off to a CPU child).
    Run,
    /// `taskmill.ack`: the ack (after the outcome is durable).
    Ack,
    /// `taskmill.retry`: the retry copy published to a delay tier, confirmed.
    Retry,
    /// `taskmill.dead_letter`: the dead-letter copy published, confirmed.
    DeadLetter,
}

/// A child span of the current span for `step`. Enter it (or
/// `.instrument()` the step's future with it) inside the job span.
pub fn step_span(step: Step) -> Span {
    match step {
        Step::Decode => tracing::info_span!(target: TARGET, "taskmill.decode"),
        Step::Claim => tracing::info_span!(target: TARGET, "taskmill.claim"),
        Step::Run => tracing::info_span!(target: TARGET, "taskmill.run"),
        Step::Ack => tracing::info_span!(target: TARGET, "taskmill.ack"),
        Step::Retry => tracing::info_span!(target: TARGET, "taskmill.retry"),
        Step::DeadLetter => tracing::info_span!(target: TARGET, "taskmill.dead_letter"),
    }
}

/// Records the outcome on a [`job_span`] (`taskmill.outcome`) and, with an
/// `error`, marks the span as failed (status error, with the message). On an
/// [`enqueue_span`] only the error part applies.
pub fn record_outcome(span: &Span, outcome: &str, error: Option<&str>) {
    span.record("taskmill.outcome", outcome);
    if let Some(e) = error {
        span.record("otel.status_code", "error");
        span.record("otel.status_description", e);
    }
}

/// The span of a CPU job in the child process: `taskmill.cpu.run`, kind
/// internal, child of the worker span whose `traceparent` came in the frame
/// header. Enter it around the handler call.
pub fn cpu_run_span(kind: &str, job_id: &str, attempt: u32, traceparent: Option<&str>) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "taskmill.cpu.run",
        otel.kind = "internal",
        taskmill.kind = kind,
        taskmill.job_id = job_id,
        // i64: the OpenTelemetry layer would turn a u64 into a string.
        taskmill.attempt = i64::from(attempt),
        process.pid = i64::from(std::process::id()),
        taskmill.outcome = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    propagation::set_parent(&span, traceparent, None);
    span
}
