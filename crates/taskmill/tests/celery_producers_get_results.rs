//! A Python service that enqueues with Celery needs nothing changed: a real
//! Celery 5 client (`celery_client.py`, `app.send_task` + `rpc://` results)
//! sends tasks to a queue this worker serves in Celery mode, and gets each
//! result or error back through `AsyncResult.get()`. What the worker must not
//! run (pickle, protocol v1, expired, unknown) ends in `Q.dead` with its
//! reason, and a retried Celery task stays a Celery message.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use taskmill_core::celery::CeleryCall;
use taskmill_core::config::KindConfig;
use taskmill_core::retry::Jitter;
use taskmill_worker::{JobContext, JobError, WorkerBuilder};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CELERY_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make test` (it creates the virtualenv with celery) or set CELERY_PYTHON",
        venv.display()
    );
    venv
}

/// What a handler saw: task name, attempt, traceparent, args.
type Seen = (String, u32, Option<String>, serde_json::Value);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_client_gets_results_and_errors() {
    let queue = common::unique_queue("celery");
    let mut config = common::config(&queue);
    config.queues = Vec::new();
    config.celery_queues = vec![queue.clone()];
    config.kind = BTreeMap::from([
        (
            "tests.flaky".to_string(),
            KindConfig {
                backoff_base_ms: Some(100),
                jitter: Some(Jitter::None),
                ..KindConfig::default()
            },
        ),
        (
            "tests.sleep".to_string(),
            KindConfig {
                max_attempts: Some(1),
                ..KindConfig::default()
            },
        ),
    ]);

    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        move |ctx: &JobContext, args: &serde_json::Value| {
            seen.lock().unwrap().push((
                ctx.kind.clone(),
                ctx.attempt,
                ctx.traceparent.clone(),
                args.clone(),
            ));
        }
    };
    let (r1, r2, r3, r4, r5) = (
        record.clone(),
        record.clone(),
        record.clone(),
        record.clone(),
        record.clone(),
    );
    let worker = WorkerBuilder::new(config)
        .io(
            "tests.add",
            move |ctx: JobContext, call: CeleryCall<(i64, i64)>| {
                r1(&ctx, &serde_json::json!([call.args.0, call.args.1]));
                let scale = call
                    .kwargs
                    .get("scale")
                    .and_then(|v| v.as_i64())
                    .unwrap_or(1);
                async move { Ok((call.args.0 + call.args.1) * scale) }
            },
        )
        .io("tests.echo", move |ctx: JobContext, call: CeleryCall| {
            r2(&ctx, &serde_json::Value::Array(call.args.clone()));
            async move { Ok(call.args.into_iter().next().unwrap_or_default()) }
        })
        .io(
            "tests.fail",
            |_ctx: JobContext, call: CeleryCall<(String,)>| async move {
                Err::<(), _>(JobError::permanent(call.args.0))
            },
        )
        .io("tests.flaky", move |ctx: JobContext, _call: CeleryCall| {
            r3(&ctx, &serde_json::Value::Null);
            async move {
                if ctx.attempt == 1 {
                    return Err(JobError::retryable("flaky: first attempt fails"));
                }
                Ok(ctx.attempt)
            }
        })
        .io("tests.when", move |ctx: JobContext, _call: CeleryCall| {
            r4(&ctx, &serde_json::Value::Null);
            async move {
                Ok(SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64())
            }
        })
        .io(
            "tests.sleep",
            move |ctx: JobContext, call: CeleryCall<(u64,)>| {
                r5(&ctx, &serde_json::Value::Null);
                async move {
                    tokio::time::sleep(Duration::from_millis(call.args.0)).await;
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/celery_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(python())
            .arg(script)
            .args([&common::amqp_url(), &queue, traceparent])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Celery client finishes within 4 minutes")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "Celery client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");

    let seen = seen.lock().unwrap().clone();
    let ran = |kind: &str| seen.iter().filter(|s| s.0 == kind).collect::<Vec<_>>();
    // Never executed: pickle, v1, expired.
    for arg in ["pickled", "v1", "late"] {
        assert!(
            !seen.iter().any(|s| s.3 == serde_json::json!([arg])),
            "the {arg} task must not run"
        );
    }
    // The retry ran as attempt 2 of the same task.
    let flaky: Vec<u32> = ran("tests.flaky").iter().map(|s| s.1).collect();
    assert_eq!(flaky, vec![1, 2]);
    // The countdown task ran once; the timed-out one once (max_attempts 1).
    assert_eq!(ran("tests.when").len(), 1);
    assert_eq!(ran("tests.sleep").len(), 1);
    // The producer's trace context reached the handler (without trace export
    // the worker hands on the producer's traceparent).
    let traced = seen
        .iter()
        .find(|s| s.3 == serde_json::json!(["traced"]))
        .expect("the traced task ran");
    assert_eq!(
        traced.2.as_deref().map(|tp| &tp[3..35]),
        Some(&traceparent[3..35]),
        "same trace id"
    );
    // 1 000 echoes, each exactly once (idempotency by task id).
    let echoes = ran("tests.echo")
        .iter()
        .filter(|s| s.3.get(0).is_some_and(|v| v.is_i64()))
        .count();
    assert_eq!(echoes, 1000);

    shutdown.cancel();
    handle.wait().await.unwrap();

    // Dead letters: each refused or failed task once, with its reason, its
    // Celery body and headers intact.
    let b = common::broker().await;
    let dead = format!("{queue}.dead");
    let mut reasons = Vec::new();
    while let Some(m) = b.get(&dead).await.unwrap() {
        let reason = m.header_str("taskmill-dead-reason").unwrap_or_default();
        let task = m.header_str("task").unwrap_or_default();
        if reason == "unsupported_serializer" {
            assert!(
                m.body().starts_with(&[0x80]),
                "the pickle body is kept as is"
            );
        }
        reasons.push(format!("{task}:{reason}"));
        m.ack().await.unwrap();
    }
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ":unsupported_protocol", // protocol v1: no task header
            "tests.echo:expired",
            "tests.echo:unsupported_serializer",
            "tests.fail:handler_error",
            "tests.fail:handler_error",
            "tests.nope:unknown_kind",
            "tests.sleep:attempts_exhausted", // a timeout with no attempt left
        ]
    );
    assert_eq!(b.queue_depth(&queue).await.unwrap(), 0);
    common::cleanup(&b, &queue).await;
    let _ = std::fs::remove_dir_all(common::data_dir(&queue));
}
