//! A Celery message with a 70 KB `eta` (and a 40 KB `kwargsrepr`) is refused
//! once: its dead letter arrives in `Q.dead` with headers cut to the copy
//! bound, and the worker stays ready and keeps running the next task.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskmill_broker::Outgoing;
use taskmill_core::bounds::{MAX_COPY_HEADER_BYTES, TRUNCATED_MARKER};
use taskmill_core::celery::{CeleryCall, H_ETA, H_ID, H_TASK};
use taskmill_core::wire::{EXCHANGE, H_DEAD_REASON};
use taskmill_core::{DeadLetter, HeaderValue};
use taskmill_worker::{CancellationToken, JobContext, WorkerBuilder};

fn celery_task(queue: &str, id: &str, extra: Vec<(&'static str, HeaderValue)>) -> Outgoing {
    let mut headers = vec![
        (H_TASK, HeaderValue::Str("tests.count".into())),
        (H_ID, HeaderValue::Str(id.into())),
    ];
    headers.extend(extra);
    Outgoing::raw(
        EXCHANGE,
        queue,
        None,
        Some("application/json"),
        &headers,
        br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
            .to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_celery_headers_are_dead_lettered_within_the_bound() {
    let queue = common::unique_queue("hostile");
    let mut config = common::config(&queue);
    config.queues = Vec::new();
    config.celery_queues = vec![queue.clone()];
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let worker = WorkerBuilder::new(config)
        .io("tests.count", move |_ctx: JobContext, _call: CeleryCall| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let handle = worker.start(shutdown.clone()).await.unwrap();
    assert!(handle.wait_ready(Duration::from_secs(20)).await);

    let broker = common::broker().await;
    let publisher = broker.publisher().await.unwrap();
    let huge_eta = format!("2024-05-01T12:00:00.{}+00:00", "0".repeat(70_000));
    let hostile = celery_task(
        &queue,
        "hostile-1",
        vec![
            (H_ETA, HeaderValue::Str(huge_eta)),
            ("kwargsrepr", HeaderValue::Str("k".repeat(40_000))),
        ],
    );
    publisher.publish(&hostile).await.unwrap();
    publisher
        .publish(&celery_task(&queue, "fine-1", Vec::new()))
        .await
        .unwrap();

    assert!(
        common::eventually(Duration::from_secs(20), || ran.load(Ordering::SeqCst) == 1).await,
        "the task after the hostile one runs"
    );
    let dead = format!("{queue}.dead");
    let mut depth = 0;
    for _ in 0..200 {
        depth = broker.queue_depth(&dead).await.unwrap();
        if depth == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth, 1, "the hostile message is dead-lettered once");

    let mut browser = broker.browse(&dead).await.unwrap();
    let msg = browser.next().await.unwrap().expect("the dead letter");
    let headers = msg.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    HeaderValue::Str(s) => s.len(),
                    HeaderValue::Bytes(b) => b.len(),
                    _ => 9,
                }
        })
        .sum();
    assert!(
        bytes <= MAX_COPY_HEADER_BYTES,
        "dead letter headers are {bytes} bytes"
    );
    let dl = DeadLetter::from_headers(|n| msg.header(n)).expect("a worker dead letter");
    assert_eq!(dl.reason, "bad_header");
    assert!(dl.detail.unwrap_or_default().contains(H_ETA));
    assert_eq!(msg.header_str(H_DEAD_REASON).as_deref(), Some("bad_header"));
    let eta = msg.header_str(H_ETA).expect("eta is kept, cut");
    assert!(
        eta.ends_with(TRUNCATED_MARKER),
        "{}",
        &eta[eta.len() - 40..]
    );
    assert_eq!(msg.header_str(H_ID).as_deref(), Some("hostile-1"));
    browser.ack(msg).await.unwrap();
    browser.requeue_all().await.unwrap();

    assert_eq!(
        common::http_get(handle.http_addr, "/readyz")
            .await
            .unwrap()
            .0,
        200,
        "the worker is still ready"
    );
    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&broker, &queue).await;
}
