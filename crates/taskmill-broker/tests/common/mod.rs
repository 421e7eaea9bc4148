//! Helpers shared by the broker crate's tests against a real RabbitMQ.
#![allow(dead_code)]

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The broker under test.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| taskmill_core::config::DEFAULT_AMQP_URL.to_string())
}

/// A name unique to this test run (queues, connection names).
pub fn unique(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t-{test}-{}-{nanos:08x}", std::process::id())
}

/// Runs an Erlang expression inside the broker; returns its printed value.
pub fn eval(expr: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Tells the broker's reader process of the connection named `name` (and of
/// no other) that a memory alarm is raised (`true`) or cleared (`false`): the
/// message RabbitMQ's alarm handler sends every connection, here sent to one.
/// Nothing broker-wide changes. Returns how many connections got it.
pub fn conserve_resources(name: &str, on: bool) -> usize {
    let expr = format!(
        "length([P ! {{conserve_resources, memory, {on}}} || P <- rabbit_networking:connections(), \
         lists:keyfind(<<\"connection_name\">>, 1, proplists:get_value(client_properties, rabbit_reader:info(P, [client_properties]), [])) \
         =:= {{<<\"connection_name\">>, longstr, <<\"{name}\">>}}])."
    );
    eval(&expr)
        .parse()
        .unwrap_or_else(|_| panic!("unexpected answer to {expr}"))
}

/// Clears the one-connection alarm even when the test fails.
pub struct Unblock(pub String);

impl Drop for Unblock {
    fn drop(&mut self) {
        conserve_resources(&self.0, false);
    }
}

/// The arguments queue `name` of vhost `/` was declared with, as the broker
/// prints them.
pub fn queue_arguments(name: &str) -> String {
    eval(&format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{name}\">>)), amqqueue:get_arguments(Q)."
    ))
}

/// `messages_unacknowledged` of queue `name` in vhost `/`.
pub fn unacked(name: &str) -> u64 {
    let out = eval(&format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{name}\">>)), \
         proplists:get_value(messages_unacknowledged, rabbit_amqqueue:info(Q, [messages_unacknowledged]))."
    ));
    out.parse()
        .unwrap_or_else(|_| panic!("unexpected messages_unacknowledged: {out}"))
}
