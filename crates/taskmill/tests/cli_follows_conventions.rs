//! The CLI as its users' tools expect it: `--help` names each flag's
//! environment variable, default and possible values; completions and a man
//! page are generated; a config file is found in the usual places when none
//! is named, and `config show` says which; `--json` output parses.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn taskmill(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskmill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMILL_") {
            c.env_remove(k);
        }
    }
    // No developer's ~/.config or XDG directory.
    c.env("HOME", home).env_remove("XDG_CONFIG_HOME");
    c
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_shows_variables_defaults_and_values() {
    let dir = common::temp_dir("cli-help");
    let help = ok(&taskmill(dir.path())
        .args(["worker", "--help"])
        .output()
        .unwrap());
    for needle in [
        "[env: TASKMILL_CONCURRENCY] [default: 100]",
        "[env: TASKMILL_QUEUES] [default: default]",
        "[env: TASKMILL_HTTP_ADDR] [default: 127.0.0.1:9464]",
        "- quorum:",
        "- classic:",
        "- text:",
        "- json:",
        "[env: TASKMILL_AMQP_URL] [default: amqp://guest:***@127.0.0.1:5672/%2f]",
    ] {
        assert!(
            help.contains(needle),
            "`{needle}` missing from worker --help:\n{help}"
        );
    }
    let out = taskmill(dir.path())
        .args(["worker", "--queue-type", "fast"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad enum value is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: quorum, classic"));
}

#[test]
fn completions_and_man_page_are_generated() {
    let dir = common::temp_dir("cli-completions");
    let bash = ok(&taskmill(dir.path())
        .args(["completions", "bash"])
        .output()
        .unwrap());
    assert!(
        bash.contains("_taskmill()") && bash.contains("enqueue") && bash.contains("--queue-type"),
        "{bash}"
    );
    let zsh = ok(&taskmill(dir.path())
        .args(["completions", "zsh"])
        .output()
        .unwrap());
    assert!(zsh.starts_with("#compdef taskmill"), "{zsh}");
    let man = ok(&taskmill(dir.path()).arg("man").output().unwrap());
    assert!(
        man.contains(".TH taskmill") && man.contains("TASKMILL_CONCURRENCY"),
        "{man}"
    );
}

#[test]
fn the_config_file_is_found_in_the_usual_places() {
    let home = common::temp_dir("cli-lookup");
    let cwd = home.join("work");
    let xdg = home.join("xdg");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(xdg.join("taskmill")).unwrap();

    // None anywhere: defaults, and config show says so.
    let show = ok(&taskmill(home.path())
        .args(["config", "show"])
        .current_dir(&cwd)
        .output()
        .unwrap());
    assert!(show.starts_with("# no config file"), "{show}");

    // $XDG_CONFIG_HOME/taskmill/taskmill.toml.
    std::fs::write(xdg.join("taskmill/taskmill.toml"), "concurrency = 11\n").unwrap();
    let show = ok(&taskmill(home.path())
        .args(["config", "show"])
        .env("XDG_CONFIG_HOME", &xdg)
        .current_dir(&cwd)
        .output()
        .unwrap());
    assert!(
        show.contains("concurrency = 11") && show.contains("xdg/taskmill/taskmill.toml"),
        "{show}"
    );

    // ./taskmill.toml wins over it; --config wins over both.
    std::fs::write(cwd.join("taskmill.toml"), "concurrency = 7\n").unwrap();
    let show = ok(&taskmill(home.path())
        .args(["config", "show"])
        .env("XDG_CONFIG_HOME", &xdg)
        .current_dir(&cwd)
        .output()
        .unwrap());
    assert!(
        show.starts_with("# read from taskmill.toml") && show.contains("concurrency = 7"),
        "{show}"
    );
    let named = home.join("named.toml");
    std::fs::write(&named, "concurrency = 3\nshutdown_grace = \"45s\"\n").unwrap();
    let json = ok(&taskmill(home.path())
        .args([
            "--config",
            named.to_str().unwrap(),
            "config",
            "show",
            "--json",
        ])
        .current_dir(&cwd)
        .output()
        .unwrap());
    let v: serde_json::Value =
        serde_json::from_str(json.trim()).expect("config show --json parses");
    assert_eq!(v["file"], named.display().to_string(), "{v}");
    assert_eq!(v["config"]["concurrency"], 3, "{v}");
    assert_eq!(v["config"]["shutdown_grace_ms"], 45_000, "{v}");
    assert_eq!(
        v["config"]["amqp_url"], "amqp://guest:***@127.0.0.1:5672/%2f",
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_json_prints_one_object_per_job() {
    let queue = common::unique_queue("cli-json");
    let broker = common::broker().await;
    broker
        .declare(&taskmill_broker::QueueSpec {
            name: queue.clone(),
            queue_type: taskmill_core::config::QueueType::Classic,
            delivery_limit: 20,
        })
        .await
        .unwrap();
    let home = common::temp_dir("cli-json");
    let out = taskmill(home.path())
        .args([
            "enqueue", "noop", "--queue", &queue, "--count", "3", "--json",
        ])
        .env("TASKMILL_AMQP_URL", common::amqp_url())
        .output()
        .unwrap();
    let text = ok(&out);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in &lines {
        assert_eq!(l["queue"], queue.as_str());
        assert!(l["job_id"].as_str().is_some_and(|id| id.len() == 36), "{l}");
    }
    assert_eq!(broker.queue_depth(&queue).await.unwrap(), 3);
    common::cleanup(&broker, &queue).await;
}
