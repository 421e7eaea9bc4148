//! Where and how spans are exported: OTLP over gRPC, HTTP/protobuf or
//! HTTP/JSON, plain or TLS.
//!
//! The OpenTelemetry SDK reads most standard `OTEL_*` variables itself: the
//! endpoint (`OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`, with `/v1/traces`
//! appended to the base one over HTTP), the timeout, headers, compression,
//! the batch delay and size (`OTEL_BSP_*`), the sampler and the resource
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`). taskmill reads only
//! what the Rust SDK leaves out: `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`,
//! the protocol (so the default stays gRPC whatever features are compiled
//! in), `OTEL_BSP_MAX_QUEUE_SIZE` (the drop counter must know the capacity)
//! and the certificate files (`OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`,
//! `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

use super::TracingError;
use super::drops::{CountingExporter, CountingProcessor, DropStats, Shared};

/// The default `service.name` when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "taskmill";

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// gRPC (tonic), usually port 4317. The default.
    Grpc,
    /// HTTP with protobuf bodies, usually port 4318, path `/v1/traces`.
    HttpProtobuf,
    /// HTTP with JSON bodies (the OTLP/JSON encoding), same port and path.
    HttpJson,
}

impl OtlpProtocol {
    /// Parses an `OTEL_EXPORTER_OTLP_PROTOCOL` value (`grpc`,
    /// `http/protobuf`, `http/json`; any case).
    pub fn parse(s: &str) -> Result<OtlpProtocol, TracingError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            "http/json" => Ok(OtlpProtocol::HttpJson),
            other => Err(TracingError::Config(format!(
                "OTLP protocol `{other}` is not supported (use `grpc`, `http/protobuf` or `http/json`)"
            ))),
        }
    }
}

/// Certificate files for an `https://` collector, PEM. Without a CA file the
/// system roots verify the collector (`SSL_CERT_FILE`/`SSL_CERT_DIR` are
/// honoured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTls {
    /// Extra CA certificates to trust (`OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for mutual TLS
    /// (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`).
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (`OTEL_EXPORTER_OTLP_CLIENT_KEY`).
    pub client_key_file: Option<PathBuf>,
}

/// How spans are exported. Build it with [`OtlpOptions::from_env`] (what the
/// binary does) or [`OtlpOptions::new`] (tests, embedding apps). Every
/// `None` is left to the SDK, which reads its standard variable or default.
#[derive(Debug, Clone)]
pub struct OtlpOptions {
    /// The collector endpoint. gRPC: `http(s)://host:4317`. HTTP: the full
    /// URL of the traces resource, `http(s)://host:4318/v1/traces`. `None`:
    /// the SDK reads `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` (default
    /// localhost on the protocol's port).
    pub endpoint: Option<String>,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// `service.name`; `None` takes `OTEL_SERVICE_NAME`, then `service.name`
    /// in `OTEL_RESOURCE_ATTRIBUTES`, then [`DEFAULT_SERVICE_NAME`].
    pub service_name: Option<String>,
    /// Extra resource attributes, added after those of
    /// `OTEL_RESOURCE_ATTRIBUTES` (e.g. `taskmill.role=cpu-child`).
    pub resource_attributes: Vec<(String, String)>,
    /// Spans buffered for export at most; more are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048).
    pub max_queue_size: usize,
    /// Spans per export request at most, capped at `max_queue_size`; `None`:
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512.
    pub max_export_batch_size: Option<usize>,
    /// Delay between two scheduled exports; `None`: `OTEL_BSP_SCHEDULE_DELAY`
    /// (ms), default 5 s. A short-lived process should use a shorter one.
    pub scheduled_delay: Option<Duration>,
    /// Time budget of one export, retries included; `None`:
    /// `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`, default 10 s.
    pub export_timeout: Option<Duration>,
    /// How long shutting down waits for the last export (default 5 s).
    pub shutdown_timeout: Duration,
    /// Which spans are exported: an env-filter directive applied to the
    /// OpenTelemetry layer only (`TASKMILL_TRACE_FILTER`, default `info`).
    /// The exporter's own crates (tonic, hyper, h2, ...) are always off.
    pub filter: String,
    /// Certificates for an `https://` endpoint.
    pub tls: OtlpTls,
}

