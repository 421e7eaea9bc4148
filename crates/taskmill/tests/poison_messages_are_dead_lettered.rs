//! Messages a worker cannot use end in `Q.dead` once, with the reason, and
//! the worker stays healthy and keeps running valid jobs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskmill_broker::Outgoing;
use taskmill_core::HeaderValue;
use taskmill_core::wire::{EXCHANGE, H_ATTEMPT, H_DEAD_ERROR, H_DEAD_QUEUE, H_DEAD_REASON, H_KIND};
use taskmill_worker::{JobError, WorkerBuilder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_dead_letter_with_reason() {
    let queue = common::unique_queue("poison");
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io("test.ok", move |_ctx, _p: serde_json::Value| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .io("test.typed", |_ctx, p: crate_payload::Typed| async move {
            Ok(p.x)
        })
        .io("test.permanent", |_ctx, _p: serde_json::Value| async move {
            Err::<(), _>(JobError::permanent("refused by handler"))
        })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let broker = common::broker().await;
    let publisher = broker.publisher().await.unwrap();
    let kind = |k: &str| (H_KIND, HeaderValue::Str(k.to_string()));
    let cases: Vec<(&str, Outgoing)> = vec![
        (
            "invalid_json",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p1"),
                Some("application/json"),
                &[kind("test.ok")],
                b"\xff\xfegarbage".to_vec(),
            ),
        ),
        (
            "missing_header",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p2"),
                Some("application/json"),
                &[],
                b"{}".to_vec(),
            ),
        ),
        (
            "unknown_kind",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p3"),
                Some("application/json"),
                &[kind("no.such.kind")],
                b"{}".to_vec(),
            ),
        ),
        (
            "bad_header",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p4"),
                Some("application/json"),
                &[kind("test.ok"), (H_ATTEMPT, HeaderValue::Str("two".into()))],
                b"{}".to_vec(),
            ),
        ),
        (
            "bad_header",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p5"),
                Some("application/x-python-serialize"),
                &[kind("test.ok")],
                b"\x80\x04".to_vec(),
            ),
        ),
        (
            "missing_header",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                None,
                Some("application/json"),
                &[kind("test.ok")],
                b"{}".to_vec(),
            ),
        ),
        (
            "invalid_payload",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p7"),
                Some("application/json"),
                &[kind("test.typed")],
                b"{\"x\": \"not a number\"}".to_vec(),
            ),
        ),
        (
            "handler_error",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p8"),
                Some("application/json"),
                &[kind("test.permanent")],
                b"{}".to_vec(),
            ),
        ),
        (
            "payload_too_large",
            Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("p9"),
                Some("application/json"),
                &[kind("test.ok")],
                vec![b' '; 2 * 1024 * 1024],
            ),
        ),
    ];
    let n_poison = cases.len();
    for (_, msg) in &cases {
        publisher.publish(msg).await.unwrap();
        // A valid job between every poison message must still run.
        publisher
            .publish(&Outgoing::raw(
                EXCHANGE,
                &queue,
                Some("ok"),
                Some("application/json"),
                &[kind("test.ok")],
                b"{}".to_vec(),
            ))
            .await
            .unwrap();
    }

    let dead = format!("{queue}.dead");
    assert!(
        common::eventually(Duration::from_secs(30), || ran.load(Ordering::SeqCst)
            == n_poison)
        .await,
        "valid jobs ran {} times, expected {n_poison}",
        ran.load(Ordering::SeqCst)
    );
    let mut depth = 0;
    for _ in 0..100 {
        depth = broker.queue_depth(&dead).await.unwrap();
        if depth as usize == n_poison {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        depth as usize, n_poison,
        "every poison message is dead-lettered exactly once"
    );

    let mut got = Vec::new();
    while let Some(m) = broker.get(&dead).await.unwrap() {
        let reason = m.header_str(H_DEAD_REASON).expect("reason header");
        assert!(!m.header_str(H_DEAD_ERROR).unwrap_or_default().is_empty());
        assert_eq!(m.header_str(H_DEAD_QUEUE).as_deref(), Some(queue.as_str()));
        if m.message_id() == Some("p1") {
            assert_eq!(m.body(), b"\xff\xfegarbage", "the original body is kept");
        }
        if m.message_id() == Some("p9") {
            assert_eq!(m.body().len(), 2 * 1024 * 1024, "the original body is kept");
        }
        got.push(reason);
        m.ack().await.unwrap();
    }
    let mut want: Vec<String> = cases.iter().map(|(r, _)| r.to_string()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);

    assert_eq!(
        common::http_get(handle.http_addr, "/healthz")
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        common::http_get(handle.http_addr, "/readyz")
            .await
            .unwrap()
            .0,
        200
    );
    let (_, metrics) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(
        common::metric_value(
            &metrics,
            &format!("taskmill_dead_letters_total{{queue=\"{queue}\",reason=\"unknown_kind\"}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(broker.queue_depth(&queue).await.unwrap(), 0);
    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&broker, &queue).await;
}

mod crate_payload {
    #[derive(serde::Deserialize)]
    pub struct Typed {
        pub x: u64,
    }
}
