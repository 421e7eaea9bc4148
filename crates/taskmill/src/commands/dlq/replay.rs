//! `taskmill dlq replay`: parses the arguments, runs
//! [`taskmill_broker::dlq::replay`] (which holds the durability rule) and
//! prints what it did.
//!
//! Each dead letter is published again to its work queue (exchange
//! `taskmill`, routing key `Q`, mandatory, confirmed) with `taskmill-attempt`
//! reset to 1 (a Celery task: `retries` 0, no `eta` or `expires`),
//! `taskmill-replay` set (a key recorded as failed may run again)
//! and the dead-letter headers removed; only once the broker confirmed that
//! copy is the dead letter acked (removed). An unroutable or refused publish
//! stops the replay with an error and leaves the dead letter where it was.
//! Dead letters looked at but not replayed are returned at the end.
//!
//! Replays are pipelined in batches of 100: publish a batch, then await
//! its confirms in order and ack exactly the confirmed ones (one
//! `basic.ack multiple` when nothing was skipped before them). Before the
//! channel closes, the browser waits half a second so a quorum queue applies
//! the last acks (`taskmill_broker::browse::ACK_GRACE`).
//!
//! `--all` is bounded by the number of dead letters ready when it starts, so
//! a job that dies again during the replay is not picked up a second time.
//!
//! Ctrl-C: the publishes in flight are settled (confirmed and acked, or left
//! in the DLQ), the rest is returned, and the command exits 130. A second
//! Ctrl-C exits at once; the broker returns whatever was held. A crash
//! between a confirmed publish and its ack leaves a duplicate (the job is in
//! the work queue and still in the DLQ): at-least-once, which the idempotency
//! key makes harmless.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{ArgGroup, Args};
use taskmill_broker::dlq::{Replay, replay};
use taskmill_core::config::Config;

use super::{DEFAULT_SCAN_LIMIT, QueueArg};

/// Arguments of `taskmill dlq replay`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "all"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    queue: QueueArg,
    /// Replay the dead letter with this job id (the first one found).
    #[arg(long)]
    id: Option<String>,
    /// Replay every dead letter present when the command starts.
    #[arg(long)]
    all: bool,
    /// Only replay dead letters of this kind (`taskmill-kind`).
    #[arg(long)]
    kind: Option<String>,
    /// Look at no more than N dead letters [default: 1000 with --id; with
    /// --all, every one present at the start].
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// Replays dead letters; see the module docs for the guarantees.
pub async fn run(config: &Config, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let broker = super::connect(config).await?;
    let publisher = broker.publisher().await?;
    let mut browser = super::open_dead(&broker, &args.queue).await?;
    let ready = browser.ready_at_open() as usize;
    let bound = match &args.id {
        Some(_) => args.limit.unwrap_or(DEFAULT_SCAN_LIMIT),
        None => args.limit.map_or(ready, |n| n.min(ready)),
    };
    let stop = interrupt_flag();
    let what = Replay {
        queue: args.queue.queue.clone(),
        id: args.id.clone(),
        kind: args.kind.clone(),
        bound,
    };
    let tally = replay(&mut browser, &publisher, &what, &stop).await;
    super::finish(browser, &broker).await;

    let dead = args.queue.dead();
    let queue = &args.queue.queue;
    if let Some(e) = tally.error {
        if tally.replayed > 0 {
            eprintln!(
                "replayed {} dead letter(s) from {dead} to {queue} before the error; the others stay in {dead}",
                tally.replayed
            );
        }
        return Err(e.into());
    }
    if let Some(id) = &args.id {
        if !tally.found {
            if tally.interrupted {
                eprintln!("interrupted; nothing was replayed");
                return Ok(ExitCode::from(130));
            }
            return Err(super::not_found(id, &args.queue, tally.looked, bound));
        }
        println!("replayed job {id} from {dead} to {queue} (attempt reset to 1, confirmed)");
        return Ok(ExitCode::SUCCESS);
    }
    let mut line = format!(
        "replayed {} dead letter(s) from {dead} to {queue}, each confirmed before removal",
        tally.replayed
    );
    if tally.skipped > 0 {
        line.push_str(&format!("; {} of other kinds left in place", tally.skipped));
    }
    println!("{line}");
    if tally.interrupted {
        eprintln!(
            "interrupted after {} dead letter(s); the rest stay in {dead}",
            tally.looked
        );
        return Ok(ExitCode::from(130));
    }
    if tally.looked >= bound && bound < ready {
        eprintln!(
            "stopped at --limit {bound}; {dead} still holds dead letters, run again to replay more"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Set on the first Ctrl-C; a second one exits at once (the broker returns
/// every held message when the connection drops, so that loses nothing).
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            f.store(true, Ordering::SeqCst);
            eprintln!(
                "interrupted: settling the replays in flight, then returning the rest (Ctrl-C again to quit now)"
            );
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    flag
}
