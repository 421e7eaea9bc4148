//! On the SQLite store, a transactional job that keeps its completion
//! transaction open for 20 s does not make the keyed jobs beside it fail.
//!
//! The handler that sleeps *before* its first write holds no lock while it
//! sleeps (the store opens the write transaction at the first statement):
//! the 500 keyed IO jobs streamed beside it claim and complete as usual, with
//! no failed completion on `/metrics`, and its own row commits once.
//!
//! The handler that writes *first* and then sleeps holds the file's write lock
//! for those 20 s; every claim and completion of the other jobs waits for it
//! (up to the store's busy timeout, 30 s). What that costs is printed; the
//! test asserts only what must hold whatever the timing: each job completes
//! exactly once, the row commits once, nothing is dead-lettered.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;
use taskmill_worker::{CompletionTx, JobContext, JobError, WorkerBuilder};

const STREAM: usize = 500;
const HOLD: Duration = Duration::from_secs(20);

#[derive(serde::Deserialize)]
struct Held {
    write_first: bool,
}

/// What one run saw.
#[derive(Debug)]
struct Seen {
    /// `taskmill_store_errors_total{operation="complete"}` (and `"claim"`).
    complete_errors: f64,
    claim_errors: f64,
    /// Failed heartbeats (lease renewals wait for the same write lock).
    heartbeat_errors: f64,
    /// Attempts of the stream's jobs by outcome.
    outcomes: HashMap<Outcome, usize>,
    /// Stream jobs that completed while the transaction was open.
    completed_during_hold: usize,
    /// The longest pause between two completions of stream jobs.
    longest_gap: Duration,
    /// Completed keys in the store and rows the transactional job wrote.
    completed_keys: i64,
    rows: i64,
    tx_outcomes: Vec<Outcome>,
}

fn sqlite(db: &std::path::Path, sql: &str) -> i64 {
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("the test needs the sqlite3 CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

async fn run_beside_a_held_transaction(name: &str, write_first: bool) -> Seen {
    let queue = common::unique_queue(name);
    let data = common::temp_dir(name);
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.concurrency = 50;
    let reports: common::Reports = Arc::default();
    let r = reports.clone();
    let held_window: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let w = held_window.clone();
    let worker = WorkerBuilder::new(config)
        .io(
            "test.keyed",
            |_ctx: JobContext, _p: serde_json::Value| async move { Ok::<_, JobError>(()) },
        )
        .io_transactional(
            "test.held",
            move |_ctx: JobContext, p: Held, mut tx: CompletionTx| {
                let w = w.clone();
                async move {
                    w.lock().unwrap().0 = Some(Instant::now());
                    if p.write_first {
                        write_row(&mut tx).await?;
                        tokio::time::sleep(HOLD).await;
                    } else {
                        tokio::time::sleep(HOLD).await;
                        write_row(&mut tx).await?;
                    }
                    w.lock().unwrap().1 = Some(Instant::now());
                    Ok(("held", tx))
                }
            },
        )
        .on_job_done(move |rep| r.lock().unwrap().push((Instant::now(), rep.clone())))
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(30)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    client
        .enqueue(
            NewJob::new(
                "test.held",
                &serde_json::json!({ "write_first": write_first }),
            )
            .unwrap()
            .queue(&queue)
            .job_id("held"),
        )
        .await
        .unwrap();
    // The stream is spread over most of the hold, so its jobs are claimed
    // and completed while the transaction is open.
    let pace = HOLD * 9 / 10 / u32::try_from(STREAM).unwrap();
    for n in 0..STREAM {
        client
            .enqueue(
                NewJob::new("test.keyed", &serde_json::json!({ "n": n }))
                    .unwrap()
                    .queue(&queue)
                    .idempotency_key(&format!("stream-{n}")),
            )
            .await
            .unwrap();
        tokio::time::sleep(pace).await;
    }
    let settled = |kind: &str| {
        reports
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, rep)| rep.kind == kind && rep.outcome != Outcome::Deferred)
            .count()
    };
    assert!(
        common::eventually(Duration::from_secs(120), || settled("test.keyed") >= STREAM
            && settled("test.held") >= 1)
        .await,
        "not settled within 120 s: {} stream jobs, {} held",
        settled("test.keyed"),
        settled("test.held")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, metrics) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    let errors = |op: &str| {
        common::metric_sum(
            &metrics,
            "taskmill_store_errors_total",
            &[("operation", op)],
        )
    };
    shutdown.cancel();
    handle.wait().await.unwrap();

    let (began, ended) = *held_window.lock().unwrap();
    let (began, ended) = (began.expect("the held job ran"), ended.expect("it ended"));
    let reports = reports.lock().unwrap().clone();
    let mut outcomes = HashMap::new();
    let mut times = Vec::new();
    for (at, rep) in reports.iter().filter(|(_, r)| r.kind == "test.keyed") {
        *outcomes.entry(rep.outcome).or_insert(0) += 1;
        if rep.outcome == Outcome::Ok {
            times.push(*at);
        }
    }
    times.sort();
    let longest_gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let db = data.0.join("taskmill.db");
    let seen = Seen {
        complete_errors: errors("complete"),
        claim_errors: errors("claim"),
        heartbeat_errors: errors("heartbeat"),
        outcomes,
        completed_during_hold: times.iter().filter(|t| **t > began && **t < ended).count(),
        longest_gap,
        completed_keys: sqlite(
            &db,
            "SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'",
        ),
        rows: sqlite(&db, "SELECT count(*) FROM held_rows"),
        tx_outcomes: reports
            .iter()
            .filter(|(_, r)| r.kind == "test.held")
            .map(|(_, r)| r.outcome)
            .collect(),
    };
    eprintln!("{name} (write_first = {write_first}): {seen:#?}");
    let broker = common::broker().await;
    assert_eq!(
        broker.queue_depth(&format!("{queue}.dead")).await.unwrap(),
        0,
        "nothing is dead-lettered"
    );
    common::cleanup(&broker, &queue).await;
    seen
}

