//! Delayed jobs (`NewJob::delay`, `NewJob::at`, `taskmill enqueue --delay`)
//! wait in the broker's delay ladder, not in a held delivery, and run when due.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use taskmill_client::{Client, EnqueueError, NewJob};
use taskmill_worker::{JobContext, WorkerBuilder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_run_when_due_and_not_before() {
    let queue = common::unique_queue("delay");
    let ran: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let r = ran.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io(
            "test.mark",
            move |_ctx: JobContext, p: serde_json::Value| {
                let r = r.clone();
                async move {
                    r.lock()
                        .unwrap()
                        .push((p["tag"].as_str().unwrap().to_string(), Instant::now()));
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let t0 = Instant::now();
    let job = |tag: &str| {
        NewJob::new("test.mark", &serde_json::json!({ "tag": tag }))
            .unwrap()
            .queue(&queue)
    };
    client.enqueue(job("now")).await.unwrap();
    client
        .enqueue(job("in-2s").delay(Duration::from_secs(2)))
        .await
        .unwrap();
    client
        .enqueue(job("at-1.3s").at(SystemTime::now() + Duration::from_millis(1_300)))
        .await
        .unwrap();

    // While they wait, nothing is held by the worker: the work queue is empty
    // and no job is in flight.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = client.broker().await.unwrap();
    assert_eq!(b.queue_depth(&queue).await.unwrap(), 0);
    let (_, m) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    let in_flight = common::metric_value(
        &m,
        &format!("taskmill_jobs_in_flight{{class=\"io\",queue=\"{queue}\"}}"),
    );
    assert!(in_flight.unwrap_or(0.0) == 0.0, "{m}");

    assert!(common::eventually(Duration::from_secs(10), || ran.lock().unwrap().len() == 3).await);
    let ran = ran.lock().unwrap().clone();
    let at = |tag: &str| ran.iter().find(|(t, _)| t == tag).unwrap().1 - t0;
    assert!(at("now") < Duration::from_millis(500), "{:?}", at("now"));
    let d2 = at("in-2s");
    assert!(
        d2 >= Duration::from_secs(2) && d2 < Duration::from_millis(3_000),
        "in-2s ran after {d2:?}"
    );
    let d13 = at("at-1.3s");
    assert!(
        d13 >= Duration::from_millis(1_200) && d13 < Duration::from_millis(2_300),
        "at-1.3s ran after {d13:?}"
    );

    // A delayed job for a queue nobody declared is refused up front (its
    // copy would have nowhere to go when due).
    let err = client
        .enqueue(
            NewJob::raw("noop", b"{}".to_vec())
                .queue(&common::unique_queue("nobody"))
                .delay(Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, EnqueueError::NoSuchQueue(_)), "{err}");

    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&b, &queue).await;
}
