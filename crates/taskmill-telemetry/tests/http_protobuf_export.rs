//! OTLP over HTTP/protobuf: spans and the `service.name` resource reach an
//! in-process `/v1/traces` receiver.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use taskmill_telemetry::traces::spans;
use taskmill_telemetry::traces::{
    self, DEFAULT_SERVICE_NAME, OtlpOptions, OtlpProtocol, TracingOptions,
};
use tokio::sync::mpsc;

async fn receive(
    State(tx): State<mpsc::UnboundedSender<ExportTraceServiceRequest>>,
    body: Bytes,
) -> Vec<u8> {
    let req = ExportTraceServiceRequest::decode(body).expect("a protobuf export request");
    let _ = tx.send(req);
    Vec::new() // an empty ExportTraceServiceResponse
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_http_protobuf() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut o = OtlpOptions::new(
        format!("http://{addr}/v1/traces"),
        OtlpProtocol::HttpProtobuf,
    );
    o.resource_attributes = vec![("taskmill.role".into(), "test".into())];
    let (d, guard) = traces::build(TracingOptions::new(false, "off").with_otlp(o)).unwrap();
    tracing::dispatcher::with_default(&d, || {
        let _s = spans::enqueue_span(
            &spans::Message {
                exchange: "taskmill",
                routing_key: "q-http",
                message_id: "job-1",
                body_size: 2,
            },
            "io.echo",
            None,
        )
        .entered();
    });
    tokio::task::spawn_blocking(move || guard.shutdown().unwrap())
        .await
        .unwrap();

    let req = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an export request within 10 s")
        .unwrap();
    let rs = &req.resource_spans[0];
    let resource: Vec<(String, String)> = rs
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect();
    let expected_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    assert!(
        resource.contains(&("service.name".into(), expected_name)),
        "{resource:?}"
    );
    assert!(
        resource.contains(&("taskmill.role".into(), "test".into())),
        "{resource:?}"
    );
    let span = &rs.scope_spans[0].spans[0];
    assert_eq!(span.name, "publish taskmill");
    assert_eq!(span.trace_id.len(), 16);
}
