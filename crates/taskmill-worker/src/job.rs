//! The life of one delivery: decode, claim the idempotency key, dispatch (IO
//! inline or CPU in the process pool) under a hard timeout, then ack, retry
//! through the delay ladder, or dead-letter.
//!
//! The rule that keeps nothing lost: a message is acked only after its
//! outcome is durable — the completion recorded in the store (when the job
//! has a key), or its retry / deferred / dead-letter copy confirmed by the
//! broker. If that publish fails, the session ends (the supervisor reconnects
//! and redeclares) and the unacked delivery returns to its queue.
//!
//! Two protocols share this flow ([`Wire`]): taskmill's own, and Celery
//! protocol v2 on the queues served in Celery mode. A Celery task is decoded
//! into the same envelope and claimed, run, retried and dead-lettered the same
//! way; what differs is that its copies (retries, deferrals, dead letters)
//! stay Celery messages, that its `eta` and `expires` are checked before it
//! runs, and that its outcome is also published to the client's `rpc://`
//! reply queue, after the outcome is durable and before the ack.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::FutureExt;
use taskmill_broker::{Incoming, Outgoing, PublishError, now_us};
use taskmill_core::celery::{self, CeleryException, ReplyTo, ResultStatus};
use taskmill_core::wire::{H_FIRST_FAILED_AT_MS, deadline_us};
use taskmill_core::{DeadReason, Envelope, HeaderValue, JobError, Outcome};
use taskmill_cpu::{CpuError, CpuRequest, HandlerError};
use taskmill_store::{Claim, ClaimToken, IdempotencyStore};
use taskmill_telemetry::metrics::{InFlightGuard, UNKNOWN_KIND};

use taskmill_telemetry::traces::spans::{self, Step};
use taskmill_telemetry::traces::traceparent_of;
use tracing::{Instrument, Span};

use crate::builder::JobReport;
use crate::handler::{Handler, IoTxHandler, JobContext};
use crate::runtime::Session;

/// Margin of an idempotency lease over the job's hard timeout: the lease
/// outlives every attempt that can still be running.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Retry delay when the store cannot be reached.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Longest wait before re-checking a key held by another worker.
const MAX_DEFER: Duration = Duration::from_secs(300);

/// The identity of a job for reports, and its `taskmill.job` span.
struct Info {
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

/// The protocol a delivery came in, and what its copies and results need.
enum Wire {
    /// taskmill protocol v1: the body moved into the envelope's payload.
    Taskmill,
    /// Celery protocol v2: the body stays in the delivery, so every copy is
    /// still a Celery message; outcomes go to the client's reply queue.
    Celery(celery::CeleryTask),
}

impl Wire {
    /// The body of a dead-letter copy: the payload taken out of a taskmill
    /// delivery; `None` (the delivery's own body) for Celery.
    fn dead_body<'a>(&self, payload: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Wire::Taskmill => Some(payload),
            Wire::Celery(_) => None,
        }
    }

    /// Where the client waits for the outcome, with what to tell it; the
    /// notice is only built when there is a client.
    fn reply(&self, notice: impl FnOnce() -> Notice) -> Option<(&ReplyTo, Notice)> {
        match self {
            Wire::Celery(task) => task.reply.as_ref().map(|r| (r, notice())),
            Wire::Taskmill => None,
        }
    }
}

/// What a Celery client is told about an outcome (`rpc://` result message).
struct Notice {
    status: ResultStatus,
    result: serde_json::Value,
    traceback: Option<String>,
}

impl Notice {
    fn success(result: serde_json::Value) -> Notice {
        Notice {
            status: ResultStatus::Success,
            result,
            traceback: None,
        }
    }

    fn error(status: ResultStatus, exc: &CeleryException, traceback: impl Into<String>) -> Notice {
        Notice {
            status,
            result: exc.to_json(),
            traceback: Some(traceback.into()),
        }
    }
}

/// Why a run produced no outcome.
enum Failure {
    /// The job failed; its error decides retry or dead-letter.
    Job(JobError),
    /// The worker is shutting down and stopped the job: leave it unacked.
    Abandon(String),
}

/// A successful run.
struct Done {
    value: serde_json::Value,
    /// The completion was committed with the handler's own writes.
    committed: bool,
}

