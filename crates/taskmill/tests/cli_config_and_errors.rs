//! The CLI's config handling and error paths, through the real binary.

mod common;

use std::process::Command;

fn taskmill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskmill"));
    // The tests must not inherit a developer's settings.
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMILL_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn config_show_applies_file_env_flags_and_redacts() {
    let dir = std::env::temp_dir().join(format!("tm-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("w.toml");
    std::fs::write(
        &file,
        "amqp_url = \"amqp://app:hunter2@rabbit:5672/prod\"\nconcurrency = 7\nqueues = [\"a\"]\n",
    )
    .unwrap();
    let out = taskmill()
        .args(["--config", file.to_str().unwrap(), "config", "show"])
        .env("TASKMILL_QUEUES", "b,c")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("amqp://app:***@rabbit:5672/prod"), "{text}");
    assert!(text.contains("concurrency = 7"), "{text}");
    assert!(
        text.contains("\"b\"") && text.contains("\"c\"") && !text.contains("\"a\""),
        "{text}"
    );
}

#[test]
fn bad_config_names_key_and_line() {
    let dir = std::env::temp_dir().join(format!("tm-cfg-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "concurrency = 3\n\n[queue.default]\nprefetsh = 10\n").unwrap();
    let out = taskmill()
        .args(["--config", file.to_str().unwrap(), "config", "show"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prefetsh") && err.contains("line 4"), "{err}");

    let out = taskmill()
        .args(["config", "show"])
        .env("TASKMILL_CONCURENCY", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TASKMILL_CONCURENCY"));
}

#[test]
fn config_keys_lists_env_names() {
    let out = taskmill().args(["config", "keys"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for k in [
        "TASKMILL_AMQP_URL",
        "TASKMILL_HTTP_ADDR",
        "TASKMILL_QUEUES",
        "TASKMILL_DATA_DIR",
    ] {
        assert!(text.lines().any(|l| l == k), "{k} missing from:\n{text}");
    }
}

#[test]
fn enqueue_fails_clearly_when_the_broker_is_unreachable() {
    let port = common::free_port();
    let out = taskmill()
        .args([
            "--amqp-url",
            &format!("amqp://guest:secret@127.0.0.1:{port}/%2f"),
            "enqueue",
            "noop",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the broker"), "{err}");
    assert!(!err.contains("secret"), "password leaked: {err}");
}

#[test]
fn enqueue_to_undeclared_queue_fails() {
    let out = taskmill()
        .args([
            "--amqp-url",
            &common::amqp_url(),
            "enqueue",
            "noop",
            "--queue",
            &common::unique_queue("nowhere"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unroutable"));
}
