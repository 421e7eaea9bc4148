//! `kill -9` of a worker in the middle of 25 000 jobs loses none of them.
//!
//! PostgreSQL store. Worker A consumes 20 000 keyed `test.effect` jobs
//! (key `k{n}`, effect name `k{n}`) plus 5 000 duplicate publishes of a
//! quarter of the keys; once it has completed 5 000 it is killed with
//! SIGKILL while up to 50 jobs are in flight (no drain, no acks, open store
//! transactions cut). Worker B and a restarted A finish the work. Then:
//! both queues are empty, every key is completed exactly once in
//! `taskmill_jobs`, and
//! - transactional effect (a row written in the completion transaction):
//!   every key has exactly one row in `test_effects`;
//! - file effect (a line appended before the completion commits): every key
//!   has at least one line, and the duplicate lines are at most the killed
//!   worker's in-flight limit (its concurrency, 50): only a job whose effect
//!   happened and whose completion was not yet committed at the kill runs
//!   again.
//!
//! Timing configuration: a key claimed by the killed worker stays leased
//! until its lease ends (job timeout + 30 s); its redelivered copies are
//! deferred until then. `TASKMILL_JOB_TIMEOUT_MS=5000` keeps that near 35 s
//! (the default timeout would make it 5 min), and still leaves each
//! millisecond-long job a hundredfold margin on a loaded machine (a timeout
//! would be a retry and so a legitimate extra file line, blurring the bound).
//!
//! The two variants run one after the other (a lock), each with 25 000 jobs.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::PgDb;
use taskmill_client::{Client, NewJob};