pub(crate) async fn handle(session: &Session, mut incoming: Incoming) {
    let shared = &session.shared;
    let queue = incoming.queue().to_string();
    let max = shared.config.max_payload_bytes;
    let celery = shared.config.is_celery_queue(&queue);
    let decoded = if celery {
        incoming
            .decode_celery(max)
            .map(|(env, task)| (env, Wire::Celery(task)))
    } else {
        incoming.decode(max).map(|env| (env, Wire::Taskmill))
    };
    let (env, wire) = match decoded {
        Ok(decoded) => decoded,
        Err(e) => {
            // A Celery client waiting on a refused task learns why, instead
            // of waiting forever (when the message names its task and client).
            let hint = celery.then(|| incoming.celery_reply_hint()).flatten();
            let job_id = incoming
                .message_id()
                .or(hint.as_ref().map(|h| h.task_id.as_str()))
                .map(str::to_string);
            tracing::warn!(queue = %queue, message_id = ?job_id, reason = e.reason.as_str(), error = %e.detail, "refusing message");
            let span = spans::job_span(
                &queue,
                UNKNOWN_KIND,
                job_id.as_deref().unwrap_or(""),
                1,
                None,
                None,
            );
            let info = Info {
                queue,
                kind: UNKNOWN_KIND.to_string(),
                job_id,
                queue_wait: None,
                span: span.clone(),
            };
            let report = info.report(Outcome::Dead, Duration::ZERO, Some(e.to_string()));
            let reply = hint.as_ref().map(|to| {
                let exc = CeleryException::from_refusal(e.reason, &e.detail, None);
                (
                    to,
                    Notice::error(ResultStatus::Failure, &exc, e.to_string()),
                )
            });
            Box::pin(dead_letter(
                session,
                &incoming,
                e.reason,
                &e.detail,
                None,
                &[],
                reply,
                report,
            ))
            .instrument(span)
            .await;
            return;
        }
    };
    let span = spans::job_span(
        &queue,
        &env.kind,
        &env.job_id,
        env.attempt,
        env.traceparent.as_deref(),
        env.tracestate.as_deref(),
    );
    process(session, incoming, env, wire, span.clone())
        .instrument(span)
        .await;
}

