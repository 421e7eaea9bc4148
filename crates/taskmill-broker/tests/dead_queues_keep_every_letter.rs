//! The topology follows the broker: new quorum queues dead-letter
//! at-least-once, `Q.dead` has no delivery limit (browsing it again and again
//! drops nothing), quorum Celery queues dead-letter to `Q.dead`, and the
//! consumer timeout option is applied only where the broker supports it.

mod common;

use std::time::Duration;

use taskmill_broker::{Broker, DeclareOptions, Outgoing, QueueSpec};
use taskmill_core::config::QueueType;

fn quorum(name: &str) -> QueueSpec {
    QueueSpec {
        name: name.to_string(),
        queue_type: QueueType::Quorum,
        delivery_limit: 20,
    }
}

async fn cleanup(broker: &Broker, queue: &str) {
    broker.delete_queue(queue).await.unwrap();
    broker.delete_queue(&format!("{queue}.dead")).await.unwrap();
}

#[tokio::test]
async fn new_quorum_queues_dead_letter_at_least_once() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("alo"))
        .await
        .unwrap();
    let queue = common::unique("alo-q");
    let declared = broker.declare(&quorum(&queue)).await.unwrap();
    assert!(declared.legacy_arguments.is_empty(), "{declared:?}");
    let args = common::queue_arguments(&queue);
    let info = broker.info();
    assert_eq!(
        args.contains("at-least-once") && args.contains("reject-publish"),
        info.supports_at_least_once_dead_lettering(),
        "{args}"
    );
    let dead = common::queue_arguments(&format!("{queue}.dead"));
    assert!(dead.contains("quorum"), "{dead}");
    assert_eq!(
        dead.contains("x-delivery-limit"),
        info.quorum_delivery_limit_default().is_some(),
        "{dead}"
    );
    // Declaring again (another worker, a reconnect) is idempotent.
    let again = broker.declare(&quorum(&queue)).await.unwrap();
    assert!(again.legacy_arguments.is_empty(), "{again:?}");
    cleanup(&broker, &queue).await;
    broker.close().await;
}

#[tokio::test]
async fn dead_letters_survive_repeated_browsing() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("browse"))
        .await
        .unwrap();
    let queue = common::unique("browse-q");
    broker.declare(&quorum(&queue)).await.unwrap();
    let dead = format!("{queue}.dead");
    let publisher = broker.publisher().await.unwrap();
    let letter = Outgoing::raw("taskmill", &dead, Some("dl-1"), None, &[], b"{}".to_vec());
    publisher.publish(&letter).await.unwrap();
    // More returns than RabbitMQ 4's default quorum delivery limit (20).
    for round in 0..25 {
        let mut browser = broker.browse(&dead).await.unwrap();
        let seen = browser.next().await.unwrap();
        assert_eq!(
            seen.as_ref().and_then(|m| m.message_id()),
            Some("dl-1"),
            "round {round}: the dead letter is gone"
        );
        browser.requeue_all().await.unwrap();
    }
    let mut depth = 0;
    for _ in 0..50 {
        depth = broker.queue_depth(&dead).await.unwrap();
        if depth == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth, 1);
    cleanup(&broker, &queue).await;
    broker.close().await;
}

#[tokio::test]
async fn quorum_celery_queues_dead_letter_to_their_dead_queue() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("celery"))
        .await
        .unwrap();
    let queue = common::unique("celery-q");
    let declared = broker.declare_celery(&quorum(&queue)).await.unwrap();
    assert!(declared.legacy_arguments.is_empty(), "{declared:?}");
    let args = common::queue_arguments(&queue);
    assert!(args.contains("x-dead-letter-exchange"), "{args}");
    assert!(args.contains(&format!("{queue}.dead")), "{args}");
    broker.declare_celery(&quorum(&queue)).await.unwrap();
    cleanup(&broker, &queue).await;
    broker.delete_exchange(&queue).await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn consumer_timeout_is_set_where_the_broker_supports_it() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("ctimeout"))
        .await
        .unwrap();
    let queue = common::unique("ctimeout-q");
    let opts = DeclareOptions {
        consumer_timeout: Some(Duration::from_secs(7200)),
    };
    let declared = broker.declare_with(&quorum(&queue), &opts).await.unwrap();
    let supported = broker.info().supports_per_queue_consumer_timeout();
    assert_eq!(declared.consumer_timeout_applied, supported);
    let args = common::queue_arguments(&queue);
    assert_eq!(args.contains("x-consumer-timeout"), supported, "{args}");
    // Without the option the same queue still declares.
    broker.declare(&quorum(&queue)).await.unwrap();
    cleanup(&broker, &queue).await;
    broker.close().await;
}
