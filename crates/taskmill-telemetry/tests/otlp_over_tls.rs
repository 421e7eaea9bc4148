//! OTLP to an `https://` collector, with real TLS: a CA, a server and a
//! client certificate made for the test (`taskmill-testpki`), a TLS terminator in front of a
//! plaintext receiver (tokio-rustls), and the exporter as taskmill builds it.
//!
//! - HTTP/protobuf and gRPC reach the collector when the CA file is given;
//! - a collector whose certificate the CA did not sign gets nothing, and the
//!   failed exports are counted;
//! - a collector that wants a client certificate gets spans only from an
//!   exporter that has one;
//! - the standard variables alone (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//!   `..._PROTOCOL=http/json`, `..._CERTIFICATE`, `OTEL_SERVICE_NAME`,
//!   `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`) configure a child process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use fake_opentelemetry_collector::FakeCollectorServer;
use taskmill_telemetry::traces::spans;
use taskmill_telemetry::traces::{self, DropReason, OtlpOptions, OtlpProtocol, TracingOptions};
use taskmill_testpki::Pki;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// Terminates TLS on a free port and forwards the plaintext to `backend`.
/// Returns the port and a counter of failed handshakes.
async fn terminator(
    config: Arc<rustls::ServerConfig>,
    backend: SocketAddr,
) -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let mut plain = TcpStream::connect(backend).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                    Err(e) => {
                        let _ = tx.send(e.to_string());
                    }
                }
            });
        }
    });
    (port, rx)
}

/// One request to the HTTP receiver: its content type and body.
type Received = (String, Bytes);

