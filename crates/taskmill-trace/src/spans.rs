//! The span model: which spans taskmill creates, their OpenTelemetry kind and
//! attributes, and one helper per span so wiring is one call each.
//!
//! ```text
//! producer process      publish taskmill  (producer)  -- traceparent in AMQP headers -->
//! worker process          process QUEUE   (consumer)  parent: the publish span
//!                           taskmill.claim / taskmill.run / taskmill.ack /
//!                           taskmill.retry / taskmill.dead_letter   (internal steps)
//!                           -- traceparent in the CPU frame header -->
//! CPU child process           taskmill.cpu.run (internal) parent: the process span
//! ```
//!
//! The producer and consumer spans follow the OpenTelemetry messaging
//! conventions for RabbitMQ: the name `{operation} {destination}` (set
//! through `otel.name`; the `tracing` names stay `taskmill.enqueue` and
//! `taskmill.job` for log filters), `messaging.operation.name` and `.type`,
//! `messaging.destination.name` (the exchange),
//! `messaging.rabbitmq.destination.routing_key`, `messaging.message.id`,
//! `messaging.message.body.size`, `server.address`/`server.port`, and
//! `error.type` on failure.
//!
//! All spans are at level INFO with target [`TARGET`], so the default trace
//! filter (`info`) exports them and a log filter can mute them in logs
//! (`taskmill::spans=off`) without touching traces (traces have their own
//! filter, [`super::OtlpOptions::filter`]).

use opentelemetry_semantic_conventions::attribute as semconv;
use tracing::Span;
use tracing::field::Empty;

use super::propagation;

/// The `tracing` target of every span below.
pub const TARGET: &str = "taskmill::spans";

/// Producer span: one publish of one job. Kind `producer`; its exported name
/// is `publish {exchange}`.
pub const ENQUEUE: &str = "taskmill.enqueue";
/// Consumer span: one delivery of one job, decode to ack. Kind `consumer`,
/// child of the producer's span (from the message's `traceparent`); its
/// exported name is `process {queue}`.
pub const JOB: &str = "taskmill.job";
/// The run of a CPU job inside the child process. Kind `internal`, child of
/// the worker's job span (from the frame header's `traceparent`).
pub const CPU_RUN: &str = "taskmill.cpu.run";

/// Attribute keys: the OpenTelemetry messaging conventions' names (from
/// `opentelemetry-semantic-conventions`), and taskmill's own.
pub mod attr {
    use opentelemetry_semantic_conventions::attribute as semconv;

    /// Always `rabbitmq`.
    pub const MESSAGING_SYSTEM: &str = semconv::MESSAGING_SYSTEM;
    /// `publish` (enqueue) or `process` (job): required by the conventions.
    pub const MESSAGING_OPERATION_NAME: &str = semconv::MESSAGING_OPERATION_NAME;
    /// `send` (enqueue) or `process` (job).
    pub const MESSAGING_OPERATION: &str = semconv::MESSAGING_OPERATION_TYPE;
    /// The exchange a job is published to (or was delivered from);
    /// `amq.default` for the default exchange.
    pub const MESSAGING_DESTINATION: &str = semconv::MESSAGING_DESTINATION_NAME;
    /// The routing key of the publish or delivery.
    pub const ROUTING_KEY: &str = semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY;
    /// The AMQP `message_id` (the job id).
    pub const MESSAGE_ID: &str = semconv::MESSAGING_MESSAGE_ID;
    /// The message body's size in bytes.
    pub const BODY_SIZE: &str = semconv::MESSAGING_MESSAGE_BODY_SIZE;
    /// The broker's host name or address.
    pub const SERVER_ADDRESS: &str = semconv::SERVER_ADDRESS;
    /// The broker's port.
    pub const SERVER_PORT: &str = semconv::SERVER_PORT;
    /// On failure: the outcome (`retried`, `dead`, `timeout`, `crashed`,
    /// `error`), a low-cardinality class of the error.
    pub const ERROR_TYPE: &str = semconv::ERROR_TYPE;
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
    pub const PID: &str = semconv::PROCESS_PID;
}

/// The broker a span talks to: `server.address` and `server.port`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Server {
    /// Host name or address, as the URL gives it.
    pub address: String,
    /// The port (the scheme's default when the URL names none: 5672 for
    /// `amqp`, 5671 for `amqps`).
    pub port: u16,
}

