//! With the collector away, ending spans never blocks: 10 000 spans finish
//! quickly, the overflow is dropped and counted in
//! `taskmill_trace_spans_dropped_total`, failed exports are counted too, and
//! shutting down is bounded.

use std::time::{Duration, Instant};

use taskmill_telemetry::Metrics;
use taskmill_telemetry::traces::spans::{self, Step};
use taskmill_telemetry::traces::{
    self, DropReason, OtlpOptions, OtlpProtocol, TracingOptions, spans_dropped_total,
};

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn dropped(reason: DropReason) -> u64 {
    spans_dropped_total()
        .with_label_values(&[reason.as_str()])
        .get()
}

fn collector_down(protocol: OtlpProtocol) {
    let endpoint = match protocol {
        OtlpProtocol::Grpc => format!("http://127.0.0.1:{}", closed_port()),
        OtlpProtocol::HttpProtobuf | OtlpProtocol::HttpJson => {
            format!("http://127.0.0.1:{}/v1/traces", closed_port())
        }
    };
    let mut o = OtlpOptions::new(endpoint, protocol);
    o.export_timeout = Some(Duration::from_secs(1));
    o.shutdown_timeout = Duration::from_secs(1);
    o.scheduled_delay = Some(Duration::from_millis(50));
    let (d, guard) = traces::build(TracingOptions::new(false, "off").with_otlp(o)).unwrap();

    let start = Instant::now();
    tracing::dispatcher::with_default(&d, || {
        for i in 0..10_000u32 {
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
                    attempt: i,
                    traceparent: None,
                    tracestate: None,
                },
                None,
            );
            let _e = job.enter();
            let _run = spans::step_span(Step::Run).entered();
        }
    });
    let took = start.elapsed();
    // Liveness, not performance: blocking on the exporter would take
    // seconds per batch.
    assert!(took < Duration::from_secs(5), "20 000 spans took {took:?}");

    // The queue holds 2048: most of the 20 000 spans were dropped.
    let full = guard.spans_dropped_for(DropReason::QueueFull);
    assert!(full >= 10_000, "only {full} dropped for a full queue");
    // The batches the exporter took fail after their retries (1 s budget).
    let until = Instant::now() + Duration::from_secs(20);
    while guard.spans_dropped_for(DropReason::ExportFailed) == 0 {
        assert!(Instant::now() < until, "no failed export was counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(guard.spans_dropped() >= full);
    eprintln!(
        "{protocol:?}: 20 000 spans in {took:?}; dropped: {full} queue_full, {} export_failed",
        guard.spans_dropped_for(DropReason::ExportFailed)
    );

    let start = Instant::now();
    let _ = guard.shutdown(); // times out: the collector is still away
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        start.elapsed()
    );
}

#[test]
fn grpc_collector_down() {
    let before = dropped(DropReason::QueueFull);
    collector_down(OtlpProtocol::Grpc);
    assert!(dropped(DropReason::QueueFull) >= before + 10_000);
    let text = Metrics::new("test").render();
    let line = text
        .lines()
        .find(|l| l.starts_with("taskmill_trace_spans_dropped_total{reason=\"queue_full\"}"))
        .unwrap_or_else(|| panic!("no drop counter in:\n{text}"));
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v >= 10_000.0, "{line}");
}

#[test]
fn http_collector_down() {
    collector_down(OtlpProtocol::HttpProtobuf);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_on_a_current_thread_runtime_does_not_stall() {
    // gRPC exporters built on the caller's current-thread runtime stall
    // shutdown for 5 s; ours has its own runtime.
    let (d, guard) = traces::build(
        TracingOptions::new(false, "off").with_otlp(OtlpOptions::new(
            format!("http://127.0.0.1:{}", closed_port()),
            OtlpProtocol::Grpc,
        )),
    )
    .unwrap();
    tracing::dispatcher::with_default(&d, || {
        let _s = spans::enqueue_span(
            &spans::Message {
                exchange: "taskmill",
                routing_key: "q",
                message_id: "j",
                body_size: 2,
            },
            "k",
            None,
        )
        .entered();
    });
    let start = Instant::now();
    drop(guard);
    // One failed export attempt with retries is ~1 s; the stall was 5 s.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}
