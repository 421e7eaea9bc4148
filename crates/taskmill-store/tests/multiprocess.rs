//! Several OS processes on one fresh SQLite file: the migration race and exactly-once
//! completion across processes (not just across connections of one process).
//!
//! The parent test re-executes this test binary with `TASKMILL_STORE_CHILD_URL` set; the
//! child entry point (`child_worker`) does nothing when that variable is absent.

mod common;

use std::time::Duration;

use common::{Kind, count, create_effects, insert_effect_sql};
use serde_json::json;
use taskmill_store::{Claim, IdempotencyStore, Store};

const CHILDREN: usize = 3;
const KEYS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_worker() {
    let Ok(url) = std::env::var("TASKMILL_STORE_CHILD_URL") else {
        return; // not started by the parent test
    };
    let id = std::env::var("TASKMILL_STORE_CHILD_ID").unwrap();
    let store = Store::connect(&url).await.expect("child connect");
    create_effects(&store).await;
    let insert = insert_effect_sql(&store);
    // Each child walks the keys from a different offset so that they collide a lot.
    let offset: usize = id.parse::<usize>().unwrap() * KEYS / CHILDREN;
    for n in 0..KEYS {
        let key = format!("mp-{:03}", (n + offset) % KEYS);
        match store
            .claim(
                &key,
                "job",
                "mp",
                &format!("proc-{id}"),
                Duration::from_secs(60),
            )
            .await
            .expect("child claim")
        {
            Claim::Acquired(token) => {
                let mut tx = store.begin_completion(&token).await.expect("child begin");
                tx.execute(insert, &[&key]).await.expect("child insert");
                tx.commit(&json!({ "proc": id }))
                    .await
                    .expect("child commit");
            }
            Claim::AlreadyCompleted { .. } | Claim::HeldElsewhere { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_processes_share_one_fresh_file() {
    if std::env::var("TASKMILL_STORE_CHILD_URL").is_ok() {
        return;
    }
    common::run(Kind::Sqlite, |url| async move {
        let exe = std::env::current_exe().unwrap();
        let mut children = Vec::new();
        for id in 0..CHILDREN {
            let child = tokio::process::Command::new(&exe)
                .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
                .env("TASKMILL_STORE_CHILD_URL", &url)
                .env("TASKMILL_STORE_CHILD_ID", id.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            children.push(child);
        }
        for child in children {
            let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
                .await
                .expect("child process hung")
                .unwrap();
            assert!(
                out.status.success(),
                "child failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Make sure the child really ran the worker (not an empty filter).
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let store = Store::connect(&url).await.unwrap();
        // Each migration file recorded once, not once per process.
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM _sqlx_migrations").await,
            common::migration_files(Kind::Sqlite)
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM test_effects").await,
            KEYS as i64
        );
        assert_eq!(
            count(&store, "SELECT COUNT(DISTINCT name) FROM test_effects").await,
            KEYS as i64
        );
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM taskmill_jobs WHERE state = 'completed'"
            )
            .await,
            KEYS as i64
        );
        store.close().await;
    })
    .await;
}
