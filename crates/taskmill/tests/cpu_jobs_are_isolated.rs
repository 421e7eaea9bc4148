//! CPU jobs run in local worker processes: a panic, an abort or a runaway
//! busy loop ends that job with the right error outcome, the pool is back to
//! its size afterwards with no zombie left, IO jobs keep their latency while
//! the pool is saturated, and recycling after `cpu_max_jobs_per_child` loses
//! no job.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;
use taskmill_core::config::{Config, KindConfig};
use taskmill_core::wire::{H_DEAD_ERROR, H_DEAD_REASON};
use taskmill_worker::{CancellationToken, JobReport, WorkerHandle};

use common::Reports;

/// The tests count this process's children, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(mut config: Config) -> (WorkerHandle, CancellationToken, Reports) {
    config.cpu_processes = 2;
    config.diagnostic_kinds = true;
    common::start_recording(config, Duration::from_secs(30)).await
}

async fn metric(handle: &WorkerHandle, sample: &str) -> Option<f64> {
    let (_, text) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    common::metric_value(&text, sample)
}

fn live_children() -> Vec<u32> {
    common::children_of(std::process::id())
        .into_iter()
        .filter(|(_, state)| *state != 'Z')
        .map(|(pid, _)| pid)
        .collect()
}

fn zombies() -> Vec<u32> {
    common::children_of(std::process::id())
        .into_iter()
        .filter(|(_, state)| *state == 'Z')
        .map(|(pid, _)| pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_panics_and_timeouts_are_contained() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique_queue("cpuiso");
    let cpu_queue = format!("{queue}-cpu");
    let mut config = common::config(&queue);
    config.cpu_queue = cpu_queue.clone();
    config.max_attempts = 1;
    config.kind.insert(
        "test.spin".into(),
        KindConfig {
            timeout_ms: Some(500),
            ..KindConfig::default()
        },
    );
    let (handle, shutdown, reports) = start(config).await;
    assert_eq!(live_children().len(), 2, "two CPU processes");
    let before = live_children();

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    for (kind, payload) in [
        ("test.panic", "{}"),
        ("test.crash", "{}"),
        ("test.spin", r#"{"ms": 60000}"#),
        ("cpu.hash", r#"{"rounds": 1000}"#),
    ] {
        client
            .enqueue(NewJob::raw(kind, payload.as_bytes().to_vec()).queue(&cpu_queue))
            .await
            .unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(30), || reports.lock().unwrap().len()
            == 4)
        .await,
        "not every CPU job finished: {:?}",
        reports.lock().unwrap()
    );
    let by_kind: HashMap<String, JobReport> = reports
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r)| (r.kind.clone(), r.clone()))
        .collect();
    assert_eq!(by_kind["cpu.hash"].outcome, Outcome::Ok);
    assert_eq!(by_kind["test.panic"].outcome, Outcome::Crashed);
    assert!(
        by_kind["test.panic"]
            .error
            .as_ref()
            .unwrap()
            .contains("panicking on purpose")
    );
    assert_eq!(by_kind["test.crash"].outcome, Outcome::Crashed);
    assert!(
        by_kind["test.crash"]
            .error
            .as_ref()
            .unwrap()
            .contains("SIGABRT"),
        "{:?}",
        by_kind["test.crash"]
    );
    assert_eq!(by_kind["test.spin"].outcome, Outcome::Timeout);
    assert!(
        by_kind["test.spin"].run_time < Duration::from_secs(5),
        "the runaway job was stopped"
    );

    // Dead letters carry the reason and the cause.
    let broker = common::broker().await;
    let dead = format!("{cpu_queue}.dead");
    let mut errors = Vec::new();
    while let Some(m) = broker.get(&dead).await.unwrap() {
        assert_eq!(
            m.header_str(H_DEAD_REASON).as_deref(),
            Some("attempts_exhausted")
        );
        errors.push(m.header_str(H_DEAD_ERROR).unwrap());
        m.ack().await.unwrap();
    }
    assert_eq!(errors.len(), 3, "{errors:?}");

    // The pool is whole again: two live children, none of the replaced ones
    // left running or as a zombie.
    assert!(
        common::eventually(Duration::from_secs(10), || live_children().len() == 2
            && zombies().is_empty())
        .await,
        "children: {:?}",
        common::children_of(std::process::id())
    );
    let replaced: Vec<u32> = before
        .iter()
        .copied()
        .filter(|p| !live_children().contains(p))
        .collect();
    assert!(
        !replaced.is_empty(),
        "crashed children were replaced by new processes"
    );
    for pid in &replaced {
        assert!(!common::is_running(*pid), "replaced child {pid} still runs");
    }
    assert_eq!(metric(&handle, "taskmill_cpu_pool_live").await, Some(2.0));
    assert!(
        metric(
            &handle,
            "taskmill_cpu_process_restarts_total{cause=\"crashed\"}"
        )
        .await
            >= Some(1.0)
    );
    assert!(
        metric(
            &handle,
            "taskmill_cpu_process_restarts_total{cause=\"timeout\"}"
        )
        .await
            >= Some(1.0)
    );
    assert!(
        metric(
            &handle,
            "taskmill_cpu_process_restarts_total{cause=\"panicked\"}"
        )
        .await
            >= Some(1.0)
    );

    shutdown.cancel();
    handle.wait().await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || live_children().is_empty()
            && zombies().is_empty())
        .await,
        "CPU children left after shutdown: {:?}",
        common::children_of(std::process::id())
    );
    common::cleanup(&broker, &queue).await;
    common::cleanup(&broker, &cpu_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_latency_holds_while_the_pool_is_saturated() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique_queue("cpusat");
    let cpu_queue = format!("{queue}-cpu");
    let mut config = common::config(&queue);
    config.cpu_queue = cpu_queue.clone();
    let (handle, shutdown, reports) = start(config).await;
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    for _ in 0..6 {
        client
            .enqueue(NewJob::raw("test.spin", br#"{"ms": 4000}"#.to_vec()).queue(&cpu_queue))
            .await
            .unwrap();
    }
    let until = Instant::now() + Duration::from_secs(10);
    while metric(&handle, "taskmill_cpu_pool_busy").await != Some(2.0) {
        assert!(Instant::now() < until, "the pool never got busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only twice the pool's worth of CPU jobs is taken from the broker (one
    // running and one waiting per process): of 6, 2 stay in the queue.
    let broker = client.broker().await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = broker.queue_depth(&cpu_queue).await.unwrap();
        if depth == 2 {
            break;
        }
        assert!(
            depth > 2 && Instant::now() < until,
            "{depth} CPU jobs left in the queue, expected 2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.queue_depth(&cpu_queue).await.unwrap(), 2);

    const SLEEP_MS: u64 = 100;
    let jobs: Vec<NewJob> = (0..100)
        .map(|_| {
            NewJob::raw("io.sleep", format!("{{\"ms\": {SLEEP_MS}}}").into_bytes()).queue(&queue)
        })
        .collect();
    client.enqueue_many(jobs).await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || {
            reports
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, r)| r.kind == "io.sleep")
                .count()
                == 100
        })
        .await
    );
    assert_eq!(
        metric(&handle, "taskmill_cpu_pool_busy").await,
        Some(2.0),
        "still saturated"
    );
    // Enqueue to finish within 2 × the sleep plus a small constant: the event
    // loop was never blocked by the CPU work.
    let bound = Duration::from_millis(2 * SLEEP_MS + 100);
    for (_, r) in reports
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, r)| r.kind == "io.sleep")
    {
        let total = r.queue_wait.unwrap() + r.run_time;
        assert!(total <= bound, "io job took {total:?} (bound {bound:?})");
    }
    shutdown.cancel();
    handle.wait().await.unwrap();
    let broker = common::broker().await;
    common::cleanup(&broker, &queue).await;
    common::cleanup(&broker, &cpu_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_after_max_jobs_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique_queue("cpurecycle");
    let cpu_queue = format!("{queue}-cpu");
    let mut config = common::config(&queue);
    config.cpu_queue = cpu_queue.clone();
    config.cpu_max_jobs_per_child = 3;
    let (handle, shutdown, reports) = start(config).await;
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let jobs: Vec<NewJob> = (0..30)
        .map(|n| {
            NewJob::raw(
                "cpu.hash",
                format!("{{\"rounds\": {}}}", 100 + n).into_bytes(),
            )
            .queue(&cpu_queue)
        })
        .collect();
    client.enqueue_many(jobs).await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || reports.lock().unwrap().len()
            == 30)
        .await,
        "only {} of 30 jobs finished",
        reports.lock().unwrap().len()
    );
    assert!(
        reports
            .lock()
            .unwrap()
            .iter()
            .all(|(_, r)| r.outcome == Outcome::Ok)
    );
    let recycled = metric(
        &handle,
        "taskmill_cpu_process_restarts_total{cause=\"recycled\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(
        recycled >= 8.0,
        "30 jobs on 3-job children recycle at least 8 times, saw {recycled}"
    );
    shutdown.cancel();
    handle.wait().await.unwrap();
    let b = common::broker().await;
    assert_eq!(
        b.queue_depth(&format!("{cpu_queue}.dead")).await.unwrap(),
        0
    );
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &cpu_queue).await;
}
