//! The run: the job's handler under its hard timeout (IO kinds inline on
//! tokio, CPU kinds in the process pool), panics and crashes turned into
//! errors, and the completion recorded for a claimed key.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use taskmill_core::JobError;
use taskmill_cpu::{CpuError, CpuRequest, HandlerError};
use taskmill_store::IdempotencyStore;
use taskmill_telemetry::metrics::InFlightGuard;
use taskmill_telemetry::traces::spans::{self, Step};
use taskmill_telemetry::traces::traceparent_of;
use tracing::Instrument;

use super::Job;
use super::claim;
use super::decide::Finding;
use crate::handler::{Handler, IoTxHandler, JobContext};

/// Runs the job's handler; the finding says how it ended.
pub(super) async fn run(job: &Job<'_>, handler: &Handler, timeout: Duration) -> Finding {
    let shared = &job.session.shared;
    let _in_flight = InFlightGuard::new(
        shared
            .metrics
            .jobs_in_flight
            .with_label_values(&[&job.info.queue, handler.class()]),
    );
    let run_span = spans::step_span(Step::Run);
    // Handlers and CPU processes continue the trace as children of the
    // process (job) span, as the messaging conventions place the work done
    // for a message; without trace export, from the producer's context.
    let traceparent = traceparent_of(&job.info.span)
        .map(|(tp, _)| tp)
        .or_else(|| job.env.traceparent.clone());
    let ran = dispatch(job, handler, timeout, traceparent)
        .instrument(run_span)
        .await;
    match ran {
        Ok(Done {
            value,
            committed: false,
        }) if job.token.is_some() => {
            let token = job.token.as_ref().expect("checked above").token();
            let recorded = Box::pin(claim::record_completion(job, token, &value)).await;
            Finding::Succeeded { value, recorded }
        }
        Ok(Done { value, .. }) => Finding::Succeeded {
            value,
            recorded: true,
        },
        Err(Stopped::Job(e)) => Finding::Failed(e),
        Err(Stopped::Shutdown(why)) => Finding::Interrupted { why },
    }
}

/// A successful run.
struct Done {
    value: serde_json::Value,
    /// The completion was committed with the handler's own writes.
    committed: bool,
}

/// Why a run produced no result.
enum Stopped {
    /// The job failed; its error decides retry or dead-letter.
    Job(JobError),
    /// The worker is shutting down and stopped the job.
    Shutdown(String),
}

async fn dispatch(
    job: &Job<'_>,
    handler: &Handler,
    timeout: Duration,
    traceparent: Option<String>,
) -> Result<Done, Stopped> {
    let env = &job.env;
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
            // The handler parses its payload when called: a panicking
            // `Deserialize` is caught here like a panicking handler.
            let fut = std::panic::catch_unwind(AssertUnwindSafe(|| h(ctx(), &job.payload)))
                .map_err(|p| Stopped::Job(panicked(&p)))?;
            let value = guarded(AssertUnwindSafe(fut).catch_unwind(), timeout)
                .await
                .map_err(Stopped::Job)?;
            Ok(Done {
                value,
                committed: false,
            })
        }
        // The other two are boxed: their futures (sqlx, the pool's IPC) are
        // large, and every in-flight IO job would otherwise carry their size.
        Handler::IoTx(h) => Box::pin(run_tx(job, h, ctx(), timeout)).await,
        Handler::Cpu => Box::pin(run_cpu(job, timeout, traceparent)).await,
    }
}

/// [`dispatch`] for a handler that writes inside the completion transaction.
async fn run_tx(
    job: &Job<'_>,
    h: &IoTxHandler,
    ctx: JobContext,
    timeout: Duration,
) -> Result<Done, Stopped> {
    let token = job
        .token
        .as_ref()
        .expect("transactional jobs are always claimed")
        .token();
    let tx = job
        .session
        .store()
        .begin_completion(token)
        .await
        .map_err(|e| {
            Stopped::Job(JobError::retryable(format!(
                "cannot open the completion transaction: {e}"
            )))
        })?;
    let fut = std::panic::catch_unwind(AssertUnwindSafe(|| h(ctx, &job.payload, tx)))
        .map_err(|p| Stopped::Job(panicked(&p)))?;
    let (value, tx) = guarded(AssertUnwindSafe(fut).catch_unwind(), timeout)
        .await
        .map_err(Stopped::Job)?;
    tx.commit(&value).await.map_err(|e| {
        Stopped::Job(JobError::retryable(format!(
            "cannot commit the completion (the handler's writes were rolled back): {e}"
        )))
    })?;
    Ok(Done {
        value,
        committed: true,
    })
}

/// [`dispatch`] for a CPU kind: through the process pool.
async fn run_cpu(
    job: &Job<'_>,
    timeout: Duration,
    traceparent: Option<String>,
) -> Result<Done, Stopped> {
    let Some(pool) = job.session.shared.cpu.get() else {
        return Err(Stopped::Job(JobError::permanent("no CPU pool is running")));
    };
    let env = &job.env;
    let req = CpuRequest {
        job_id: env.job_id.clone(),
        kind: env.kind.clone(),
        attempt: env.attempt,
        traceparent,
        payload: job.payload.clone(),
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
        Err(e) if e.is_shutdown() => Err(Stopped::Shutdown(e.to_string())),
        Err(e) => Err(Stopped::Job(cpu_error(e))),
    }
}

/// Awaits a handler future with the hard timeout, turning panics into errors.
async fn guarded<T>(
    fut: impl std::future::Future<Output = Result<Result<T, JobError>, Box<dyn std::any::Any + Send>>>,
    timeout: Duration,
) -> Result<T, JobError> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(JobError::Timeout { after: timeout }),
        Ok(Err(panic)) => Err(panicked(&panic)),
        Ok(Ok(r)) => r,
    }
}

/// The error of a handler (or its payload's `Deserialize`) that panicked.
fn panicked(p: &Box<dyn std::any::Any + Send>) -> JobError {
    let message = if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    };
    JobError::Crashed {
        cause: format!("handler panicked: {message}"),
    }
}

/// The job error of a CPU pool failure.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_failures_map_to_job_errors() {
        let after = Duration::from_secs(2);
        assert_eq!(
            cpu_error(CpuError::Timeout { after }),
            JobError::Timeout { after }
        );
        assert_eq!(
            cpu_error(CpuError::Handler(HandlerError::Retryable {
                message: "m".into(),
                retry_after_ms: Some(u64::MAX),
            })),
            JobError::Retryable {
                message: "m".into(),
                retry_after: Some(Duration::from_millis(u64::MAX)),
            }
        );
        assert!(matches!(
            cpu_error(CpuError::Panicked {
                message: "boom".into()
            }),
            JobError::Crashed { cause } if cause.contains("boom")
        ));
    }

    #[tokio::test]
    async fn a_panic_and_an_overrun_become_errors() {
        let boom = async { panic!("boom") };
        let r: Result<(), _> = guarded(
            AssertUnwindSafe(async {
                boom.await;
                Ok(())
            })
            .catch_unwind(),
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(r, Err(JobError::Crashed { cause }) if cause.contains("boom")));
        let slow = AssertUnwindSafe(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, JobError>(())
        })
        .catch_unwind();
        let r = guarded(slow, Duration::from_millis(10)).await;
        assert_eq!(
            r,
            Err(JobError::Timeout {
                after: Duration::from_millis(10)
            })
        );
    }
}
