//! A broker memory alarm makes the worker not ready, and loses no job.
//!
//! 1 000 `test.fail` jobs that fail their first attempt (`times = 1`) run on
//! a worker with a small concurrency, so retry copies are being published
//! throughout. A memory alarm is raised (`rabbitmqctl
//! set_vm_memory_high_watermark 0.000001`); RabbitMQ blocks the worker's
//! publishing connection at its next publish and tells it so
//! (`connection.blocked`). `/readyz` must answer 503 naming `broker_flow`
//! within 10 s. The alarm is cleared a few seconds later (within the
//! worker's 30 s confirm timeout, so no session is lost), always, by a
//! guard, even if the test panics: it blocks every publisher on the broker.
//! Then every job succeeds exactly once on its second attempt, nothing is
//! dead-lettered or left in the queue, and readiness comes back.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;

const JOBS: usize = 1_000;
/// Small, so the first attempts (and their retry publishes) take seconds.
const CONCURRENCY: usize = 2;
/// How soon `/readyz` must turn 503 once the alarm is raised.
const NOT_READY_WITHIN: Duration = Duration::from_secs(10);
/// How long the alarm stays once the worker reports it.
const HOLD: Duration = Duration::from_secs(3);

/// A memory alarm on the broker while this lives; cleared on drop (also when
/// the test panics) or by [`MemoryAlarm::clear`].
struct MemoryAlarm {
    raised: bool,
}

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        // Armed before the alarm goes up, so a failure halfway still clears it.
        let alarm = MemoryAlarm { raised: true };
        common::rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
        alarm
    }

    fn clear(&mut self) {
        if std::mem::take(&mut self.raised) {
            common::rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
        }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        self.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_readiness_and_loses_no_job() {
    let queue = common::unique_queue("alarm");
    let data = common::temp_dir("alarm");
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.concurrency = CONCURRENCY;
    let (handle, shutdown, reports) =
        common::start_recording(config, Duration::from_secs(30)).await;
    let addr = handle.http_addr;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let jobs = (0..JOBS).map(|_| {
        NewJob::new("test.fail", &serde_json::json!({ "times": 1 }))
            .unwrap()
            .queue(&queue)
    });
    let ids = client.enqueue_many(jobs).await.unwrap();
    assert_eq!(ids.len(), JOBS);
    let outcomes = |outcome: Outcome| {
        reports
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.queue == queue && r.outcome == outcome)
            .count()
    };
    assert!(
        common::eventually(Duration::from_secs(30), || outcomes(Outcome::Retried) >= 20).await,
        "the jobs are not retrying"
    );
    let retried_before = outcomes(Outcome::Retried);
    assert!(
        retried_before < JOBS,
        "every first attempt ended before the alarm: nothing was publishing during it"
    );

    let mut alarm = MemoryAlarm::raise();
    let raised_at = Instant::now();
    let body = loop {
        if let Ok((503, body)) = common::http_get(addr, "/readyz").await {
            break body;
        }
        assert!(
            raised_at.elapsed() < NOT_READY_WITHIN,
            "/readyz did not turn 503 within {NOT_READY_WITHIN:?} of the alarm"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let noticed = raised_at.elapsed();
    eprintln!("/readyz answered 503 {noticed:?} after the alarm: {body}");
    assert!(body.contains("broker_flow"), "{body}");
    tokio::time::sleep(HOLD).await;
    alarm.clear();
    let cleared_at = Instant::now();

    // Everything finishes once the broker accepts publishes again.
    assert!(
        common::eventually(Duration::from_secs(120), || outcomes(Outcome::Ok) >= JOBS).await,
        "only {} of {JOBS} jobs succeeded after the alarm cleared",
        outcomes(Outcome::Ok)
    );
    assert!(
        handle.wait_ready(Duration::from_secs(10)).await,
        "readiness did not come back"
    );
    let (status, body) = common::http_get(addr, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "all {JOBS} jobs done {:?} after the alarm cleared",
        cleared_at.elapsed()
    );

    // Let any stray copy arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = common::broker().await;
    let depth = common::settled_depth(&broker, &queue, Duration::from_secs(10)).await;
    let dead = broker.queue_depth(&format!("{queue}.dead")).await.unwrap();
    let (_, metrics) = common::http_get(addr, "/metrics").await.unwrap();
    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&broker, &queue).await;

    let mut per_job: HashMap<String, (usize, usize)> = HashMap::new();
    for (_, r) in reports
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, r)| r.queue == queue)
    {
        let e = per_job
            .entry(r.job_id.clone().unwrap_or_default())
            .or_default();
        match r.outcome {
            Outcome::Ok => e.0 += 1,
            Outcome::Retried => e.1 += 1,
            other => panic!("job {:?} ended {other:?}: {:?}", r.job_id, r.error),
        }
    }
    let wrong: Vec<_> = ids
        .iter()
        .filter(|id| per_job.get(*id) != Some(&(1, 1)))
        .map(|id| (id, per_job.get(id)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} jobs did not succeed exactly once after one retry (id, (ok, retried)): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(per_job.len(), JOBS, "reports for unknown jobs");
    assert_eq!(depth, 0, "messages left in the queue");
    assert_eq!(dead, 0, "dead letters");
    let reconnects = common::metric_sum(&metrics, "taskmill_broker_reconnects_total", &[]);
    eprintln!("broker reconnects during the test: {reconnects}");
}