/// Everything after a successful decode, inside the job span.
async fn process(session: &Session, incoming: Incoming, mut env: Envelope, wire: Wire, span: Span) {
    let shared = &session.shared;
    let queue = incoming.queue().to_string();
    let payload: Bytes = std::mem::take(&mut env.payload).into();
    let queue_wait = env
        .enqueued_at_us
        .map(|at| Duration::from_micros(now_us().saturating_sub(at)));
    let info = Info {
        queue: queue.clone(),
        kind: env.kind.clone(),
        job_id: Some(env.job_id.clone()),
        queue_wait,
        span,
    };
    // Cold paths are boxed (here and below) so the per-job future that
    // every in-flight job keeps in memory stays small.
    if matches!(wire, Wire::Celery(_))
        && !Box::pin(celery_gate(
            session, &incoming, &wire, &env, &payload, &info,
        ))
        .await
    {
        return;
    }
    let Some(handler) = shared.handlers.get(&env.kind).cloned() else {
        let detail = format!("no handler is registered for kind `{}`", env.kind);
        tracing::warn!(queue = %queue, job_id = %env.job_id, kind = %env.kind, "refusing job: unknown kind");
        let report = info.report(Outcome::Dead, Duration::ZERO, Some(detail.clone()));
        let reply = wire.reply(|| {
            let exc =
                CeleryException::from_refusal(DeadReason::UnknownKind, &detail, Some(&env.kind));
            Notice::error(ResultStatus::Failure, &exc, detail.clone())
        });
        Box::pin(dead_letter(
            session,
            &incoming,
            DeadReason::UnknownKind,
            &detail,
            wire.dead_body(&payload),
            &[],
            reply,
            report,
        ))
        .await;
        return;
    };

    let kind_timeout = shared.config.kind_timeout(&env.kind);
    let timeout = env.timeout.map_or(kind_timeout, |t| t.min(kind_timeout));
    let labels = [queue.as_str(), env.kind.as_str()];
    if let Some(w) = queue_wait {
        shared
            .metrics
            .job_queue_wait_seconds
            .with_label_values(&labels)
            .observe(w.as_secs_f64());
    }

    // Idempotency: a job with a key (and every transactional job, keyed by
    // its id when it has no key) is claimed before it runs.
    let key = env
        .idempotency_key
        .clone()
        .or_else(|| matches!(handler, Handler::IoTx(_)).then(|| env.job_id.clone()));
    let token = match key {
        None => None,
        Some(key) => {
            match Box::pin(claim(
                session,
                &incoming,
                &wire,
                &env,
                &payload,
                &key,
                timeout + LEASE_MARGIN,
                &info,
            ))
            .await
            {
                Some(t) => Some(t),
                None => return,
            }
        }
    };

    let start = Instant::now();
    let result = {
        let _in_flight = InFlightGuard::new(
            shared
                .metrics
                .jobs_in_flight
                .with_label_values(&[&queue, handler.class()]),
        );
        let run_span = spans::step_span(Step::Run);
        // Handlers and CPU processes continue the trace from the run span;
        // without trace export, from the producer's context.
        let traceparent = traceparent_of(&run_span)
            .map(|(tp, _)| tp)
            .or_else(|| env.traceparent.clone());
        run(
            session,
            &handler,
            &env,
            &payload,
            timeout,
            token.as_ref(),
            traceparent,
        )
        .instrument(run_span)
        .await
    };
    let run_time = start.elapsed();
    shared
        .metrics
        .job_run_seconds
        .with_label_values(&labels)
        .observe(run_time.as_secs_f64());

    match result {
        Ok(done) => {
            if let Some(t) = &token
                && !done.committed
                && !Box::pin(complete(session, t, &done.value)).await
            {
                {
                    // The effect happened but its completion is not recorded:
                    // check again later (at-least-once; the lease keeps other
                    // workers off until it expires).
                    let report = info.report(
                        Outcome::Deferred,
                        run_time,
                        Some("completion not recorded".into()),
                    );
                    Box::pin(defer(
                        session,
                        &incoming,
                        &wire,
                        &env,
                        &payload,
                        STORE_RETRY_DELAY,
                        report,
                    ))
                    .await;
                    return;
                }
            }
            let report = info.report(Outcome::Ok, run_time, None);
            let reply = wire.reply(|| Notice::success(done.value));
            settle(session, &incoming, reply, report).await;
        }
        Err(Failure::Abandon(why)) => {
            tracing::info!(queue = %queue, job_id = %env.job_id, reason = %why, "job stopped by shutdown; leaving it to the broker");
            if let Some(t) = &token {
                let _ = Box::pin(session.store().release(t)).await;
            }
        }
        Err(Failure::Job(err)) => {
            let policy = shared.config.retry_policy(&env.kind);
            if err.is_retryable() && policy.allows_retry_after(env.attempt) {
                let mut delay = policy.backoff(env.attempt, fastrand::f64());
                if let JobError::Retryable {
                    retry_after: Some(at_least),
                    ..
                } = &err
                {
                    delay = delay.max(*at_least);
                }
                tracing::info!(queue = %queue, job_id = %env.job_id, kind = %env.kind, attempt = env.attempt, retry_in = ?delay, error = %err, "job failed; retrying");
                if let Some(t) = &token
                    && let Err(e) = Box::pin(session.store().release(t)).await
                {
                    tracing::warn!(error = %e, "cannot release the idempotency lease; it expires by itself");
                }
                let mut next = env.clone();
                next.attempt += 1;
                next.first_failed_at_ms.get_or_insert(now_us() / 1000);
                next.replay = false;
                let report = info.report(Outcome::Retried, run_time, Some(err.to_string()));
                let reply = wire.reply(|| {
                    let exc = CeleryException::from_job_error(&err);
                    Notice::error(ResultStatus::Retry, &exc, err.to_string())
                });
                Box::pin(republish(
                    session, &incoming, &wire, next, &payload, delay, reply, report,
                ))
                .await;
            } else {
                let reason = if err.is_retryable() {
                    DeadReason::AttemptsExhausted
                } else {
                    err.dead_reason()
                };
                tracing::warn!(queue = %queue, job_id = %env.job_id, kind = %env.kind, attempt = env.attempt, reason = reason.as_str(), error = %err, "job failed for good; dead-lettering");
                let exc = CeleryException::from_job_error(&err);
                if let Some(t) = &token {
                    let mut record = serde_json::json!({
                        "reason": reason.as_str(),
                        "error": err.to_string(),
                        "attempts": env.attempt,
                    });
                    if let Wire::Celery(_) = wire {
                        // Reported again to a client whose task is redelivered.
                        record[CELERY_EXCEPTION] = exc.to_json();
                    }
                    if let Err(e) = Box::pin(session.store().fail(t, &record)).await {
                        tracing::warn!(error = %e, "cannot record the final failure in the store");
                    }
                }
                let first_failed = env.first_failed_at_ms.unwrap_or(now_us() / 1000);
                let extra = [(
                    H_FIRST_FAILED_AT_MS,
                    HeaderValue::Int(i64::try_from(first_failed).unwrap_or(i64::MAX)),
                )];
                let report = info.report(err.final_outcome(), run_time, Some(err.to_string()));
                let detail = err.to_string();
                let reply = wire.reply(|| {
                    Notice::error(
                        ResultStatus::Failure,
                        &exc,
                        format!("{}: {detail}", reason.as_str()),
                    )
                });
                Box::pin(dead_letter(
                    session,
                    &incoming,
                    reason,
                    &detail,
                    wire.dead_body(&payload),
                    &extra,
                    reply,
                    report,
                ))
                .await;
            }
        }
    }
}

