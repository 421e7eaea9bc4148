//! The life of one delivery: decode, dispatch, run under a timeout, then ack
//! or dead-letter.
//!
//! The rule that keeps nothing lost: the message is acked only after its
//! outcome is durable. A dead-letter copy is acked only once the broker
//! confirmed the copy; if that publish fails the delivery stays unacked and the
//! broker redelivers it.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use taskmill_broker::Incoming;
use taskmill_core::wire::now_us;
use taskmill_core::{DeadReason, JobError, Outcome};
use taskmill_telemetry::metrics::{InFlightGuard, UNKNOWN_KIND};

use crate::builder::JobReport;
use crate::handler::JobContext;
use crate::runtime::Session;

pub(crate) async fn handle(session: &Session, mut incoming: Incoming) {
    let shared = &session.shared;
    let queue = incoming.queue().to_string();
    let env = match incoming.decode(shared.config.max_payload_bytes) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!(queue = %queue, message_id = ?incoming.message_id(), reason = e.reason.as_str(), error = %e.detail, "refusing message");
            let report = JobReport {
                queue: queue.clone(),
                kind: UNKNOWN_KIND.to_string(),
                job_id: incoming.message_id().map(str::to_string),
                outcome: Outcome::Dead,
                queue_wait: None,
                run_time: Duration::ZERO,
                error: Some(e.to_string()),
            };
            dead_letter(session, &incoming, e.reason, &e.detail, None, report).await;
            return;
        }
    };
    let Some(handler) = shared.io.get(&env.kind) else {
        let detail = format!("no handler is registered for kind `{}`", env.kind);
        tracing::warn!(queue = %queue, job_id = %env.job_id, kind = %env.kind, "refusing job: unknown kind");
        let report = JobReport {
            queue: queue.clone(),
            kind: env.kind.clone(),
            job_id: Some(env.job_id.clone()),
            outcome: Outcome::Dead,
            queue_wait: None,
            run_time: Duration::ZERO,
            error: Some(detail.clone()),
        };
        dead_letter(
            session,
            &incoming,
            DeadReason::UnknownKind,
            &detail,
            Some(&env.payload),
            report,
        )
        .await;
        return;
    };

    let kind_timeout = shared.config.kind_timeout(&env.kind);
    let timeout = env.timeout.map_or(kind_timeout, |t| t.min(kind_timeout));
    let queue_wait = env
        .enqueued_at_us
        .map(|at| Duration::from_micros(now_us().saturating_sub(at)));
    let labels = [queue.as_str(), env.kind.as_str()];
    if let Some(w) = queue_wait {
        shared
            .metrics
            .job_queue_wait_seconds
            .with_label_values(&labels)
            .observe(w.as_secs_f64());
    }
    let start = Instant::now();
    let ctx = JobContext {
        job_id: env.job_id.clone(),
        kind: env.kind.clone(),
        queue: queue.clone(),
        attempt: env.attempt,
        idempotency_key: env.idempotency_key.clone(),
        traceparent: env.traceparent.clone(),
        deadline: start + timeout,
    };
    // The handler parses the payload before returning its future, so the
    // bytes stay here, uncopied, for a possible dead-letter copy.
    let result = {
        let _in_flight = InFlightGuard::new(
            shared
                .metrics
                .jobs_in_flight
                .with_label_values(&[&queue, "io"]),
        );
        let fut = AssertUnwindSafe(handler(ctx, &env.payload)).catch_unwind();
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(JobError::Timeout { after: timeout }),
            Ok(Err(panic)) => Err(JobError::Crashed {
                cause: format!("handler panicked: {}", panic_message(&panic)),
            }),
            Ok(Ok(r)) => r,
        }
    };
    let run_time = start.elapsed();
    shared
        .metrics
        .job_run_seconds
        .with_label_values(&labels)
        .observe(run_time.as_secs_f64());

    match result {
        Ok(_value) => {
            if ack(session, &incoming).await {
                finish(
                    session,
                    JobReport {
                        queue,
                        kind: env.kind,
                        job_id: Some(env.job_id),
                        outcome: Outcome::Ok,
                        queue_wait,
                        run_time,
                        error: None,
                    },
                );
            }
        }
        Err(err) => {
            tracing::warn!(queue = %queue, job_id = %env.job_id, kind = %env.kind, attempt = env.attempt, error = %err, "job failed");
            let report = JobReport {
                queue: queue.clone(),
                kind: env.kind.clone(),
                job_id: Some(env.job_id.clone()),
                outcome: err.final_outcome(),
                queue_wait,
                run_time,
                error: Some(err.to_string()),
            };
            dead_letter(
                session,
                &incoming,
                err.dead_reason(),
                &err.to_string(),
                Some(&env.payload),
                report,
            )
            .await;
        }
    }
}

/// Publishes the dead-letter copy, waits for its confirm, then acks.
async fn dead_letter(
    session: &Session,
    incoming: &Incoming,
    reason: DeadReason,
    detail: &str,
    body: Option<&[u8]>,
    report: JobReport,
) {
    let shared = &session.shared;
    let copy = incoming.dead_letter(reason, detail, &shared.worker_id, body);
    match session.publisher.publish(&copy).await {
        Ok(took) => {
            shared
                .metrics
                .publish_confirm_seconds
                .observe(took.as_secs_f64());
            shared
                .metrics
                .dead_letters_total
                .with_label_values(&[incoming.queue(), reason.as_str()])
                .inc();
            if ack(session, incoming).await {
                finish(session, report);
            }
        }
        Err(e) => {
            // Not acked: the broker redelivers it and the next attempt tries
            // the dead-letter publish again. Nothing is lost.
            tracing::error!(queue = %incoming.queue(), error = %e, "cannot publish the dead-letter copy; leaving the message unacked");
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
    let kind = if report.kind == UNKNOWN_KIND || shared.io.contains_key(&report.kind) {
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
