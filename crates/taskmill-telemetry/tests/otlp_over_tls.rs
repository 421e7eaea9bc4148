//! OTLP to an `https://` collector, with real TLS: a CA, a server and a
//! client certificate made here (rcgen), a TLS terminator in front of a
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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use fake_opentelemetry_collector::FakeCollectorServer;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use taskmill_telemetry::traces::spans;
use taskmill_telemetry::traces::{self, DropReason, OtlpOptions, OtlpProtocol, TracingOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// A CA and, signed by it, a server certificate for 127.0.0.1 and a client
/// certificate, as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    server: (CertificateDer<'static>, Vec<u8>),
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("tm-otlp-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("taskmill test CA {name}"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |san: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
            let mut p = CertificateParams::new(san).unwrap();
            p.distinguished_name.push(DnType::CommonName, file);
            p.extended_key_usages = vec![usage];
            p.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
            (cert.der().clone(), key.serialize_der())
        };
        let server = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["taskmill-worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        Pki {
            dir,
            ca_der: ca_cert.der().clone(),
            server,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The server side: this PKI's server certificate, `alpn`, and a client
    /// certificate signed by this CA required when `mutual`.
    fn server_config(&self, alpn: &[&[u8]], mutual: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let b = if mutual {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            b.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap(),
            )
        } else {
            b.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server.1.clone()));
        let mut c = b
            .with_single_cert(vec![self.server.0.clone()], key)
            .unwrap();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    let pki = Pki::new("http");
    let (backend, mut got) = http_receiver().await;
    let (port, _handshakes) = terminator(pki.server_config(&[b"http/1.1"], false), backend).await;

    let o = options(
        format!("https://127.0.0.1:{port}/v1/traces"),
        OtlpProtocol::HttpProtobuf,
        &pki.file("ca.pem"),
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
    let pki = Pki::new("grpc");
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let (port, _handshakes) =
        terminator(pki.server_config(&[b"h2"], false), collector.address()).await;

    let o = options(
        format!("https://127.0.0.1:{port}"),
        OtlpProtocol::Grpc,
        &pki.file("ca.pem"),
    );
    assert_eq!(export_one(o, "q-grpcs").await, 0);
    let spans = collector.exported_spans(1, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 1, "one span through TLS: {spans:?}");
    assert_eq!(spans[0].name, "publish taskmill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_signed_by_another_ca_gets_nothing() {
    let theirs = Pki::new("theirs");
    let ours = Pki::new("ours");
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
            &ours.file("ca.pem"),
        ),
        "q-wrong-ca",
    )
    .await;
    assert!(failed >= 1, "the failed HTTP export is counted");
    let failed = export_one(
        options(
            format!("https://127.0.0.1:{grpc_port}"),
            OtlpProtocol::Grpc,
            &ours.file("ca.pem"),
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
    let pki = Pki::new("mtls");
    let (backend, mut got) = http_receiver().await;
    let (port, mut handshakes) = terminator(pki.server_config(&[b"http/1.1"], true), backend).await;
    let endpoint = format!("https://127.0.0.1:{port}/v1/traces");

    // Without a client certificate: refused.
    let o = options(
        endpoint.clone(),
        OtlpProtocol::HttpProtobuf,
        &pki.file("ca.pem"),
    );
    assert!(export_one(o, "q-anon").await >= 1);
    let why = next(&mut handshakes, "a refused handshake").await;
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert!(got.try_recv().is_err());

    // With one: through.
    let mut o = options(endpoint, OtlpProtocol::HttpProtobuf, &pki.file("ca.pem"));
    o.tls.client_cert_file = Some(pki.file("client.pem"));
    o.tls.client_key_file = Some(pki.file("client.key"));
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
    let pki = Pki::new("env");
    let (backend, mut got) = http_receiver().await;
    let (port, _handshakes) = terminator(pki.server_config(&[b"http/1.1"], false), backend).await;
    let ca = pki.file("ca.pem").display().to_string();
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