/// Environment variables read by [`OtlpOptions::from_env`] (the SDK reads
/// the others).
pub mod env {
    /// `true` turns the SDK off: no span is exported.
    pub const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
    /// `otlp` or `none`. Unset: export when an endpoint variable is set.
    pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
    /// Base endpoint of every signal (read by the SDK; taskmill looks at it
    /// to decide whether to export and whether TLS is wanted).
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Endpoint of traces; wins over [`ENDPOINT`] and is used as is.
    pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// `grpc` (taskmill's default), `http/protobuf` or `http/json`.
    pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    /// Protocol of traces; wins over [`PROTOCOL`].
    pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
    /// Batch queue size.
    pub const BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
    /// CA certificates (PEM) that verify an `https://` collector.
    pub const CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
    /// Of traces; wins over [`CERTIFICATE`].
    pub const TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
    /// Client certificate (PEM) for mutual TLS.
    pub const CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
    /// Of traces; wins over [`CLIENT_CERTIFICATE`].
    pub const TRACES_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE";
    /// The client certificate's private key (PEM).
    pub const CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";
    /// Of traces; wins over [`CLIENT_KEY`].
    pub const TRACES_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY";
    /// Which spans are exported (env-filter directive).
    pub const TRACE_FILTER: &str = "TASKMILL_TRACE_FILTER";
}

/// Crates whose spans are never exported: the exporter itself. Exporting
/// them would feed the pipeline with its own work.
const ALWAYS_OFF: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "reqwest",
    "rustls",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
];

type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads a variable, trimmed; empty counts as unset.
fn non_empty(get: Vars, name: &str) -> Option<String> {
    get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The traces-specific variable, else the generic one.
fn either(get: Vars, traces: &str, generic: &str) -> Option<String> {
    non_empty(get, traces).or_else(|| non_empty(get, generic))
}

fn number<T: std::str::FromStr>(get: Vars, name: &str) -> Result<Option<T>, TracingError> {
    match non_empty(get, name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| TracingError::Config(format!("{name}=`{v}` is not a number"))),
    }
}

/// `OTEL_SDK_DISABLED`: `true`/`false`, any case; anything else is an error.
fn disabled(get: Vars) -> Result<bool, TracingError> {
    match non_empty(get, env::SDK_DISABLED) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(TracingError::Config(format!(
            "{}=`{v}` is not a boolean (use `true` or `false`)",
            env::SDK_DISABLED
        ))),
    }
}

/// `OTEL_TRACES_EXPORTER`: `Some(true)` for `otlp`, `Some(false)` for
/// `none`, `None` when unset.
fn exporter_wanted(get: Vars) -> Result<Option<bool>, TracingError> {
    let Some(v) = non_empty(get, env::TRACES_EXPORTER) else {
        return Ok(None);
    };
    let mut otlp = false;
    for name in v.split(',').map(|n| n.trim().to_ascii_lowercase()) {
        match name.as_str() {
            "otlp" => otlp = true,
            "none" | "" => {}
            other => {
                return Err(TracingError::Config(format!(
                    "{}=`{v}`: exporter `{other}` is not supported (use `otlp` or `none`)",
                    env::TRACES_EXPORTER
                )));
            }
        }
    }
    Ok(Some(otlp))
}

impl OtlpOptions {
    /// Options for `endpoint` over `protocol`, with the defaults above.
    pub fn new(endpoint: impl Into<String>, protocol: OtlpProtocol) -> OtlpOptions {
        OtlpOptions {
            endpoint: Some(endpoint.into()),
            ..OtlpOptions::sdk_defaults(protocol)
        }
    }

    /// Everything left to the SDK's variables and defaults.
    fn sdk_defaults(protocol: OtlpProtocol) -> OtlpOptions {
        OtlpOptions {
            endpoint: None,
            protocol,
            service_name: None,
            resource_attributes: Vec::new(),
            max_queue_size: 2048,
            max_export_batch_size: None,
            scheduled_delay: None,
            export_timeout: None,
            shutdown_timeout: Duration::from_secs(5),
            filter: "info".to_string(),
            tls: OtlpTls::default(),
        }
    }

    /// Reads the standard variables. `None` (no export) when
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; with
    /// `OTEL_TRACES_EXPORTER` unset, only when no endpoint variable is set
    /// (a worker without a collector does not try localhost:4317).
    pub fn from_env() -> Result<Option<OtlpOptions>, TracingError> {
        OtlpOptions::from_vars(&|name| std::env::var(name).ok())
    }