const KEYS: usize = 20_000;
/// Every `DUP_EVERY`-th key is published a second time (5 000 copies).
const DUP_EVERY: usize = 4;
const CONCURRENCY: usize = 50;
const JOB_TIMEOUT_MS: u64 = 5_000;
/// Lease of a key = job timeout + 30 s; a deferral waits it out plus 1 s,
/// rounded up to the 100 ms delay tick, plus the ladder's own latency.
const MAX_DEFER: Duration = Duration::from_millis(JOB_TIMEOUT_MS + 30_000 + 1_000 + 3_000);
const KILL_AFTER: f64 = 5_000.0;
const BOUND: Duration = Duration::from_secs(600);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_transactional_effect() {
    let _serial = SERIAL.lock().await;
    run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_file_effect() {
    let _serial = SERIAL.lock().await;
    run(false).await;
}

async fn run(transactional: bool) {
    let started = Instant::now();
    let queue = common::unique_queue(if transactional {
        "kill-tx"
    } else {
        "kill-file"
    });
    let cpu_queue = format!("{queue}-cpu");
    let db = PgDb::create();
    let tmp = common::temp_dir("kill");
    let effects = tmp.join("effects.txt");
    let env = |data: &str| {
        vec![
            ("TASKMILL_QUEUES", queue.clone()),
            ("TASKMILL_STORE_URL", db.url()),
            ("TASKMILL_DATA_DIR", tmp.join(data).display().to_string()),
            ("TASKMILL_DIAGNOSTIC_KINDS", "true".to_string()),
            ("TASKMILL_EFFECTS_FILE", effects.display().to_string()),
            ("TASKMILL_CONCURRENCY", CONCURRENCY.to_string()),
            ("TASKMILL_JOB_TIMEOUT_MS", JOB_TIMEOUT_MS.to_string()),
            // A private CPU queue (the binary registers CPU kinds).
            ("TASKMILL_CPU_QUEUE", cpu_queue.clone()),
            ("TASKMILL_CPU_PROCESSES", "1".to_string()),
        ]
    };
    let mut a = common::spawn_worker("kill-a", &env("a"), &tmp.0);
    a.wait_ready(Duration::from_secs(60)).await.unwrap();

    // Publish in the background: consumption starts while publishing goes on.
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let job = {
        let queue = queue.clone();
        move |n: usize| {
            NewJob::new(
                "test.effect",
                &serde_json::json!({ "name": format!("k{n}"), "transactional": transactional }),
            )
            .unwrap()
            .queue(&queue)
            .idempotency_key(&format!("k{n}"))
        }
    };
    let publishing = tokio::spawn(async move {
        let jobs = (0..KEYS)
            .map(&job)
            .chain((0..KEYS).step_by(DUP_EVERY).map(&job));
        let ids = client.enqueue_many(jobs).await.unwrap();
        (client, ids.len())
    });

    // Kill A in the middle of consumption.
    let ok_of = |m: &str| {
        common::metric_sum(
            m,
            "taskmill_jobs_total",
            &[("queue", &queue), ("outcome", "ok")],
        )
    };
    loop {
        let m = a.metrics().await.unwrap();
        if ok_of(&m) >= KILL_AFTER {
            break;
        }
        assert!(started.elapsed() < BOUND, "worker A too slow:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill9();
    let killed_at = Instant::now();
    let completed_at_kill =
        db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'");
    let claimed_at_kill = db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'claimed'");
    eprintln!(
        "killed A with {completed_at_kill} keys completed, {claimed_at_kill} claimed (in flight)"
    );
    assert!(
        (completed_at_kill as usize) < KEYS,
        "A finished everything before the kill: the test proves nothing"
    );
    let (_client, published) = publishing.await.unwrap();
    assert_eq!(published, KEYS + KEYS / DUP_EVERY);

    // B and a restarted A finish the work.
    let mut rest = vec![
        common::spawn_worker("kill-b", &env("b"), &tmp.0),
        common::spawn_worker("kill-a2", &env("a2"), &tmp.0),
    ];
    for w in &mut rest {
        w.wait_ready(Duration::from_secs(60)).await.unwrap();
    }
    loop {
        let done = db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'");
        if done as usize >= KEYS {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "only {done} of {KEYS} keys completed within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("all keys completed after {:?}", started.elapsed());

    // Quiescence: deferred and retry copies wait in the delay ladder and come
    // back later (and are acked as duplicates). Wait until the queue is
    // empty, nothing runs, and no copy can still be on its way: the last
    // deferral or retry (by any live worker; A's were made before the kill)
    // is longer ago than the longest deferral.
    let mut last_change = killed_at;
    let mut last: Option<f64> = None;
    let b = common::broker().await;
    let mut totals: HashMap<&str, f64>;
    loop {
        totals = HashMap::new();
        for w in &rest {
            let m = w.metrics().await.unwrap();
            for o in ["ok", "duplicate", "deferred", "retried", "dead"] {
                *totals.entry(o).or_default() += common::metric_sum(
                    &m,
                    "taskmill_jobs_total",
                    &[("queue", &queue), ("outcome", o)],
                );
            }
            *totals.entry("in_flight").or_default() +=
                common::metric_sum(&m, "taskmill_jobs_in_flight", &[("queue", &queue)]);
        }
        let republished = totals["deferred"] + totals["retried"];
        if last != Some(republished) {
            last = Some(republished);
            last_change = last_change.max(Instant::now());
        }
        let depth = b.queue_depth(&queue).await.unwrap();
        if depth == 0 && totals["in_flight"] == 0.0 && last_change.elapsed() > MAX_DEFER {
            break;
        }
        assert!(
            started.elapsed() < BOUND,
            "no quiescence within {BOUND:?}: depth {depth}, {totals:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "quiet after {:?}; B + A2 outcomes: {totals:?}",
        started.elapsed()
    );
    for w in &mut rest {
        let status = w.terminate(Duration::from_secs(30)).await.unwrap();
        assert!(status.success(), "{} exited with {status}", w.name);
    }
    assert_eq!(
        common::settled_depth(&b, &queue, Duration::from_secs(10)).await,
        0,
        "messages left in the work queue"
    );
    assert_eq!(
        b.queue_depth(&format!("{queue}.dead")).await.unwrap(),
        0,
        "dead letters"
    );

    // Every key completed exactly once: one row per key, all completed.
    let keys: HashSet<String> = (0..KEYS).map(|n| format!("k{n}")).collect();
    let completed: Vec<String> = db
        .query("SELECT key FROM taskmill_jobs WHERE state = 'completed'")
        .lines()
        .map(str::to_string)
        .collect();
    let completed_set: HashSet<String> = completed.iter().cloned().collect();
    assert_eq!(db.count("SELECT count(*) FROM taskmill_jobs"), KEYS as i64);
    assert_eq!(completed.len(), KEYS);
    assert_eq!(
        completed_set, keys,
        "completed keys differ from the published keys"
    );
    let taken_over = db.count("SELECT count(*) FROM taskmill_jobs WHERE attempts > 1");
    eprintln!("{taken_over} keys were taken over from the killed worker's expired lease");

    if transactional {
        let rows = db.query("SELECT name, count(*) FROM test_effects GROUP BY name");
        let per_name: HashMap<String, i64> = rows
            .lines()
            .map(|l| {
                let (name, n) = l.split_once('|').expect("name|count");
                (name.to_string(), n.parse().unwrap())
            })
            .collect();
        let wrong: Vec<(&String, i64)> = keys
            .iter()
            .filter_map(|k| match per_name.get(k) {
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
    } else {
        let text = std::fs::read_to_string(&effects).unwrap();
        let mut per_name: HashMap<&str, usize> = HashMap::new();
        for line in text.lines() {
            *per_name.entry(line).or_default() += 1;
        }
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !per_name.contains_key(k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "{} keys have no effect line: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        let unknown: Vec<&&str> = per_name.keys().filter(|k| !keys.contains(**k)).collect();
        assert!(unknown.is_empty(), "unexpected effect lines: {unknown:?}");
        let lines = text.lines().count();
        let extra = lines - KEYS;
        eprintln!("{lines} effect lines: {extra} duplicates (bound {CONCURRENCY})");
        assert!(
            extra <= CONCURRENCY,
            "{extra} duplicate effect lines, more than the killed worker's {CONCURRENCY} in-flight jobs"
        );
    }
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &cpu_queue).await;
}
