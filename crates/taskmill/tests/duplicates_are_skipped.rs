//! A job whose idempotency key already completed is acked and skipped: 500
//! keys, each published 3 times, run the handler 500 times, and /metrics
//! counts the 1 000 skipped copies as `outcome="duplicate"`. In-process worker
//! with the embedded SQLite store in its own temp data dir.

mod common;

use std::time::Duration;

use taskmill_client::{Client, NewJob};
use taskmill_worker::WorkerBuilder;

const KEYS: usize = 500;
const COPIES: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_completed_key_are_skipped() {
    let queue = common::unique_queue("dups");
    let data = common::temp_dir("dups");
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    // The copies of one key are published KEYS messages apart, more than the
    // prefetch window, so two copies are never in flight together and none is
    // deferred. Should one be all the same, a short job timeout keeps its
    // lease (timeout + 30 s) and so the deferral short.
    config.job_timeout_ms = 2_000;
    config.concurrency = 50;
    assert!(usize::from(config.queue_settings(&queue).prefetch) < KEYS);

    let (builder, counts) = common::counting(WorkerBuilder::new(config), KEYS);
    let worker = builder.build().unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let jobs = (0..COPIES).flat_map(|_| {
        (0..KEYS).map(|n| {
            NewJob::new("test.count", &serde_json::json!({ "n": n }))
                .unwrap()
                .queue(&queue)
                .idempotency_key(&format!("dup-{n}"))
        })
    });
    let ids = client.enqueue_many(jobs).await.unwrap();
    assert_eq!(ids.len(), KEYS * COPIES);

    let series = |outcome: &str| {
        format!(
            "taskmill_jobs_total{{kind=\"test.count\",outcome=\"{outcome}\",queue=\"{queue}\"}}"
        )
    };
    let until = std::time::Instant::now() + Duration::from_secs(90);
    let metrics = loop {
        let (_, m) = common::http_get(handle.http_addr, "/metrics")
            .await
            .unwrap();
        let ok = common::metric_value(&m, &series("ok")).unwrap_or(0.0);
        let dup = common::metric_value(&m, &series("duplicate")).unwrap_or(0.0);
        if ok + dup >= (KEYS * COPIES) as f64 {
            break m;
        }
        assert!(
            std::time::Instant::now() < until,
            "not every copy was handled within 90 s: ok {ok}, duplicate {dup}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let a stray redelivery show up before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let counts = counts.lock().unwrap().clone();
    let wrong: Vec<(usize, u32)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 1)
        .map(|(n, c)| (n, *c))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} keys did not run exactly once (key, runs): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(
        common::metric_value(&metrics, &series("ok")),
        Some(KEYS as f64),
        "{metrics}"
    );
    assert_eq!(
        common::metric_value(&metrics, &series("duplicate")),
        Some((KEYS * (COPIES - 1)) as f64),
        "{metrics}"
    );
    assert_eq!(
        common::metric_value(&metrics, &series("deferred")).unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        common::metric_value(&metrics, &series("dead")).unwrap_or(0.0),
        0.0
    );

    shutdown.cancel();
    handle.wait().await.unwrap();
    let b = &common::broker().await;
    assert_eq!(
        common::settled_depth(b, &queue, Duration::from_secs(10)).await,
        0
    );
    assert_eq!(b.queue_depth(&format!("{queue}.dead")).await.unwrap(), 0);
    common::cleanup(b, &queue).await;
}
