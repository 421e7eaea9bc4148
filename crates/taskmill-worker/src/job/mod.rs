//! The life of one delivery: decode, the Celery gate, claim the idempotency
//! key, run (IO inline or CPU in the process pool) under a hard timeout, then
//! settle: ack, retry through the delay ladder, defer, or dead-letter.
//!
//! Layout, one file per stage:
//! - `mod.rs` (this file): the pipeline and the [`Job`] value every stage takes.
//! - `decide.rs`: the pure decision, finding -> settlement, with its tests.
//! - `claim.rs`: the key in the store (claim, record completion or failure, release).
//! - `run.rs`: the handler under its hard timeout; panics become errors.
//! - `settle.rs`: a settlement carried out (store effect, copy, confirm, reply, ack).
//! - `celery.rs`: what differs for Celery protocol v2 (copies, gate, results).
//! - `events.rs`: the typed events that log and count each step.
//!
//! The rule that keeps nothing lost: a message is acked only after its
//! outcome is durable — the completion recorded in the store (when the job
//! has a key), or its retry / deferred / dead-letter copy confirmed by the
//! broker. See `settle.rs`.

mod celery;
mod claim;
mod decide;
mod events;
mod run;
mod settle;

use std::time::{Duration, Instant};

use bytes::Bytes;
use taskmill_broker::Incoming;
use taskmill_broker::now_us;
use taskmill_core::{DecodeError, Envelope, Outcome};
use taskmill_telemetry::metrics::UNKNOWN_KIND;
use taskmill_telemetry::traces::spans;
use tracing::{Instrument, Span};

use celery::Notice;
pub(crate) use celery::Wire;
use decide::Finding;
use events::{QueueWaited, Ran, Refused};
use settle::DeadLetter;

use crate::leases::LeaseHold;
use crate::shared::{JobReport, Session};

/// The identity of a job for reports, and its `taskmill.job` span.
pub(crate) struct Info {
    queue: String,
    kind: String,
    job_id: Option<String>,
    queue_wait: Option<Duration>,
    span: Span,
}

impl Info {
    /// The report of the job's outcome; also records it on the job span.
    fn report(&self, outcome: Outcome, run_time: Duration, error: Option<String>) -> JobReport {
        spans::record_outcome(&self.span, outcome.as_str(), error.as_deref());
        JobReport {
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            job_id: self.job_id.clone(),
            outcome,
            queue_wait: self.queue_wait,
            run_time,
            error,
        }
    }
}

/// One decoded delivery on its way through the pipeline: what every stage
/// reads, in one value instead of a long argument list.
pub(crate) struct Job<'s> {
    session: &'s Session,
    incoming: Incoming,
    wire: Wire,
    /// The envelope, its payload moved out to [`Job::payload`].
    env: Envelope,
    payload: Bytes,
    info: Info,
    /// The claim on the job's key, once taken, kept alive by the heartbeat
    /// until the job settles.
    token: Option<LeaseHold>,
    /// The delivery was acked before the run, its message parked with the
    /// claim in the store (a job that may outlast the consumer timeout).
    acked_early: bool,
}

/// Handles one delivery from its decode to its settlement.
pub(crate) async fn handle(session: &Session, mut incoming: Incoming) {
    let queue = incoming.queue().to_string();
    let body_size = incoming.body_len();
    let max = session.shared.config.max_payload_bytes;
    let decoded = if session.shared.config.is_celery_queue(&queue) {
        incoming
            .decode_celery(max)
            .map(|(env, task)| (env, Wire::Celery(task)))
    } else {
        incoming.decode(max).map(|env| (env, Wire::Taskmill))
    };
    match decoded {
        Ok((mut env, wire)) => {
            let delivery = spans::Delivery {
                queue: &queue,
                message: spans::Message {
                    exchange: incoming.exchange(),
                    routing_key: incoming.routing_key(),
                    message_id: &env.job_id,
                    body_size,
                },
                kind: &env.kind,
                attempt: env.attempt,
                traceparent: env.traceparent.as_deref(),
                tracestate: env.tracestate.as_deref(),
            };
            let span = spans::job_span(&delivery, session.server.as_ref());
            let payload: Bytes = std::mem::take(&mut env.payload).into();
            let queue_wait = env
                .enqueued_at_us
                .map(|at| Duration::from_micros(now_us().saturating_sub(at)));
            let info = Info {
                queue,
                kind: env.kind.clone(),
                job_id: Some(env.job_id.clone()),
                queue_wait,
                span: span.clone(),
            };
            let job = Job {
                session,
                incoming,
                wire,
                env,
                payload,
                info,
                token: None,
                acked_early: false,
            };
            pipeline(job).instrument(span).await;
        }
        // Cold paths are boxed (here and below) so the per-job future that
        // every in-flight job keeps in memory stays small.
        Err(e) => Box::pin(refuse(session, incoming, queue, e)).await,
    }
}

