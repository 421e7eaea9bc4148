//! A queue declared by an earlier taskmill version (without the newer
//! arguments) is redeclared with the arguments it has: the declaration
//! succeeds, reports the queue in `legacy_arguments`, and the queue works.

mod common;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use taskmill_broker::{Broker, Outgoing, QueueSpec};
use taskmill_core::config::QueueType;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// Declares `name` durable with exactly `args`, as an older version did.
async fn declare_raw(name: &str, args: &[(&str, AMQPValue)]) {
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert((*k).into(), v.clone());
    }
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        table,
    )
    .await
    .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn an_older_quorum_work_queue_is_kept_and_still_works() {
    let queue = common::unique("legacy");
    let dead = format!("{queue}.dead");
    declare_raw(&dead, &[("x-queue-type", long("quorum"))]).await;
    declare_raw(
        &queue,
        &[
            ("x-queue-type", long("quorum")),
            ("x-delivery-limit", AMQPValue::LongLongInt(20)),
            ("x-dead-letter-exchange", long("taskmill")),
            ("x-dead-letter-routing-key", long(&dead)),
        ],
    )
    .await;
    let broker = Broker::connect(&common::amqp_url(), &common::unique("legacy"))
        .await
        .unwrap();
    let spec = QueueSpec {
        name: queue.clone(),
        queue_type: QueueType::Quorum,
        delivery_limit: 20,
    };
    let declared = broker.declare(&spec).await.unwrap();
    if broker.info().supports_at_least_once_dead_lettering() {
        assert_eq!(declared.legacy_arguments, vec![queue.clone()]);
    }
    let args = common::queue_arguments(&queue);
    assert!(!args.contains("at-least-once"), "arguments changed: {args}");
    // The bindings were made after the fallback: a job routes and confirms.
    let publisher = broker.publisher().await.unwrap();
    let job = Outgoing::raw("taskmill", &queue, Some("j-1"), None, &[], b"{}".to_vec());
    publisher.publish(&job).await.unwrap();
    assert_eq!(broker.queue_depth(&queue).await.unwrap(), 1);
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&dead).await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn a_kombu_declared_quorum_celery_queue_is_kept() {
    let queue = common::unique("legacy-celery");
    declare_raw(&queue, &[("x-queue-type", long("quorum"))]).await;
    let broker = Broker::connect(&common::amqp_url(), &common::unique("legacy-celery"))
        .await
        .unwrap();
    let spec = QueueSpec {
        name: queue.clone(),
        queue_type: QueueType::Quorum,
        delivery_limit: 20,
    };
    let declared = broker.declare_celery(&spec).await.unwrap();
    assert_eq!(declared.legacy_arguments, vec![queue.clone()]);
    let args = common::queue_arguments(&queue);
    assert!(
        !args.contains("x-dead-letter-exchange"),
        "arguments changed: {args}"
    );
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_queue(&format!("{queue}.dead")).await.unwrap();
    broker.delete_exchange(&queue).await.unwrap();
    broker.close().await;
}
