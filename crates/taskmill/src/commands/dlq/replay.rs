//! `taskmill dlq replay`.
//!
//! Each dead letter is published again to its work queue (exchange
//! `taskmill`, routing key `Q`, mandatory, confirmed) with `taskmill-attempt`
//! reset to 1, `taskmill-replay` set (a key recorded as failed may run again)
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
use taskmill_broker::browse::{Browsed, Browser};
use taskmill_broker::{PendingConfirm, Publisher};
use taskmill_core::config::Config;
use taskmill_core::wire::H_KIND;

use super::{DEFAULT_SCAN_LIMIT, QueueArg};

/// Replays published before their confirms are awaited.
const BATCH: usize = 100;

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

/// What a replay did.
#[derive(Debug, Default)]
struct Tally {
    looked: usize,
    replayed: usize,
    skipped: usize,
    found: bool,
    interrupted: bool,
    error: Option<anyhow::Error>,
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
    let tally = replay(&mut browser, &publisher, &args, bound, &stop).await;
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
        return Err(e);
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

fn wanted(msg: &Browsed, args: &ReplayArgs) -> bool {
    if let Some(id) = &args.id
        && msg.message_id() != Some(id.as_str())
    {
        return false;
    }
    match &args.kind {
        Some(k) => msg.header_str(H_KIND).as_deref() == Some(k.as_str()),
        None => true,
    }
}

async fn replay(
    browser: &mut Browser,
    publisher: &Publisher,
    args: &ReplayArgs,
    bound: usize,
    stop: &AtomicBool,
) -> Tally {
    let queue = args.queue.queue.as_str();
    let mut t = Tally::default();
    loop {
        // Take up to BATCH wanted messages and publish their replacements.
        let mut batch: Vec<(Browsed, PendingConfirm)> = Vec::new();
        let mut exhausted = false;
        while batch.len() < BATCH && t.error.is_none() {
            if stop.load(Ordering::SeqCst) {
                t.interrupted = true;
                break;
            }
            if t.looked >= bound || t.found {
                exhausted = true;
                break;
            }
            let msg = match browser.next().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    exhausted = true;
                    break;
                }
                Err(e) => {
                    t.error = Some(anyhow::Error::new(e).context("reading the dead-letter queue"));
                    break;
                }
            };
            t.looked += 1;
            if !wanted(&msg, args) {
                // Held until requeue_all returns it, in order.
                t.skipped += 1;
                continue;
            }
            if args.id.is_some() {
                t.found = true;
            }
            match publisher.send(&msg.replay_to(queue)).await {
                Ok(pending) => batch.push((msg, pending)),
                Err(e) => t.error = Some(publish_error(e, &msg, queue)),
            }
        }
        // Settle the batch: ack exactly the dead letters whose replacement
        // the broker confirmed; the others stay held and are returned.
        let mut confirmed = Vec::with_capacity(batch.len());
        for (msg, pending) in batch {
            match pending.wait().await {
                Ok(()) => confirmed.push(msg),
                Err(e) => {
                    let err = publish_error(e, &msg, queue);
                    t.error.get_or_insert(err);
                }
            }
        }
        let n = confirmed.len();
        match browser.ack_many(confirmed).await {
            Ok(()) => t.replayed += n,
            Err(e) => {
                t.error = Some(anyhow::Error::new(e).context(format!(
                    "{n} job(s) were replayed to {queue} but their dead letters could not be removed; they stay in the DLQ (replaying them again runs them twice unless they have an idempotency key)"
                )));
            }
        }
        if exhausted || t.interrupted || t.error.is_some() {
            return t;
        }
    }
}

fn publish_error(e: taskmill_broker::PublishError, msg: &Browsed, queue: &str) -> anyhow::Error {
    anyhow::Error::new(e).context(format!(
        "replaying job {} to queue `{queue}` failed; its dead letter stays in the DLQ",
        msg.message_id().unwrap_or("(no id)")
    ))
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