impl Server {
    /// The host and port of an AMQP URL; `None` when it is not one. The
    /// user-info is skipped, so no password ends up in a span.
    pub fn from_url(url: &str) -> Option<Server> {
        let (scheme, rest) = url.split_once("://")?;
        let default_port = match scheme {
            "amqp" => 5672,
            "amqps" => 5671,
            _ => return None,
        };
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (address, port) = if let Some(v6) = host_port.strip_prefix('[') {
            let (addr, tail) = v6.split_once(']')?;
            (addr, tail.strip_prefix(':'))
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        if address.is_empty() {
            return None;
        }
        let port = match port {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        Some(Server {
            address: address.to_string(),
            port,
        })
    }
}

/// What a publish or a delivery carries, as the conventions describe it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// The exchange (`""`: the default exchange).
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The AMQP `message_id`.
    pub message_id: &'a str,
    /// The body's size in bytes.
    pub body_size: usize,
}

impl Message<'_> {
    /// The exchange as the conventions name it (`amq.default` for `""`).
    fn destination(&self) -> &str {
        if self.exchange.is_empty() {
            "amq.default"
        } else {
            self.exchange
        }
    }

    fn body_size(&self) -> i64 {
        i64::try_from(self.body_size).unwrap_or(i64::MAX)
    }
}

/// The producer span of one publish: `publish {exchange}`, kind producer.
///
/// Create it around the publish (including the confirm wait), and take the
/// headers from it with [`propagation::traceparent_of`] (or
/// [`propagation::current_traceparent`] inside it).
pub fn enqueue_span(msg: &Message<'_>, kind: &str, server: Option<&Server>) -> Span {
    let (address, port) = server.map_or(("", 0), |s| (s.address.as_str(), i64::from(s.port)));
    let span = tracing::info_span!(
        target: TARGET,
        "taskmill.enqueue",
        otel.name = format!("publish {}", msg.destination()),
        otel.kind = "producer",
        { semconv::MESSAGING_SYSTEM } = "rabbitmq",
        { semconv::MESSAGING_OPERATION_NAME } = "publish",
        { semconv::MESSAGING_OPERATION_TYPE } = "send",
        { semconv::MESSAGING_DESTINATION_NAME } = msg.destination(),
        { semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY } = msg.routing_key,
        { semconv::MESSAGING_MESSAGE_ID } = msg.message_id,
        { semconv::MESSAGING_MESSAGE_BODY_SIZE } = msg.body_size(),
        { semconv::SERVER_ADDRESS } = Empty,
        { semconv::SERVER_PORT } = Empty,
        { semconv::ERROR_TYPE } = Empty,
        taskmill.kind = kind,
        taskmill.job_id = msg.message_id,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if server.is_some() {
        span.record(semconv::SERVER_ADDRESS, address);
        span.record(semconv::SERVER_PORT, port);
    }
    span
}

/// One delivery, for [`job_span`].
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The queue it was consumed from.
    pub queue: &'a str,
    /// The message as delivered (exchange and routing key of the delivery).
    pub message: Message<'a>,
    /// The job kind (`unknown` before it is decoded).
    pub kind: &'a str,
    /// 1-based attempt number.
    pub attempt: u32,
    /// The producer's `traceparent` and `tracestate`.
    pub traceparent: Option<&'a str>,
    /// See `traceparent`.
    pub tracestate: Option<&'a str>,
}

/// The consumer span of one delivery: `process {queue}`, kind consumer,
/// child of the producer span the message's `traceparent`/`tracestate` name
/// (a new trace when they are missing or invalid). `taskmill.outcome` is
/// empty until [`record_outcome`].
pub fn job_span(d: &Delivery<'_>, server: Option<&Server>) -> Span {
    let (address, port) = server.map_or(("", 0), |s| (s.address.as_str(), i64::from(s.port)));
    let span = tracing::info_span!(
        target: TARGET,
        "taskmill.job",
        otel.name = format!("process {}", d.queue),
        otel.kind = "consumer",
        { semconv::MESSAGING_SYSTEM } = "rabbitmq",
        { semconv::MESSAGING_OPERATION_NAME } = "process",
        { semconv::MESSAGING_OPERATION_TYPE } = "process",
        { semconv::MESSAGING_DESTINATION_NAME } = d.message.destination(),
        { semconv::MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY } = d.message.routing_key,
        { semconv::MESSAGING_MESSAGE_ID } = d.message.message_id,
        { semconv::MESSAGING_MESSAGE_BODY_SIZE } = d.message.body_size(),
        { semconv::SERVER_ADDRESS } = Empty,
        { semconv::SERVER_PORT } = Empty,
        { semconv::ERROR_TYPE } = Empty,
        taskmill.queue = d.queue,
        taskmill.kind = d.kind,
        taskmill.job_id = d.message.message_id,
        // i64: the OpenTelemetry layer would turn a u64 into a string.
        taskmill.attempt = i64::from(d.attempt),
        taskmill.outcome = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if server.is_some() {
        span.record(semconv::SERVER_ADDRESS, address);
        span.record(semconv::SERVER_PORT, port);
    }
    propagation::set_parent(&span, d.traceparent, d.tracestate);
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
        span.record(semconv::ERROR_TYPE, outcome);
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
        { semconv::PROCESS_PID } = i64::from(std::process::id()),
        taskmill.outcome = Empty,
        { semconv::ERROR_TYPE } = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    propagation::set_parent(&span, traceparent, None);
    span
}