/// Claims `key`; `None` when the delivery was dealt with here (duplicate,
/// deferred, or left for the store to come back).
#[allow(clippy::too_many_arguments)]
async fn claim(
    session: &Session,
    incoming: &Incoming,
    wire: &Wire,
    env: &Envelope,
    payload: &Bytes,
    key: &str,
    lease: Duration,
    info: &Info,
) -> Option<ClaimToken> {
    let shared = &session.shared;
    let store = session.store();
    let mut forgot = false;
    loop {
        let claim = store
            .claim(key, &env.job_id, &env.kind, &shared.worker_id, lease)
            .await;
        match claim {
            Ok(Claim::Acquired(token)) => return Some(token),
            Ok(Claim::AlreadyCompleted { result }) => {
                tracing::debug!(job_id = %env.job_id, key, "duplicate: key already completed");
                // A Celery client may still wait: the run that completed it
                // may have stopped before its result was sent.
                let reply = wire.reply(|| Notice::success(result.unwrap_or_default()));
                let report = info.report(Outcome::Duplicate, Duration::ZERO, None);
                settle(session, incoming, reply, report).await;
                return None;
            }
            Ok(Claim::AlreadyFailed { .. }) if env.replay && !forgot => {
                // An operator replayed a job whose key ended in failure.
                tracing::info!(job_id = %env.job_id, key, "replay: forgetting the failed key");
                if let Err(e) = store.forget(key).await {
                    tracing::warn!(error = %e, "cannot forget the key for the replay");
                }
                forgot = true;
            }
            Ok(Claim::AlreadyFailed { error }) => {
                tracing::debug!(job_id = %env.job_id, key, "duplicate: key already failed for good");
                let reply = wire.reply(|| {
                    let text = error["error"].as_str().unwrap_or("failed").to_string();
                    let exc = error
                        .get(CELERY_EXCEPTION)
                        .and_then(|v| serde_json::from_value(v.clone()).ok())
                        .unwrap_or_else(|| {
                            CeleryException::from_job_error(&JobError::permanent(text.clone()))
                        });
                    Notice::error(ResultStatus::Failure, &exc, text)
                });
                let report = info.report(Outcome::Duplicate, Duration::ZERO, None);
                settle(session, incoming, reply, report).await;
                return None;
            }
            Ok(Claim::HeldElsewhere { owner, expires_in }) => {
                let delay = (expires_in + Duration::from_secs(1)).min(MAX_DEFER);
                tracing::debug!(job_id = %env.job_id, key, owner = %owner, retry_in = ?delay, "key held by a live lease; deferring");
                let report = info.report(Outcome::Deferred, Duration::ZERO, None);
                defer(session, incoming, wire, env, payload, delay, report).await;
                return None;
            }
            Err(e) => {
                shared.readiness.set("store", false);
                tracing::warn!(job_id = %env.job_id, error = %e, "cannot claim the idempotency key; deferring");
                let report = info.report(Outcome::Deferred, Duration::ZERO, Some(e.to_string()));
                defer(
                    session,
                    incoming,
                    wire,
                    env,
                    payload,
                    STORE_RETRY_DELAY,
                    report,
                )
                .await;
                return None;
            }
        }
    }
}