    /// [`OtlpOptions::from_env`] over any variable lookup (testable).
    pub(crate) fn from_vars(get: Vars) -> Result<Option<OtlpOptions>, TracingError> {
        if disabled(get)? {
            return Ok(None);
        }
        let has_endpoint = either(get, env::TRACES_ENDPOINT, env::ENDPOINT).is_some();
        if !exporter_wanted(get)?.unwrap_or(has_endpoint) {
            return Ok(None);
        }
        let protocol = match either(get, env::TRACES_PROTOCOL, env::PROTOCOL) {
            Some(p) => OtlpProtocol::parse(&p)?,
            None => OtlpProtocol::Grpc,
        };
        let mut o = OtlpOptions::sdk_defaults(protocol);
        if let Some(n) = number::<usize>(get, env::BSP_MAX_QUEUE_SIZE)? {
            o.max_queue_size = n;
        }
        if let Some(f) = non_empty(get, env::TRACE_FILTER) {
            o.filter = f;
        }
        o.tls = OtlpTls {
            ca_file: either(get, env::TRACES_CERTIFICATE, env::CERTIFICATE).map(PathBuf::from),
            client_cert_file: either(get, env::TRACES_CLIENT_CERTIFICATE, env::CLIENT_CERTIFICATE)
                .map(PathBuf::from),
            client_key_file: either(get, env::TRACES_CLIENT_KEY, env::CLIENT_KEY)
                .map(PathBuf::from),
        };
        if o.tls.client_cert_file.is_some() != o.tls.client_key_file.is_some() {
            return Err(TracingError::Config(format!(
                "{} and {} go together: set both or neither",
                env::CLIENT_CERTIFICATE,
                env::CLIENT_KEY
            )));
        }
        Ok(Some(o))
    }

    /// The env-filter directive of the OpenTelemetry layer: [`Self::filter`]
    /// with the exporter's own crates turned off.
    pub(crate) fn filter_directive(&self) -> String {
        let mut d = self.filter.clone();
        for t in ALWAYS_OFF {
            d.push_str(&format!(",{t}=off"));
        }
        d
    }

    /// Whether the endpoint (ours, else the SDK's variable) is `https://`.
    fn wants_tls(&self, get: Vars) -> bool {
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| either(get, env::TRACES_ENDPOINT, env::ENDPOINT));
        endpoint.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https://"))
    }

    /// The resource: the environment's attributes, the service name, ours.
    fn resource(&self) -> Resource {
        let detected = Resource::builder().build();
        let mut b = Resource::builder();
        let env_name = detected
            .get(&opentelemetry::Key::new("service.name"))
            .map(|v| v.as_str().into_owned())
            .filter(|n| !n.starts_with("unknown_service"));
        match (&self.service_name, env_name) {
            (Some(n), _) => b = b.with_service_name(n.clone()),
            (None, Some(_)) => {}
            (None, None) => b = b.with_service_name(DEFAULT_SERVICE_NAME),
        }
        b.with_attributes(
            self.resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
    }
}

/// Reads one PEM file named by `what` (the option or variable).
fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, TracingError> {
    std::fs::read(path)
        .map_err(|e| TracingError::Config(format!("{what} `{}`: {e}", path.display())))
}

/// The certificate files as PEM bytes: (CA, client cert + key).
#[allow(clippy::type_complexity)]
fn tls_material(
    t: &OtlpTls,
) -> Result<(Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>), TracingError> {
    let ca = match &t.ca_file {
        Some(p) => Some(read_pem(p, env::CERTIFICATE)?),
        None => None,
    };
    let identity = match (&t.client_cert_file, &t.client_key_file) {
        (Some(c), Some(k)) => Some((
            read_pem(c, env::CLIENT_CERTIFICATE)?,
            read_pem(k, env::CLIENT_KEY)?,
        )),
        (None, None) => None,
        _ => {
            return Err(TracingError::Config(format!(
                "{} and {} go together: set both or neither",
                env::CLIENT_CERTIFICATE,
                env::CLIENT_KEY
            )));
        }
    };
    Ok((ca, identity))
}

/// The TLS settings of the gRPC channel: system roots, the extra CA, the
/// client identity. ring is the provider (tonic's `tls-ring`), as for the
/// broker and PostgreSQL.
fn grpc_tls(t: &OtlpTls) -> Result<tonic::transport::ClientTlsConfig, TracingError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (ca, identity) = tls_material(t)?;
    let mut c = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = ca {
        c = c.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    Ok(c)
}