/// A plaintext OTLP/HTTP receiver on `/v1/traces` that answers every request
/// with an empty success.
async fn http_receiver() -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    async fn receive(
        State(tx): State<mpsc::UnboundedSender<Received>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> ([(&'static str, String); 1], Vec<u8>) {
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let json = ct.contains("json");
        let _ = tx.send((ct.clone(), body));
        if json {
            ([("content-type", ct)], b"{}".to_vec())
        } else {
            ([("content-type", ct)], Vec::new())
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(tx);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, rx)
}

fn options(endpoint: String, protocol: OtlpProtocol, ca: &Path) -> OtlpOptions {
    let mut o = OtlpOptions::new(endpoint, protocol);
    o.scheduled_delay = Some(Duration::from_millis(50));
    o.export_timeout = Some(Duration::from_secs(2));
    o.shutdown_timeout = Duration::from_secs(5);
    o.tls.ca_file = Some(ca.to_path_buf());
    o
}

fn emit(d: &tracing::Dispatch, routing_key: &str) {
    tracing::dispatcher::with_default(d, || {
        let _s = spans::enqueue_span(
            &spans::Message {
                exchange: "taskmill",
                routing_key,
                message_id: "job-tls",
                body_size: 2,
            },
            "io.echo",
            None,
        )
        .entered();
    });
}

/// Exports one span with `o`; returns how many exports failed.
async fn export_one(o: OtlpOptions, routing_key: &str) -> u64 {
    let (d, guard) = traces::build(TracingOptions::new(false, "off").with_otlp(o)).unwrap();
    emit(&d, routing_key);
    tokio::task::spawn_blocking(move || {
        let _ = guard.flush();
        let failed = guard.spans_dropped_for(DropReason::ExportFailed);
        let _ = guard.shutdown();
        failed
    })
    .await
    .unwrap()
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} within 10 s"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_to_an_https_collector() {
    let pki = Pki::new("http").unwrap();
    let (backend, mut got) = http_receiver().await;
    let (port, _handshakes) = terminator(pki.server_config(&[b"http/1.1"], false), backend).await;

    let o = options(
        format!("https://127.0.0.1:{port}/v1/traces"),
        OtlpProtocol::HttpProtobuf,
        &pki.ca_file(),
    );
    assert_eq!(export_one(o, "q-https").await, 0);
    let (ct, body) = next(&mut got, "an export over https").await;
    assert_eq!(ct, "application/x-protobuf");
    assert!(
        body.windows(7).any(|w| w == b"q-https"),
        "the span's routing key is in the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_to_an_https_collector() {
    let pki = Pki::new("grpc").unwrap();
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let (port, _handshakes) =
        terminator(pki.server_config(&[b"h2"], false), collector.address()).await;

    let o = options(
        format!("https://127.0.0.1:{port}"),
        OtlpProtocol::Grpc,
        &pki.ca_file(),
    );
    assert_eq!(export_one(o, "q-grpcs").await, 0);
    let spans = collector.exported_spans(1, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 1, "one span through TLS: {spans:?}");
    assert_eq!(spans[0].name, "publish taskmill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_signed_by_another_ca_gets_nothing() {
    let theirs = Pki::new("theirs").unwrap();
    let ours = Pki::new("ours").unwrap();
    let (backend, mut got) = http_receiver().await;
    let (http_port, mut http_handshakes) =
        terminator(theirs.server_config(&[b"http/1.1"], false), backend).await;
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let (grpc_port, mut grpc_handshakes) =
        terminator(theirs.server_config(&[b"h2"], false), collector.address()).await;

    let failed = export_one(
        options(
            format!("https://127.0.0.1:{http_port}/v1/traces"),
            OtlpProtocol::HttpProtobuf,
            &ours.ca_file(),
        ),
        "q-wrong-ca",
    )
    .await;
    assert!(failed >= 1, "the failed HTTP export is counted");
    let failed = export_one(
        options(
            format!("https://127.0.0.1:{grpc_port}"),
            OtlpProtocol::Grpc,
            &ours.ca_file(),
        ),
        "q-wrong-ca",
    )
    .await;
    assert!(failed >= 1, "the failed gRPC export is counted");

    // The client refused the server's certificate: the server saw the
    // handshakes fail, and no request came through.
    next(&mut http_handshakes, "a failed HTTP handshake").await;
    next(&mut grpc_handshakes, "a failed gRPC handshake").await;
    assert!(got.try_recv().is_err(), "no request passed a wrong CA");
    let spans = collector
        .exported_spans(1, Duration::from_millis(300))
        .await;
    assert!(spans.is_empty(), "no span passed a wrong CA: {spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new("mtls").unwrap();
    let (backend, mut got) = http_receiver().await;
    let (port, mut handshakes) = terminator(pki.server_config(&[b"http/1.1"], true), backend).await;
    let endpoint = format!("https://127.0.0.1:{port}/v1/traces");

    // Without a client certificate: refused.
    let o = options(endpoint.clone(), OtlpProtocol::HttpProtobuf, &pki.ca_file());
    assert!(export_one(o, "q-anon").await >= 1);
    let why = next(&mut handshakes, "a refused handshake").await;
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert!(got.try_recv().is_err());

    // With one: through.
    let mut o = options(endpoint, OtlpProtocol::HttpProtobuf, &pki.ca_file());
    o.tls.client_cert_file = Some(pki.client_cert_file());
    o.tls.client_key_file = Some(pki.client_key_file());
    assert_eq!(export_one(o, "q-mtls").await, 0);
    let (_, body) = next(&mut got, "an export with a client certificate").await;
    assert!(body.windows(6).any(|w| w == b"q-mtls"));
}

/// The child half of [`standard_variables_alone_configure_export`]: builds
/// tracing from the environment only, ends one span, shuts down.
#[test]
#[ignore = "run by standard_variables_alone_configure_export in a child process"]
fn env_child() {
    if std::env::var_os("TM_OTLP_TLS_CHILD").is_none() {
        return;
    }
    let opts = match TracingOptions::from_env(false, "off") {
        Ok(o) => o,
        Err(e) => {
            eprintln!("CONFIG ERROR: {e}");
            std::process::exit(3);
        }
    };
    let (d, guard) = traces::build(opts).unwrap();
    println!("EXPORTING={}", guard.is_exporting());
    emit(&d, "q-env");
    guard.shutdown().unwrap();
}

fn child(vars: &[(&str, String)]) -> std::process::Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["env_child", "--exact", "--ignored", "--nocapture"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c.env("TM_OTLP_TLS_CHILD", "1");
    for (k, v) in vars {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_variables_alone_configure_export() {
    let pki = Pki::new("env").unwrap();
    let (backend, mut got) = http_receiver().await;
    let (port, _handshakes) = terminator(pki.server_config(&[b"http/1.1"], false), backend).await;
    let ca = pki.ca_file().display().to_string();
    let base = vec![
        // The base endpoint: the SDK appends /v1/traces for HTTP.
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("https://127.0.0.1:{port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP/JSON".to_string()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_string()),
        ("OTEL_SERVICE_NAME", "env-configured".to_string()),
    ];

    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        move || child(&base)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("EXPORTING=true"), "{stdout}");
    let (ct, body) = next(&mut got, "a JSON export configured by variables").await;
    assert_eq!(ct, "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
    let text = json.to_string();
    assert!(text.contains("env-configured"), "service name: {text}");
    assert!(text.contains("q-env"), "the span: {text}");

    // OTEL_SDK_DISABLED=true: nothing is exported although all else is set.
    let mut off = base.clone();
    off.push(("OTEL_SDK_DISABLED", "true".to_string()));
    let out = tokio::task::spawn_blocking(move || child(&off))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("EXPORTING=false"));
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        assert!(got.try_recv().is_err(), "a disabled SDK exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An exporter taskmill does not have is a configuration error that
    // names the variable.
    let mut bad = base;
    bad.push(("OTEL_TRACES_EXPORTER", "zipkin".to_string()));
    let out = tokio::task::spawn_blocking(move || child(&bad))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_TRACES_EXPORTER") && stderr.contains("zipkin"),
        "{stderr}"
    );
}
