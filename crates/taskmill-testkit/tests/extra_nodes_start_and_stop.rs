//! An extra RabbitMQ node boots beside the service broker on its own ports,
//! stops without touching the service broker, restarts on the same ports,
//! and leaves nothing behind when dropped.

use std::net::TcpStream;
use std::time::Duration;

use taskmill_testkit::rabbit::{ExtraNode, NodeOptions, can_start_nodes};

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

#[test]
fn an_extra_node_starts_stops_and_restarts_beside_the_service_broker() {
    if !can_start_nodes() {
        eprintln!("skipped: rabbitmq-server is not installed here");
        return;
    }
    let node = ExtraNode::start(NodeOptions::unique("tk-node").unwrap()).expect("node starts");
    let port = node.amqp_port();
    assert!(answers(port), "the node answers on 127.0.0.1:{port}");
    let queues = node
        .ctl(&["list_queues", "name"])
        .expect("rabbitmqctl reaches the node");
    assert!(queues.contains("Listing queues"), "{queues}");
    assert!(node.dir().join("log").is_dir());

    node.stop().expect("node stops");
    assert!(!answers(port), "a stopped node does not answer");
    assert!(answers(5672), "the service broker still answers");

    node.restart().expect("node restarts");
    assert!(answers(port), "the restarted node answers on the same port");

    let dir = node.dir().to_path_buf();
    drop(node);
    assert!(!answers(port), "a dropped node is stopped");
    assert!(!dir.exists(), "a dropped node's directory is removed");
}