/// The blocking HTTP client for an `https://` collector with certificate
/// files (without them the SDK's own client, on the system roots, serves).
/// Built on a thread of its own: a blocking client must not be made inside
/// an async context.
fn https_client(t: &OtlpTls, timeout: Duration) -> Result<reqwest::blocking::Client, TracingError> {
    let (ca, identity) = tls_material(t)?;
    let mut b = reqwest::blocking::Client::builder().timeout(timeout);
    if let Some(ca) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(&ca).map_err(|e| {
            TracingError::Config(format!("{}: not PEM certificates: {e}", env::CERTIFICATE))
        })?;
        b = b.tls_certs_merge(certs);
    }
    if let Some((cert, key)) = identity {
        let mut pem = key;
        pem.push(b'\n');
        pem.extend_from_slice(&cert);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            TracingError::Config(format!(
                "{}/{}: not a PEM certificate and key: {e}",
                env::CLIENT_CERTIFICATE,
                env::CLIENT_KEY
            ))
        })?;
        b = b.identity(id);
    }
    std::thread::Builder::new()
        .name("taskmill-otlp-client".into())
        .spawn(move || b.build())
        .map_err(|e| TracingError::Config(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| TracingError::Config("building the HTTP client panicked".into()))?
        .map_err(|e| TracingError::Config(format!("cannot build the HTTPS client: {e}")))
}

/// The export timeout for a client taskmill builds itself: the option, else
/// the SDK's variables, else 10 s.
fn timeout_of(o: &OtlpOptions, get: Vars) -> Result<Duration, TracingError> {
    if let Some(t) = o.export_timeout {
        return Ok(t);
    }
    let ms = match number::<u64>(get, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")? {
        Some(ms) => Some(ms),
        None => number::<u64>(get, "OTEL_EXPORTER_OTLP_TIMEOUT")?,
    };
    Ok(Duration::from_millis(ms.unwrap_or(10_000)))
}

/// Makes ring the process's rustls provider unless one is installed: the
/// HTTP exporter's client (reqwest without a provider of its own) takes it.
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may win the race; either provider then serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A built export pipeline.
pub(crate) struct Pipeline {
    pub(crate) provider: SdkTracerProvider,
    pub(crate) stats: Arc<DropStats>,
    /// The runtime the gRPC channel lives on (gRPC only).
    pub(crate) runtime: Option<tokio::runtime::Runtime>,
}

/// Builds the provider: OTLP exporter -> counting wrapper -> batch processor
/// -> counting wrapper.
///
/// The gRPC channel gets a small runtime of its own (one thread), so export
/// works the same whether the caller is in a multi-thread runtime, a
/// current-thread one (no 5 s stall at shutdown) or none at all (the CPU
/// child). The batch processor exports from its own thread, never from the
/// thread that ends a span.
pub(crate) fn build(o: &OtlpOptions) -> Result<Pipeline, TracingError> {
    build_with(o, &|name| std::env::var(name).ok())
}

