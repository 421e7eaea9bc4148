//! Where and how spans are exported: OTLP over gRPC or HTTP/protobuf,
//! configured from the standard `OTEL_*` environment variables.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
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
}

impl OtlpProtocol {
    /// Parses an `OTEL_EXPORTER_OTLP_PROTOCOL` value (`grpc`, `http/protobuf`).
    pub fn parse(s: &str) -> Result<OtlpProtocol, TracingError> {
        match s.trim() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(TracingError::Config(format!(
                "OTLP protocol `{other}` is not supported (use `grpc` or `http/protobuf`)"
            ))),
        }
    }
}

/// How spans are exported. Build it with [`OtlpOptions::from_env`] (what the
/// binary does) or [`OtlpOptions::new`] (tests, embedding apps).
#[derive(Debug, Clone)]
pub struct OtlpOptions {
    /// The collector endpoint. gRPC: `http://host:4317`. HTTP: the full URL
    /// of the traces resource, `http://host:4318/v1/traces`.
    pub endpoint: String,
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
    /// Spans per export request at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
    /// default 512, capped at `max_queue_size`).
    pub max_export_batch_size: usize,
    /// Delay between two scheduled exports (`OTEL_BSP_SCHEDULE_DELAY` in ms,
    /// default 5 s). A short-lived process should use a shorter one.
    pub scheduled_delay: Duration,
    /// Time budget of one export, retries included; `None` takes
    /// `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`, default 10 s.
    pub export_timeout: Option<Duration>,
    /// How long shutting down waits for the last export (default 5 s).
    pub shutdown_timeout: Duration,
    /// Which spans are exported: an env-filter directive applied to the
    /// OpenTelemetry layer only (`TASKMILL_TRACE_FILTER`, default `info`).
    /// The exporter's own crates (tonic, hyper, h2, ...) are always off.
    pub filter: String,
}

/// Environment variables read by [`OtlpOptions::from_env`].
pub mod env {
    /// Base endpoint of every signal.
    pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    /// Endpoint of traces; wins over [`ENDPOINT`] and is used as is.
    pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    /// `grpc` (default) or `http/protobuf`.
    pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    /// Protocol of traces; wins over [`PROTOCOL`].
    pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
    /// Batch queue size.
    pub const BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
    /// Batch export size.
    pub const BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
    /// Batch schedule delay, milliseconds.
    pub const BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
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
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
];

/// Reads a variable, trimmed; empty counts as unset.
fn non_empty(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, TracingError> {
    match non_empty(get, name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| TracingError::Config(format!("{name}=`{v}` is not a number"))),
    }
}

impl OtlpOptions {
    /// Options for `endpoint` over `protocol`, with the defaults above.
    pub fn new(endpoint: impl Into<String>, protocol: OtlpProtocol) -> OtlpOptions {
        OtlpOptions {
            endpoint: endpoint.into(),
            protocol,
            service_name: None,
            resource_attributes: Vec::new(),
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_secs(5),
            export_timeout: None,
            shutdown_timeout: Duration::from_secs(5),
            filter: "info".to_string(),
        }
    }

    /// Reads the standard variables: `None` (no export) unless
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// is set. With HTTP, the base `OTEL_EXPORTER_OTLP_ENDPOINT` gets
    /// `/v1/traces` appended, as the specification says.
    pub fn from_env() -> Result<Option<OtlpOptions>, TracingError> {
        OtlpOptions::from_vars(&|name| std::env::var(name).ok())
    }

    /// [`OtlpOptions::from_env`] over any variable lookup (testable).
    pub(crate) fn from_vars(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpOptions>, TracingError> {
        let protocol =
            match non_empty(get, env::TRACES_PROTOCOL).or_else(|| non_empty(get, env::PROTOCOL)) {
                Some(p) => OtlpProtocol::parse(&p)?,
                None => OtlpProtocol::Grpc,
            };
        let endpoint = if let Some(e) = non_empty(get, env::TRACES_ENDPOINT) {
            e
        } else if let Some(base) = non_empty(get, env::ENDPOINT) {
            match protocol {
                OtlpProtocol::Grpc => base,
                OtlpProtocol::HttpProtobuf => {
                    format!("{}/v1/traces", base.trim_end_matches('/'))
                }
            }
        } else {
            return Ok(None);
        };
        let mut o = OtlpOptions::new(endpoint, protocol);
        if let Some(n) = number::<usize>(get, env::BSP_MAX_QUEUE_SIZE)? {
            o.max_queue_size = n;
        }
        if let Some(n) = number::<usize>(get, env::BSP_MAX_EXPORT_BATCH_SIZE)? {
            o.max_export_batch_size = n;
        }
        if let Some(ms) = number::<u64>(get, env::BSP_SCHEDULE_DELAY)? {
            o.scheduled_delay = Duration::from_millis(ms);
        }
        if let Some(f) = non_empty(get, env::TRACE_FILTER) {
            o.filter = f;
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
    if o.max_queue_size == 0 {
        return Err(TracingError::Config(
            "the span queue size must be at least 1".into(),
        ));
    }
    let shared = Shared::new(o.max_queue_size);
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
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(o.endpoint.clone());
                if let Some(t) = o.export_timeout {
                    b = b.with_timeout(t);
                }
                b.build()?
            };
            (exporter, Some(rt))
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(o.endpoint.clone());
            if let Some(t) = o.export_timeout {
                b = b.with_timeout(t);
            }
            (b.build()?, None)
        }
    };
    let batch = BatchSpanProcessor::builder(CountingExporter::new(exporter, shared.clone()))
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(o.max_queue_size)
                .with_max_export_batch_size(o.max_export_batch_size.clamp(1, o.max_queue_size))
                .with_scheduled_delay(o.scheduled_delay)
                .build(),
        )
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
    fn grpc_by_default_endpoint_as_is() {
        let o = from(&[(env::ENDPOINT, "http://jaeger:4317")])
            .unwrap()
            .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(o.endpoint, "http://jaeger:4317");
        assert_eq!(o.max_queue_size, 2048);
    }

    #[test]
    fn http_appends_the_traces_path_to_the_base_endpoint_only() {
        let o = from(&[
            (env::ENDPOINT, "http://jaeger:4318/"),
            (env::PROTOCOL, "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.endpoint, "http://jaeger:4318/v1/traces");
        let o = from(&[
            (env::ENDPOINT, "http://ignored:4318"),
            (env::TRACES_ENDPOINT, "http://c:4318/custom"),
            (env::PROTOCOL, "grpc"),
            (env::TRACES_PROTOCOL, "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.endpoint, "http://c:4318/custom");
    }

    #[test]
    fn batch_settings_and_errors() {
        let o = from(&[
            (env::ENDPOINT, "http://c:4317"),
            (env::BSP_MAX_QUEUE_SIZE, "100"),
            (env::BSP_SCHEDULE_DELAY, "250"),
            (env::TRACE_FILTER, "taskmill=debug"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.max_queue_size, 100);
        assert_eq!(o.scheduled_delay, Duration::from_millis(250));
        assert!(o.filter_directive().starts_with("taskmill=debug,h2=off"));
        assert!(from(&[(env::ENDPOINT, "x"), (env::PROTOCOL, "http/json")]).is_err());
        assert!(from(&[(env::ENDPOINT, "x"), (env::BSP_MAX_QUEUE_SIZE, "many")]).is_err());
    }
}
