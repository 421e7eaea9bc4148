//! Counting the spans the export pipeline drops.
//!
//! The SDK's [`BatchSpanProcessor`] never blocks the thread that ends a span:
//! `on_end` is a `try_send` into a bounded channel, and a full channel drops
//! the span. It counts those drops only privately (a log line at shutdown),
//! and an export that fails after its retries loses the whole batch without a
//! count at all. Two thin wrappers make both visible:
//!
//! - `CountingProcessor` wraps the batch processor. It keeps its own count
//!   of spans handed over but not yet given to the exporter and refuses (and
//!   counts) a span once that count reaches the queue size. Because the
//!   channel never holds more spans than that count, the inner processor never
//!   finds its channel full, so no drop goes uncounted.
//! - `CountingExporter` wraps the OTLP exporter. It lowers that count by the
//!   size of every batch it is given and counts a failed batch's spans.
//!
//! Both feed `taskmill_trace_spans_dropped_total{reason}` (process-wide, see
//! [`spans_dropped_total`]) and the per-pipeline [`DropStats`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor};
use prometheus::{IntCounterVec, Opts};

/// Why a span was dropped: the `reason` label of
/// `taskmill_trace_spans_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full (the collector is slow or away).
    QueueFull,
    /// The batch holding the span failed to export after its retries.
    ExportFailed,
    /// The span ended after the pipeline was shut down.
    Shutdown,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 3] = [
        DropReason::QueueFull,
        DropReason::ExportFailed,
        DropReason::Shutdown,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
            DropReason::Shutdown => "shutdown",
        }
    }
}

static SPANS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "taskmill_trace_spans_dropped_total",
            "Trace spans dropped instead of exported, by reason (queue_full, export_failed, shutdown).",
        ),
        &["reason"],
    )
    .expect("valid metric");
    for r in DropReason::ALL {
        c.with_label_values(&[r.as_str()]);
    }
    c
});

/// The process-wide `taskmill_trace_spans_dropped_total{reason}` counter.
/// Tracing is installed once per process, so the counter is one per process
/// too; [`crate::Metrics::new`] registers it in every registry it creates.
pub fn spans_dropped_total() -> &'static IntCounterVec {
    &SPANS_DROPPED
}

/// Drop counts of one pipeline (one [`super::TelemetryGuard`]).
#[derive(Debug, Default)]
pub struct DropStats {
    queue_full: AtomicU64,
    export_failed: AtomicU64,
    shutdown: AtomicU64,
}

impl DropStats {
    /// Spans dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.cell(reason).load(Ordering::Relaxed)
    }

    /// Spans dropped for any reason.
    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(*r)).sum()
    }

    fn cell(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::QueueFull => &self.queue_full,
            DropReason::ExportFailed => &self.export_failed,
            DropReason::Shutdown => &self.shutdown,
        }
    }

    fn add(&self, reason: DropReason, n: u64) {
        self.cell(reason).fetch_add(n, Ordering::Relaxed);
        SPANS_DROPPED
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }
}

/// State shared by the processor and exporter wrappers of one pipeline.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Spans handed to the batch processor and not yet given to the exporter.
    queued: AtomicUsize,
    max_queue: usize,
    shut_down: AtomicBool,
    pub(crate) stats: Arc<DropStats>,
    /// When the export side last warned, and the totals it warned about.
    warned: Mutex<Option<(Instant, u64)>>,
}

/// Warn at most this often about drops (they can be many per second).
const WARN_EVERY: Duration = Duration::from_secs(30);

impl Shared {
    pub(crate) fn new(max_queue: usize) -> Arc<Shared> {
        Arc::new(Shared {
            queued: AtomicUsize::new(0),
            max_queue,
            shut_down: AtomicBool::new(false),
            stats: Arc::new(DropStats::default()),
            warned: Mutex::new(None),
        })
    }

    /// Logs a warning when spans were dropped since the last one, at most
    /// every [`WARN_EVERY`]. Called on the export thread only: events from
    /// inside `on_end` would be lost anyway (the subscriber is busy there).
    fn maybe_warn(&self, export_error: Option<&str>) {
        let total = self.stats.total();
        let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let due = match *w {
            None => total > 0,
            Some((at, seen)) => total > seen && at.elapsed() >= WARN_EVERY,
        };
        if due {
            tracing::warn!(
                target: "taskmill_telemetry::traces",
                dropped_total = total,
                queue_full = self.stats.get(DropReason::QueueFull),
                export_failed = self.stats.get(DropReason::ExportFailed),
                error = export_error.unwrap_or(""),
                "trace spans are being dropped (collector slow or unreachable); jobs are not affected"
            );
            *w = Some((Instant::now(), total));
        }
    }
}

/// A [`SpanProcessor`] around the SDK's [`BatchSpanProcessor`] that counts
/// the spans it drops. `on_end` never blocks.
#[derive(Debug)]
pub(crate) struct CountingProcessor {
    inner: BatchSpanProcessor,
    shared: Arc<Shared>,
}

impl CountingProcessor {
    /// Wraps `inner`, whose exporter must be a [`CountingExporter`] over the
    /// same `shared` and whose queue size must be `shared.max_queue`.
    pub(crate) fn new(inner: BatchSpanProcessor, shared: Arc<Shared>) -> Self {
        CountingProcessor { inner, shared }
    }
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.shared.shut_down.load(Ordering::Relaxed) {
            self.shared.stats.add(DropReason::Shutdown, 1);
            return;
        }
        // Reserve a slot first, so concurrent callers cannot overshoot.
        let before = self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.shared.max_queue {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.shared.stats.add(DropReason::QueueFull, 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.shared.shut_down.store(true, Ordering::Relaxed);
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A [`SpanExporter`] that releases queue slots and counts failed batches.
#[derive(Debug)]
pub(crate) struct CountingExporter<E> {
    inner: E,
    shared: Arc<Shared>,
}

impl<E> CountingExporter<E> {
    pub(crate) fn new(inner: E, shared: Arc<Shared>) -> Self {
        CountingExporter { inner, shared }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        // These spans have left the processor's queue.
        self.shared.queued.fetch_sub(n, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.shared.maybe_warn(None),
            Err(e) => {
                self.shared.stats.add(DropReason::ExportFailed, n as u64);
                self.shared.maybe_warn(Some(&e.to_string()));
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