/// Runs the handler under the hard timeout, catching panics.
async fn run(
    session: &Session,
    handler: &Handler,
    env: &Envelope,
    payload: &Bytes,
    timeout: Duration,
    token: Option<&ClaimToken>,
    traceparent: Option<String>,
) -> Result<Done, Failure> {
    let ctx = || JobContext {
        job_id: env.job_id.clone(),
        kind: env.kind.clone(),
        queue: env.queue.clone(),
        attempt: env.attempt,
        idempotency_key: env.idempotency_key.clone(),
        traceparent: traceparent.clone(),
        deadline: Instant::now() + timeout,
    };
    match handler {
        Handler::Io(h) => {
            let fut = AssertUnwindSafe(h(ctx(), payload)).catch_unwind();
            let value = guarded(fut, timeout).await.map_err(Failure::Job)?;
            Ok(Done {
                value,
                committed: false,
            })
        }
        // The other two are boxed: their futures (sqlx, the pool's IPC) are
        // large, and every in-flight IO job would otherwise carry their size.
        Handler::IoTx(h) => Box::pin(run_tx(session, h, ctx(), payload, timeout, token)).await,
        Handler::Cpu => Box::pin(run_cpu(session, env, payload, timeout, traceparent)).await,
    }
}

/// [`run`] for a handler that writes inside the completion transaction.
async fn run_tx(
    session: &Session,
    h: &IoTxHandler,
    ctx: JobContext,
    payload: &Bytes,
    timeout: Duration,
    token: Option<&ClaimToken>,
) -> Result<Done, Failure> {
    let token = token.expect("transactional jobs are always claimed");
    let tx = session.store().begin_completion(token).await.map_err(|e| {
        Failure::Job(JobError::retryable(format!(
            "cannot open the completion transaction: {e}"
        )))
    })?;
    let fut = AssertUnwindSafe(h(ctx, payload, tx)).catch_unwind();
    let (value, tx) = guarded(fut, timeout).await.map_err(Failure::Job)?;
    tx.commit(&value).await.map_err(|e| {
        Failure::Job(JobError::retryable(format!(
            "cannot commit the completion (the handler's writes were rolled back): {e}"
        )))
    })?;
    Ok(Done {
        value,
        committed: true,
    })
}

/// [`run`] for a CPU kind: through the process pool.
async fn run_cpu(
    session: &Session,
    env: &Envelope,
    payload: &Bytes,
    timeout: Duration,
    traceparent: Option<String>,
) -> Result<Done, Failure> {
    let Some(pool) = session.shared.cpu.get() else {
        return Err(Failure::Job(JobError::permanent("no CPU pool is running")));
    };
    let req = CpuRequest {
        job_id: env.job_id.clone(),
        kind: env.kind.clone(),
        attempt: env.attempt,
        traceparent,
        payload: payload.clone(),
        timeout,
    };
    match pool.run(req).await {
        Ok(bytes) => {
            let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            Ok(Done {
                value,
                committed: false,
            })
        }
        Err(e) if e.is_shutdown() => Err(Failure::Abandon(e.to_string())),
        Err(e) => Err(Failure::Job(cpu_error(e))),
    }
}

/// Awaits a handler future with the hard timeout, turning panics into errors.
async fn guarded<T>(
    fut: impl std::future::Future<Output = Result<Result<T, JobError>, Box<dyn std::any::Any + Send>>>,
    timeout: Duration,
) -> Result<T, JobError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(JobError::Timeout { after: timeout }),
        Ok(Err(panic)) => Err(JobError::Crashed {
            cause: format!("handler panicked: {}", panic_message(&panic)),
        }),
        Ok(Ok(r)) => r,
    }
}

fn cpu_error(e: CpuError) -> JobError {
    match e {
        CpuError::Timeout { after } => JobError::Timeout { after },
        CpuError::Crashed { cause } => JobError::Crashed { cause },
        CpuError::Panicked { message } => JobError::Crashed {
            cause: format!("handler panicked: {message}"),
        },
        CpuError::Handler(HandlerError::Retryable {
            message,
            retry_after_ms,
        }) => JobError::Retryable {
            message,
            retry_after: retry_after_ms.map(Duration::from_millis),
        },
        CpuError::Handler(HandlerError::Permanent { message }) => JobError::Permanent { message },
        e @ CpuError::PayloadTooLarge { .. } => JobError::Permanent {
            message: e.to_string(),
        },
        other => JobError::Crashed {
            cause: other.to_string(),
        },
    }
}

