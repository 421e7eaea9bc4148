//! The worker's `/metrics`, scraped over HTTP after real jobs (including a
//! dead-lettered one), passes `promtool check metrics`: valid exposition
//! format and Prometheus naming conventions (`_total`, base units, help).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use taskmill_client::{Client, NewJob};
use taskmill_worker::{JobError, WorkerBuilder};

const PROMTOOL: &str = "/usr/bin/promtool";

#[derive(Deserialize)]
struct Job {
    fail: bool,
}

/// `promtool` from `PATH`, else its Debian location.
fn promtool() -> String {
    let on_path = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        "promtool".to_string()
    } else {
        assert!(
            std::path::Path::new(PROMTOOL).exists(),
            "promtool is missing: install Debian's `prometheus` package \
             (`make promtool` does it: apt-get install -y --no-install-recommends prometheus)"
        );
        PROMTOOL.to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_pass_promtool() {
    let promtool = promtool();
    let queue = common::unique_queue("promtool");
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io("test.maybe_fail", |_ctx, p: Job| async move {
            if p.fail {
                Err(JobError::permanent("asked to fail"))
            } else {
                Ok(())
            }
        })
        .on_job_done(move |_| {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let client = Client::connect(&common::amqp_url()).await.unwrap();
    let jobs = [false, false, false, true];
    client
        .enqueue_many(jobs.iter().map(|fail| {
            NewJob::new("test.maybe_fail", &serde_json::json!({ "fail": fail }))
                .unwrap()
                .queue(&queue)
        }))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || done.load(Ordering::SeqCst)
            >= jobs.len())
        .await,
        "only {} of {} jobs finished",
        done.load(Ordering::SeqCst),
        jobs.len()
    );

    let (status, text) = common::http_get(handle.http_addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // The scrape covers what promtool should judge: jobs by outcome, a dead
    // letter, histograms, the span drop counter.
    for needle in [
        format!(
            "taskmill_jobs_total{{kind=\"test.maybe_fail\",outcome=\"ok\",queue=\"{queue}\"}} 3"
        ),
        "taskmill_dead_letters_total{".to_string(),
        "taskmill_job_run_seconds_bucket{".to_string(),
        "taskmill_trace_spans_dropped_total{".to_string(),
    ] {
        assert!(text.contains(&needle), "no `{needle}` in:\n{text}");
    }

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    shutdown.cancel();
    handle.wait().await.unwrap();
    common::cleanup(&client.broker().await.unwrap(), &queue).await;
    let _ = std::fs::remove_dir_all(common::data_dir(&queue));
}
