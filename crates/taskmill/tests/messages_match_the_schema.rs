//! docs/schema/job-message.json describes the messages taskmill's producers
//! actually publish: jobs from the Rust client (plain, keyed, with a timeout
//! and trace context, delayed, `enqueue_many`), from `taskmill enqueue`, and
//! from the Node.js example are taken raw from a scratch queue (`basic.get`)
//! and validated with Python's jsonschema. A message that breaks the
//! protocol is rejected by the same check, so the check can fail.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use taskmill_broker::{Broker, Outgoing, QueueSpec};
use taskmill_client::{Client, NewJob};
use taskmill_core::HeaderValue;
use taskmill_core::config::QueueType;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// The result of validating one message.
#[derive(Debug, serde::Deserialize)]
struct Checked {
    id: Option<String>,
    valid: bool,
    errors: Vec<String>,
    instance: serde_json::Value,
}

/// Validates every message in `queue` against the schema (consuming them);
/// `routes` maps job ids to the exchange and routing key they were published
/// with. Returns the exit status and the result per message.
async fn check_queue(
    queue: &str,
    routes: &HashMap<String, (String, String)>,
) -> (bool, Vec<Checked>) {
    let dir = common::temp_dir("schema");
    let routes_file = dir.path().join("routes.json");
    std::fs::write(&routes_file, serde_json::to_vec(routes).unwrap()).unwrap();
    let out = tokio::process::Command::new(common::venv_python())
        .arg(repo_file("crates/taskmill/tests/check_job_messages.py"))
        .arg(repo_file("docs/schema/job-message.json"))
        .arg(common::amqp_url())
        .arg(queue)
        .arg(&routes_file)
        .output()
        .await
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let checked: Vec<Checked> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{stderr}")))
        .collect();
    assert!(
        out.status.success() || checked.iter().any(|c| !c.valid),
        "the checker failed without reporting an invalid message: {stderr}"
    );
    (out.status.success(), checked)
}

