//! A consumer the broker stops feeding (its channel wedged: here suspended
//! inside RabbitMQ with `sys:suspend`) while its queue holds ready messages
//! turns `/readyz` to 503 naming `watchdog:<queue>`; once the channel works
//! again, readiness comes back and every job runs.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use taskmill_client::{Client, NewJob};
use taskmill_worker::WorkerBuilder;

/// Suspends or resumes, inside the broker, the channel of the consumer `tag`.
fn channel(action: &str, tag: &str) -> String {
    let expr = format!(
        "[sys:{action}(proplists:get_value(channel_pid, C)) || C <- rabbit_amqqueue:consumers_all(<<\"/\">>), proplists:get_value(consumer_tag, C) =:= <<\"{tag}\">>]."
    );
    let out = Command::new("rabbitmqctl")
        .args(["eval", &expr])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Resumes the channel even when the test fails.
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        channel("resume", &self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_turns_readiness_false_until_it_recovers() {
    let queue = common::unique_queue("watchdog");
    let mut config = common::config(&queue);
    config.consume_watchdog_ms = 2_000;
    let tag = format!("{}/{queue}", config.worker_id.clone().unwrap());
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let worker = WorkerBuilder::new(config)
        .io("test.count", move |_ctx, _p: serde_json::Value| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let suspended = channel("suspend", &tag);
    assert!(
        suspended.contains("[ok]"),
        "could not suspend the consumer's channel: {suspended}"
    );
    let _resume = Resume(tag.clone());

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let jobs: Vec<NewJob> = (0..300)
        .map(|_| NewJob::raw("test.count", b"{}".to_vec()).queue(&queue))
        .collect();
    client.enqueue_many(jobs).await.unwrap();

    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = common::http_get(handle.http_addr, "/readyz").await.unwrap();
        if status == 503 {
            assert!(body.contains(&format!("watchdog:{queue}")), "{body}");
            break;
        }
        assert!(
            Instant::now() < until,
            "readiness never turned false for the stalled queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "nothing was delivered while suspended"
    );

    channel("resume", &tag);
    assert!(
        common::eventually(Duration::from_secs(30), || ran.load(Ordering::SeqCst)
            == 300)
        .await,
        "only {} of 300 jobs ran after the channel recovered",
        ran.load(Ordering::SeqCst)
    );
    let until = Instant::now() + Duration::from_secs(20);
    while common::http_get(handle.http_addr, "/readyz")
        .await
        .unwrap()
        .0
        != 200
    {
        assert!(Instant::now() < until, "readiness did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&common::broker().await, &queue).await;
}
