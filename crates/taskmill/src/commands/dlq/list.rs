//! `taskmill dlq list`.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use taskmill_core::config::Config;

use super::entry::{Entry, format_age, now_ms};
use super::{DEFAULT_SCAN_LIMIT, QueueArg};

/// Arguments of `taskmill dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    queue: QueueArg,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Look at no more than N dead letters (they are held unacked during the
    /// scan, then returned).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SCAN_LIMIT)]
    limit: usize,
}

/// Lists up to `--limit` dead letters, sorted by the time they were
/// dead-lettered (then by id), since a quorum queue does not keep its order
/// across scans; removes nothing.
pub async fn run(config: &Config, args: ListArgs) -> anyhow::Result<ExitCode> {
    let broker = super::connect(config).await?;
    let mut browser = super::open_dead(&broker, &args.queue).await?;
    let ready = browser.ready_at_open();
    let mut entries = Vec::new();
    let scan = async {
        while entries.len() < args.limit {
            match browser.next().await? {
                // The message stays held until requeue_all below.
                Some(msg) => entries.push(Entry::of(&msg)),
                None => break,
            }
        }
        anyhow::Ok(())
    }
    .await;
    super::finish(browser, &broker).await;
    scan?;
    entries.sort_by_cached_key(|e| (e.dead_at_ms.unwrap_or(u64::MAX), e.id.clone()));

    let now = now_ms();
    let written = (|| {
        let mut out = std::io::stdout().lock();
        if args.json {
            for e in &entries {
                writeln!(out, "{}", e.to_json(now))?;
            }
        } else {
            write_table(&mut out, &entries, now)?;
        }
        out.flush()
    })();
    super::stdout_result(written)?;
    let dead = args.queue.dead();
    if entries.len() >= args.limit && (ready as usize) > entries.len() {
        eprintln!(
            "showing {} of about {ready} dead letters in {dead} (the first the queue handed out); raise --limit to see more",
            entries.len()
        );
    } else if !args.json {
        eprintln!("{} dead letter(s) in {dead}", entries.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_table(out: &mut impl Write, entries: &[Entry], now: u64) -> std::io::Result<()> {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            [
                e.id.clone().unwrap_or_else(|| "-".into()),
                e.kind.clone().unwrap_or_else(|| "-".into()),
                e.reason.clone(),
                e.attempts.to_string(),
                e.age(now).map_or_else(|| "-".into(), format_age),
            ]
        })
        .collect();
    let header = ["ID", "KIND", "REASON", "ATTEMPTS", "AGE"];
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 5]| {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        )
    };
    line(out, header)?;
    for r in &rows {
        line(out, [&r[0], &r[1], &r[2], &r[3], &r[4]])?;
    }
    Ok(())
}
