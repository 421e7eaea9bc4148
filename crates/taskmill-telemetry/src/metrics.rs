//! The worker's `taskmill_*` metrics, registered in one registry (the CPU
//! pool's gauges and restart counter are added to it by `taskmill-worker`).
//!
//! Labels are bounded: queue, kind (kinds not registered are folded into
//! [`UNKNOWN_KIND`]), outcome, reason, class. Never a job id or key.
//! `docs/operations.md` explains each one.
//!
//! `taskmill_trace_spans_dropped_total{reason}` is process-wide (tracing is
//! installed once per process); every registry created here includes it.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `kind` label value of jobs whose kind has no registered handler.
pub const UNKNOWN_KIND: &str = "_unknown";

/// The metrics of one worker process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `taskmill_jobs_total{queue,kind,outcome}`.
    pub jobs_total: IntCounterVec,
    /// `taskmill_job_run_seconds{queue,kind}`.
    pub job_run_seconds: HistogramVec,
    /// `taskmill_job_queue_wait_seconds{queue,kind}`.
    pub job_queue_wait_seconds: HistogramVec,
    /// `taskmill_jobs_in_flight{queue,class}`.
    pub jobs_in_flight: IntGaugeVec,
    /// `taskmill_dead_letters_total{queue,reason}`.
    pub dead_letters_total: IntCounterVec,
    /// `taskmill_publish_confirm_seconds`.
    pub publish_confirm_seconds: Histogram,
    /// `taskmill_broker_reconnects_total`.
    pub broker_reconnects_total: IntCounter,
    /// `taskmill_ack_failures_total`: acks that could not be sent (channel
    /// gone); the broker redelivers those messages.
    pub ack_failures_total: IntCounter,
    /// `taskmill_store_errors_total{operation}`: store calls that failed
    /// (claim, complete, release, fail, heartbeat, park, sweep); each is handled (deferred,
    /// retried or left to the lease), never ignored.
    pub store_errors_total: IntCounterVec,
    /// `taskmill_leases_lost_total`: running jobs whose idempotency lease
    /// another worker took over (their completion is not recorded by this one).
    pub leases_lost_total: IntCounter,
}

/// The `operation` label values of `taskmill_store_errors_total`.
pub const STORE_OPERATIONS: &[&str] = &[
    "claim",
    "complete",
    "release",
    "fail",
    "heartbeat",
    "park",
    "sweep",
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish()
    }
}

/// Buckets for job run and wait times: 100 µs to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0,
];

impl Metrics {
    /// Creates and registers every metric. `version` labels `taskmill_build_info`.
    pub fn new(version: &str) -> Metrics {
        let registry = Registry::new();
        let jobs_total = IntCounterVec::new(
            Opts::new(
                "taskmill_jobs_total",
                "Jobs finished, by queue, kind and outcome.",
            ),
            &["queue", "kind", "outcome"],
        )
        .expect("valid metric");
        let job_run_seconds = HistogramVec::new(
            HistogramOpts::new("taskmill_job_run_seconds", "Time a job's handler ran.")
                .buckets(SECONDS_BUCKETS.to_vec()),
            &["queue", "kind"],
        )
        .expect("valid metric");
        let job_queue_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "taskmill_job_queue_wait_seconds",
                "Time from enqueue to the start of the job's handler.",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["queue", "kind"],
        )
        .expect("valid metric");
        let jobs_in_flight = IntGaugeVec::new(
            Opts::new(
                "taskmill_jobs_in_flight",
                "Jobs running now, by queue and class (io, cpu).",
            ),
            &["queue", "class"],
        )
        .expect("valid metric");
        let dead_letters_total = IntCounterVec::new(
            Opts::new(
                "taskmill_dead_letters_total",
                "Messages dead-lettered, by queue and reason.",
            ),
            &["queue", "reason"],
        )
        .expect("valid metric");
        let publish_confirm_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "taskmill_publish_confirm_seconds",
                "Time from publish to the broker's confirm, for messages the worker publishes.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        let broker_reconnects_total = IntCounter::new(
            "taskmill_broker_reconnects_total",
            "Times the worker re-established its broker connection after losing it.",
        )
        .expect("valid metric");
        let ack_failures_total = IntCounter::new(
            "taskmill_ack_failures_total",
            "Acks that could not be sent because the channel was gone; the broker redelivers those messages.",
        )
        .expect("valid metric");
        let store_errors_total = IntCounterVec::new(
            Opts::new(
                "taskmill_store_errors_total",
                "Idempotency store calls that failed, by operation.",
            ),
            &["operation"],
        )
        .expect("valid metric");
        for op in STORE_OPERATIONS {
            store_errors_total.with_label_values(&[op]);
        }
        let leases_lost_total = IntCounter::new(
            "taskmill_leases_lost_total",
            "Running jobs whose idempotency lease was taken over by another worker.",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "taskmill_build_info",
                "Always 1; the version label names the build.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[version]).set(1);
        for c in [
            Box::new(jobs_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(job_run_seconds.clone()),
            Box::new(job_queue_wait_seconds.clone()),
            Box::new(jobs_in_flight.clone()),
            Box::new(dead_letters_total.clone()),
            Box::new(publish_confirm_seconds.clone()),
            Box::new(broker_reconnects_total.clone()),
            Box::new(ack_failures_total.clone()),
            Box::new(store_errors_total.clone()),
            Box::new(leases_lost_total.clone()),
            Box::new(build_info),
            Box::new(crate::traces::spans_dropped_total().clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            jobs_total,
            job_run_seconds,
            job_queue_wait_seconds,
            jobs_in_flight,
            dead_letters_total,
            publish_confirm_seconds,
            broker_reconnects_total,
            ack_failures_total,
            store_errors_total,
            leases_lost_total,
        }
    }

    /// The registry, to add metrics of other crates (e.g. the CPU pool).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// A gauge that is incremented now and decremented when dropped, so an
/// early return or a panic cannot leave it high.
#[derive(Debug)]
pub struct InFlightGuard(IntGauge);

impl InFlightGuard {
    /// Increments `gauge` until the guard is dropped.
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        InFlightGuard(gauge)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_and_build_info() {
        let m = Metrics::new("1.2.3");
        m.jobs_total.with_label_values(&["q", "noop", "ok"]).inc();
        {
            let _g = InFlightGuard::new(m.jobs_in_flight.with_label_values(&["q", "io"]));
            assert_eq!(m.jobs_in_flight.with_label_values(&["q", "io"]).get(), 1);
        }
        assert_eq!(m.jobs_in_flight.with_label_values(&["q", "io"]).get(), 0);
        let text = m.render();
        assert!(
            text.contains("taskmill_jobs_total{kind=\"noop\",outcome=\"ok\",queue=\"q\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("taskmill_build_info{version=\"1.2.3\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("taskmill_trace_spans_dropped_total{reason=\"queue_full\"}"),
            "{text}"
        );
    }
}