fn build_with(o: &OtlpOptions, get: Vars) -> Result<Pipeline, TracingError> {
    if o.max_queue_size == 0 {
        return Err(TracingError::Config(
            "the span queue size must be at least 1".into(),
        ));
    }
    install_crypto_provider();
    let shared = Shared::new(o.max_queue_size);
    let tls = o.wants_tls(get);
    let (exporter, runtime) = match o.protocol {
        OtlpProtocol::Grpc => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("taskmill-otlp")
                .enable_all()
                .build()
                .map_err(|e| TracingError::Config(format!("cannot start the OTLP runtime: {e}")))?;
            let exporter = {
                let _enter = rt.enter();
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(e) = &o.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                if let Some(t) = o.export_timeout {
                    b = b.with_timeout(t);
                }
                if tls {
                    b = b.with_tls_config(grpc_tls(&o.tls)?);
                }
                b.build()?
            };
            (exporter, Some(rt))
        }
        OtlpProtocol::HttpProtobuf | OtlpProtocol::HttpJson => {
            let protocol = if o.protocol == OtlpProtocol::HttpJson {
                opentelemetry_otlp::Protocol::HttpJson
            } else {
                opentelemetry_otlp::Protocol::HttpBinary
            };
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol);
            if let Some(e) = &o.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if let Some(t) = o.export_timeout {
                b = b.with_timeout(t);
            }
            if tls && o.tls != OtlpTls::default() {
                b = b.with_http_client(https_client(&o.tls, timeout_of(o, get)?)?);
            }
            (b.build()?, None)
        }
    };
    let mut batch_config = BatchConfigBuilder::default().with_max_queue_size(o.max_queue_size);
    if let Some(n) = o.max_export_batch_size {
        batch_config = batch_config.with_max_export_batch_size(n.clamp(1, o.max_queue_size));
    }
    if let Some(d) = o.scheduled_delay {
        batch_config = batch_config.with_scheduled_delay(d);
    }
    let batch = BatchSpanProcessor::builder(CountingExporter::new(exporter, shared.clone()))
        .with_batch_config(batch_config.build())
        .build();
    let stats = shared.stats.clone();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(CountingProcessor::new(batch, shared))
        .with_resource(o.resource())
        .build();
    Ok(Pipeline {
        provider,
        stats,
        runtime,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<Option<OtlpOptions>, TracingError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpOptions::from_vars(&move |k| m.get(k).cloned())
    }

    #[test]
    fn no_endpoint_no_export() {
        assert!(from(&[]).unwrap().is_none());
        assert!(from(&[(env::ENDPOINT, " ")]).unwrap().is_none());
        assert!(from(&[(env::PROTOCOL, "grpc")]).unwrap().is_none());
    }

    #[test]
    fn grpc_by_default_endpoint_left_to_the_sdk() {
        let o = from(&[(env::ENDPOINT, "http://jaeger:4317")])
            .unwrap()
            .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(o.endpoint, None, "the SDK reads the endpoint itself");
        assert_eq!(o.scheduled_delay, None);
        assert_eq!(o.max_queue_size, 2048);
    }

    #[test]
    fn protocols_traces_variable_first_any_case() {
        let o = from(&[
            (env::ENDPOINT, "http://c:4318"),
            (env::PROTOCOL, "grpc"),
            (env::TRACES_PROTOCOL, "HTTP/JSON"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpJson);
        let o = from(&[
            (env::TRACES_ENDPOINT, "http://c"),
            (env::PROTOCOL, "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        let e = from(&[(env::ENDPOINT, "x"), (env::PROTOCOL, "thrift")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`thrift`") && e.contains("http/json"), "{e}");
    }

    #[test]
    fn sdk_disabled_and_exporter_none_turn_export_off() {
        let ep = (env::ENDPOINT, "http://c:4317");
        assert!(from(&[ep, (env::SDK_DISABLED, "true")]).unwrap().is_none());
        assert!(from(&[ep, (env::SDK_DISABLED, "TRUE")]).unwrap().is_none());
        assert!(from(&[ep, (env::SDK_DISABLED, "false")]).unwrap().is_some());
        assert!(
            from(&[ep, (env::TRACES_EXPORTER, "none")])
                .unwrap()
                .is_none()
        );
        // Disabled wins over an explicit exporter.
        assert!(
            from(&[(env::TRACES_EXPORTER, "otlp"), (env::SDK_DISABLED, "true")])
                .unwrap()
                .is_none()
        );
        let e = from(&[ep, (env::SDK_DISABLED, "yes")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OTEL_SDK_DISABLED=`yes`"), "{e}");
    }

    #[test]
    fn exporter_otlp_exports_to_the_sdk_default_without_an_endpoint() {
        let o = from(&[(env::TRACES_EXPORTER, "otlp")]).unwrap().unwrap();
        assert_eq!(o.endpoint, None);
        let e = from(&[(env::TRACES_EXPORTER, "zipkin")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("OTEL_TRACES_EXPORTER") && e.contains("`zipkin`"),
            "{e}"
        );
    }

    #[test]
    fn certificate_files_and_https() {
        let o = from(&[
            (env::ENDPOINT, "https://c:4317"),
            (env::CERTIFICATE, "/ca.pem"),
            (env::TRACES_CERTIFICATE, "/traces-ca.pem"),
            (env::CLIENT_CERTIFICATE, "/c.pem"),
            (env::CLIENT_KEY, "/k.pem"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.tls.ca_file, Some(PathBuf::from("/traces-ca.pem")));
        assert_eq!(o.tls.client_key_file, Some(PathBuf::from("/k.pem")));
        let vars = |k: &str| (k == env::ENDPOINT).then(|| "HTTPS://c:4317".to_string());
        assert!(o.wants_tls(&vars));
        assert!(!OtlpOptions::new("http://c:4317", OtlpProtocol::Grpc).wants_tls(&vars));
        let e = from(&[
            (env::ENDPOINT, "https://c"),
            (env::CLIENT_CERTIFICATE, "/c.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("go together"), "{e}");
        let missing = OtlpTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..OtlpTls::default()
        };
        let e = tls_material(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn batch_settings_and_errors() {
        let o = from(&[
            (env::ENDPOINT, "http://c:4317"),
            (env::BSP_MAX_QUEUE_SIZE, "100"),
            (env::TRACE_FILTER, "taskmill=debug"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.max_queue_size, 100);
        assert!(o.filter_directive().starts_with("taskmill=debug,h2=off"));
        assert!(from(&[(env::ENDPOINT, "x"), (env::BSP_MAX_QUEUE_SIZE, "many")]).is_err());
    }
}
