//! The supervisor and the consume loops.
//!
//! `supervise` runs sessions until shutdown. A session is one broker
//! connection: declare the topology, open the dead-letter publisher, run one
//! consume loop per queue. When the connection or a consumer fails, the
//! session ends, readiness turns false and a new session starts after a
//! backoff. On shutdown the consume loops cancel their consumers, in-flight
//! jobs get the grace period, and closing the channels returns every
//! unacknowledged delivery to its queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use taskmill_broker::{Broker, BrokerError, ConnectOptions, Consumer, QueueSpec};
use taskmill_core::config::QueueSettings;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::job;
use crate::shared::{Session, Shared, Ticks};
use taskmill_store::{IdempotencyStore, Store};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Registers every readiness check, failing.
pub(crate) fn register_checks(shared: &Shared) {
    shared.readiness.set("broker", false);
    shared.readiness.set("store", false);
    for q in &shared.config.queues {
        shared.readiness.set(&format!("consumer:{q}"), false);
    }
}

pub(crate) async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    if !connect_store(&shared, &shutdown).await {
        return;
    }
    let purge = tokio::spawn(purge_expired_keys(shared.clone(), shutdown.clone()));
    // The heartbeat runs until the drain is over: jobs still running during
    // the grace period keep their leases.
    let beats = CancellationToken::new();
    let heartbeat = tokio::spawn(crate::leases::heartbeat_loop(shared.clone(), beats.clone()));
    let mut backoff = BACKOFF_START;
    // Set once a session that was up is lost: the next session to come up
    // counts as one reconnection, however many attempts it takes.
    let mut lost = false;
    loop {
        match run_session(&shared, &shutdown, &mut lost).await {
            Ok(()) => break,
            Err(e) => {
                shared.readiness.set("broker", false);
                shared.readiness.set_prefix("consumer:", false);
                if shutdown.is_cancelled() {
                    break;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "broker session ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                // Reset the backoff only after a session that got going.
                backoff = if matches!(e, SessionError::Lost(_)) {
                    lost = true;
                    BACKOFF_START
                } else {
                    (backoff * 2).min(BACKOFF_MAX)
                };
            }
        }
    }
    shared.readiness.set("broker", false);
    purge.abort();
    beats.cancel();
    let _ = heartbeat.await;
    if let Some(store) = shared.store.get()
        && let Err(e) = store.deregister_worker(&shared.worker_id).await
    {
        tracing::warn!(error = %e, "cannot deregister the worker; its registry entry ages out");
    }
    if let Some(pool) = shared.cpu.get() {
        pool.shutdown(Duration::ZERO).await;
    }
    if let Some(store) = shared.store.get() {
        store.close().await;
    }
    tracing::info!("worker stopped");
}

