//! The CLI reports a failure once: one `error:` line in which no cause is
//! repeated, a `hint:` where a remedy is known, no log lines of the AMQP
//! library, and the documented exit status (1 runtime failure, 2 usage).

mod common;

use std::process::{Command, Output};

fn taskmill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskmill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMILL_") {
            c.env_remove(k);
        }
    }
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// No `: `-separated part of the error line appears twice.
fn assert_said_once(err: &str) {
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    let parts: Vec<&str> = line["error: ".len()..].split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(p),
            "`{p}` is repeated in the error line:\n{line}"
        );
    }
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "one error line:\n{err}"
    );
    for noise in ["ERROR", "WARN", "lapin"] {
        assert!(
            !err.contains(noise),
            "`{noise}` leaks into the output:\n{err}"
        );
    }
}

#[test]
fn an_unreachable_broker_is_one_line_with_a_hint_and_status_1() {
    let port = common::free_port();
    let out = taskmill()
        .args(["enqueue", "noop"])
        .env(
            "TASKMILL_AMQP_URL",
            format!("amqp://guest@127.0.0.1:{port}/%2f"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_said_once(&err);
    assert!(err.contains("hint: nothing listens there"), "{err}");
}

#[test]
fn a_missing_vhost_and_a_missing_topology_name_their_remedy() {
    let out = taskmill()
        .args(["enqueue", "noop"])
        .env(
            "TASKMILL_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/tm-no-such-vhost",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_said_once(&err);
    assert!(err.contains("add_vhost"), "{err}");

    // A vhost with no taskmill topology: the publish finds no exchange.
    let vhost = format!("tm-empty-{}", std::process::id());
    common::rabbitmqctl(&["add_vhost", &vhost]);
    common::rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let out = taskmill()
        .args(["enqueue", "noop", "--queue", "reports"])
        .env(
            "TASKMILL_AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
        )
        .output()
        .unwrap();
    let _ = Command::new("rabbitmqctl")
        .args(["delete_vhost", &vhost])
        .output();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_said_once(&err);
    assert!(
        err.contains("exchange `taskmill`")
            && err.contains("start a worker for queue `reports` first, it declares the topology"),
        "{err}"
    );
}

#[test]
fn a_dlq_command_on_a_missing_queue_is_one_line() {
    let out = taskmill()
        .args(["dlq", "list", "--queue", &common::unique_queue("nodlq")])
        .env("TASKMILL_AMQP_URL", common::amqp_url())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_said_once(&stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    let out = taskmill().args(["enqueue"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap's usage error: {}",
        stderr(&out)
    );
    let out = taskmill()
        .args(["--config", "/nonexistent/taskmill.toml", "config", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_said_once(&stderr(&out));
}
