//! `taskmill dlq`: inspect, replay and purge the dead letters of a queue.
//!
//! A work queue `Q` dead-letters to `Q.dead`, either through a worker (the
//! original message plus `taskmill-dead-*` headers) or through the broker
//! itself when a quorum queue's `x-delivery-limit` is exceeded (RabbitMQ's
//! `x-death` header instead). Every subcommand takes `--queue Q` (default
//! `default`) and works on `Q.dead`.
//!
//! The rule these commands keep: **nothing leaves `Q.dead` before its
//! replacement is confirmed**. Reading goes through
//! [`taskmill_broker::browse::Browser`]: `basic.get` with manual acks, so every
//! message looked at stays unacked until it is acked (replayed) or returned.
//! The consequences, also in `docs/`:
//! - `list`, `show` and a replay that did not touch a message return it with
//!   `basic.nack requeue`. A classic queue puts it back at its head in order;
//!   a quorum queue (the default) does not keep the order, so `list` sorts by
//!   dead-letter time and a `--limit` smaller than the queue shows *some* N.
//! - Ctrl-C or a crash mid-scan: the broker returns every unacked message when
//!   the connection closes. Nothing is lost.
//! - A crash after a replay was confirmed but before its dead letter was acked
//!   leaves both: the job runs and its dead letter stays (or a later replay
//!   runs it again). At-least-once; the idempotency key makes that harmless.
//! - A scan holds what it looked at, so it is bounded (`--limit`).
//! - A replayed job carries `taskmill-replay`, so a worker lets it run even if
//!   its idempotency key is recorded as failed for good.
//!
//! Layout: [`entry`] (one dead letter summarised, whichever wrote it),
//! [`list`], [`show`], [`replay`], [`purge`].

pub mod entry;
pub mod list;
pub mod purge;
pub mod replay;
pub mod show;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use taskmill_broker::Broker;
use taskmill_broker::browse::Browser;
use taskmill_core::config::Config;
use taskmill_core::wire::dead_queue_name;

/// Default bound on how many dead letters one scan looks at.
pub const DEFAULT_SCAN_LIMIT: usize = 1_000;

/// Arguments of `taskmill dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// `taskmill dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (id, kind, reason, attempts, age) without removing any.
    List(list::ListArgs),
    /// Print one dead letter: properties, every header, and the body.
    Show(show::ShowArgs),
    /// Publish dead letters back to their work queue (attempt 1), each removed
    /// from the DLQ only once the broker confirmed its replacement.
    Replay(replay::ReplayArgs),
    /// Delete every dead letter of a queue (requires --yes).
    Purge(purge::PurgeArgs),
}

/// The work queue whose dead letters a command uses.
#[derive(Debug, Args, Clone)]
pub struct QueueArg {
    /// Work queue `Q`; its dead letters are in `Q.dead`.
    #[arg(long, default_value = taskmill_core::wire::DEFAULT_QUEUE)]
    pub queue: String,
}

impl QueueArg {
    /// `Q.dead`.
    pub fn dead(&self) -> String {
        dead_queue_name(&self.queue)
    }
}

/// Runs a dead-letter command.
pub async fn run(config: Config, args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DlqCommand::List(a) => list::run(&config, a).await,
        DlqCommand::Show(a) => show::run(&config, a).await,
        DlqCommand::Replay(a) => replay::run(&config, a).await,
        DlqCommand::Purge(a) => purge::run(&config, a).await,
    }
}

/// Connects to the broker the configuration names.
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Broker> {
    Ok(Broker::connect(&config.amqp_url, "taskmill dlq").await?)
}

/// Opens a browser on `Q.dead`, with an error that says what is missing.
pub(crate) async fn open_dead(broker: &Broker, queue: &QueueArg) -> anyhow::Result<Browser> {
    let dead = queue.dead();
    broker.browse(&dead).await.with_context(|| {
        format!(
            "cannot read dead-letter queue `{dead}` (a worker serving queue `{}` declares it)",
            queue.queue
        )
    })
}

/// The error for an id that a scan did not find.
pub(crate) fn not_found(id: &str, queue: &QueueArg, looked: usize, limit: usize) -> anyhow::Error {
    let dead = queue.dead();
    if looked >= limit {
        anyhow::anyhow!(
            "no dead letter with id `{id}` among the first {looked} in `{dead}` (raise --limit to look further); nothing was changed"
        )
    } else {
        anyhow::anyhow!(
            "no dead letter with id `{id}` in `{dead}` ({looked} looked at); nothing was changed"
        )
    }
}

/// Returns what `browser` still holds and closes the connection. A failed
/// return is only a warning: closing the connection makes the broker return
/// every unacked message anyway.
pub(crate) async fn finish(browser: Browser, broker: &Broker) {
    let held = browser.held();
    if let Err(e) = browser.requeue_all().await {
        eprintln!(
            "warning: returning {held} dead letter(s) explicitly failed ({e}); the broker returns them as the connection closes"
        );
    }
    broker.close().await;
}

/// Writing to stdout, where a reader that went away (`| head`) means it has
/// seen enough: not an error.
pub(crate) fn stdout_result(r: std::io::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