/// Records the completion, retrying briefly on transient store errors.
async fn complete(session: &Session, token: &ClaimToken, value: &serde_json::Value) -> bool {
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=3 {
        match session.store().complete(token, value).await {
            Ok(()) => return true,
            Err(taskmill_store::StoreError::LeaseLost { .. }) => {
                // Another worker took the key over after our lease expired and
                // will record its own outcome; ours must not overwrite it.
                tracing::warn!(key = %token.key, "lease lost before completion; the job may have run twice");
                return true;
            }
            Err(e) => {
                tracing::warn!(key = %token.key, attempt, error = %e, "cannot record the completion");
                tokio::time::sleep(wait).await;
                wait *= 4;
            }
        }
    }
    false
}

/// The copy of a delivery that runs `next` after `delay`: a taskmill job, or
/// the Celery message itself with `retries` = attempt - 1 and `eta` = when it
/// is due (never earlier than its own `eta`: a delay clamped to the ladder's
/// maximum only means another round through the ladder).
fn delayed(
    incoming: &Incoming,
    wire: &Wire,
    next: &Envelope,
    delay: Duration,
) -> Result<Outgoing, String> {
    match wire {
        Wire::Taskmill => Outgoing::job_delayed(next, delay),
        Wire::Celery(task) => {
            let due = now_us()
                .saturating_add(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX))
                .max(task.eta_us.unwrap_or(0));
            let headers = celery::redelivery_headers(
                next.attempt.saturating_sub(1),
                due,
                next.first_failed_at_ms,
            );
            incoming.delayed_copy(&headers, delay)
        }
    }
}

/// Publishes `next` to run after `delay`, tells a Celery client (`reply`),
/// then acks the original.
#[allow(clippy::too_many_arguments)]
async fn republish(
    session: &Session,
    incoming: &Incoming,
    wire: &Wire,
    mut next: Envelope,
    payload: &Bytes,
    delay: Duration,
    reply: Option<(&ReplyTo, Notice)>,
    report: JobReport,
) {
    next.payload = payload.to_vec();
    next.enqueued_at_us = Some(deadline_us(now_us(), delay));
    let msg = match delayed(incoming, wire, &next, delay) {
        Ok(m) => m,
        Err(e) => {
            // Only a delay beyond the ladder's range; clamp to its maximum.
            tracing::warn!(error = %e, "delay out of range; using the maximum");
            delayed(incoming, wire, &next, taskmill_core::wire::MAX_DELAY)
                .expect("the maximum delay is in range")
        }
    };
    let published = publish(session, &msg)
        .instrument(spans::step_span(Step::Retry))
        .await;
    if published {
        settle(session, incoming, reply, report).await;
    }
}

/// Publishes a copy of the same attempt to run after `delay`, then acks.
async fn defer(
    session: &Session,
    incoming: &Incoming,
    wire: &Wire,
    env: &Envelope,
    payload: &Bytes,
    delay: Duration,
    report: JobReport,
) {
    republish(
        session,
        incoming,
        wire,
        env.clone(),
        payload,
        delay,
        None,
        report,
    )
    .await;
}

/// Celery's `expires` and `eta`, checked before anything runs: an expired
/// task is dead-lettered (reason `expired`) and reported REVOKED, as Celery
/// does; a task not due yet goes through the delay ladder until its `eta`
/// instead of being held unacked. Returns whether the job may go on now.
async fn celery_gate(
    session: &Session,
    incoming: &Incoming,
    wire: &Wire,
    env: &Envelope,
    payload: &Bytes,
    info: &Info,
) -> bool {
    let Wire::Celery(task) = wire else {
        return true;
    };
    let now = now_us();
    if task.expired_at(now) {
        let at = celery::format_iso8601(task.expires_us.unwrap_or(0));
        let detail = format!("the Celery task expired at {at}");
        tracing::info!(queue = %env.queue, job_id = %env.job_id, kind = %env.kind, expires = %at, "Celery task expired; not running it");
        let report = info.report(Outcome::Dead, Duration::ZERO, Some(detail.clone()));
        let reply = wire.reply(|| {
            Notice::error(
                ResultStatus::Revoked,
                &CeleryException::revoked("expired"),
                detail.clone(),
            )
        });
        dead_letter(
            session,
            incoming,
            DeadReason::Expired,
            &detail,
            None,
            &[],
            reply,
            report,
        )
        .await;
        return false;
    }
    if let Some(wait) = task.wait_at(now) {
        tracing::debug!(job_id = %env.job_id, wait = ?wait, "Celery task not due yet; delaying it to its eta");
        let report = info.report(Outcome::Deferred, Duration::ZERO, None);
        defer(session, incoming, wire, env, payload, wait, report).await;
        return false;
    }
    true
}

