//! A planted password never reaches what taskmill prints: `config show`, the
//! worker's log at debug level (lapin's and sqlx's debug lines included), the
//! errors of `taskmill enqueue`. The password is real: a broker user is
//! created with it, the worker and the CLI authenticate with it, read from a
//! password file (`TASKMILL_AMQP_PASSWORD_FILE`) and from a URL file
//! (`TASKMILL_AMQP_URL_FILE`), and it holds the characters that break naive
//! URL handling (`/ ? # @ %`).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use taskmill_core::config::with_password;
use taskmill_testkit::metrics::metric_sum;

/// The planted password, and a fragment of it that must not appear either
/// (a partly escaped or truncated copy still leaks).
const PLANTED: &str = "Pl4nt3d/s3cr?t#x@y%z";
const FRAGMENT: &str = "Pl4nt3d";

/// Every form in which the password could leak: as written, `%`-encoded, the
/// fragment.
fn leaks(text: &str) -> Vec<&'static str> {
    let encoded = with_password("amqp://u@h", PLANTED).unwrap();
    let encoded = encoded["amqp://u:".len()..encoded.len() - "@h".len()].to_string();
    let mut found = Vec::new();
    if text.contains(PLANTED) {
        found.push("the password as written");
    }
    if text.contains(&encoded) {
        found.push("the password %-encoded");
    }
    if text.contains(FRAGMENT) {
        found.push("a fragment of the password");
    }
    found
}

fn assert_no_leak(what: &str, text: &str) {
    let found = leaks(text);
    assert!(found.is_empty(), "{what} leaks {found:?}:\n{text}");
}

/// A broker user whose password is [`PLANTED`], deleted when dropped.
struct BrokerUser(String);

impl BrokerUser {
    fn create() -> BrokerUser {
        let name = format!("tm-planted-{}", std::process::id());
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &name])
            .output();
        common::rabbitmqctl(&["add_user", &name, PLANTED]);
        common::rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser(name)
    }

    /// `amqp://USER@127.0.0.1:5672/%2f`: no password in the URL.
    fn url_without_password(&self) -> String {
        format!("amqp://{}@127.0.0.1:5672/%2f", self.0)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

fn taskmill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taskmill"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMILL_") {
            c.env_remove(k);
        }
    }
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_password_reaches_the_broker_and_no_output() {
    let user = BrokerUser::create();
    let dir = common::temp_dir("secrets");
    let password_file = dir.join("amqp-password");
    write(&password_file, &format!("{PLANTED}\n"));
    let url_file = dir.join("amqp-url");
    let full_url = with_password(&user.url_without_password(), PLANTED).unwrap();
    write(&url_file, &format!("{full_url}\n"));
    let queue = common::unique_queue("secrets");

    // The worker: URL without password + password file, debug logs of every
    // crate (lapin and sqlx included).
    let mut worker = common::spawn_worker(
        "secrets-worker",
        &[
            ("TASKMILL_AMQP_URL", user.url_without_password()),
            (
                "TASKMILL_AMQP_PASSWORD_FILE",
                password_file.display().to_string(),
            ),
            ("TASKMILL_QUEUES", queue.clone()),
            ("TASKMILL_DATA_DIR", dir.path().display().to_string()),
            ("TASKMILL_LOG_LEVEL", "debug".to_string()),
        ],
        dir.path(),
    );
    worker
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("the worker authenticates with the password from its file");

    // The CLI: the whole URL from a URL file.
    let out = taskmill()
        .args(["enqueue", "noop", "--queue", &queue, "--count", "3"])
        .env("TASKMILL_AMQP_URL_FILE", &url_file)
        .env("TASKMILL_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "enqueue with the URL file: {}",
        text(&out)
    );
    assert_no_leak("enqueue's output", &text(&out));

    let mut metrics = String::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until {
        metrics = worker.metrics().await.unwrap_or_default();
        if metric_sum(
            &metrics,
            "taskmill_jobs_total",
            &[("queue", queue.as_str()), ("outcome", "ok")],
        ) >= 3.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = metric_sum(
        &metrics,
        "taskmill_jobs_total",
        &[("queue", queue.as_str()), ("outcome", "ok")],
    );
    assert_eq!(ok, 3.0, "the 3 jobs ran:\n{}", worker.log_tail(40));
    assert_no_leak("/metrics", &metrics);

    worker.terminate(Duration::from_secs(30)).await.unwrap();
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("DEBUG"),
        "the worker logged at debug level:\n{log}"
    );
    assert_no_leak("the worker's debug log", &log);

    // `config show` with both files and a PostgreSQL URL whose password is a
    // query parameter.
    let out = taskmill()
        .args(["config", "show"])
        .env("TASKMILL_AMQP_URL", user.url_without_password())
        .env("TASKMILL_AMQP_PASSWORD_FILE", &password_file)
        .env(
            "TASKMILL_STORE_URL",
            format!("postgres://app@db/jobs?sslmode=verify-full&password={PLANTED}"),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "config show: {}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains(&format!("amqp://{}:***@127.0.0.1", user.0)),
        "{shown}"
    );
    assert!(
        shown.contains("password=***") && shown.contains("amqp-password"),
        "{shown}"
    );
    assert_no_leak("config show", &shown);

    // Errors: a refused login (the password is wrong, and planted too), an
    // unreachable broker.
    let wrong = with_password(&user.url_without_password(), &format!("{PLANTED}-wrong")).unwrap();
    let out = taskmill()
        .args(["enqueue", "noop", "--queue", &queue])
        .env("TASKMILL_AMQP_URL", &wrong)
        .env("TASKMILL_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password is refused");
    assert_no_leak("enqueue's refused-login error", &text(&out));

    let port = common::free_port();
    let unreachable =
        with_password(&format!("amqp://{}@127.0.0.1:{port}/%2f", user.0), PLANTED).unwrap();
    let out = taskmill()
        .args(["--amqp-url", &unreachable, "enqueue", "noop"])
        .env("TASKMILL_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unreachable broker is an error");
    let err = text(&out);
    assert!(err.contains("cannot connect to the broker"), "{err}");
    assert!(
        err.contains("visible to every local user") && err.contains("TASKMILL_AMQP_URL_FILE"),
        "a password on the command line is warned about:\n{err}"
    );
    assert_no_leak("enqueue's connect error", &err);
}

#[test]
fn a_url_file_and_its_plain_variable_together_are_refused() {
    let dir = common::temp_dir("secrets-both");
    let url_file = dir.join("url");
    write(&url_file, "amqp://a:b@h/%2f\n");
    let out = taskmill()
        .args(["config", "show"])
        .env("TASKMILL_AMQP_URL_FILE", &url_file)
        .env("TASKMILL_AMQP_URL", "amqp://c:d@h/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("TASKMILL_AMQP_URL_FILE") && err.contains("only one"),
        "{err}"
    );

    let out = taskmill()
        .args(["config", "show"])
        .env("TASKMILL_AMQP_PASSWORD_FILE", dir.join("missing"))
        .env("TASKMILL_AMQP_URL", "amqp://app@h/%2f")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("amqp_password_file") && err.contains("missing"),
        "{err}"
    );
}