async fn wait_depth(broker: &Broker, queue: &str, n: u32, within: Duration) -> u32 {
    let until = std::time::Instant::now() + within;
    loop {
        let d = broker.queue_depth(queue).await.unwrap();
        if d >= n || std::time::Instant::now() > until {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn declare(broker: &Broker, queue: &str) {
    broker
        .declare(&QueueSpec {
            name: queue.to_string(),
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_publish_what_the_schema_describes() {
    let node = common::node();
    let queue = common::unique_queue("schema");
    let broker = common::broker().await;
    // The topology a worker declares (the queue, its .dead queue, the
    // bindings, the delay ladder), with no worker consuming.
    declare(&broker, &queue).await;
    broker.declare_delays().await.unwrap();
    let mut routes: HashMap<String, (String, String)> = HashMap::new();
    let direct = |routes: &mut HashMap<_, _>, id: &str| {
        routes.insert(id.to_string(), ("taskmill".to_string(), queue.clone()));
    };

    // The Rust client.
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let plain = client
        .enqueue(
            NewJob::new("io.sleep", &serde_json::json!({"ms": 5}))
                .unwrap()
                .queue(&queue),
        )
        .await
        .unwrap();
    direct(&mut routes, &plain);
    let keyed = client
        .enqueue(
            NewJob::new(
                "test.record",
                &serde_json::json!({"nested": {"a": [1, 2, null]}}),
            )
            .unwrap()
            .queue(&queue)
            .idempotency_key("order-42")
            .timeout(Duration::from_millis(2500))
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        )
        .await
        .unwrap();
    direct(&mut routes, &keyed);
    let delay = Duration::from_millis(300);
    let delayed = client
        .enqueue(
            NewJob::new("cpu.hash", &serde_json::json!({"rounds": 10}))
                .unwrap()
                .queue(&queue)
                .delay(delay),
        )
        .await
        .unwrap();
    routes.insert(
        delayed.clone(),
        taskmill_core::wire::delay_route(&queue, delay).unwrap(),
    );
    let many = client
        .enqueue_many((0..2).map(|n| {
            NewJob::new("noop", &serde_json::json!(n))
                .unwrap()
                .queue(&queue)
        }))
        .await
        .unwrap();
    for id in &many {
        direct(&mut routes, id);
    }
    client.close().await;

    // The CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args(["--amqp-url", &common::amqp_url(), "enqueue", "cpu.primes"])
        .args(["--queue", &queue, "--payload", r#"{"limit": 1000}"#])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    direct(&mut routes, &cli_id);

    // The Node.js example: plain, keyed with a timeout and trace context, delayed.
    let mut node_jobs = common::node_enqueue(
        &node,
        &queue,
        &["--kind", "io.sleep", "--payload", r#"{"ms": 1}"#],
    )
    .await;
    node_jobs.extend(
        common::node_enqueue(
            &node,
            &queue,
            &[
                "--kind",
                "test.record",
                "--payload",
                r#"["any", "json", 1.5]"#,
                "--idempotency-key",
                "node-order-42",
                "--timeout-ms",
                "2500",
                "--traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ],
        )
        .await,
    );
    node_jobs.extend(
        common::node_enqueue(
            &node,
            &queue,
            &["--kind", "noop", "--payload", "{}", "--delay-ms", "300"],
        )
        .await,
    );
    assert_eq!(node_jobs.len(), 3);
    for j in &node_jobs {
        routes.insert(j.id.clone(), (j.exchange.clone(), j.routing_key.clone()));
    }
    assert!(
        node_jobs[2].exchange == "taskmill.delay.24",
        "the delayed node job went through the ladder"
    );

    // Every job, the delayed ones included, is in the queue.
    let expected = routes.len() as u32;
    assert_eq!(expected, 9);
    assert_eq!(
        wait_depth(&broker, &queue, expected, Duration::from_secs(15)).await,
        expected
    );
    let (ok, checked) = check_queue(&queue, &routes).await;
    let invalid: Vec<_> = checked.iter().filter(|c| !c.valid).collect();
    assert!(
        ok && invalid.is_empty(),
        "messages break the schema: {invalid:#?}"
    );
    assert_eq!(checked.len(), routes.len(), "{checked:#?}");
    for c in &checked {
        let id = c.id.as_deref().expect("a message_id");
        assert!(routes.contains_key(id), "unexpected message {id}");
        assert!(c.errors.is_empty());
    }
    // What was validated carries what the producers set.
    let by_id: HashMap<&str, &Checked> = checked
        .iter()
        .map(|c| (c.id.as_deref().unwrap(), c))
        .collect();
    for (id, key) in [
        (keyed.as_str(), "order-42"),
        (node_jobs[1].id.as_str(), "node-order-42"),
    ] {
        let h = &by_id[id].instance["headers"];
        assert_eq!(h["taskmill-idempotency-key"], key);
        assert_eq!(h["taskmill-timeout-ms"], 2500);
        assert!(h["traceparent"].is_string());
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&by_id[node_jobs[1].id.as_str()].instance).unwrap()
    );

    common::cleanup(&broker, &queue).await;
}

/// A broken message: job id, content type, headers, body.
type Broken = (
    &'static str,
    Option<&'static str>,
    Vec<(&'static str, HeaderValue)>,
    &'static [u8],
);

/// The check is not a rubber stamp: messages that break the protocol in
/// ways the worker refuses are invalid under the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_rejects_broken_messages() {
    let queue = common::unique_queue("schema-bad");
    let broker = common::broker().await;
    declare(&broker, &queue).await;
    let publisher = broker.publisher().await.unwrap();
    let s = |v: &str| HeaderValue::Str(v.to_string());
    let bad: Vec<Broken> = vec![
        // no taskmill-kind
        ("no-kind", Some("application/json"), vec![], b"{}"),
        // not JSON content
        (
            "xml",
            Some("text/xml"),
            vec![("taskmill-kind", s("noop"))],
            b"{}",
        ),
        // protocol 2
        (
            "v2",
            Some("application/json"),
            vec![
                ("taskmill-kind", s("noop")),
                ("taskmill-protocol", HeaderValue::Int(2)),
            ],
            b"{}",
        ),
        // attempt 0, a string timeout
        (
            "attempt0",
            Some("application/json"),
            vec![
                ("taskmill-kind", s("noop")),
                ("taskmill-attempt", HeaderValue::Int(0)),
            ],
            b"{}",
        ),
        (
            "timeout-str",
            Some("application/json"),
            vec![
                ("taskmill-kind", s("noop")),
                ("taskmill-timeout-ms", s("5s")),
            ],
            b"{}",
        ),
        // a built-in kind with the wrong payload shape
        (
            "sleep-shape",
            Some("application/json"),
            vec![("taskmill-kind", s("io.sleep"))],
            br#"{"ms": "long"}"#,
        ),
        // a body that is not JSON
        (
            "not-json",
            Some("application/json"),
            vec![("taskmill-kind", s("noop"))],
            b"{nope",
        ),
    ];
    let mut routes = HashMap::new();
    for (id, ct, headers, body) in &bad {
        publisher
            .publish(&Outgoing::raw(
                "taskmill",
                &queue,
                Some(id),
                *ct,
                headers,
                body.to_vec(),
            ))
            .await
            .unwrap();
        routes.insert(id.to_string(), ("taskmill".to_string(), queue.clone()));
    }
    assert_eq!(
        wait_depth(&broker, &queue, bad.len() as u32, Duration::from_secs(10)).await,
        bad.len() as u32
    );
    let (ok, checked) = check_queue(&queue, &routes).await;
    assert!(!ok, "the checker accepted broken messages: {checked:#?}");
    assert_eq!(checked.len(), bad.len());
    for c in &checked {
        assert!(!c.valid, "{:?} passed the schema: {:?}", c.id, c.instance);
    }
    common::cleanup(&broker, &queue).await;
}