/// The transactional job's one write, in its completion transaction.
async fn write_row(tx: &mut CompletionTx) -> Result<(), JobError> {
    let err = |e: taskmill_store::StoreError| JobError::retryable(format!("held: {e}"));
    tx.execute("CREATE TABLE IF NOT EXISTS held_rows (name text)", &[])
        .await
        .map_err(err)?;
    tx.execute("INSERT INTO held_rows (name) VALUES (?)", &["held"])
        .await
        .map_err(err)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_sleeps_before_writing_blocks_no_claim() {
    let seen = run_beside_a_held_transaction("txsleepfirst", false).await;
    assert_eq!(seen.complete_errors, 0.0, "{seen:#?}");
    assert_eq!(seen.claim_errors, 0.0, "{seen:#?}");
    assert_eq!(seen.heartbeat_errors, 0.0, "{seen:#?}");
    assert_eq!(seen.outcomes.get(&Outcome::Ok), Some(&STREAM), "{seen:#?}");
    assert_eq!(seen.outcomes.len(), 1, "only `ok` outcomes: {seen:#?}");
    assert_eq!(seen.completed_keys, i64::try_from(STREAM).unwrap() + 1);
    assert_eq!(seen.rows, 1, "the held job's row commits once");
    assert_eq!(seen.tx_outcomes, [Outcome::Ok]);
    // The stream ran beside the open transaction, not after it.
    assert!(seen.longest_gap < HOLD / 4, "{seen:#?}");
    assert!(seen.completed_during_hold >= STREAM / 2, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_writes_first_makes_claims_wait() {
    let seen = run_beside_a_held_transaction("txwritefirst", true).await;
    // Whatever the waits cost, every job completes once and the row once.
    assert_eq!(
        seen.completed_keys,
        i64::try_from(STREAM).unwrap() + 1,
        "{seen:#?}"
    );
    assert_eq!(seen.rows, 1, "{seen:#?}");
    assert_eq!(seen.tx_outcomes.last(), Some(&Outcome::Ok), "{seen:#?}");
}