/// Everything after a successful decode, inside the job span.
async fn pipeline(mut job: Job<'_>) {
    let shared = &job.session.shared;
    if let Some(finding) = job.wire.gate(now_us()) {
        return Box::pin(settle::settle(job, finding, Duration::ZERO)).await;
    }
    let Some(handler) = shared.handlers.get(&job.env.kind).cloned() else {
        return Box::pin(settle::settle(job, Finding::UnknownKind, Duration::ZERO)).await;
    };
    let kind_timeout = shared.config.kind_timeout(&job.env.kind);
    let timeout = job
        .env
        .timeout
        .map_or(kind_timeout, |t| t.min(kind_timeout));
    if let Some(wait) = job.info.queue_wait {
        QueueWaited {
            labels: [&job.info.queue, &job.env.kind],
            wait,
        }
        .emit(shared);
    }
    let early = decide::acks_early(
        timeout,
        Duration::from_millis(shared.config.broker_consumer_timeout_ms),
    );
    if let Some(key) = claim::key_of(&job.env, &handler, early) {
        match Box::pin(claim::claim(&job, &key)).await {
            Ok(token) => job.token = Some(shared.leases.hold(token)),
            Err(finding) => {
                return Box::pin(settle::settle(job, finding, Duration::ZERO)).await;
            }
        }
    }
    if early {
        // The store holds the job from here on; the broker may forget it.
        if let Err(finding) = Box::pin(claim::park(&job)).await {
            return Box::pin(settle::settle(job, finding, Duration::ZERO)).await;
        }
        job.acked_early = true;
        if let Err(e) = job.incoming.ack().await {
            // Redelivered meanwhile: that copy finds the key held and waits.
            tracing::warn!(job_id = %job.env.job_id, error = %e, "early ack failed; the redelivery waits for this run");
        }
    }
    let start = Instant::now();
    let finding = run::run(&job, &handler, timeout).await;
    let took = start.elapsed();
    Ran {
        labels: [&job.info.queue, &job.env.kind],
        took,
    }
    .emit(shared);
    settle::settle(job, finding, took).await;
}

/// A delivery that does not decode: dead-lettered once with the reason. A
/// Celery client waiting on the refused task learns why, instead of waiting
/// forever (when the message names its task and client).
async fn refuse(session: &Session, incoming: Incoming, queue: String, e: DecodeError) {
    let hint = session
        .shared
        .config
        .is_celery_queue(&queue)
        .then(|| incoming.celery_reply_hint())
        .flatten();
    let job_id = incoming
        .message_id()
        .or(hint.as_ref().map(|h| h.task_id.as_str()))
        .map(str::to_string);
    Refused {
        queue: &queue,
        message_id: job_id.as_deref(),
        reason: e.reason,
        detail: &e.detail,
    }
    .emit();
    let delivery = spans::Delivery {
        queue: &queue,
        message: spans::Message {
            exchange: incoming.exchange(),
            routing_key: incoming.routing_key(),
            message_id: job_id.as_deref().unwrap_or(""),
            body_size: incoming.body_len(),
        },
        kind: UNKNOWN_KIND,
        attempt: 1,
        traceparent: None,
        tracestate: None,
    };
    let span = spans::job_span(&delivery, session.server.as_ref());
    let info = Info {
        queue,
        kind: UNKNOWN_KIND.to_string(),
        job_id,
        queue_wait: None,
        span: span.clone(),
    };
    let finding = Finding::Refused {
        reason: e.reason,
        detail: e.detail.clone(),
    };
    let settlement = decide::decide(&finding, decide::Facts::none());
    let report = info.report(
        settlement
            .outcome()
            .expect("a refused message is dead-lettered"),
        Duration::ZERO,
        finding.detail(UNKNOWN_KIND),
    );
    let detail = finding.detail(UNKNOWN_KIND);
    let reply = hint.as_ref().and_then(|to| {
        Notice::for_settlement(&finding, &settlement, UNKNOWN_KIND, detail.as_deref())
            .map(|n| (to, n))
    });
    let letter = DeadLetter {
        reason: e.reason,
        detail: &e.detail,
        body: None,
        extra: &[],
    };
    async {
        if settle::dead_letter(session, &incoming, letter).await {
            settle::finish(session, Some(&incoming), reply, report).await;
        }
    }
    .instrument(span)
    .await;
}