/// Connects the store, retrying with backoff until it answers or shutdown.
async fn connect_store(shared: &Arc<Shared>, shutdown: &CancellationToken) -> bool {
    let url = shared.config.store_url();
    if url.starts_with("sqlite://")
        && let Err(e) = std::fs::create_dir_all(&shared.config.data_dir)
    {
        tracing::warn!(dir = %shared.config.data_dir.display(), error = %e, "cannot create the data dir");
    }
    let mut backoff = BACKOFF_START;
    loop {
        match Store::connect(&url).await {
            Ok(store) => {
                let _ = shared.store.set(store);
                shared.readiness.set("store", true);
                tracing::info!(store = %taskmill_core::redact::redact_url(&url), "store connected");
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot open the store");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Forgets finished idempotency keys older than the retention, hourly, and
/// keeps the store's readiness check current.
async fn purge_expired_keys(shared: Arc<Shared>, shutdown: CancellationToken) {
    let retention = Duration::from_secs(shared.config.store_retention_hours.saturating_mul(3600));
    let mut ticks = Ticks::new(Duration::from_secs(15), shutdown);
    let mut last_purge: Option<tokio::time::Instant> = None;
    while ticks.next().await {
        let Some(store) = shared.store.get() else {
            continue;
        };
        let ok = store.ping().await.is_ok();
        shared.readiness.set("store", ok);
        if let Some(pool) = shared.cpu.get() {
            shared
                .readiness
                .set("cpu_pool", pool.live() > 0 || pool.is_closed());
        }
        if ok && last_purge.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            last_purge = Some(tokio::time::Instant::now());
            match store.purge_older_than(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(keys = n, "forgot idempotency keys past retention"),
                Err(e) => tracing::warn!(error = %e, "idempotency key purge failed"),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot start: {0}")]
    Start(BrokerError),
    #[error("connection lost: {0}")]
    Lost(BrokerError),
}

async fn run_session(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    lost: &mut bool,
) -> Result<(), SessionError> {
    let name = format!("taskmill worker {}", shared.worker_id);
    // Raced against shutdown: a broker that never answers must not hold
    // up SIGTERM.
    let options = connect_options();
    let broker = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        b = Broker::connect_with(&shared.config.amqp_url, &name, &options) => b.map_err(SessionError::Start)?,
    };
    tracing::info!(broker = %broker.info().version_text, "broker version");
    // The delay ladder first: work queues bind to its delivery exchange.
    broker.declare_delays().await.map_err(SessionError::Start)?;
    for q in &shared.config.queues {
        let s = shared.config.queue_settings(q);
        let spec = QueueSpec {
            name: q.clone(),
            queue_type: s.queue_type,
            delivery_limit: shared.config.delivery_limit,
        };
        // A Celery queue is declared the way Celery declares it.
        let declared = if shared.config.is_celery_queue(q) {
            broker.declare_celery(&spec).await
        } else {
            broker.declare(&spec).await
        };
        declared.map_err(SessionError::Start)?;
    }
    let publisher = broker.publisher().await.map_err(SessionError::Start)?;
    shared.readiness.set("broker", true);
    if std::mem::take(lost) {
        shared.metrics.broker_reconnects_total.inc();
    }
    tracing::info!("connected to the broker");

    // Stops the consume loops on shutdown or when the session fails.
    let stop = shutdown.child_token();
    let session = Arc::new(Session {
        shared: shared.clone(),
        publisher,
        server: taskmill_telemetry::traces::spans::Server::from_url(&shared.config.amqp_url),
        stop: stop.clone(),
        fault: std::sync::Mutex::new(None),
    });
    // A broker that blocks our publishing connection (a memory or disk
    // alarm) makes the worker not ready, with the broker's reason, until it
    // unblocks; consumers and acks go on on their own connection.
    tokio::spawn(watch_flow(broker.blocked(), shared.clone(), stop.clone()));
    tokio::spawn(crate::sweep::sweep_orphans(session.clone(), stop.clone()));
    let tracker = TaskTracker::new();
    let mut loops = JoinSet::new();
    for q in &shared.config.queues {
        let mut settings = shared.config.queue_settings(q);
        if let (Some(pool), true) = (shared.cpu.get(), *q == shared.config.cpu_queue) {
            // CPU work is taken from the broker only as fast as the pool
            // can run it: one job per process running, and one more per
            // process waiting in the prefetch window, so a process that
            // finishes starts its next job at once instead of idling for an
            // ack-and-deliver round trip to the broker. No pile of CPU jobs
            // in memory beyond that.
            let own = shared.config.queue.get(q).cloned().unwrap_or_default();
            let size = pool.size();
            settings.concurrency = own.concurrency.unwrap_or(size);
            settings.prefetch = own.prefetch.unwrap_or(
                u16::try_from(settings.concurrency.saturating_mul(2)).unwrap_or(u16::MAX),
            );
        }
        loops.spawn(consume_loop(
            session.clone(),
            broker.clone(),
            settings,
            stop.clone(),
            tracker.clone(),
        ));
    }

    let mut consumers: Vec<Consumer> = Vec::new();
    let mut failure: Option<BrokerError> = None;
    while let Some(res) = loops.join_next().await {
        match res {
            Ok(Ok(c)) => consumers.push(c),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                stop.cancel();
            }
            Err(join) => {
                tracing::error!(error = %join, "consume loop panicked");
                failure.get_or_insert(BrokerError::Closed(format!(
                    "consume loop panicked: {join}"
                )));
                stop.cancel();
            }
        }
    }
    tracker.close();
    if let Some(why) = session.take_fault() {
        failure.get_or_insert(BrokerError::Closed(why));
    }
    if let Some(e) = failure.filter(|_| !shutdown.is_cancelled()) {
        // The jobs still running finish on their own; their acks fail
        // harmlessly and the broker redelivers those messages.
        broker.close().await;
        return Err(SessionError::Lost(e));
    }

    let grace = Duration::from_millis(shared.config.shutdown_grace_ms);
    let in_flight = tracker.len();
    tracing::info!(in_flight, grace = ?grace, "draining in-flight jobs");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            still_running = tracker.len(),
            "grace period over; unfinished jobs return to the broker unacked"
        );
        if let Some(pool) = shared.cpu.get() {
            // Kill the CPU children: their jobs end as interrupted and stay unacked.
            pool.shutdown(Duration::ZERO).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
    }
    for c in &consumers {
        c.close().await;
    }
    broker.close().await;
    Ok(())
}

/// How the worker connects: publishing on a connection of its own, as
/// RabbitMQ advises, so a blocked publisher never stalls the acks.
fn connect_options() -> ConnectOptions {
    ConnectOptions {
        separate_publish_connection: true,
        ..ConnectOptions::default()
    }
}

/// Mirrors the broker's `connection.blocked` into the `broker_flow`
/// readiness check until the session ends.
async fn watch_flow(
    mut blocked: tokio::sync::watch::Receiver<Option<String>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let reason = blocked.borrow_and_update().clone();
        if let Some(r) = &reason {
            tracing::warn!(reason = %r, "the broker blocked publishing; not ready until it unblocks");
        }
        shared.readiness.fail_because(
            "broker_flow",
            reason.map(|r| format!("broker blocked publishing: {r}")),
        );
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = blocked.changed() => if changed.is_err() { break },
        }
    }
    shared.readiness.set("broker_flow", true);
}

/// Consumes `settings.name` until `stop`; returns the consumer so its channel
/// stays open for the acks of jobs still running.
async fn consume_loop(
    session: Arc<Session>,
    broker: Broker,
    settings: QueueSettings,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> Result<Consumer, BrokerError> {
    let shared = &session.shared;
    let tag = format!("{}/{}", shared.worker_id, settings.name);
    let mut consumer = broker
        .consume(&settings.name, settings.prefetch, &tag)
        .await?;
    let check = format!("consumer:{}", settings.name);
    shared.readiness.set(&check, true);
    tracing::info!(queue = %settings.name, prefetch = settings.prefetch, concurrency = settings.concurrency, "consuming");
    let permits = shared.permits(&settings.name, settings.concurrency);
    let last = crate::watchdog::LastDelivery::new();
    if shared.config.consume_watchdog_ms > 0 {
        tokio::spawn(crate::watchdog::watch(
            broker.clone(),
            crate::watchdog::Watched {
                queue: settings.name.clone(),
                concurrency: settings.concurrency,
                permits: permits.clone(),
                last: last.clone(),
            },
            Duration::from_millis(shared.config.consume_watchdog_ms),
            shared.readiness.clone(),
            stop.clone(),
        ));
    }
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            n = consumer.next() => n,
        };
        let incoming = match next {
            Some(Ok(i)) => {
                last.touch();
                i
            }
            Some(Err(e)) => {
                shared.readiness.set(&check, false);
                return Err(e);
            }
            None => {
                shared.readiness.set(&check, false);
                return Err(BrokerError::Closed(format!(
                    "the consumer of {} was closed by the broker",
                    settings.name
                )));
            }
        };
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Not started: give it back for another worker.
                let _ = incoming.requeue().await;
                break;
            }
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let s = session.clone();
        shared.leases.in_flight.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(async move {
            job::handle(&s, incoming).await;
            s.shared.leases.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    shared.readiness.set(&check, false);
    if let Err(e) = consumer.cancel().await {
        tracing::warn!(queue = %settings.name, error = %e, "basic.cancel failed");
    }
    Ok(consumer)
}
