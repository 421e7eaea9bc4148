//! Acks are coalesced per channel (`basic.ack multiple`), but a long job at
//! the front of the delivery window does not hold back the acks of the jobs
//! delivered after it: while a 5 s job runs, the 200 short jobs behind it are
//! acked as they finish, so the broker's unacked count drops to about the
//! number of jobs still running, not the whole window. When the long job ends
//! everything is acked exactly once: stopping the worker returns nothing.
//!
//! A classic queue, so `rabbitmqctl list_queues` reports its unacked count.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;
use taskmill_core::config::QueueType;
use taskmill_worker::{JobContext, WorkerBuilder};

const SHORT: usize = 200;
const CONCURRENCY: usize = 50;
const LONG: Duration = Duration::from_secs(5);

#[derive(serde::Deserialize)]
struct Sleep {
    ms: u64,
}

/// The queue's (ready, unacknowledged) counts, from `rabbitmqctl`.
fn counts(queue: &str) -> (u64, u64) {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("the test needs rabbitmqctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} is not listed:\n{text}"));
    let mut cols = line
        .split('\t')
        .skip(1)
        .map(|c| c.trim().parse::<u64>().unwrap());
    (cols.next().unwrap(), cols.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_does_not_hold_back_the_acks_behind_it() {
    let queue = common::unique_queue("acks");
    let data = common::temp_dir("acks");
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.queue_type = QueueType::Classic;
    config.concurrency = CONCURRENCY;
    // The whole batch fits in the window, so every short job is delivered
    // behind the long one before the long one ends.
    config.prefetch = 250;
    let done: Arc<Mutex<HashMap<String, Vec<Outcome>>>> = Arc::default();
    let d = done.clone();
    let worker = WorkerBuilder::new(config)
        .io("test.sleep", |_ctx: JobContext, p: Sleep| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok(())
        })
        .on_job_done(move |r| {
            d.lock()
                .unwrap()
                .entry(r.job_id.clone().unwrap_or_default())
                .or_default()
                .push(r.outcome)
        })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(30)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let long_ms = u64::try_from(LONG.as_millis()).unwrap();
    let jobs = std::iter::once(
        NewJob::new("test.sleep", &serde_json::json!({ "ms": long_ms }))
            .unwrap()
            .queue(&queue)
            .job_id("long"),
    )
    .chain((0..SHORT).map(|n| {
        NewJob::new("test.sleep", &serde_json::json!({ "ms": 10 }))
            .unwrap()
            .queue(&queue)
            .job_id(&format!("short-{n}"))
    }));
    let started = Instant::now();
    client.enqueue_many(jobs).await.unwrap();

    let finished = |d: &HashMap<String, Vec<Outcome>>| d.len();
    assert!(
        common::eventually(Duration::from_secs(20), || finished(&done.lock().unwrap())
            >= SHORT)
        .await,
        "the short jobs finish"
    );
    // Give the flusher a moment, then look while the long job still runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ready, unacked) = counts(&queue);
    let long_still_running = !done.lock().unwrap().contains_key("long");
    eprintln!(
        "{:?} after publishing: ready {ready}, unacked {unacked}, long job running: {long_still_running}",
        started.elapsed()
    );
    assert!(
        long_still_running,
        "the long job ended before the check ({:?}); the test proves nothing",
        started.elapsed()
    );
    assert_eq!(ready, 0, "every job was delivered");
    assert!(
        unacked <= CONCURRENCY as u64,
        "{unacked} deliveries unacked behind the long job (concurrency {CONCURRENCY})"
    );

    assert!(
        common::eventually(Duration::from_secs(20), || done
            .lock()
            .unwrap()
            .contains_key("long"))
        .await,
        "the long job finishes"
    );
    let mut settled = (u64::MAX, u64::MAX);
    for _ in 0..20 {
        settled = counts(&queue);
        if settled == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(settled, (0, 0), "(ready, unacked) once the long job ended");

    shutdown.cancel();
    handle.wait().await.unwrap();
    let broker = common::broker().await;
    assert_eq!(
        common::settled_depth(&broker, &queue, Duration::from_secs(10)).await,
        0,
        "nothing returns to the queue when the worker stops"
    );
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), SHORT + 1);
    let wrong: Vec<_> = done
        .iter()
        .filter(|(_, outcomes)| outcomes.as_slice() != [Outcome::Ok])
        .collect();
    assert!(wrong.is_empty(), "jobs not run exactly once: {wrong:?}");
    common::cleanup(&broker, &queue).await;
}
