//! Retryable failures come back after the configured exponential backoff
//! (through the broker's delay ladder), a job that fails on every allowed
//! attempt ends in `Q.dead` as `attempts_exhausted`, and a permanent error
//! dead-letters at once as `handler_error`. In-process worker with the
//! built-in and diagnostic kinds (`test.fail`).

mod common;

use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_core::retry::Jitter;
use taskmill_core::wire::{
    H_ATTEMPT, H_DEAD_AT_MS, H_DEAD_ERROR, H_DEAD_QUEUE, H_DEAD_REASON, H_DEAD_WORKER,
    H_FIRST_FAILED_AT_MS,
};
use taskmill_core::{HeaderValue, Outcome};
use taskmill_worker::{CancellationToken, JobReport, WorkerHandle};

use common::Reports;

struct Running {
    queue: String,
    cpu_queue: String,
    handle: WorkerHandle,
    shutdown: CancellationToken,
    reports: Reports,
    worker_id: String,
    _data: common::TempDir,
}

/// A worker on a fresh queue with `backoff_base_ms` 1000, factor 2, no
/// jitter, and `max_attempts`; every finished attempt is recorded with the
/// moment its report arrived.
async fn start(test: &str, max_attempts: u32) -> Running {
    let queue = common::unique_queue(test);
    let data = common::temp_dir(test);
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.backoff_base_ms = 1_000;
    config.backoff_factor = 2.0;
    config.jitter = Jitter::None;
    config.max_attempts = max_attempts;
    // The registry includes CPU kinds, which add the CPU queue to the
    // worker's queues: a private one, so this worker takes no other test's
    // CPU jobs. One process is plenty (no CPU job runs here).
    let cpu_queue = format!("{queue}-cpu");
    config.cpu_queue = cpu_queue.clone();
    config.cpu_processes = 1;
    let worker_id = config.worker_id(taskmill_broker::default_worker_id);
    let (handle, shutdown, reports) =
        common::start_recording(config, Duration::from_secs(30)).await;
    Running {
        queue,
        cpu_queue,
        handle,
        shutdown,
        reports,
        worker_id,
        _data: data,
    }
}

impl Running {
    /// Waits until `n` attempts of `test.fail` have reported.
    async fn wait_reports(&self, n: usize, timeout: Duration) -> Vec<(Instant, JobReport)> {
        let ok = common::eventually(timeout, || self.reports.lock().unwrap().len() >= n).await;
        let got = self.reports.lock().unwrap().clone();
        assert!(
            ok,
            "expected {n} finished attempts within {timeout:?}, got {:?}",
            got.iter()
                .map(|(_, r)| (r.outcome, r.error.clone()))
                .collect::<Vec<_>>()
        );
        got
    }

