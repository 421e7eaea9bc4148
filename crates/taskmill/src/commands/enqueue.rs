//! `taskmill enqueue`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use taskmill_client::{Client, NewJob};
use taskmill_core::config::Config;

/// Arguments of `taskmill enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Job kind (the handler's registered name).
    pub kind: String,
    /// JSON payload. With --count, the placeholder `{ n }` written without
    /// spaces is replaced by the 0-based index.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the JSON payload from a file.
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Target queue.
    #[arg(long, default_value = taskmill_core::wire::DEFAULT_QUEUE)]
    pub queue: String,
    /// Idempotency key; with --count, the same placeholder is replaced by the index.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Publish N jobs (pipelined confirms, progress bar, final rate).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Make the jobs ready only after this delay (e.g. `30s`, `5m`; precision
    /// 100 ms). The queue must exist (a worker serving it declares it).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "at")]
    pub delay: Option<Duration>,
    /// Make the jobs ready at this time (RFC 3339, e.g. `2026-11-26T18:00:00Z`).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub at: Option<std::time::SystemTime>,
    /// Per-job hard timeout (e.g. `30s`); can only lower the kind's timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Do not print job ids.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print each job id as a JSON object on its own line: `{"job_id": ...,
    /// "queue": ...}`.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
}

/// One printed id: the plain id, or its JSON line with `--json`.
fn id_line(args: &EnqueueArgs, id: &str) -> String {
    if args.json {
        serde_json::json!({ "job_id": id, "queue": args.queue }).to_string()
    } else {
        id.to_string()
    }
}

const BATCH: u64 = 5_000;

/// Publishes the jobs; exits non-zero with a clear message when the broker is
/// unreachable or refuses a job.
pub async fn run(config: Config, args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let template = match (&args.payload, &args.payload_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading payload file {}", f.display()))?,
        (None, None) => "{}".to_string(),
    };
    let client = Client::connect(&config.amqp_url)
        .await?
        .with_max_payload_bytes(config.max_payload_bytes);
    let templated = args.count > 1;
    let make = |n: u64| {
        let fill = |s: &str| {
            if templated {
                s.replace("{n}", &n.to_string())
            } else {
                s.to_string()
            }
        };
        let mut job = NewJob::raw(&args.kind, fill(&template).into_bytes()).queue(&args.queue);
        if let Some(k) = &args.idempotency_key {
            job = job.idempotency_key(&fill(k));
        }
        if let Some(t) = args.timeout {
            job = job.timeout(t);
        }
        if let Some(d) = args.delay {
            job = job.delay(d);
        }
        if let Some(at) = args.at {
            job = job.at(at);
        }
        job
    };
    if args.count <= 1 {
        let id = client.enqueue(make(0)).await?;
        if !args.quiet {
            println!("{}", id_line(&args, &id));
        }
        client.close().await;
        return Ok(ExitCode::SUCCESS);
    }
    let bar = ProgressBar::new(args.count);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} jobs  {per_sec}  eta {eta}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut done = 0u64;
    while done < args.count {
        let n = BATCH.min(args.count - done);
        let ids = client
            .enqueue_many((done..done + n).map(make))
            .await
            .with_context(|| format!("after {done} confirmed jobs"))?;
        if !args.quiet {
            bar.suspend(|| {
                for id in &ids {
                    println!("{}", id_line(&args, id));
                }
            });
        }
        done += n;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "enqueued {done} jobs to queue {} in {secs:.2}s: {:.0} jobs/s (all confirmed)",
        args.queue,
        done as f64 / secs
    );
    client.close().await;
    Ok(ExitCode::SUCCESS)
}
