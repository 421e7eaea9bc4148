//! `Broker::browse` on a queue that does not exist fails with
//! `BrokerError::Closed` naming the queue (the dead-letter tools add their
//! hint on top of this text), and the broker connection stays usable.

mod common;

use taskmill_broker::{Broker, BrokerError, QueueSpec};
use taskmill_core::config::QueueType;

#[tokio::test]
async fn browsing_a_missing_queue_names_it() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("browse-missing"))
        .await
        .unwrap();
    let queue = common::unique("no-such-dead");
    let err = broker.browse(&queue).await.unwrap_err();
    match &err {
        BrokerError::Closed(text) => {
            assert_eq!(text, &format!("queue `{queue}` does not exist"));
        }
        other => panic!("expected Closed, got {other:?}"),
    }

    // Only the browsing channel was closed: the same broker browses a queue
    // that exists.
    let spec = QueueSpec {
        name: common::unique("browse-present"),
        queue_type: QueueType::Classic,
        delivery_limit: 0,
    };
    broker.declare(&spec).await.unwrap();
    let dead = format!("{}.dead", spec.name);
    let browser = broker.browse(&dead).await.unwrap();
    assert_eq!(browser.ready_at_open(), 0);
    browser.requeue_all().await.unwrap();
    broker.delete_queue(&spec.name).await.unwrap();
    broker.delete_queue(&dead).await.unwrap();
    broker.close().await;
}
