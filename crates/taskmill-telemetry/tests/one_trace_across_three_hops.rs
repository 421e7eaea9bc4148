//! Producer -> consumer -> CPU child is one trace: spans created through the
//! crate's helpers, linked only by `traceparent` strings (as they travel in
//! AMQP headers and the CPU frame header), reach an OTLP gRPC collector with
//! one trace id, the right parent links, kinds and attributes.

use std::collections::HashMap;
use std::time::Duration;

use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use taskmill_telemetry::traces::spans::{self, Step};
use taskmill_telemetry::traces::{
    self, OtlpOptions, OtlpProtocol, TracingOptions, current_traceparent,
};

fn grpc(endpoint: String) -> OtlpOptions {
    let mut o = OtlpOptions::new(endpoint, OtlpProtocol::Grpc);
    o.scheduled_delay = Some(Duration::from_millis(100));
    o
}

/// The fake collector keeps attribute values as Debug strings, e.g.
/// `Some(AnyValue { value: Some(StringValue("cpu")) })`.
fn attr<'a>(span: &'a ExportedSpan, key: &str) -> &'a str {
    span.attributes
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| {
            panic!(
                "{} has no attribute {key}: {:?}",
                span.name, span.attributes
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_consumer_and_cpu_child_share_one_trace() {
    let mut collector = FakeCollectorServer::start().await.unwrap();

    // The worker process's pipeline (producer and consumer share it here).
    let (worker, worker_guard) =
        traces::build(TracingOptions::new(false, "off").with_otlp(grpc(collector.endpoint())))
            .unwrap();
    assert!(worker_guard.is_exporting());
    // The CPU child process's pipeline: its own provider and exporter.
    let (child, child_guard) =
        traces::build(TracingOptions::new(false, "off").with_otlp(grpc(collector.endpoint())))
            .unwrap();

    let (enqueue_tp, job_tp) = tracing::dispatcher::with_default(&worker, || {
        // Producer: inject the current span's context into "headers".
        let enqueue = spans::enqueue_span(
            &spans::Message {
                exchange: "taskmill",
                routing_key: "q-trace",
                message_id: "job-7",
                body_size: 2,
            },
            "cpu.hash",
            None,
        );
        let headers = {
            let _e = enqueue.enter();
            current_traceparent().expect("a traceparent inside the producer span")
        };
        drop(enqueue);

        // Consumer: continue from the headers.
        let job = spans::job_span(
            &spans::Delivery {
                queue: "q-trace",
                message: spans::Message {
                    exchange: "taskmill",
                    routing_key: "q-trace",
                    message_id: "job-7",
                    body_size: 2,
                },
                kind: "cpu.hash",
                attempt: 2,
                traceparent: Some(&headers.0),
                tracestate: headers.1.as_deref(),
            },
            None,
        );
        let frame_tp = {
            let _e = job.enter();
            let _run = spans::step_span(Step::Run).entered();
            // What the worker puts in the CPU frame header: the consumer
            // span's context, taken explicitly.
            traces::traceparent_of(&job).expect("a traceparent for the job span")
        };
        spans::record_outcome(&job, "ok", None);
        drop(job);
        (headers, frame_tp)
    });
    // A W3C traceparent: version-traceid-spanid-flags, sampled.
    assert_eq!(enqueue_tp.0.len(), 55, "{}", enqueue_tp.0);
    assert!(enqueue_tp.0.starts_with("00-") && enqueue_tp.0.ends_with("-01"));

    // The CPU child, on another thread with no local parent at all.
    let tp = job_tp.0.clone();
    std::thread::spawn(move || {
        tracing::dispatcher::with_default(&child, || {
            let run = spans::cpu_run_span("cpu.hash", "job-7", 2, Some(&tp));
            let _e = run.enter();
            spans::record_outcome(&run, "ok", None);
        })
    })
    .join()
    .unwrap();

    tokio::task::spawn_blocking(move || {
        worker_guard.shutdown().unwrap();
        child_guard.shutdown().unwrap();
    })
    .await
    .unwrap();

    let got = collector.exported_spans(4, Duration::from_secs(20)).await;
    let by_name: HashMap<&str, &ExportedSpan> = got.iter().map(|s| (s.name.as_str(), s)).collect();
    let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(got.len(), 4, "spans: {names:?}");
    let enqueue = by_name["publish taskmill"];
    let job = by_name["process q-trace"];
    let run = by_name["taskmill.run"];
    let cpu = by_name[spans::CPU_RUN];

    // One trace.
    for s in &got {
        assert_eq!(
            s.trace_id, enqueue.trace_id,
            "{} is in another trace",
            s.name
        );
    }
    assert_eq!(enqueue_tp.0.split('-').nth(1).unwrap(), enqueue.trace_id);
    // Parent links: enqueue <- job <- run, job <- cpu.run.
    assert_eq!(enqueue.parent_span_id, "", "the producer span is the root");
    assert_eq!(job.parent_span_id, enqueue.span_id);
    assert_eq!(run.parent_span_id, job.span_id);
    assert_eq!(cpu.parent_span_id, job.span_id);
    assert_eq!(enqueue_tp.0.split('-').nth(2).unwrap(), enqueue.span_id);
    assert_eq!(job_tp.0.split('-').nth(2).unwrap(), job.span_id);

    // Kinds.
    assert_eq!(enqueue.kind, "SPAN_KIND_PRODUCER");
    assert_eq!(job.kind, "SPAN_KIND_CONSUMER");
    assert_eq!(run.kind, "SPAN_KIND_INTERNAL");
    assert_eq!(cpu.kind, "SPAN_KIND_INTERNAL");

    // Attributes.
    assert!(attr(enqueue, "messaging.system").contains("\"rabbitmq\""));
    assert!(attr(enqueue, "messaging.destination.name").contains("\"taskmill\""));
    assert!(attr(enqueue, "messaging.rabbitmq.destination.routing_key").contains("\"q-trace\""));
    assert!(attr(enqueue, "messaging.operation.name").contains("\"publish\""));
    assert!(attr(job, "messaging.operation.name").contains("\"process\""));
    assert!(attr(enqueue, "taskmill.kind").contains("\"cpu.hash\""));
    assert!(attr(enqueue, "taskmill.job_id").contains("\"job-7\""));
    assert!(attr(job, "taskmill.queue").contains("\"q-trace\""));
    assert!(attr(job, "taskmill.kind").contains("\"cpu.hash\""));
    assert!(attr(job, "taskmill.job_id").contains("\"job-7\""));
    assert!(
        attr(job, "taskmill.attempt").contains("IntValue(2)"),
        "{}",
        attr(job, "taskmill.attempt")
    );
    assert!(attr(job, "taskmill.outcome").contains("\"ok\""));
    assert!(attr(cpu, "taskmill.job_id").contains("\"job-7\""));
    assert!(attr(cpu, "process.pid").contains(&format!("IntValue({})", std::process::id())));
    assert!(attr(cpu, "taskmill.attempt").contains("IntValue(2)"));
    // `otel.*` fields steer the exporter; they are not attributes.
    assert!(!job.attributes.contains_key("otel.kind"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_is_marked_as_an_error() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let (d, guard) =
        traces::build(TracingOptions::new(false, "off").with_otlp(grpc(collector.endpoint())))
            .unwrap();
    tracing::dispatcher::with_default(&d, || {
        // No traceparent: a new trace, no error.
        let job = spans::job_span(
            &spans::Delivery {
                queue: "q",
                message: spans::Message {
                    exchange: "taskmill",
                    routing_key: "q",
                    message_id: "j",
                    body_size: 2,
                },
                kind: "k",
                attempt: 1,
                traceparent: None,
                tracestate: None,
            },
            None,
        );
        let _e = job.enter();
        spans::record_outcome(&job, "dead", Some("handler_error: boom"));
    });
    tokio::task::spawn_blocking(move || guard.shutdown().unwrap())
        .await
        .unwrap();
    let got = collector.exported_spans(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    let job = &got[0];
    assert_eq!(job.parent_span_id, "");
    assert!(attr(job, "taskmill.outcome").contains("\"dead\""));
    let status = job.status.as_ref().expect("a status");
    assert_eq!(status.code, "STATUS_CODE_ERROR");
    assert_eq!(status.message, "handler_error: boom");
}
