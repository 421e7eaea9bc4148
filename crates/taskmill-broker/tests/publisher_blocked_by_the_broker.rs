//! A publishing connection the broker blocks (a memory alarm, delivered
//! here to one connection only) is reported through `Broker::blocked`, its
//! confirms time out as errors instead of hanging, and with a separate
//! publish connection the consumers' acks keep flowing meanwhile.

mod common;

use std::time::{Duration, Instant};

use taskmill_broker::{Broker, ConnectOptions, Outgoing, PublishError, QueueSpec};
use taskmill_core::config::QueueType;

fn options() -> ConnectOptions {
    ConnectOptions {
        confirm_timeout: Duration::from_millis(800),
        separate_publish_connection: true,
        ..ConnectOptions::default()
    }
}

async fn wait_blocked(broker: &Broker, want: bool) -> Option<String> {
    let mut rx = broker.blocked();
    let wanted = async {
        rx.wait_for(|b| b.is_some() == want)
            .await
            .map(|b| b.clone())
    };
    tokio::time::timeout(Duration::from_secs(10), wanted)
        .await
        .unwrap_or_else(|_| panic!("blocked() never became {want}"))
        .unwrap()
}

fn message(queue: &str, n: u8) -> Outgoing {
    Outgoing::raw(
        "",
        queue,
        Some(&format!("m{n}")),
        Some("application/json"),
        &[],
        b"{}".to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_publishes_time_out_and_acks_keep_flowing() {
    let name = common::unique("blocked");
    let queue = common::unique("blocked-q");
    let broker = Broker::connect_with(&common::amqp_url(), &name, &options())
        .await
        .unwrap();
    assert!(broker.has_publish_connection());
    assert_eq!(*broker.blocked().borrow(), None);
    broker
        .declare(&QueueSpec {
            name: queue.clone(),
            queue_type: QueueType::Classic,
            delivery_limit: 20,
        })
        .await
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    publisher.publish(&message(&queue, 1)).await.unwrap();
    let mut consumer = broker.consume(&queue, 10, &name).await.unwrap();
    let first = consumer.next().await.unwrap().unwrap();

    let publish_conn = format!("{name} publisher");
    assert_eq!(common::conserve_resources(&publish_conn, true), 1);
    let _unblock = common::Unblock(publish_conn.clone());

    // RabbitMQ blocks a connection once it publishes during an alarm.
    let start = Instant::now();
    let err = publisher.publish(&message(&queue, 2)).await.unwrap_err();
    assert!(
        matches!(err, PublishError::ConfirmTimeout { after, .. } if after == Duration::from_millis(800)),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let reason = wait_blocked(&broker, true).await.unwrap();
    assert!(!reason.is_empty());

    // The consume connection is not blocked: the ack reaches the broker.
    assert_eq!(common::unacked(&queue), 1);
    first.ack().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while common::unacked(&queue) != 0 {
        assert!(
            Instant::now() < deadline,
            "the ack did not reach the broker while publishing was blocked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), consumer.cancel())
        .await
        .expect("basic.cancel stalled")
        .unwrap();

    assert_eq!(common::conserve_resources(&publish_conn, false), 1);
    assert_eq!(wait_blocked(&broker, false).await, None);
    // Unblocked, the connection works again: the held publish goes in and
    // a new one is confirmed.
    publisher.publish(&message(&queue, 3)).await.unwrap();
    let other = Broker::connect(&common::amqp_url(), &format!("{name} check"))
        .await
        .unwrap();
    other.delete_queue(&queue).await.unwrap();
    other.delete_queue(&format!("{queue}.dead")).await.unwrap();
    other.close().await;
    broker.close().await;
}
