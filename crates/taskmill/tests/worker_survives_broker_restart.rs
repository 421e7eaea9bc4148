//! The broker goes away in the middle of 3 000 jobs (`rabbitmqctl stop_app`,
//! back ~2 s later with `start_app`; queues are quorum and durable, messages
//! persistent): the worker process reports not-ready meanwhile, reconnects
//! by itself, redeclares and resumes; every job completes, none is lost, and
//! the queues are empty at the end.
//!
//! This restarts the shared broker: it must stay the only test in this file
//! (cargo runs test binaries one after the other), and a guard brings the
//! broker back up even when the test fails.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::PgDb;
use taskmill_client::{Client, NewJob};

const JOBS: usize = 3_000;
const BOUND: Duration = Duration::from_secs(300);

fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("this test needs rabbitmqctl")
}

/// Starts the broker's application again when dropped, whatever happened.
struct BrokerBackUp;

impl Drop for BrokerBackUp {
    fn drop(&mut self) {
        let out = rabbitmqctl(&["start_app"]);
        if !out.status.success() {
            eprintln!(
                "rabbitmqctl start_app failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = rabbitmqctl(&["await_startup"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reconnects_after_broker_restart_and_loses_nothing() {
    let started = Instant::now();
    let queue = common::unique_queue("restart");
    let cpu_queue = format!("{queue}-cpu");
    let db = PgDb::create();
    let tmp = common::temp_dir("restart");
    let env = vec![
        ("TASKMILL_QUEUES", queue.clone()),
        ("TASKMILL_STORE_URL", db.url()),
        ("TASKMILL_DATA_DIR", tmp.join("data").display().to_string()),
        // Few at once, so the run is still going when the broker stops.
        ("TASKMILL_CONCURRENCY", "4".to_string()),
        // A copy redelivered while its first run still holds the key is
        // deferred until the lease (job timeout + 30 s) ends: keep it short.
        ("TASKMILL_JOB_TIMEOUT_MS", "2000".to_string()),
        ("TASKMILL_CPU_QUEUE", cpu_queue.clone()),
        ("TASKMILL_CPU_PROCESSES", "1".to_string()),
    ];
    let mut w = common::spawn_worker("restart", &env, &tmp.0);
    w.wait_ready(Duration::from_secs(60)).await.unwrap();

    // Everything is published (and confirmed) before the restart: the
    // producer is not under test here.
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let ids = client
        .enqueue_many((0..JOBS).map(|n| {
            NewJob::raw("io.sleep", br#"{"ms": 5}"#.to_vec())
                .queue(&queue)
                .idempotency_key(&format!("r{n}"))
        }))
        .await
        .unwrap();
    assert_eq!(ids.len(), JOBS);
    client.close().await;

    // Record every /readyz answer from now on.
    let seen: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::new(Mutex::new(Vec::new()));
    let probe = {
        let (seen, addr) = (seen.clone(), w.addr);
        tokio::spawn(async move {
            loop {
                let s = common::http_get(addr, "/readyz")
                    .await
                    .map(|r| r.0)
                    .unwrap_or(0);
                seen.lock().unwrap().push((Instant::now(), s));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let ok_of = |m: &str| {
        common::metric_sum(
            m,
            "taskmill_jobs_total",
            &[("queue", &queue), ("outcome", "ok")],
        )
    };
    loop {
        let m = w.metrics().await.unwrap();
        if ok_of(&m) >= 200.0 {
            break;
        }
        assert!(started.elapsed() < BOUND, "worker too slow:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let guard = BrokerBackUp;
    let out = tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "stop_app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped_at = Instant::now();
    let done_at_stop = db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'");
    eprintln!("broker stopped with {done_at_stop} of {JOBS} jobs completed");
    assert!(
        (done_at_stop as usize) < JOBS,
        "everything finished before the broker stopped: the test proves nothing"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "start_app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(guard);
    eprintln!("broker back after {:?}", stopped_at.elapsed());

    // Not ready while the broker was away, ready again by itself.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = seen.lock().unwrap().clone();
        let down = s.iter().position(|(t, st)| *t >= stopped_at && *st == 503);
        if let Some(i) = down
            && s[i..].iter().any(|(_, st)| *st == 200)
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "/readyz did not go 503 then 200 after the broker stop: {:?}",
            s.iter()
                .filter(|(t, _)| *t >= stopped_at)
                .map(|(_, st)| st)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w.is_running(), "the worker process died");
    let m = w.metrics().await.unwrap();
    let reconnects = common::metric_value(&m, "taskmill_broker_reconnects_total").unwrap_or(0.0);
    assert!(
        reconnects >= 1.0,
        "taskmill_broker_reconnects_total = {reconnects}"
    );

    // Every job completes; each message reaches a terminal outcome.
    let b = common::broker().await;
    let totals = loop {
        let m = w.metrics().await.unwrap();
        let sum = |o: &str| {
            common::metric_sum(
                &m,
                "taskmill_jobs_total",
                &[("queue", &queue), ("outcome", o)],
            )
        };
        let terminal = sum("ok") + sum("duplicate") + sum("dead") + sum("timeout") + sum("crashed");
        let republished = sum("retried") + sum("deferred");
        let in_flight = common::metric_sum(&m, "taskmill_jobs_in_flight", &[("queue", &queue)]);
        let done = db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'");
        let depth = b.queue_depth(&queue).await.unwrap();
        if done as usize == JOBS
            && terminal >= JOBS as f64 + republished
            && depth == 0
            && in_flight == 0.0
        {
            break [
                sum("ok"),
                sum("duplicate"),
                sum("retried"),
                sum("deferred"),
                sum("dead"),
            ];
        }
        assert!(
            started.elapsed() < BOUND,
            "not done within {BOUND:?}: {done} keys completed, queue depth {depth}, terminal {terminal}, republished {republished}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "done after {:?}: ok {}, duplicate {}, retried {}, deferred {}, dead {}; reconnects {reconnects}",
        started.elapsed(),
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4]
    );
    probe.abort();
    let keys: std::collections::HashSet<String> = db
        .query("SELECT key FROM taskmill_jobs WHERE state = 'completed'")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), JOBS);
    assert!(
        (0..JOBS).all(|n| keys.contains(&format!("r{n}"))),
        "a key is missing"
    );
    assert_eq!(db.count("SELECT count(*) FROM taskmill_jobs"), JOBS as i64);

    let status = w.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "worker exited with {status}");
    assert_eq!(
        common::settled_depth(&b, &queue, Duration::from_secs(10)).await,
        0
    );
    assert_eq!(
        b.queue_depth(&format!("{queue}.dead")).await.unwrap(),
        0,
        "dead letters"
    );
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &cpu_queue).await;
}
