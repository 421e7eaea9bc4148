//! `Broker::info` reports what the real broker says about itself, and the
//! passive declare behind `queue_depth` names a missing queue.

mod common;

use taskmill_broker::{Broker, BrokerError};

#[tokio::test]
async fn the_broker_reports_its_version_and_capabilities() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("info"))
        .await
        .unwrap();
    let info = broker.info();
    assert!(info.is_rabbitmq(), "{info:?}");
    assert!(info.has_capability("publisher_confirms"), "{info:?}");
    assert!(info.sends_connection_blocked(), "{info:?}");
    // The same version rabbitmqctl reports.
    let version = common::eval("rabbit:product_version().");
    assert_eq!(format!("\"{}\"", info.version_text), version);
    assert!(info.version >= (3, 8, 0), "{info:?}");
    assert_eq!(
        info.supports_per_queue_consumer_timeout(),
        info.version >= (3, 12, 0)
    );
    broker.close().await;
}

#[tokio::test]
async fn a_missing_queue_is_named() {
    let broker = Broker::connect(&common::amqp_url(), &common::unique("missing"))
        .await
        .unwrap();
    let queue = common::unique("no-such-queue");
    let err = broker.queue_depth(&queue).await.unwrap_err();
    assert!(matches!(err, BrokerError::Closed(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("`{queue}` does not exist")),
        "{err}"
    );
    broker.close().await;
}

#[tokio::test]
async fn refused_credentials_fail_the_connect_in_time() {
    let url = common::amqp_url().replacen("guest:guest", "guest:wrong-secret", 1);
    if url == common::amqp_url() {
        // TEST_AMQP_URL with other credentials: nothing to break here.
        return;
    }
    let start = std::time::Instant::now();
    let err = Broker::connect(&url, &common::unique("refused"))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, BrokerError::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("cannot connect to the broker"), "{text}");
    assert!(!text.contains("wrong-secret"), "password leaked: {text}");
}
