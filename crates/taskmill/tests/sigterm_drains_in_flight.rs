//! SIGTERM to a real `taskmill worker` process: the job in flight finishes
//! and is acked, the prefetched jobs not started go back to the queue, the
//! process exits 0, and the next worker runs what is left. Nothing is lost.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use taskmill_client::{Client, NewJob};
use taskmill_worker::{CancellationToken, WorkerBuilder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_returns_the_rest() {
    let queue = common::unique_queue("sigterm");
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args([
            "worker",
            "--queue",
            &queue,
            "--concurrency",
            "1",
            "--prefetch",
            "3",
        ])
        .args([
            "--http-addr",
            &addr.to_string(),
            "--shutdown-grace-ms",
            "10000",
        ])
        .env("TASKMILL_AMQP_URL", common::amqp_url())
        .env("TASKMILL_DATA_DIR", common::data_dir(&queue))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn taskmill worker");

    // Ready means the queue is declared and consumed.
    assert!(
        taskmill_testkit::http::wait_ready(addr, Duration::from_secs(30)).await,
        "worker process never became ready"
    );
    let client = Client::connect(&common::amqp_url()).await.unwrap();
    for _ in 0..3 {
        client
            .enqueue(NewJob::raw("io.sleep", br#"{"ms": 1500}"#.to_vec()).queue(&queue))
            .await
            .unwrap();
    }
    // Wait until exactly one job runs (concurrency 1; the other two are
    // prefetched and waiting).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = common::http_get(addr, "/metrics").await.unwrap();
        let running = common::metric_value(
            &m,
            &format!("taskmill_jobs_in_flight{{class=\"io\",queue=\"{queue}\"}}"),
        );
        if running == Some(1.0) {
            break;
        }
        assert!(Instant::now() < until, "no job started:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Instant::now();
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("worker did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(5), "drain took {took:?}");

    // The in-flight job was acked; the two not started are back.
    // The broker re-queues a closed channel's unacked messages asynchronously.
    let b = &client.broker().await.unwrap();
    let mut depth = 0;
    for _ in 0..100 {
        depth = b.queue_depth(&queue).await.unwrap();
        if depth == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth, 2, "in-flight acked, two returned");
    assert_eq!(b.queue_depth(&format!("{queue}.dead")).await.unwrap(), 0);

    // The next worker finishes them.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = done.clone();
    let worker = taskmill::kinds::register(WorkerBuilder::new(common::config(&queue)), false)
        .cpu_program(env!("CARGO_BIN_EXE_taskmill"))
        .on_job_done(move |r| {
            assert_eq!(r.outcome, taskmill_core::Outcome::Ok);
            d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let handle = worker.start(shutdown.clone()).await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(20), || done
            .load(std::sync::atomic::Ordering::SeqCst)
            == 2)
        .await,
        "the returned jobs did not run on the next worker"
    );
    shutdown.cancel();
    handle.wait().await.unwrap();
    assert_eq!(b.queue_depth(&queue).await.unwrap(), 0);
    common::cleanup(b, &queue).await;
}
