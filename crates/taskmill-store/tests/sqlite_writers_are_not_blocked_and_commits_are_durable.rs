//! The SQLite group commit: an acknowledged completion survives reopening the file, one
//! failing statement fails only its own caller, and an open transactional completion does
//! not stop the other claims and completions.

mod common;

use std::time::{Duration, Instant};

use common::Kind;
use serde_json::json;
use taskmill_store::{Claim, ClaimToken, IdempotencyStore, Store, StoreOptions};

const LONG: Duration = Duration::from_secs(60);

async fn acquire(store: &Store, key: &str) -> ClaimToken {
    common::acquire(store, key, "w", LONG).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_completions_survive_reopening_the_file() {
    common::run(Kind::Sqlite, |url| async move {
        let store = Store::connect(&url).await.unwrap();
        // Many at once, so they share batches.
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let key = format!("dur-{i}");
                    let t = acquire(&store, &key).await;
                    store.complete(&t, &json!(i)).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Drop every handle and connection, then open the file afresh.
        store.close().await;
        drop(store);
        let reopened = Store::connect(&url).await.unwrap();
        for i in 0..200 {
            assert_eq!(
                reopened
                    .claim(&format!("dur-{i}"), "j", "kind", "x", LONG)
                    .await
                    .unwrap(),
                Claim::AlreadyCompleted {
                    result: Some(json!(i))
                }
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_failing_statement_fails_only_its_caller() {
    common::run(Kind::Sqlite, |url| async move {
        let store = Store::connect(&url).await.unwrap();
        // A trigger that makes the claim of one key fail inside the database.
        sqlx::query(
            "CREATE TRIGGER poison BEFORE INSERT ON taskmill_jobs WHEN NEW.key = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned key'); END",
        )
        .execute(store.as_sqlite().unwrap().pool())
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for round in 0..5 {
            for i in 0..40 {
                let store = store.clone();
                let key = if i == 20 {
                    "poison".to_owned()
                } else {
                    format!("iso-{round}-{i}")
                };
                tasks.push(tokio::spawn(async move {
                    let r = store.claim(&key, "j", "kind", "w", LONG).await;
                    (key, r)
                }));
            }
        }
        let mut poisoned = 0;
        for t in tasks {
            let (key, r) = t.await.unwrap();
            if key == "poison" {
                let err = r.unwrap_err();
                assert!(err.to_string().contains("poisoned key"), "{err}");
                poisoned += 1;
                continue;
            }
            // Rolled back alone: every other caller of the batch got its claim.
            let t = match r {
                Ok(Claim::Acquired(t)) => t,
                other => panic!("{key}: {other:?}"),
            };
            store.complete(&t, &json!(true)).await.unwrap();
        }
        assert_eq!(poisoned, 5);
        assert_eq!(
            common::count(
                &store,
                "SELECT COUNT(*) FROM taskmill_jobs WHERE state = 'completed'"
            )
            .await,
            5 * 39
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_transactional_completion_does_not_block_other_writers() {
    common::run(Kind::Sqlite, |url| async move {
        // The group commit waits at most the busy timeout for the write lock; hold the
        // completion open for over three times that.
        let busy = Duration::from_secs(1);
        let hold = busy * 7 / 2;
        let opts = StoreOptions::default().sqlite_busy_timeout(busy);
        let store = Store::connect_with(&url, &opts).await.unwrap();
        common::create_effects(&store).await;
        let held = acquire(&store, "held").await;
        let mut tx = store.begin_completion(&held).await.unwrap();

        let stream = {
            let store = store.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut done = 0u32;
                let mut failed = Vec::new();
                while started.elapsed() < hold {
                    let key = format!("stream-{done}");
                    let outcome = async {
                        let t = match store.claim(&key, "j", "kind", "w2", LONG).await? {
                            Claim::Acquired(t) => t,
                            other => panic!("{key}: {other:?}"),
                        };
                        store.complete(&t, &json!(1)).await
                    }
                    .await;
                    if let Err(e) = outcome {
                        failed.push(format!("{key}: {e}"));
                    }
                    done += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (done, failed)
            })
        };
        // The handler works for the whole hold, then writes and commits.
        tokio::time::sleep(hold).await;
        tx.execute(common::insert_effect_sql(&store), &["held"])
            .await
            .unwrap();
        tx.commit(&json!("held")).await.unwrap();
        let (done, failed) = stream.await.unwrap();
        assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
        assert!(
            done >= 50,
            "only {done} claims+completions ran beside the open completion"
        );
        assert_eq!(
            common::count(&store, "SELECT COUNT(*) FROM test_effects").await,
            1
        );
    })
    .await;
}
