//! The supervisor and the consume loops.
//!
//! `supervise` runs sessions until shutdown. A session is one broker
//! connection: declare the topology, open the dead-letter publisher, run one
//! consume loop per queue. When the connection or a consumer fails, the
//! session ends, readiness turns false and a new session starts after a
//! backoff. On shutdown the consume loops cancel their consumers, in-flight
//! jobs get the grace period, and closing the channels returns every
//! unacknowledged delivery to its queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use taskmill_broker::{Broker, BrokerError, Consumer, Publisher, QueueSpec};
use taskmill_core::config::{Config, QueueSettings};
use taskmill_telemetry::{Metrics, Readiness};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::builder::JobObserver;
use crate::handler::IoHandler;
use crate::job;

/// State shared by every task of a worker.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) io: HashMap<String, IoHandler>,
    pub(crate) metrics: Metrics,
    pub(crate) readiness: Readiness,
    pub(crate) observer: Option<JobObserver>,
    pub(crate) worker_id: String,
}

/// What the tasks of one session share.
pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) publisher: Publisher,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    shared.readiness.set("broker", false);
    for q in &shared.config.queues {
        shared.readiness.set(&format!("consumer:{q}"), false);
    }
    let mut backoff = BACKOFF_START;
    let mut first = true;
    loop {
        if !first {
            shared.metrics.broker_reconnects_total.inc();
        }
        match run_session(&shared, &shutdown).await {
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
                    BACKOFF_START
                } else {
                    (backoff * 2).min(BACKOFF_MAX)
                };
                first = false;
            }
        }
    }
    shared.readiness.set("broker", false);
    tracing::info!("worker stopped");
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
) -> Result<(), SessionError> {
    let name = format!("taskmill worker {}", shared.worker_id);
    let broker = Broker::connect(&shared.config.amqp_url, &name)
        .await
        .map_err(SessionError::Start)?;
    for q in &shared.config.queues {
        let s = shared.config.queue_settings(q);
        broker
            .declare(&QueueSpec {
                name: q.clone(),
                queue_type: s.queue_type,
                delivery_limit: shared.config.delivery_limit,
            })
            .await
            .map_err(SessionError::Start)?;
    }
    let publisher = broker.publisher().await.map_err(SessionError::Start)?;
    shared.readiness.set("broker", true);
    tracing::info!("connected to the broker");

    let session = Arc::new(Session {
        shared: shared.clone(),
        publisher,
    });
    // Stops the consume loops on shutdown or when one of them fails.
    let stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    let mut loops = JoinSet::new();
    for q in &shared.config.queues {
        let settings = shared.config.queue_settings(q);
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
                stop.cancel();
            }
        }
    }
    tracker.close();
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
    }
    for c in &consumers {
        c.close().await;
    }
    broker.close().await;
    Ok(())
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
    let permits = Arc::new(Semaphore::new(settings.concurrency));
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            n = consumer.next() => n,
        };
        let incoming = match next {
            Some(Ok(i)) => i,
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
        tracker.spawn(async move {
            job::handle(&s, incoming).await;
            drop(permit);
        });
    }
    shared.readiness.set(&check, false);
    if let Err(e) = consumer.cancel().await {
        tracing::warn!(queue = %settings.name, error = %e, "basic.cancel failed");
    }
    Ok(consumer)
}
