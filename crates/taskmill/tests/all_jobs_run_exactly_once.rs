//! 10 000 jobs enqueued with confirms are all run exactly once, none stays in
//! any queue, and the worker's /metrics (scraped over HTTP) agrees.

mod common;

use std::time::Duration;

use taskmill_client::{Client, NewJob};
use taskmill_worker::WorkerBuilder;

const JOBS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_run_exactly_once() {
    let queue = common::unique_queue("once");
    let (builder, counts) = common::counting(WorkerBuilder::new(common::config(&queue)), JOBS);
    let worker = builder.build().unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let ids = client
        .enqueue_many((0..JOBS).map(|n| {
            NewJob::new("test.count", &serde_json::json!({ "n": n }))
                .unwrap()
                .queue(&queue)
        }))
        .await
        .unwrap();
    assert_eq!(ids.len(), JOBS);

    let done = common::eventually(Duration::from_secs(120), || {
        counts.lock().unwrap().iter().all(|c| *c >= 1)
    })
    .await;
    assert!(done, "not every job ran within 120 s");
    // Give a duplicate delivery time to show up before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = counts.lock().unwrap().clone();
    let twice: Vec<usize> = (0..JOBS).filter(|i| counts[*i] != 1).collect();
    assert!(
        twice.is_empty(),
        "jobs run more than once: {:?}",
        &twice[..twice.len().min(10)]
    );

    let (status, metrics) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let ok = common::metric_value(
        &metrics,
        &format!("taskmill_jobs_total{{kind=\"test.count\",outcome=\"ok\",queue=\"{queue}\"}}"),
    );
    assert_eq!(ok, Some(JOBS as f64), "metrics:\n{metrics}");

    shutdown.cancel();
    handle.wait().await.unwrap();
    let b = &client.broker().await.unwrap();
    assert_eq!(
        b.queue_depth(&queue).await.unwrap(),
        0,
        "work queue not empty"
    );
    assert_eq!(
        b.queue_depth(&format!("{queue}.dead")).await.unwrap(),
        0,
        "dead letters found"
    );
    common::cleanup(b, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_to_a_queue_nobody_declared_is_an_error() {
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let err = client
        .enqueue(NewJob::raw("noop", b"{}".to_vec()).queue(&common::unique_queue("nowhere")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unroutable"), "{err}");
    let err = client
        .enqueue(NewJob::raw("noop", b"{not json".to_vec()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");
}
