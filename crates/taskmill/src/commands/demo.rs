//! `taskmill demo`: a worker in-process, a mixed workload, a summary.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use taskmill_client::{Client, NewJob};
use taskmill_core::config::Config;
use taskmill_worker::{CancellationToken, JobReport, WorkerBuilder};

use taskmill_bench::stats::{ms, quantile};

/// Arguments of `taskmill demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of jobs: 1/10 `cpu.hash` (in CPU worker processes), the rest
    /// 2/3 `noop` and 1/3 `io.sleep` of 5 to 50 ms.
    #[arg(long, default_value_t = 3_000)]
    pub jobs: u64,
    /// Queue used by the demo (deleted afterwards).
    #[arg(long, default_value = "taskmill-demo")]
    pub queue: String,
}

/// Runs the demo and prints the summary.
pub async fn run(mut config: Config, args: DemoArgs) -> anyhow::Result<ExitCode> {
    config.queues = vec![args.queue.clone()];
    // CPU jobs go to their own queue, taken only as fast as the pool runs them.
    let cpu_queue = format!("{}-cpu", args.queue);
    config.cpu_queue = cpu_queue.clone();
    config.http_addr = "127.0.0.1:0".parse().expect("valid address");
    config.concurrency = 200;
    config.shutdown_grace_ms = 5_000;
    let reports: Arc<Mutex<Vec<JobReport>>> = Arc::default();
    let sink = reports.clone();
    let bar = ProgressBar::new(args.jobs);
    bar.set_style(
        ProgressStyle::with_template("{msg:10} {bar:40} {pos}/{len}  {per_sec}")
            .expect("valid template"),
    );
    bar.set_message("running");
    let progress = bar.clone();
    let worker = crate::kinds::register(WorkerBuilder::new(config.clone()), false)
        .on_job_done(move |r| {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(r.clone());
            progress.inc(1);
        })
        .build()?;
    let shutdown = CancellationToken::new();
    let handle = worker.start(shutdown.clone()).await?;
    eprintln!(
        "taskmill demo: worker up (metrics at http://{}/metrics), enqueueing {} jobs to queue {}",
        handle.http_addr, args.jobs, args.queue
    );
    let client = Client::connect(&config.amqp_url).await?;
    // Publishes are only routable once the worker has declared the queue.
    anyhow::ensure!(
        handle.wait_ready(Duration::from_secs(30)).await,
        "the worker did not become ready within 30 s (is the broker at {} reachable?)",
        taskmill_core::redact::redact_url(&config.amqp_url)
    );
    let start = Instant::now();
    let jobs = (0..args.jobs).map(|n| {
        if n % 10 == 9 {
            // ~1 ms of SHA-256 in a CPU worker process.
            return NewJob::raw("cpu.hash", b"{\"rounds\": 2000}".to_vec()).queue(&cpu_queue);
        }
        let job = if n % 3 == 2 {
            NewJob::raw(
                "io.sleep",
                format!("{{\"ms\": {}}}", 5 + (n * 7919) % 46).into_bytes(),
            )
        } else {
            NewJob::raw("noop", format!("{{\"n\": {n}}}").into_bytes())
        };
        job.queue(&args.queue)
    });
    client.enqueue_many(jobs).await?;
    let published = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120 + args.jobs / 100);
    while (reports.lock().unwrap_or_else(|e| e.into_inner()).len() as u64) < args.jobs {
        anyhow::ensure!(
            Instant::now() < deadline,
            "demo jobs did not finish in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    shutdown.cancel();
    handle.wait().await?;
    let broker = client.broker().await?;
    for q in [&args.queue, &cpu_queue] {
        let _ = broker.delete_queue(q).await;
        let _ = broker
            .delete_queue(&taskmill_core::wire::dead_queue_name(q))
            .await;
    }
    client.close().await;

    let reports = reports.lock().unwrap_or_else(|e| e.into_inner());
    print_summary(&reports, args.jobs, published, elapsed);
    Ok(ExitCode::SUCCESS)
}

fn print_summary(reports: &[JobReport], jobs: u64, published: Duration, elapsed: Duration) {
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, (Vec<Duration>, Vec<Duration>)> = BTreeMap::new();
    for r in reports {
        *outcomes.entry(r.outcome.as_str()).or_default() += 1;
        let e = by_kind.entry(r.kind.as_str()).or_default();
        if let Some(w) = r.queue_wait {
            e.0.push(w);
        }
        e.1.push(r.run_time);
    }
    println!("taskmill demo summary");
    println!(
        "  jobs: {jobs}   published in {:.2}s ({:.0} jobs/s, confirmed)   all done in {:.2}s ({:.0} jobs/s)",
        published.as_secs_f64(),
        jobs as f64 / published.as_secs_f64(),
        elapsed.as_secs_f64(),
        jobs as f64 / elapsed.as_secs_f64()
    );
    let outcomes: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  outcomes: {}", outcomes.join(" "));
    println!(
        "  {:<10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "kind", "jobs", "wait p50", "wait p95", "wait p99", "run p50", "run p95", "run p99"
    );
    for (kind, (mut wait, mut run)) in by_kind {
        wait.sort();
        run.sort();
        println!(
            "  {:<10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            kind,
            run.len(),
            ms(quantile(&wait, 0.5)),
            ms(quantile(&wait, 0.95)),
            ms(quantile(&wait, 0.99)),
            ms(quantile(&run, 0.5)),
            ms(quantile(&run, 0.95)),
            ms(quantile(&run, 0.99)),
        );
    }
    println!("  (times in ms; wait = enqueue to start, run = handler time)");
}
