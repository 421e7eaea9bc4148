//! One job's trace, end to end, as an OTLP collector sees it: the producer
//! span in this process (`publish taskmill`), the real `taskmill worker`
//! process consuming it twice (`process QUEUE` for attempts 1 and 2, with
//! their `taskmill.run` steps and the `taskmill.retry` between them), and the
//! CPU child process running the handler each time (`taskmill.cpu.run`, a
//! child of the process span). Every span is in ONE trace, with the parent
//! links of the span model and the OpenTelemetry messaging conventions'
//! attributes.
//!
//! The job is `test.cpu_fail {"times": 1}`: attempt 1 fails retryably in the
//! CPU process, attempt 2 succeeds. The worker and its child export with the
//! inherited `OTEL_*` variables and flush on SIGTERM / exit.
//!
//! The span tree is printed to stdout (`--nocapture` shows it).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use taskmill_client::{Client, NewJob};
use taskmill_telemetry::traces::{self, OtlpOptions, OtlpProtocol, TracingOptions, spans};
use tracing::instrument::WithSubscriber;

const RUN: &str = "taskmill.run";
const RETRY: &str = "taskmill.retry";

/// The spans the collector received so far, drained continuously (the fake
/// collector's channel holds 64 spans; a full channel would stall exports).
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportedSpan>>>);

impl Received {
    fn drain_from(&self, mut collector: FakeCollectorServer) -> tokio::task::JoinHandle<()> {
        let store = self.0.clone();
        tokio::spawn(async move {
            loop {
                let got = collector
                    .exported_spans(1, Duration::from_millis(100))
                    .await;
                store.lock().unwrap().extend(got);
            }
        })
    }

    fn snapshot(&self) -> Vec<ExportedSpan> {
        self.0.lock().unwrap().clone()
    }
}

/// The fake collector keeps attribute values as Debug strings, e.g.
/// `Some(AnyValue { value: Some(IntValue(2)) })`.
fn int_attr(span: &ExportedSpan, key: &str) -> Option<i64> {
    let v = span.attributes.get(key)?;
    let rest = v.split_once("IntValue(")?.1;
    rest.split_once(')')?.0.parse().ok()
}

/// `Some(AnyValue { value: Some(StringValue("ok")) })` -> `ok`.
fn str_attr<'a>(span: &'a ExportedSpan, key: &str) -> Option<&'a str> {
    let v = span.attributes.get(key)?;
    let rest = v.split_once("StringValue(\"")?.1;
    Some(rest.rsplit_once("\")")?.0)
}

fn attempt(span: &ExportedSpan) -> i64 {
    int_attr(span, "taskmill.attempt")
        .unwrap_or_else(|| panic!("{} {} has no taskmill.attempt", span.name, span.span_id))
}

fn count(spans: &[ExportedSpan], name: &str) -> usize {
    spans.iter().filter(|s| s.name == name).count()
}

