//! Eight concurrent consumers (two `taskmill worker` processes with
//! concurrency 4 each) on one queue, PostgreSQL store: 1 000 keys, each
//! published 3 times in shuffled order, of the transactional `test.effect`.
//! Copies of one key race each other across processes; the effect row and the
//! key's completion commit together, so `test_effects` holds exactly one row
//! per key. Nothing is dead-lettered, nothing deadlocks (everything is done
//! within a bound), and the queue is empty at the end.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::PgDb;
use taskmill_client::{Client, NewJob};

const KEYS: usize = 1_000;
const COPIES: usize = 3;
/// Everything must be done within this (see the lease note below).
const BOUND: Duration = Duration::from_secs(240);

/// Terminal outcomes: each published message ends in exactly one of them.
/// (`retried` and `deferred` republish a copy that ends later.)
const TERMINAL: [&str; 5] = ["ok", "duplicate", "dead", "timeout", "crashed"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_commit_their_effect_exactly_once() {
    let queue = common::unique_queue("race");
    let cpu_queue = format!("{queue}-cpu");
    let db = PgDb::create();
    let tmp = common::temp_dir("race");
    let env = |name: &str| {
        vec![
            ("TASKMILL_QUEUES", queue.clone()),
            ("TASKMILL_STORE_URL", db.url()),
            ("TASKMILL_DATA_DIR", tmp.join(name).display().to_string()),
            ("TASKMILL_DIAGNOSTIC_KINDS", "true".to_string()),
            ("TASKMILL_CONCURRENCY", "4".to_string()),
            // A copy that finds its key claimed by a live lease is deferred
            // until the lease ends: lease = job timeout + 30 s. The jobs take
            // milliseconds; a 2 s timeout keeps such a deferral near 32 s
            // instead of the default 5 min.
            ("TASKMILL_JOB_TIMEOUT_MS", "2000".to_string()),
            // The binary registers CPU kinds, which add the CPU queue: a
            // private one, so these workers take no other test's CPU jobs.
            ("TASKMILL_CPU_QUEUE", cpu_queue.clone()),
            ("TASKMILL_CPU_PROCESSES", "1".to_string()),
        ]
    };
    let mut workers = vec![
        common::spawn_worker("race-a", &env("a"), &tmp.0),
        common::spawn_worker("race-b", &env("b"), &tmp.0),
    ];
    for w in &mut workers {
        w.wait_ready(Duration::from_secs(60)).await.unwrap();
    }

    // 3 copies of each key, shuffled (fixed-seed xorshift).
    let mut order: Vec<usize> = (0..COPIES).flat_map(|_| 0..KEYS).collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let started = Instant::now();
    let ids = client
        .enqueue_many(order.iter().map(|n| {
            NewJob::new(
                "test.effect",
                &serde_json::json!({ "name": format!("e{n}"), "transactional": true }),
            )
            .unwrap()
            .queue(&queue)
            .idempotency_key(&format!("e{n}"))
        }))
        .await
        .unwrap();
    assert_eq!(ids.len(), KEYS * COPIES);

    // Done when every published message reached a terminal outcome.
    let series = |m: &str, outcome: &str| {
        common::metric_sum(
            m,
            "taskmill_jobs_total",
            &[("queue", &queue), ("outcome", outcome)],
        )
    };
    let mut totals: HashMap<&str, f64>;
    loop {
        totals = HashMap::new();
        for w in &workers {
            let m = w.metrics().await.unwrap();
            for o in TERMINAL.iter().chain(&["retried", "deferred"]) {
                *totals.entry(o).or_default() += series(&m, o);
            }
        }
        let terminal: f64 = TERMINAL.iter().map(|o| totals[o]).sum();
        if terminal >= (KEYS * COPIES) as f64 {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "not done within {BOUND:?} (deadlock or lost messages?): {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("done in {:?}: {totals:?}", started.elapsed());

    // Exactly one effect row per key.
    let rows = db.query("SELECT name, count(*) FROM test_effects GROUP BY name");
    let mut per_name: HashMap<String, i64> = HashMap::new();
    for line in rows.lines() {
        let (name, n) = line.split_once('|').expect("name|count");
        per_name.insert(name.to_string(), n.parse().unwrap());
    }
    let wrong: Vec<(String, i64)> = (0..KEYS)
        .map(|n| format!("e{n}"))
        .filter_map(|k| match per_name.get(&k) {
            Some(1) => None,
            other => Some((k, other.copied().unwrap_or(0))),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} keys without exactly one effect row (key, rows): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(per_name.len(), KEYS, "effect rows for unknown names");
    assert_eq!(db.count("SELECT count(*) FROM test_effects"), KEYS as i64);
    assert_eq!(
        db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'"),
        KEYS as i64
    );
    assert_eq!(db.count("SELECT count(*) FROM taskmill_jobs"), KEYS as i64);
    assert_eq!(totals["ok"], KEYS as f64, "{totals:?}");
    assert_eq!(
        totals["dead"] + totals["timeout"] + totals["crashed"],
        0.0,
        "{totals:?}"
    );

    for w in &mut workers {
        let status = w.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{} exited with {status}", w.name);
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        assert!(
            !log.contains("deadlock"),
            "{} logged a deadlock:\n{}",
            w.name,
            w.log_tail(40)
        );
    }
    let b = common::broker().await;
    assert_eq!(
        common::settled_depth(&b, &queue, Duration::from_secs(10)).await,
        0
    );
    assert_eq!(b.queue_depth(&format!("{queue}.dead")).await.unwrap(), 0);
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &cpu_queue).await;
}
