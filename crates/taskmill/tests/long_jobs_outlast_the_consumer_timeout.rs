//! A job that runs longer than the broker's consumer timeout completes once,
//! without a channel close, while short jobs keep flowing.
//!
//! The broker's `consumer_timeout` is lowered to 5 s (`rabbitmqctl eval
//! 'application:set_env(rabbit, consumer_timeout, 5000).'`) and the worker
//! is told so (`broker_consumer_timeout_ms = 5000`): a job whose hard timeout
//! comes near that limit is claimed by its job id, its message parked in the
//! store and its delivery acked before it runs. A channel reads the
//! timeout when it opens, so the lowered value is restored (to what
//! `application:get_env` read before) as soon as the worker is consuming,
//! and by a guard even if the test panics: other tests on the broker see it
//! for a few seconds only.
//!
//! RabbitMQ 3.10 checks the timeout only on its channel tick
//! (`channel_tick_interval`, 60 s), not when it runs out. A 15 s job is
//! never caught: with `broker_consumer_timeout_ms = 0` (never ack early) it
//! also completes once, so it proves nothing. The job therefore runs
//! [`LONG`] (75 s), outlasting the first tick after the consumer channel
//! opens. With `broker_consumer_timeout_ms = 0` this scenario fails: at the
//! tick the broker closes the channel (`PRECONDITION_FAILED - delivery
//! acknowledgement timed out`), the worker reconnects (the counter goes to
//! 1), and the redelivered job runs a second time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::SqliteDb;
use taskmill_client::{Client, NewJob};
use taskmill_core::Outcome;
use taskmill_worker::WorkerBuilder;

/// The broker's consumer timeout during the test, and the worker's setting.
const CONSUMER_TIMEOUT_MS: u64 = 5_000;
/// How long the long job runs: past the broker's first channel tick.
const LONG: Duration = Duration::from_secs(75);
/// The long job's hard timeout.
const LONG_TIMEOUT: Duration = Duration::from_secs(120);
/// Short jobs enqueued while the long one runs.
const SHORT: usize = 200;

/// The broker's `consumer_timeout`, lowered while this lives; restored on
/// drop (also when the test panics) or by [`ConsumerTimeout::restore`].
struct ConsumerTimeout {
    previous: Option<u64>,
}

impl ConsumerTimeout {
    fn lower_to(ms: u64) -> ConsumerTimeout {
        let got = common::rabbitmqctl(&["eval", "application:get_env(rabbit, consumer_timeout)."]);
        // `{ok,1800000}`, or `undefined` (then the broker's default applies).
        let previous = got
            .trim()
            .strip_prefix("{ok,")
            .and_then(|s| s.strip_suffix('}'))
            .map(|n| n.parse().expect("consumer_timeout is a number"))
            .unwrap_or(1_800_000);
        set_consumer_timeout(ms);
        ConsumerTimeout {
            previous: Some(previous),
        }
    }

    fn restore(&mut self) {
        if let Some(ms) = self.previous.take() {
            set_consumer_timeout(ms);
        }
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        self.restore();
    }
}

fn set_consumer_timeout(ms: u64) {
    common::rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, consumer_timeout, {ms})."),
    ]);
}

/// Payload of `test.long`.
#[derive(serde::Deserialize)]
struct Long {
    ms: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_completes_once_without_a_channel_close() {
    let queue = common::unique_queue("long");
    let data = common::temp_dir("long");
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.concurrency = 8;
    config.broker_consumer_timeout_ms = CONSUMER_TIMEOUT_MS;

    let runs = Arc::new(AtomicU32::new(0));
    let long_done = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let (builder, counts) = common::counting(WorkerBuilder::new(config), SHORT);
    let d = long_done.clone();
    let worker = builder
        .io("test.long", move |_ctx, p: Long| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(p.ms)).await;
                Ok(())
            }
        })
        .on_job_done(move |rep| {
            if rep.kind == "test.long" && rep.outcome == Outcome::Ok {
                d.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();

    let mut lowered = ConsumerTimeout::lower_to(CONSUMER_TIMEOUT_MS);
    let (handle, shutdown) = common::start(worker, Duration::from_secs(30)).await;
    // The worker's consumer channel is open and holds the 5 s timeout; the
    // channels other tests open from now on get the usual one again.
    lowered.restore();
    let addr = handle.http_addr;

    // Readiness, watched all along.
    let watching = Arc::new(AtomicBool::new(true));
    let watch = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut not_ready = Vec::new();
            while watching.load(Ordering::SeqCst) {
                match common::http_get(addr, "/readyz").await {
                    Ok((200, _)) => {}
                    Ok((status, body)) => not_ready.push(format!("{status}: {body}")),
                    Err(e) => not_ready.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            not_ready
        })
    };

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let started = Instant::now();
    let long_id = client
        .enqueue(
            NewJob::new(
                "test.long",
                &serde_json::json!({ "ms": LONG.as_millis() as u64 }),
            )
            .unwrap()
            .queue(&queue)
            .timeout(LONG_TIMEOUT),
        )
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || runs.load(Ordering::SeqCst) == 1).await,
        "the long job did not start"
    );

    // Short jobs flow while the long one runs.
    let short = (0..SHORT).map(|n| {
        NewJob::new("test.count", &serde_json::json!({ "n": n }))
            .unwrap()
            .queue(&queue)
    });
    assert_eq!(client.enqueue_many(short).await.unwrap().len(), SHORT);
    assert!(
        common::eventually(Duration::from_secs(30), || counts
            .lock()
            .unwrap()
            .iter()
            .all(|&c| c >= 1))
        .await,
        "short jobs did not all run while the long job ran"
    );
    assert_eq!(
        long_done.load(Ordering::SeqCst),
        0,
        "the long job ended before the short jobs did: they did not run meanwhile"
    );

    // The long job completes once; nothing comes back after it.
    assert!(
        common::eventually(LONG + Duration::from_secs(60), || long_done
            .load(Ordering::SeqCst)
            >= 1)
        .await,
        "the long job did not complete within {:?}",
        LONG + Duration::from_secs(60)
    );
    let took = started.elapsed();
    eprintln!("the {LONG:?} job completed after {took:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    watching.store(false, Ordering::SeqCst);
    let not_ready = watch.await.unwrap();

    let (_, metrics) = common::http_get(addr, "/metrics").await.unwrap();
    let reconnects = common::metric_sum(&metrics, "taskmill_broker_reconnects_total", &[]);
    let broker = common::broker().await;
    let dead = broker.queue_depth(&format!("{queue}.dead")).await.unwrap();
    let left = broker.queue_depth(&queue).await.unwrap();
    shutdown.cancel();
    handle.wait().await.unwrap();

    let store = SqliteDb {
        path: data.join("taskmill.db"),
    };
    let row = store.query(&format!(
        "SELECT state, attempts FROM taskmill_jobs WHERE key = '{long_id}'"
    ));
    common::cleanup(&broker, &queue).await;

    assert_eq!(runs.load(Ordering::SeqCst), 1, "the long job ran again");
    assert_eq!(long_done.load(Ordering::SeqCst), 1);
    assert_eq!(reconnects, 0.0, "the worker lost its channel:\n{metrics}");
    assert!(
        not_ready.is_empty(),
        "readiness turned false: {not_ready:?}"
    );
    assert_eq!(row.trim(), "completed|1", "the long job's row in the store");
    assert_eq!(dead, 0, "dead letters");
    assert_eq!(left, 0, "messages left in the queue");
    assert!(
        counts.lock().unwrap().iter().all(|&c| c == 1),
        "a short job ran other than once: {:?}",
        counts.lock().unwrap()
    );
}
