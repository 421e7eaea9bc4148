//! The consumption watchdog: readiness turns false when a queue has ready
//! messages, none of its jobs is running, and nothing was delivered for the
//! configured time — the "worker silently stopped consuming" failure (a
//! consumer the broker stopped feeding, a wedged channel) that a plain
//! connection check never sees. Kubernetes then stops routing to the pod and
//! an operator (or a liveness policy) can restart it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use taskmill_broker::Broker;
use taskmill_telemetry::Readiness;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How often the watchdog looks at its queue.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// When the last delivery of a queue arrived, as ms since `base`.
#[derive(Debug, Clone)]
pub(crate) struct LastDelivery {
    base: Instant,
    ms: Arc<AtomicU64>,
}

impl LastDelivery {
    pub(crate) fn new() -> Self {
        LastDelivery {
            base: Instant::now(),
            ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes a delivery now.
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.ms.load(Ordering::Relaxed)))
    }
}

/// Whether a queue looks stalled: work is waiting, nothing of it runs, and
/// nothing arrived for `limit`.
pub(crate) fn stalled(ready: u32, running: usize, idle: Duration, limit: Duration) -> bool {
    ready > 0 && running == 0 && idle >= limit
}

/// What the watchdog of one queue looks at.
pub(crate) struct Watched {
    /// Queue name.
    pub(crate) queue: String,
    /// Its concurrency.
    pub(crate) concurrency: usize,
    /// Its concurrency semaphore (running = concurrency − available).
    pub(crate) permits: Arc<Semaphore>,
    /// Its last delivery.
    pub(crate) last: LastDelivery,
}

/// Watches a queue until `stop`, reporting through `readiness`.
pub(crate) async fn watch(
    broker: Broker,
    w: Watched,
    limit: Duration,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let Watched {
        queue,
        concurrency,
        permits,
        last,
    } = w;
    let check = format!("watchdog:{queue}");
    readiness.set(&check, true);
    let mut was_stalled = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(CHECK_EVERY.min(limit)) => {}
        }
        let Ok(ready) = broker.queue_depth(&queue).await else {
            // The session is ending; the broker check reports that.
            continue;
        };
        let running = concurrency.saturating_sub(permits.available_permits());
        let now_stalled = stalled(ready, running, last.idle(), limit);
        if now_stalled && !was_stalled {
            tracing::error!(queue = %queue, ready, idle = ?last.idle(), "queue has ready messages but nothing was consumed; reporting not ready");
        } else if was_stalled && !now_stalled {
            tracing::info!(queue = %queue, "consumption resumed");
        }
        was_stalled = now_stalled;
        readiness.set(&check, !now_stalled);
    }
    // The next session registers the check again.
    readiness.set(&check, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_needs_waiting_work_no_running_job_and_idle_time() {
        let limit = Duration::from_secs(60);
        assert!(stalled(5, 0, Duration::from_secs(61), limit));
        assert!(
            !stalled(0, 0, Duration::from_secs(600), limit),
            "empty queue is idle, not stalled"
        );
        assert!(
            !stalled(5, 3, Duration::from_secs(600), limit),
            "long jobs running is busy, not stalled"
        );
        assert!(
            !stalled(5, 0, Duration::from_secs(10), limit),
            "recent delivery"
        );
    }

    #[test]
    fn last_delivery_tracks_idle_time() {
        let l = LastDelivery::new();
        std::thread::sleep(Duration::from_millis(20));
        assert!(l.idle() >= Duration::from_millis(20));
        l.touch();
        assert!(l.idle() < Duration::from_millis(20));
    }
}
