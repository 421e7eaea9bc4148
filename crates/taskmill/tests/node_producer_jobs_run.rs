//! A producer in Node.js needs nothing but docs/protocol.md: the example in
//! `examples/node-producer/` (amqplib, installed by `npm ci` from its
//! committed lockfile) publishes jobs, and a real worker runs them: plain
//! jobs, a job with an idempotency key published twice (runs once), a
//! delayed job (runs after its delay, not before), with the trace context.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskmill_worker::{JobContext, WorkerBuilder};

/// One job as the handler saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    job_id: String,
    payload: serde_json::Value,
    key: Option<String>,
    traceparent: Option<String>,
    attempt: u32,
}

/// Runs `enqueue.js` with `args`; returns the job ids it printed.
async fn enqueue(node: &Path, queue: &str, args: &[&str]) -> Vec<String> {
    common::node_enqueue(node, queue, args)
        .await
        .into_iter()
        .map(|j| j.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_producer_jobs_run() {
    let node = common::node();
    let queue = common::unique_queue("node");
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io(
            "test.record",
            move |ctx: JobContext, payload: serde_json::Value| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(Seen {
                        at: Instant::now(),
                        job_id: ctx.job_id.clone(),
                        payload,
                        key: ctx.idempotency_key.clone(),
                        traceparent: ctx.traceparent.clone(),
                        attempt: ctx.attempt,
                    });
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    // Three plain jobs, with a trace context.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let plain = enqueue(
        &node,
        &queue,
        &[
            "--kind",
            "test.record",
            "--payload",
            r#"{"from": "node", "n": 3}"#,
            "--count",
            "3",
            "--traceparent",
            traceparent,
        ],
    )
    .await;
    assert_eq!(plain.len(), 3);
    // The same idempotency key twice: the second copy is a duplicate. The
    // first must have completed before the second is published, or the
    // second is deferred (not skipped) while the first holds the key.
    let key_args = [
        "--kind",
        "test.record",
        "--payload",
        r#"{"keyed": true}"#,
        "--idempotency-key",
        "node-order-42",
    ];
    let first = enqueue(&node, &queue, &key_args).await;
    assert!(
        common::eventually(Duration::from_secs(15), || seen
            .lock()
            .unwrap()
            .iter()
            .any(|j| j.job_id == first[0]))
        .await,
        "the keyed job did not run"
    );
    let second = enqueue(&node, &queue, &key_args).await;
    // A delayed job: through the delay ladder, due in 1.5 s.
    let published = Instant::now();
    let delayed = enqueue(
        &node,
        &queue,
        &[
            "--kind",
            "test.record",
            "--payload",
            r#"{"delayed": true}"#,
            "--delay-ms",
            "1500",
        ],
    )
    .await;

    let all_ids: Vec<&String> = plain.iter().chain(&first).chain(&delayed).collect();
    assert!(
        common::eventually(Duration::from_secs(20), || {
            let got = seen.lock().unwrap();
            all_ids
                .iter()
                .all(|id| got.iter().any(|j| &&j.job_id == id))
        })
        .await,
        "not every job published by node ran: {:?}",
        seen.lock().unwrap()
    );
    // Let a wrongly run duplicate show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got.len(),
        5,
        "5 runs expected (3 plain, 1 keyed, 1 delayed): {got:?}"
    );

    for id in &plain {
        let j = got.iter().find(|j| &j.job_id == id).unwrap();
        assert_eq!(j.payload, serde_json::json!({"from": "node", "n": 3}));
        assert_eq!(j.traceparent.as_deref(), Some(traceparent));
        assert_eq!(j.attempt, 1);
        assert_eq!(j.key, None);
    }
    let keyed: Vec<&Seen> = got
        .iter()
        .filter(|j| j.key.as_deref() == Some("node-order-42"))
        .collect();
    assert_eq!(keyed.len(), 1, "the keyed job ran more than once");
    assert_ne!(first[0], second[0], "each publish is a new job id");
    assert!(!got.iter().any(|j| j.job_id == second[0]));
    let d = got.iter().find(|j| j.job_id == delayed[0]).unwrap();
    assert_eq!(d.payload, serde_json::json!({"delayed": true}));
    assert!(
        d.at.duration_since(published) >= Duration::from_millis(1500),
        "the delayed job ran after {:?}, before its 1.5 s delay",
        d.at.duration_since(published)
    );

    shutdown.cancel();
    handle.wait().await.unwrap();
    let b = common::broker().await;
    assert_eq!(
        b.queue_depth(&format!("{queue}.dead")).await.unwrap(),
        0,
        "a job from node was dead-lettered"
    );
    common::cleanup(&b, &queue).await;
}