/// One line per span, children indented under their parent, by start time.
fn tree(spans: &[ExportedSpan]) -> String {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: BTreeMap<&str, Vec<&ExportedSpan>> = BTreeMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if ids.contains(s.parent_span_id.as_str()) {
            children
                .entry(s.parent_span_id.as_str())
                .or_default()
                .push(s);
        } else {
            roots.push(s);
        }
    }
    roots.sort_by_key(|s| s.start_time_unix_nano);
    for c in children.values_mut() {
        c.sort_by_key(|s| s.start_time_unix_nano);
    }
    fn line(
        out: &mut String,
        s: &ExportedSpan,
        depth: usize,
        children: &BTreeMap<&str, Vec<&ExportedSpan>>,
    ) {
        let parent = if s.parent_span_id.is_empty() {
            "-".to_string()
        } else {
            s.parent_span_id.clone()
        };
        let mut extra = String::new();
        if let Some(a) = int_attr(s, "taskmill.attempt") {
            extra.push_str(&format!(" attempt={a}"));
        }
        if let Some(o) = str_attr(s, "taskmill.outcome") {
            extra.push_str(&format!(" outcome={o}"));
        }
        if let Some(p) = int_attr(s, "process.pid") {
            extra.push_str(&format!(" pid={p}"));
        }
        out.push_str(&format!(
            "{:indent$}{} [{}] span={} parent={}{}\n",
            "",
            s.name,
            s.kind.trim_start_matches("SPAN_KIND_").to_lowercase(),
            s.span_id,
            parent,
            extra,
            indent = depth * 2
        ));
        for c in children.get(s.span_id.as_str()).into_iter().flatten() {
            line(out, c, depth + 1, children);
        }
    }
    let mut out = String::new();
    for r in roots {
        line(&mut out, r, 0, &children);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_enqueue_to_retry() {
    // 1. The collector, drained into `received` from now on.
    let collector = FakeCollectorServer::start().await.unwrap();
    let endpoint = collector.endpoint();
    let received = Received::default();
    let drain = received.drain_from(collector);

    // 2. The real worker, exporting to it (its CPU child inherits OTEL_*).
    let queue = common::unique_queue("trace");
    let cpu_queue = format!("{queue}-cpu");
    let dir = common::temp_dir("trace");
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut worker = common::spawn_worker(
        "trace-worker",
        &[
            ("TASKMILL_QUEUES", queue.clone()),
            ("TASKMILL_CPU_QUEUE", cpu_queue.clone()),
            ("TASKMILL_CPU_PROCESSES", "1".into()),
            ("TASKMILL_DATA_DIR", data_dir.display().to_string()),
            ("TASKMILL_DIAGNOSTIC_KINDS", "true".into()),
            ("TASKMILL_BACKOFF_BASE_MS", "200".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", "taskmill-worker-test".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ],
        &dir.0,
    );
    worker.wait_ready(Duration::from_secs(30)).await.unwrap();
    let worker_pid = worker.pid();

    // 3. The producer: this process's own pipeline to the same collector,
    //    scoped to the enqueue future.
    let (dispatch, guard) = traces::build(
        TracingOptions::new(false, "info")
            .with_otlp(OtlpOptions::new(endpoint.clone(), OtlpProtocol::Grpc)),
    )
    .unwrap();
    assert!(guard.is_exporting());
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let job = NewJob::new("test.cpu_fail", &serde_json::json!({"times": 1}))
        .unwrap()
        .queue(&cpu_queue);
    let job_id = job.id().to_string();
    client
        .enqueue(job)
        .with_subscriber(dispatch)
        .await
        .expect("enqueue");
    // Blocks until exported; the runtime has other threads meanwhile.
    tokio::task::block_in_place(|| guard.flush()).expect("flush the producer's spans");

    // 4. Attempt 1 retried, attempt 2 ok; then SIGTERM (flushes the worker
    //    and, as its CPU child exits, the child).
    let series = |outcome: &str| {
        format!(
            "taskmill_jobs_total{{kind=\"test.cpu_fail\",outcome=\"{outcome}\",queue=\"{cpu_queue}\"}}"
        )
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let m = worker.metrics().await.unwrap();
        let ok = common::metric_value(&m, &series("ok"));
        let retried = common::metric_value(&m, &series("retried"));
        if ok == Some(1.0) && retried == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "job {job_id} did not finish (ok={ok:?}, retried={retried:?})\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = worker.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(
        status.success(),
        "worker exit status {status}\n{}",
        worker.log_tail(40)
    );

    // 5. Spans of the job's trace, until the expected ones are in and no more
    //    arrive for a second (bounded).
    let job_id_attr = |s: &ExportedSpan| str_attr(s, "taskmill.job_id") == Some(job_id.as_str());
    let publish_name = "publish taskmill".to_string();
    let process_name = format!("process {cpu_queue}");
    let expected = [
        (publish_name.clone(), 1),
        (process_name.clone(), 2),
        (RUN.to_string(), 2),
        (RETRY.to_string(), 1),
        (spans::CPU_RUN.to_string(), 2),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_len = usize::MAX;
    let mut quiet_since = Instant::now();
    let all = loop {
        let all = received.snapshot();
        if all.len() != last_len {
            last_len = all.len();
            quiet_since = Instant::now();
        }
        let trace_id = all
            .iter()
            .find(|s| s.name == publish_name && job_id_attr(s))
            .map(|s| s.trace_id.clone());
        let complete = trace_id.is_some_and(|t| {
            let in_trace: Vec<ExportedSpan> =
                all.iter().filter(|s| s.trace_id == t).cloned().collect();
            expected
                .iter()
                .all(|(name, n)| count(&in_trace, name) >= *n)
        });
        if (complete && quiet_since.elapsed() >= Duration::from_secs(1))
            || Instant::now() > deadline
        {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drain.abort();

    let enqueue = all
        .iter()
        .find(|s| s.name == publish_name && job_id_attr(s))
        .unwrap_or_else(|| {
            panic!(
                "no taskmill.enqueue span for job {job_id} reached the collector; got:\n{}",
                tree(&all)
            )
        });
    let trace_id = enqueue.trace_id.clone();
    let mut trace: Vec<ExportedSpan> = all
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect();
    trace.sort_by_key(|s| s.start_time_unix_nano);

    // The tree, for the record (before any assertion can fail).
    println!(
        "trace {trace_id} of job {job_id} ({} spans; worker pid {worker_pid}, test pid {}):\n{}",
        trace.len(),
        std::process::id(),
        tree(&trace)
    );

    // Every span that names this job is in this one trace.
    let strays: Vec<&ExportedSpan> = all
        .iter()
        .filter(|s| job_id_attr(s) && s.trace_id != trace_id)
        .collect();
    assert!(
        strays.is_empty(),
        "spans of job {job_id} outside trace {trace_id}:\n{}",
        tree(&strays.into_iter().cloned().collect::<Vec<_>>())
    );
    for (name, n) in &expected {
        assert_eq!(
            count(&trace, name),
            *n,
            "{name} spans in trace {trace_id}:\n{}",
            tree(&trace)
        );
    }
    let named = |name: &str| -> Vec<&ExportedSpan> {
        trace.iter().filter(|s| s.name == name).collect::<Vec<_>>()
    };

    // The producer span: the root, kind producer.
    assert_eq!(enqueue.parent_span_id, "", "the enqueue span is the root");
    assert_eq!(enqueue.kind, "SPAN_KIND_PRODUCER");
    let attrs = [
        ("messaging.system", "rabbitmq"),
        ("messaging.operation.name", "publish"),
        ("messaging.operation.type", "send"),
        ("messaging.destination.name", "taskmill"),
        (
            "messaging.rabbitmq.destination.routing_key",
            cpu_queue.as_str(),
        ),
        ("messaging.message.id", job_id.as_str()),
        ("server.address", "127.0.0.1"),
    ];
    for (key, want) in attrs {
        assert_eq!(str_attr(enqueue, key), Some(want), "publish span's {key}");
    }
    assert_eq!(int_attr(enqueue, "server.port"), Some(5672));
    assert!(
        int_attr(enqueue, "messaging.message.body.size").is_some_and(|n| n > 0),
        "publish span's messaging.message.body.size: {:?}",
        enqueue.attributes
    );
    assert_eq!(
        str_attr(enqueue, "error.type"),
        None,
        "the publish succeeded"
    );

    // Two consumer spans, attempts 1 and 2, both children of the enqueue
    // span (the retry copy keeps the producer's traceparent).
    let jobs = named(&process_name);
    let mut attempts: Vec<i64> = jobs.iter().map(|j| attempt(j)).collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2], "job span attempts");
    for j in &jobs {
        assert_eq!(j.kind, "SPAN_KIND_CONSUMER", "job span {}", j.span_id);
        assert_eq!(
            j.parent_span_id,
            enqueue.span_id,
            "job span of attempt {} is not a child of the enqueue span",
            attempt(j)
        );
        assert_eq!(str_attr(j, "taskmill.job_id"), Some(job_id.as_str()));
        assert_eq!(str_attr(j, "taskmill.queue"), Some(cpu_queue.as_str()));
        assert_eq!(str_attr(j, "taskmill.kind"), Some("test.cpu_fail"));
        for (key, want) in [
            ("messaging.system", "rabbitmq"),
            ("messaging.operation.name", "process"),
            ("messaging.operation.type", "process"),
            ("messaging.message.id", job_id.as_str()),
            ("server.address", "127.0.0.1"),
        ] {
            assert_eq!(str_attr(j, key), Some(want), "process span's {key}");
        }
        assert_eq!(int_attr(j, "server.port"), Some(5672));
        assert!(
            str_attr(j, "messaging.destination.name").is_some_and(|d| !d.is_empty())
                && str_attr(j, "messaging.rabbitmq.destination.routing_key").is_some()
                && int_attr(j, "messaging.message.body.size").is_some_and(|n| n > 0),
            "process span's destination, routing key and body size: {:?}",
            j.attributes
        );
    }
    let job_of = |n: i64| *jobs.iter().find(|j| attempt(j) == n).unwrap();
    let (job1, job2) = (job_of(1), job_of(2));
    assert_eq!(str_attr(job1, "taskmill.outcome"), Some("retried"));
    assert_eq!(str_attr(job1, "error.type"), Some("retried"));
    // The first delivery came through taskmill's exchange, routed by queue.
    assert_eq!(
        str_attr(job1, "messaging.destination.name"),
        Some("taskmill")
    );
    assert_eq!(
        str_attr(job1, "messaging.rabbitmq.destination.routing_key"),
        Some(cpu_queue.as_str())
    );
    assert_eq!(
        job1.status.as_ref().map(|s| s.code.as_str()),
        Some("STATUS_CODE_ERROR"),
        "attempt 1 failed"
    );
    assert_eq!(str_attr(job2, "taskmill.outcome"), Some("ok"));
    assert_ne!(
        job2.status.as_ref().map(|s| s.code.as_str()),
        Some("STATUS_CODE_ERROR"),
        "attempt 2 succeeded"
    );

    // One run step under each job span; the retry step under attempt 1's.
    let runs = named(RUN);
    for j in [job1, job2] {
        let mine: Vec<_> = runs
            .iter()
            .filter(|r| r.parent_span_id == j.span_id)
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "taskmill.run spans under the job span of attempt {}",
            attempt(j)
        );
    }
    for r in &runs {
        assert_eq!(r.kind, "SPAN_KIND_INTERNAL");
    }
    let retry = named(RETRY)[0];
    assert_eq!(
        retry.parent_span_id, job1.span_id,
        "the retry step belongs to attempt 1"
    );
    assert_eq!(retry.kind, "SPAN_KIND_INTERNAL");

    // One CPU run per process span, its child, in the child process, same
    // attempt.
    let cpus = named(spans::CPU_RUN);
    for j in [job1, job2] {
        let mine: Vec<_> = cpus
            .iter()
            .filter(|c| c.parent_span_id == j.span_id)
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "taskmill.cpu.run spans under the process span of attempt {}",
            attempt(j)
        );
        assert_eq!(
            attempt(mine[0]),
            attempt(j),
            "the CPU run's attempt is its job's"
        );
    }
    for c in &cpus {
        assert_eq!(c.kind, "SPAN_KIND_INTERNAL");
        assert_eq!(str_attr(c, "taskmill.job_id"), Some(job_id.as_str()));
        let pid = int_attr(c, "process.pid").expect("the CPU run's process.pid");
        assert_ne!(
            pid,
            i64::from(worker_pid),
            "the CPU run happened in the child"
        );
        assert_ne!(pid, i64::from(std::process::id()));
        let outcome = str_attr(c, "taskmill.outcome");
        let expected = if attempt(c) == 1 { "error" } else { "ok" };
        assert_eq!(outcome, Some(expected), "CPU run of attempt {}", attempt(c));
    }

    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .unwrap()
        .expect("stop the producer's pipeline");
    let broker = client.broker().await.unwrap();
    common::cleanup(&broker, &cpu_queue).await;
    common::cleanup(&broker, &queue).await;
    client.close().await;
}
