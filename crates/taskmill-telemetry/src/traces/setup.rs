//! Installing the subscriber: env filter + fmt layer (text or JSON lines on
//! stderr) + the OpenTelemetry layer when an OTLP endpoint is configured.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Dispatch;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::drops::{DropReason, DropStats};
use super::json::JsonWithTraceIds;
use super::otlp::{self, OtlpOptions};

/// Tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// A log or trace filter directive does not parse.
    #[error("{0}")]
    Filter(String),
    /// An `OTEL_*` variable or option is not usable.
    #[error("tracing configuration: {0}")]
    Config(String),
    /// The OTLP exporter could not be built (e.g. a malformed endpoint).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Another global subscriber was installed first.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    /// Flushing or shutting down the export pipeline failed or timed out.
    #[error("trace export: {0}")]
    Export(String),
}

/// What to install: see [`init`].
pub struct TracingOptions {
    /// JSON lines (with `trace_id`/`span_id`) instead of text.
    pub json: bool,
    /// Env-filter directive for logs, e.g. `info` or `taskmill=debug,lapin=warn`;
    /// `RUST_LOG` wins when set.
    pub log_filter: String,
    /// Where spans go; `None`: logs only.
    pub otlp: Option<OtlpOptions>,
    writer: Option<BoxMakeWriter>,
}

impl std::fmt::Debug for TracingOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracingOptions")
            .field("json", &self.json)
            .field("log_filter", &self.log_filter)
            .field("otlp", &self.otlp)
            .field("custom_writer", &self.writer.is_some())
            .finish()
    }
}

impl TracingOptions {
    /// Logs only (no span export), to stderr.
    pub fn new(json: bool, log_filter: &str) -> TracingOptions {
        TracingOptions {
            json,
            log_filter: log_filter.to_string(),
            otlp: None,
            writer: None,
        }
    }

    /// Logs, plus span export when `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is
    /// set (see [`OtlpOptions::from_env`]).
    pub fn from_env(json: bool, log_filter: &str) -> Result<TracingOptions, TracingError> {
        Ok(TracingOptions {
            otlp: OtlpOptions::from_env()?,
            ..TracingOptions::new(json, log_filter)
        })
    }

    /// Exports spans as `otlp` says.
    pub fn with_otlp(mut self, otlp: OtlpOptions) -> Self {
        self.otlp = Some(otlp);
        self
    }

    /// Writes logs to `writer` instead of stderr (tests).
    pub fn with_writer<W>(mut self, writer: W) -> Self
    where
        W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    {
        self.writer = Some(BoxMakeWriter::new(writer));
        self
    }
}

/// Keeps the export pipeline alive; flushes and shuts it down when dropped
/// (or by [`TelemetryGuard::shutdown`]). Without export it does nothing.
///
/// Shutting down blocks the calling thread until the last batch is sent or
/// [`OtlpOptions::shutdown_timeout`] passes. Export runs on threads of its
/// own, so this works from any thread, inside a runtime (multi-thread or
/// current-thread) or not, without the 5 s stall of a gRPC exporter that
/// lives on a current-thread runtime.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    inner: Option<Exporting>,
}

