//! A producer in another language needs nothing but docs/protocol.md: a pika
//! script publishes a job and the worker runs it, continuing its trace.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskmill_worker::{JobContext, WorkerBuilder};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PIKA_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make test` (it creates the virtualenv with pika) or set PIKA_PYTHON",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_producer_job_runs() {
    let queue = common::unique_queue("pika");
    type Seen = (serde_json::Value, Option<String>, u32);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let worker = WorkerBuilder::new(common::config(&queue))
        .io(
            "test.record",
            move |ctx: JobContext, p: serde_json::Value| {
                let s = s.clone();
                async move {
                    s.lock()
                        .unwrap()
                        .push((p, ctx.traceparent.clone(), ctx.attempt));
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pika_publish.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .args([
            &common::amqp_url(),
            &queue,
            r#"{"hello": "from python", "n": 7}"#,
            traceparent,
        ])
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "pika script failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(common::eventually(Duration::from_secs(15), || !seen.lock().unwrap().is_empty()).await);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].0,
        serde_json::json!({"hello": "from python", "n": 7})
    );
    assert_eq!(got[0].1.as_deref(), Some(traceparent));
    assert_eq!(got[0].2, 1);

    shutdown.cancel();
    handle.wait().await.unwrap();
    let b = common::broker().await;
    assert_eq!(b.queue_depth(&format!("{queue}.dead")).await.unwrap(), 0);
    common::cleanup(&b, &queue).await;
}
