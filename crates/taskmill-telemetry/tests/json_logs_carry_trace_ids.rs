//! JSON log lines carry the `trace_id` and `span_id` of the span they were
//! logged in, the same ids the span is exported with, so a log line leads to
//! its trace and back. Text logs and logs without export keep working.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use taskmill_telemetry::traces::spans;
use taskmill_telemetry::traces::{
    self, OtlpOptions, OtlpProtocol, TracingOptions, current_traceparent,
};
use tracing_subscriber::fmt::MakeWriter;

/// Captures everything written, line by line.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// An exporter pointed at a closed port: the OpenTelemetry layer is there,
/// the spans go nowhere.
fn nowhere() -> OtlpOptions {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = OtlpOptions::new(format!("http://127.0.0.1:{port}"), OtlpProtocol::Grpc);
    o.shutdown_timeout = Duration::from_millis(200);
    o.export_timeout = Some(Duration::from_millis(200));
    o
}

#[test]
fn json_lines_have_the_ids_of_the_current_span() {
    let out = Capture::default();
    let (d, guard) = traces::build(
        TracingOptions::new(true, "info")
            .with_otlp(nowhere())
            .with_writer(out.clone()),
    )
    .unwrap();
    let tp = tracing::dispatcher::with_default(&d, || {
        tracing::info!("before any span");
        let job = spans::job_span(
            &spans::Delivery {
                queue: "q-json",
                message: spans::Message {
                    exchange: "taskmill",
                    routing_key: "q-json",
                    message_id: "job-42",
                    body_size: 2,
                },
                kind: "io.echo",
                attempt: 3,
                traceparent: None,
                tracestate: None,
            },
            None,
        );
        let _e = job.enter();
        tracing::info!(answer = 42, "inside the job");
        current_traceparent().unwrap().0
    });
    drop(guard);

    let lines = out.lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let outside: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(outside["message"], "before any span");
    assert!(outside.get("trace_id").is_none(), "{outside}");

    let inside: Value = serde_json::from_str(&lines[1]).unwrap();
    let mut parts = tp.split('-').skip(1);
    let (trace_id, span_id) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(inside["trace_id"], trace_id, "{inside}");
    assert_eq!(inside["span_id"], span_id, "{inside}");
    assert_eq!(inside["message"], "inside the job");
    assert_eq!(inside["answer"], 42);
    assert_eq!(inside["level"], "INFO");
    assert!(
        inside["timestamp"]
            .as_str()
            .is_some_and(|t| t.contains('T'))
    );
    assert_eq!(inside["target"], module_path!());
    // The per-job spans are for tracing only: the log layer does not format
    // them (hot path), so the line carries the ids, not the span's fields.
    assert!(inside.get("span").is_none(), "{inside}");
}

#[test]
fn without_export_json_and_text_logs_still_work() {
    let out = Capture::default();
    let (d, guard) =
        traces::build(TracingOptions::new(true, "info").with_writer(out.clone())).unwrap();
    assert!(!guard.is_exporting());
    tracing::dispatcher::with_default(&d, || {
        let _s = tracing::info_span!("outer", n = 1).entered();
        tracing::info!("hello");
        tracing::debug!("filtered out");
        assert_eq!(current_traceparent(), None);
    });
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["message"], "hello");
    assert_eq!(v["span"]["name"], "outer");
    assert_eq!(v["span"]["n"], 1);
    assert!(v.get("trace_id").is_none());

    let out = Capture::default();
    let (d, _guard) = traces::build(
        TracingOptions::new(false, "warn")
            .with_otlp(nowhere())
            .with_writer(out.clone()),
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
        tracing::info!("muted");
        tracing::warn!("plain text");
        // The log filter does not decide what is traced.
        assert!(current_traceparent().is_some());
    });
    let lines = out.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("plain text"),
        "{}",
        lines[0]
    );
}

#[test]
fn a_bad_filter_is_an_error() {
    let err = traces::build(TracingOptions::new(false, "info,=[")).unwrap_err();
    assert!(err.to_string().contains("log level"), "{err}");
    let mut o = nowhere();
    o.filter = "info,=[".into();
    let err = traces::build(TracingOptions::new(false, "info").with_otlp(o)).unwrap_err();
    assert!(err.to_string().contains("trace filter"), "{err}");
}