struct Exporting {
    provider: SdkTracerProvider,
    stats: Arc<DropStats>,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.inner.is_some())
            .finish()
    }
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.inner.is_some()
    }

    /// Spans this pipeline dropped, for any reason (0 without export).
    pub fn spans_dropped(&self) -> u64 {
        self.inner.as_ref().map_or(0, |e| e.stats.total())
    }

    /// Spans this pipeline dropped for `reason`.
    pub fn spans_dropped_for(&self, reason: DropReason) -> u64 {
        self.inner.as_ref().map_or(0, |e| e.stats.get(reason))
    }

    /// Exports every finished span now; blocks until done (at most 5 s).
    pub fn flush(&self) -> Result<(), TracingError> {
        match &self.inner {
            Some(e) => e
                .provider
                .force_flush()
                .map_err(|err| TracingError::Export(err.to_string())),
            None => Ok(()),
        }
    }

    /// Flushes and stops export; blocks until done or the shutdown timeout.
    pub fn shutdown(mut self) -> Result<(), TracingError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), TracingError> {
        let Some(e) = self.inner.take() else {
            return Ok(());
        };
        let result = e.provider.shutdown_with_timeout(e.shutdown_timeout);
        let mut global = GLOBAL_PROVIDER.lock().unwrap_or_else(|p| p.into_inner());
        if global.as_ref().is_some_and(|g| Arc::ptr_eq(&g.1, &e.stats)) {
            *global = None;
        }
        drop(global);
        if let Some(rt) = e.runtime {
            // Never blocks, and is allowed inside an async context.
            rt.shutdown_background();
        }
        result.map_err(|err| TracingError::Export(err.to_string()))
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The provider [`init`] installed, for [`flush`]; the stats identify it.
#[allow(clippy::type_complexity)]
static GLOBAL_PROVIDER: Mutex<Option<(SdkTracerProvider, Arc<DropStats>)>> = Mutex::new(None);

fn env_filter(directive: &str, what: &str) -> Result<EnvFilter, TracingError> {
    EnvFilter::try_new(directive)
        .map_err(|e| TracingError::Filter(format!("{what} `{directive}`: {e}")))
}

/// Builds the subscriber without installing it: for tests and embedding
/// apps that scope it with [`tracing::dispatcher::set_default`] /
/// [`tracing::dispatcher::with_default`]. [`init`] installs it globally.
///
/// The gRPC exporter needs no runtime from the caller (it brings its own).
pub fn build(opts: TracingOptions) -> Result<(Dispatch, TelemetryGuard), TracingError> {
    let log_filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => env_filter(&v, "RUST_LOG")?,
        _ => env_filter(&opts.log_filter, "log level")?,
    };
    // The per-job spans (`taskmill::spans`) exist for tracing: the log layer
    // skips them, which keeps span creation off the hot path when nothing is
    // exported (their fields were formatted for every job). Log events keep
    // their own fields (job id, queue, kind), and JSON lines still carry the
    // trace and span ids from the OpenTelemetry context.
    let log_filter = log_filter.and(tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.is_span() && meta.target() == super::spans::TARGET)
    }));
    let writer = opts
        .writer
        .unwrap_or_else(|| BoxMakeWriter::new(std::io::stderr));
    let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = if opts.json {
        tracing_subscriber::fmt::layer()
            .event_format(JsonWithTraceIds)
            .fmt_fields(JsonFields::new())
            .with_writer(writer)
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(log_filter)
            .boxed()
    };
    let subscriber = Registry::default().with(fmt_layer);

    let Some(o) = opts.otlp else {
        return Ok((Dispatch::new(subscriber), TelemetryGuard { inner: None }));
    };
    let trace_filter = env_filter(&o.filter_directive(), "trace filter")?;
    let pipeline = otlp::build(&o)?;
    let tracer = pipeline.provider.tracer("taskmill");
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(trace_filter);
    let dispatch = Dispatch::new(subscriber.with(otel_layer));
    let guard = TelemetryGuard {
        inner: Some(Exporting {
            provider: pipeline.provider,
            stats: pipeline.stats,
            runtime: pipeline.runtime,
            shutdown_timeout: o.shutdown_timeout,
        }),
    };
    Ok((dispatch, guard))
}

/// Installs the global subscriber: the env filter and fmt layer (text, or
/// JSON lines with `trace_id`/`span_id`, on stderr) and, when `opts.otlp`
/// is set, the OpenTelemetry layer exporting over OTLP. Also routes `log`
/// records into `tracing`, and sets the OpenTelemetry global tracer provider
/// and W3C propagator for other instrumentation.
///
/// Keep the guard until the process ends: dropping it flushes and stops
/// export. Fails with [`TracingError::AlreadyInstalled`] when a global
/// subscriber exists already.
pub fn init(opts: TracingOptions) -> Result<TelemetryGuard, TracingError> {
    let (dispatch, guard) = build(opts)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| TracingError::AlreadyInstalled)?;
    // Another logger may own `log` already (an embedding app): not fatal.
    let _ = tracing_log::LogTracer::init();
    if let Some(e) = &guard.inner {
        opentelemetry::global::set_tracer_provider(e.provider.clone());
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        *GLOBAL_PROVIDER.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((e.provider.clone(), e.stats.clone()));
    }
    Ok(guard)
}

/// Exports every finished span of the pipeline [`init`] installed now, from
/// code that does not hold the guard (e.g. a CPU child before it exits).
/// Blocks until done (at most 5 s); a no-op without export.
pub fn flush() -> Result<(), TracingError> {
    let provider = GLOBAL_PROVIDER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|(p, _)| p.clone());
    match provider {
        Some(p) => p
            .force_flush()
            .map_err(|err| TracingError::Export(err.to_string())),
        None => Ok(()),
    }
}