    /// Takes the single dead letter of the queue.
    async fn single_dead_letter(&self) -> taskmill_broker::Fetched {
        let b = &common::broker().await;
        let dead = format!("{}.dead", self.queue);
        assert_eq!(
            common::settled_depth(b, &dead, Duration::from_secs(10)).await,
            1
        );
        b.get(&dead).await.unwrap().expect("a dead letter")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.wait().await.unwrap();
        let b = &common::broker().await;
        assert_eq!(
            common::settled_depth(b, &self.queue, Duration::from_secs(10)).await,
            0,
            "work queue not empty"
        );
        common::cleanup(b, &self.queue).await;
        common::cleanup(b, &self.cpu_queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_one_then_two_seconds_and_succeed_on_attempt_three() {
    let w = start("backoff", 5).await;
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let id = client
        .enqueue(NewJob::raw("test.fail", br#"{"times": 2}"#.to_vec()).queue(&w.queue))
        .await
        .unwrap();
    let got = w.wait_reports(3, Duration::from_secs(30)).await;
    // Nothing more arrives: the job is done after attempt 3.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.reports.lock().unwrap().len(), 3);

    let outcomes: Vec<Outcome> = got.iter().map(|(_, r)| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Retried, Outcome::Retried, Outcome::Ok],
        "{got:?}"
    );
    for (_, r) in &got {
        assert_eq!(
            r.job_id.as_deref(),
            Some(id.as_str()),
            "the job id is kept across retries"
        );
        assert_eq!(r.kind, "test.fail");
    }
    assert!(
        got[0]
            .1
            .error
            .as_deref()
            .unwrap_or("")
            .contains("attempt 1 of 2"),
        "{got:?}"
    );
    assert!(
        got[1]
            .1
            .error
            .as_deref()
            .unwrap_or("")
            .contains("attempt 2 of 2"),
        "{got:?}"
    );

    // An attempt's report arrives after its handler ended and its outcome was
    // made durable (retry copy confirmed, message acked). Attempt n started
    // `run_time` before the end of its handler, which is at most its report.
    // So the measured gap `(report_n - run_time_n) - report_{n-1}` is the
    // wait between attempts give or take the confirm and ack round trips
    // (milliseconds), and the backoff is 1 s, then 2 s, rounded up to whole
    // 100 ms ticks (already whole here).
    let expected = [Duration::from_millis(1_000), Duration::from_millis(2_000)];
    let slack = Duration::from_millis(700);
    let mut gaps = Vec::new();
    for n in 1..3 {
        let end_prev = got[n - 1].0;
        let start = got[n].0 - got[n].1.run_time;
        gaps.push(start.saturating_duration_since(end_prev));
    }
    eprintln!("observed gaps between attempts: {gaps:?} (backoff {expected:?})");
    // The worker's own measure: a retry copy is stamped "enqueued at" the
    // moment it was published plus its delay, and the queue wait is measured
    // from there (saturating at zero). A positive wait proves the attempt
    // started no earlier than its backoff after the previous one ended.
    for (_, r) in &got[1..] {
        let wait = r.queue_wait.expect("retry copies carry their enqueue time");
        assert!(
            wait > Duration::ZERO && wait <= slack,
            "attempt started {wait:?} after its scheduled time (must be > 0 and <= {slack:?})"
        );
    }
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            *gap >= want && *gap <= want + slack,
            "gap {gap:?} outside [{want:?}, {:?}] (all gaps {gaps:?})",
            want + slack
        );
    }
    assert_eq!(
        common::settled_depth(
            &common::broker().await,
            &format!("{}.dead", w.queue),
            Duration::from_secs(5)
        )
        .await,
        0
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_attempts_go_to_dead_letter_with_headers() {
    let w = start("exhaust", 3).await;
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let payload = br#"{"times": 9}"#.to_vec();
    let before_ms = taskmill_broker::now_ms();
    let id = client
        .enqueue(NewJob::raw("test.fail", payload.clone()).queue(&w.queue))
        .await
        .unwrap();
    let got = w.wait_reports(3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcomes: Vec<Outcome> = w
        .reports
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r)| r.outcome)
        .collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Retried, Outcome::Retried, Outcome::Dead],
        "three attempts in all, then dead: {got:?}"
    );

    let m = w.single_dead_letter().await;
    assert_eq!(m.message_id(), Some(id.as_str()));
    assert_eq!(m.body(), payload.as_slice(), "the original payload is kept");
    assert_eq!(
        m.header_str(H_DEAD_REASON).as_deref(),
        Some("attempts_exhausted")
    );
    assert_eq!(m.header(H_ATTEMPT), Some(HeaderValue::Int(3)));
    let first_failed = match m.header(H_FIRST_FAILED_AT_MS) {
        Some(HeaderValue::Int(ms)) => ms as u64,
        other => panic!("{H_FIRST_FAILED_AT_MS}: {other:?}"),
    };
    let dead_at = match m.header(H_DEAD_AT_MS) {
        Some(HeaderValue::Int(ms)) => ms as u64,
        other => panic!("{H_DEAD_AT_MS}: {other:?}"),
    };
    assert!(
        before_ms <= first_failed && first_failed <= dead_at,
        "first failure at {first_failed} must fall between the enqueue ({before_ms}) and the dead-lettering ({dead_at})"
    );
    // Attempt 1 failed, then 1 s + 2 s of backoff before attempt 3 failed.
    assert!(
        dead_at - first_failed >= 3_000,
        "dead-lettered {} ms after the first failure",
        dead_at - first_failed
    );
    let error = m.header_str(H_DEAD_ERROR).unwrap_or_default();
    assert!(error.contains("attempt 3 of 9"), "dead error: {error:?}");
    assert_eq!(
        m.header_str(H_DEAD_WORKER).as_deref(),
        Some(w.worker_id.as_str())
    );
    assert_eq!(
        m.header_str(H_DEAD_QUEUE).as_deref(),
        Some(w.queue.as_str())
    );
    m.ack().await.unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_dead_lettered_after_one_attempt() {
    let w = start("permanent", 5).await;
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let id = client
        .enqueue(
            NewJob::raw("test.fail", br#"{"times": 1, "permanent": true}"#.to_vec())
                .queue(&w.queue),
        )
        .await
        .unwrap();
    w.wait_reports(1, Duration::from_secs(20)).await;
    // A retry would come back after 1 s: wait longer than that.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let got = w.reports.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one attempt only: {got:?}");
    assert_eq!(got[0].1.outcome, Outcome::Dead);

    let m = w.single_dead_letter().await;
    assert_eq!(m.message_id(), Some(id.as_str()));
    assert_eq!(
        m.header_str(H_DEAD_REASON).as_deref(),
        Some("handler_error")
    );
    assert_eq!(m.header(H_ATTEMPT), Some(HeaderValue::Int(1)));
    assert!(matches!(
        m.header(H_FIRST_FAILED_AT_MS),
        Some(HeaderValue::Int(_))
    ));
    let error = m.header_str(H_DEAD_ERROR).unwrap_or_default();
    assert!(error.contains("attempt 1 of 1"), "dead error: {error:?}");
    assert_eq!(
        m.header_str(H_DEAD_WORKER).as_deref(),
        Some(w.worker_id.as_str())
    );
    m.ack().await.unwrap();
    w.stop().await;
}
