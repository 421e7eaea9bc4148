//! `taskmill dlq purge`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use taskmill_core::config::Config;

use super::QueueArg;

/// Arguments of `taskmill dlq purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    queue: QueueArg,
    /// Really delete them (without it the command refuses and changes nothing).
    #[arg(long)]
    yes: bool,
}

/// Deletes every ready dead letter of the queue and prints how many.
/// Messages held unacked by a running `dlq` command at that moment are not
/// ready, so they survive the purge.
pub async fn run(config: &Config, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let dead = args.queue.dead();
    let broker = super::connect(config).await?;
    // Opening a browser checks that the queue exists and counts it.
    let depth = match super::open_dead(&broker, &args.queue).await {
        Ok(b) => {
            let n = b.ready_at_open();
            b.requeue_all().await.map(|()| n).map_err(Into::into)
        }
        Err(e) => Err(e),
    };
    let result = match depth {
        Err(e) => Err(e),
        Ok(n) if !args.yes => Err(anyhow::anyhow!(
            "refusing to purge {n} dead letter(s) from `{dead}` without --yes; nothing was deleted"
        )),
        Ok(_) => broker
            .purge(&dead)
            .await
            .with_context(|| format!("purging `{dead}`"))
            .map(|n| println!("purged {n} dead letter(s) from {dead}")),
    };
    broker.close().await;
    result.map(|()| ExitCode::SUCCESS)
}
