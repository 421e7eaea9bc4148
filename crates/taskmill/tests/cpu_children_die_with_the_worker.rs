//! `kill -9` of a worker process leaves none of its CPU worker processes
//! running (they die with their parent), and a SIGTERM'd worker reaps them.

mod common;

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

async fn spawn_worker(queue: &str) -> (tokio::process::Child, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args(["worker", "--queue", queue, "--http-addr", &addr.to_string()])
        .env("TASKMILL_AMQP_URL", common::amqp_url())
        .env("TASKMILL_DATA_DIR", common::data_dir(queue))
        .env("TASKMILL_CPU_PROCESSES", "2")
        .env("TASKMILL_CPU_QUEUE", format!("{queue}-cpu"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn taskmill worker");
    assert!(
        taskmill_testkit::http::wait_ready(addr, Duration::from_secs(30)).await,
        "worker never became ready"
    );
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_worker_leaves_no_cpu_process() {
    let queue = common::unique_queue("pdeath");
    let (mut worker, _) = spawn_worker(&queue).await;
    let pid = worker.id().unwrap();
    let children: Vec<u32> = common::children_of(pid)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(children.len(), 2, "the worker runs two CPU processes");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    worker.wait().await.unwrap();
    let gone = common::eventually(Duration::from_secs(5), || {
        children.iter().all(|c| !common::is_running(*c))
    })
    .await;
    assert!(gone, "CPU processes outlived their parent: {children:?}");
    let b = common::broker().await;
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &format!("{queue}-cpu")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reaps_every_cpu_process() {
    let queue = common::unique_queue("reap");
    let (mut worker, _) = spawn_worker(&queue).await;
    let pid = worker.id().unwrap();
    let children: Vec<u32> = common::children_of(pid)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(children.len(), 2);
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    for c in &children {
        assert!(!common::is_running(*c), "CPU process {c} still runs");
    }
    let b = common::broker().await;
    common::cleanup(&b, &queue).await;
    common::cleanup(&b, &format!("{queue}-cpu")).await;
}