/// Publishes with confirm; on failure ends the session and returns false.
async fn publish(session: &Session, msg: &Outgoing) -> bool {
    match session.publisher.publish(msg).await {
        Ok(took) => {
            session
                .shared
                .metrics
                .publish_confirm_seconds
                .observe(took.as_secs_f64());
            true
        }
        Err(e) => {
            // The delivery stays unacked and returns to its queue when the
            // session's channels close; the next session redeclares the
            // topology (a deleted `Q.dead`, say) and tries again.
            session.fail(format!("cannot publish to {}: {e}", msg.routing_key()));
            false
        }
    }
}

/// Publishes the dead-letter copy, waits for its confirm, tells a Celery
/// client (`reply`), then acks.
#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    session: &Session,
    incoming: &Incoming,
    reason: DeadReason,
    detail: &str,
    body: Option<&[u8]>,
    extra: &[(&'static str, HeaderValue)],
    reply: Option<(&ReplyTo, Notice)>,
    report: JobReport,
) {
    let shared = &session.shared;
    let copy = incoming.dead_letter(reason, detail, &shared.worker_id, body, extra);
    let published = publish(session, &copy)
        .instrument(spans::step_span(Step::DeadLetter))
        .await;
    if published {
        shared
            .metrics
            .dead_letters_total
            .with_label_values(&[incoming.queue(), reason.as_str()])
            .inc();
        settle(session, incoming, reply, report).await;
    }
}

/// The key of a failure record that holds the exception reported to Celery.
const CELERY_EXCEPTION: &str = "celery_exception";

/// The end of a delivery whose outcome is durable: tells a Celery client
/// (`reply`), then acks and reports.
async fn settle(
    session: &Session,
    incoming: &Incoming,
    reply: Option<(&ReplyTo, Notice)>,
    report: JobReport,
) {
    if let Some((to, notice)) = reply
        && !Box::pin(notify(session, to, notice)).await
    {
        return;
    }
    if ack(session, incoming).await {
        finish(session, report);
    }
}

/// Publishes a result message to a Celery client's reply queue, confirmed.
/// A reply queue that no longer exists (the client went away) drops the
/// result, as Celery does. A RETRY notice is informative: if it cannot be
/// sent, the job goes on. Any other failure to send a final state ends the
/// session like a failed publish: the delivery returns unacked and its
/// redelivery, finding the outcome recorded, reports it again.
async fn notify(session: &Session, to: &ReplyTo, notice: Notice) -> bool {
    let body = celery::result_body(
        to,
        notice.status,
        &notice.result,
        notice.traceback.as_deref(),
        now_us(),
    );
    let msg = Outgoing::celery_result(to, body);
    match session.publisher.publish(&msg).await {
        Ok(took) => {
            session
                .shared
                .metrics
                .publish_confirm_seconds
                .observe(took.as_secs_f64());
            true
        }
        Err(PublishError::Unroutable { .. }) => {
            tracing::info!(task_id = %to.task_id, reply_to = %to.queue, status = notice.status.as_str(), "the Celery client's reply queue is gone; result dropped");
            true
        }
        Err(e) if !notice.status.is_ready() => {
            tracing::warn!(task_id = %to.task_id, error = %e, "cannot send the RETRY state to the Celery client");
            true
        }
        Err(e) => {
            session.fail(format!(
                "cannot send the result of Celery task {} to {}: {e}",
                to.task_id, to.queue
            ));
            false
        }
    }
}

async fn ack(session: &Session, incoming: &Incoming) -> bool {
    match incoming.ack().await {
        Ok(()) => true,
        Err(e) => {
            session.shared.metrics.ack_failures_total.inc();
            tracing::warn!(queue = %incoming.queue(), error = %e, "ack failed; the broker will redeliver this message");
            false
        }
    }
}

fn finish(session: &Session, report: JobReport) {
    let shared = &session.shared;
    let kind = if shared.handlers.contains_key(&report.kind) {
        report.kind.as_str()
    } else {
        UNKNOWN_KIND
    };
    shared
        .metrics
        .jobs_total
        .with_label_values(&[&report.queue, kind, report.outcome.as_str()])
        .inc();
    if let Some(obs) = &shared.observer {
        obs(&report);
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
