//! Carrying a [`Settlement`] out: the store effect on a claimed key, the
//! copy (retry, deferral, dead letter) published and confirmed, the Celery
//! client told, and only then the ack and the report.
//!
//! The rule that keeps nothing lost lives here: the ack is sent only after
//! the outcome is durable. When a publish fails, the session ends (the
//! supervisor reconnects and redeclares) and the unacked delivery returns to
//! its queue.

use std::time::Duration;

use taskmill_broker::now_us;
use taskmill_broker::{Incoming, Outgoing};
use taskmill_core::celery::ReplyTo;
use taskmill_core::wire::{H_FIRST_FAILED_AT_MS, MAX_DELAY, deadline_us};
use taskmill_core::{DeadReason, Envelope, HeaderValue};
use taskmill_telemetry::traces::spans::{self, Step};
use tracing::Instrument;

use super::Job;
use super::celery::{Notice, Wire};
use super::claim;
use super::decide::{Facts, Finding, Settlement, StoreEffect, decide, store_effect_first};
use super::events::{AckFailed, Confirmed, DeadLettered, Decided, Finished};
use crate::shared::{JobReport, Session};

/// Decides a decoded job's fate from what its last stage found and carries
/// it out.
pub(super) async fn settle(job: Job<'_>, finding: Finding, run_time: Duration) {
    let shared = &job.session.shared;
    let policy = shared.config.retry_policy(&job.env.kind);
    let settlement = decide(
        &finding,
        Facts {
            attempt: job.env.attempt,
            policy: &policy,
            jitter: fastrand::f64(),
        },
    );
    let detail = finding.detail(&job.env.kind);
    Decided {
        queue: &job.info.queue,
        job_id: &job.env.job_id,
        kind: &job.env.kind,
        attempt: job.env.attempt,
        finding: &finding,
        settlement: &settlement,
        detail: detail.as_deref(),
    }
    .emit();
    let effect = settlement.store_effect(job.acked_early);
    let effect_first = store_effect_first(job.acked_early);
    if effect_first {
        apply(&job, effect, &finding, &settlement).await;
    }
    let reply = job.wire.reply_to().and_then(|to| {
        Notice::for_settlement(&finding, &settlement, &job.env.kind, detail.as_deref())
            .map(|n| (to, n))
    });
    let Some(outcome) = settlement.outcome() else {
        // Left to the broker: no outcome to report or record on the span.
        if !effect_first {
            apply(&job, effect, &finding, &settlement).await;
        }
        return;
    };
    let report = job.info.report(outcome, run_time, detail.clone());
    let session = job.session;
    // The copy this settlement needs, confirmed by the broker.
    let copied = match settlement {
        Settlement::Ack { .. } => true,
        Settlement::Retry { delay } => {
            let mut next = job.env.clone();
            next.attempt += 1;
            next.first_failed_at_ms.get_or_insert(now_us() / 1000);
            next.replay = false;
            let copy = delayed_copy(&job, next, delay);
            publish(session, &copy, Step::Retry).await
        }
        Settlement::Defer { delay } => {
            let copy = delayed_copy(&job, job.env.clone(), delay);
            publish(session, &copy, Step::Retry).await
        }
        Settlement::DeadLetter { reason, .. } => {
            // The time of the first failure travels with a job that ran.
            let extra = if matches!(finding, Finding::Failed(_)) {
                let first = job.env.first_failed_at_ms.unwrap_or(now_us() / 1000);
                vec![(
                    H_FIRST_FAILED_AT_MS,
                    HeaderValue::Int(i64::try_from(first).unwrap_or(i64::MAX)),
                )]
            } else {
                Vec::new()
            };
            let letter = DeadLetter {
                reason,
                detail: detail.as_deref().unwrap_or_default(),
                body: job.wire.dead_body(&job.payload),
                extra: &extra,
            };
            dead_letter(session, &job.incoming, letter).await
        }
        Settlement::LeaveUnacked => unreachable!("settled above: it has no outcome"),
    };
    if !copied {
        return;
    }
    if !effect_first {
        apply(&job, effect, &finding, &settlement).await;
    }
    // A job acked early has nothing left to ack.
    let incoming = (!job.acked_early).then_some(&job.incoming);
    finish(session, incoming, reply, report).await;
}

