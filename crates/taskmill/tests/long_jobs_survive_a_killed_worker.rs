//! A long job whose worker is killed with `kill -9` mid-run is republished
//! by another worker's orphan sweep and completes once.
//!
//! Two `taskmill worker` processes share a PostgreSQL store and are told the
//! broker's consumer timeout is 5 s (`TASKMILL_BROKER_CONSUMER_TIMEOUT_MS`;
//! the broker itself is left alone: acking early is the worker's choice), so
//! a keyed `io.sleep` job with a 60 s hard timeout is parked in the store
//! and its delivery acked before it runs. Once it runs, its worker is
//! killed: the broker has nothing to redeliver, and only the parked copy
//! remains. The survivor's sweep (every half lease) takes the orphan once the
//! killed worker counts as dead, republishes it, and runs it; the key ends
//! completed, the survivor ran the job exactly once, and nothing is
//! dead-lettered or left in the queue.

mod common;

use std::time::{Duration, Instant};

use common::PgDb;
use taskmill_client::{Client, NewJob};

/// How long the job runs.
const RUN: Duration = Duration::from_secs(10);
/// Death (3 missed 2 s heartbeats) + one sweep interval (half the 15 s
/// lease) + the run, with room for a loaded machine.
const DONE_WITHIN: Duration = Duration::from_secs(6 + 8 + 10 + 30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_job_of_a_killed_worker_completes_once() {
    let queue = common::unique_queue("long-kill");
    let cpu_queue = format!("{queue}-cpu");
    let db = PgDb::create();
    let tmp = common::temp_dir("long-kill");
    let env = |name: &str| {
        vec![
            ("TASKMILL_QUEUES", queue.clone()),
            ("TASKMILL_STORE_URL", db.url()),
            ("TASKMILL_DATA_DIR", tmp.join(name).display().to_string()),
            ("TASKMILL_WORKER_ID", format!("{queue}-{name}")),
            ("TASKMILL_BROKER_CONSUMER_TIMEOUT_MS", "5000".to_string()),
            ("TASKMILL_CPU_QUEUE", cpu_queue.clone()),
            ("TASKMILL_CPU_PROCESSES", "1".to_string()),
        ]
    };
    let mut workers = vec![
        common::spawn_worker("a", &env("a"), &tmp.0),
        common::spawn_worker("b", &env("b"), &tmp.0),
    ];
    for w in &mut workers {
        w.wait_ready(Duration::from_secs(60)).await.unwrap();
    }

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    client
        .enqueue(
            NewJob::new(
                "io.sleep",
                &serde_json::json!({ "ms": RUN.as_millis() as u64 }),
            )
            .unwrap()
            .queue(&queue)
            .idempotency_key("long-1")
            .timeout(Duration::from_secs(60)),
        )
        .await
        .unwrap();

    // The job is parked and acked: the broker no longer holds it.
    let parked = "SELECT owner FROM taskmill_jobs \
                  WHERE key = 'long-1' AND state = 'claimed' AND parked_queue IS NOT NULL";
    let broker = common::broker().await;
    let until = Instant::now() + Duration::from_secs(20);
    let owner = loop {
        let owner = db.query(parked).trim().to_string();
        if !owner.is_empty() {
            break owner;
        }
        assert!(Instant::now() < until, "the long job was not parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let holder = workers
        .iter()
        .position(|w| owner == format!("{queue}-{}", w.name))
        .unwrap_or_else(|| panic!("unknown owner {owner}"));
    // Running: the delivery was acked before the run began.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = workers[holder].metrics().await.unwrap();
        if common::metric_sum(&m, "taskmill_jobs_in_flight", &[("queue", &queue)]) == 1.0 {
            break;
        }
        assert!(Instant::now() < until, "the long job does not run:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = workers.remove(holder);
    killed.kill9();
    let killed_at = Instant::now();
    let mut survivor = workers.pop().unwrap();

    let state = "SELECT state FROM taskmill_jobs WHERE key = 'long-1'";
    loop {
        if db.query(state).trim() == "completed" {
            break;
        }
        assert!(
            killed_at.elapsed() < DONE_WITHIN,
            "the orphaned long job did not complete within {DONE_WITHIN:?} of the kill: {}",
            db.query("SELECT state, owner, attempts, parked_queue FROM taskmill_jobs")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the orphaned long job completed {:?} after its worker was killed",
        killed_at.elapsed()
    );

    // Let a second copy, if the sweep made one, arrive and be counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = survivor.metrics().await.unwrap();
    let outcome = |o: &str| {
        common::metric_sum(
            &m,
            "taskmill_jobs_total",
            &[("queue", &queue), ("kind", "io.sleep"), ("outcome", o)],
        )
    };
    let runs = common::metric_sum(
        &m,
        "taskmill_job_run_seconds_count",
        &[("queue", &queue), ("kind", "io.sleep")],
    );
    let depth = common::settled_depth(&broker, &queue, Duration::from_secs(10)).await;
    let dead = broker.queue_depth(&format!("{queue}.dead")).await.unwrap();
    let status = survivor.terminate(Duration::from_secs(30)).await.unwrap();
    common::cleanup(&broker, &queue).await;
    common::cleanup(&broker, &cpu_queue).await;

    assert!(status.success(), "the survivor exited with {status}");
    assert_eq!(outcome("ok"), 1.0, "the survivor's outcomes:\n{m}");
    assert_eq!(runs, 1.0, "the survivor ran the job other than once");
    assert_eq!(depth, 0, "messages left in the queue");
    assert_eq!(dead, 0, "dead letters");
    assert_eq!(
        db.query("SELECT state, parked_queue IS NULL FROM taskmill_jobs")
            .trim(),
        "completed|t",
        "the key's row"
    );
}