/// Carries out the store effect of a settlement on the job's claimed key.
async fn apply(job: &Job<'_>, effect: StoreEffect, finding: &Finding, settlement: &Settlement) {
    let Some(token) = job.token.as_ref().map(|h| h.token()) else {
        return;
    };
    match (effect, finding, settlement) {
        (StoreEffect::Release, ..) => claim::release(job, token).await,
        (StoreEffect::Fail, Finding::Failed(err), Settlement::DeadLetter { reason, .. }) => {
            let exc = celery_exception(&job.wire, finding);
            claim::record_failure(job, token, *reason, err, exc).await;
        }
        (StoreEffect::Fail, ..) => {
            // A key refused before its run (the store rejects its input)
            // has no run to record: give it back.
            claim::release(job, token).await;
        }
        (StoreEffect::None, ..) => {}
    }
}

/// The exception a Celery task's failure record keeps, for a client whose
/// task is redelivered after the failure was recorded.
fn celery_exception(wire: &Wire, finding: &Finding) -> Option<serde_json::Value> {
    match (wire, finding) {
        (Wire::Celery(_), Finding::Failed(err)) => {
            Some(taskmill_core::celery::CeleryException::from_job_error(err).to_json())
        }
        _ => None,
    }
}

/// The copy of the job that runs `next` after `delay`, in the job's protocol.
fn delayed_copy(job: &Job<'_>, mut next: Envelope, delay: Duration) -> Outgoing {
    next.payload = job.payload.to_vec();
    next.enqueued_at_us = Some(deadline_us(now_us(), delay));
    job.wire
        .delayed(&job.incoming, &next, delay.min(MAX_DELAY))
        .expect("a delay within the ladder's range always has a route")
}

/// What a dead-letter copy says.
pub(super) struct DeadLetter<'a> {
    pub(super) reason: DeadReason,
    pub(super) detail: &'a str,
    /// The payload taken out of a taskmill delivery; `None`: the delivery's own body.
    pub(super) body: Option<&'a [u8]>,
    pub(super) extra: &'a [(&'static str, HeaderValue)],
}

/// Publishes the dead-letter copy and waits for its confirm; returns
/// whether it was confirmed (if not, the session is ending).
pub(super) async fn dead_letter(
    session: &Session,
    incoming: &Incoming,
    letter: DeadLetter<'_>,
) -> bool {
    let shared = &session.shared;
    let copy = incoming.dead_letter(
        letter.reason,
        letter.detail,
        &shared.worker_id,
        letter.body,
        letter.extra,
    );
    let published = publish(session, &copy, Step::DeadLetter).await;
    if published {
        DeadLettered {
            queue: incoming.queue(),
            reason: letter.reason,
        }
        .emit(shared);
    }
    published
}

/// Publishes with confirm, inside the step's span; on failure ends the
/// session and returns false (the delivery stays unacked and returns to its
/// queue when the session's channels close; the next session redeclares the
/// topology, a deleted `Q.dead` say, and tries again).
async fn publish(session: &Session, msg: &Outgoing, step: Step) -> bool {
    let published = session
        .publisher
        .publish(msg)
        .instrument(spans::step_span(step))
        .await;
    match published {
        Ok(took) => {
            Confirmed { took }.emit(&session.shared);
            true
        }
        Err(e) => {
            session.fail(format!("cannot publish to {}: {e}", msg.routing_key()));
            false
        }
    }
}

/// The end of a delivery whose outcome is durable: tells a Celery client
/// (`reply`), then acks (`incoming`; `None` when it was acked early) and
/// reports.
pub(super) async fn finish(
    session: &Session,
    incoming: Option<&Incoming>,
    reply: Option<(&ReplyTo, Notice)>,
    report: JobReport,
) {
    if let Some((to, notice)) = reply
        && !Box::pin(super::celery::notify(session, to, notice)).await
    {
        return;
    }
    let Some(incoming) = incoming else {
        return Finished { report }.emit(&session.shared);
    };
    match incoming.ack().await {
        Ok(()) => Finished { report }.emit(&session.shared),
        Err(e) => AckFailed {
            queue: incoming.queue(),
            error: &e,
        }
        .emit(&session.shared),
    }
}
