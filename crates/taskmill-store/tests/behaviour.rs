//! Behaviour tests, run against both backends: real SQLite files in a temp dir and the real
//! PostgreSQL server. Each scenario is an `async fn(url)`; `both_backends!` generates one
//! `#[tokio::test]` per backend.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Kind, acquire, count, create_effects, insert_effect_sql, kind_of};
use serde_json::json;
use taskmill_store::{Claim, IdempotencyStore, JobState, Store, StoreError, StoreOptions};

const LONG: Duration = Duration::from_secs(60);

both_backends!(
    claim_complete_then_already_completed,
    live_lease_held_elsewhere_then_takeover_fences_old_owner,
    transactional_completion_commit_and_drop,
    fail_then_forget_makes_key_claimable,
    release_and_extend_lease,
    concurrent_claims_run_each_key_exactly_once,
    purge_removes_only_old_finished_rows,
    concurrent_connect_on_fresh_database,
    record_fields_and_ping,
    open_completion_blocks_takeover_of_expired_lease,
);

fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, StoreError>, key: &str) {
    match r {
        Err(StoreError::LeaseLost { key: k }) => assert_eq!(k, key),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

// 1. claim -> complete -> claim again returns AlreadyCompleted with the result.
async fn claim_complete_then_already_completed(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let token = acquire(&store, "k1", "worker-a", LONG).await;
    assert_eq!(token.fencing, 1);
    assert_eq!(token.owner, "worker-a");
    let result = json!({"sum": 42, "items": [1, 2, 3], "note": "ünïcode"});
    store.complete(&token, &result).await.unwrap();

    for owner in ["worker-a", "worker-b"] {
        let again = store
            .claim("k1", "job-2", "test_kind", owner, LONG)
            .await
            .unwrap();
        assert_eq!(
            again,
            Claim::AlreadyCompleted {
                result: Some(result.clone())
            }
        );
    }
    // A second completion with the same token is refused: at most once.
    assert_lease_lost(store.complete(&token, &json!("again")).await, "k1");
    assert_eq!(store.get("k1").await.unwrap().unwrap().result, Some(result));
}

// 2. live lease -> HeldElsewhere; expiry -> takeover; old owner's writes -> LeaseLost.
async fn live_lease_held_elsewhere_then_takeover_fences_old_owner(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let lease = Duration::from_millis(200);
    let a = acquire(&store, "k2", "worker-a", lease).await;

    match store
        .claim("k2", "job-1b", "test_kind", "worker-b", LONG)
        .await
        .unwrap()
    {
        Claim::HeldElsewhere { owner, expires_in } => {
            assert_eq!(owner, "worker-a");
            assert!(
                expires_in > Duration::ZERO && expires_in <= lease,
                "expires_in = {expires_in:?}"
            );
        }
        other => panic!("expected HeldElsewhere, got {other:?}"),
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = acquire(&store, "k2", "worker-b", LONG).await;
    assert_eq!(b.fencing, 2, "takeover must bump the epoch");

    // Every write of the presumed-dead owner is fenced out and writes nothing.
    assert_lease_lost(store.complete(&a, &json!("stale")).await, "k2");
    assert_lease_lost(store.begin_completion(&a).await, "k2");
    assert_lease_lost(store.fail(&a, &json!("stale")).await, "k2");
    assert_lease_lost(store.release(&a).await, "k2");
    assert_lease_lost(store.extend_lease(&a, LONG).await, "k2");
    let rec = store.get("k2").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Claimed);
    assert_eq!(rec.owner, "worker-b");
    assert_eq!(rec.attempts, 2);

    store.complete(&b, &json!("fresh")).await.unwrap();
    assert_eq!(
        store
            .claim("k2", "j", "test_kind", "worker-c", LONG)
            .await
            .unwrap(),
        Claim::AlreadyCompleted {
            result: Some(json!("fresh"))
        }
    );
}

// 3. transactional completion: commit -> effect + completed; drop -> neither.
async fn transactional_completion_commit_and_drop(url: String) {
    let store = Store::connect(&url).await.unwrap();
    create_effects(&store).await;
    let insert = insert_effect_sql(&store);

    // Commit path.
    let t = acquire(&store, "k3-commit", "worker-a", LONG).await;
    let mut tx = store.begin_completion(&t).await.unwrap();
    assert_eq!(tx.token(), &t);
    assert_eq!(tx.execute(insert, &["k3-commit"]).await.unwrap(), 1);
    tx.commit(&json!({"ok": true})).await.unwrap();
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM test_effects WHERE name = 'k3-commit'"
        )
        .await,
        1
    );
    let rec = store.get("k3-commit").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Completed);
    assert_eq!(rec.result, Some(json!({"ok": true})));
    assert!(rec.completed_at.is_some());
    assert!(matches!(
        store
            .claim("k3-commit", "j", "test_kind", "worker-b", LONG)
            .await
            .unwrap(),
        Claim::AlreadyCompleted { .. }
    ));

    // Drop path, with the backend-specific connection accessor for the handler's write.
    let t = acquire(&store, "k3-drop", "worker-a", LONG).await;
    {
        let mut tx = store.begin_completion(&t).await.unwrap();
        match kind_of(&url) {
            Kind::Sqlite => {
                assert!(tx.postgres().is_none());
                sqlx::query("INSERT INTO test_effects (name) VALUES (?)")
                    .bind("k3-drop")
                    .execute(tx.sqlite().await.unwrap().unwrap())
                    .await
                    .unwrap();
            }
            Kind::Postgres => {
                assert!(tx.sqlite().await.unwrap().is_none());
                sqlx::query("INSERT INTO test_effects (name) VALUES ($1)")
                    .bind("k3-drop")
                    .execute(tx.postgres().unwrap())
                    .await
                    .unwrap();
            }
        }
        // The handler "fails": the transaction is dropped without commit.
    }
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM test_effects WHERE name = 'k3-drop'"
        )
        .await,
        0
    );
    let rec = store.get("k3-drop").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Claimed);
    assert_eq!(rec.result, None);
    // Still held by the live lease until released...
    assert!(matches!(
        store
            .claim("k3-drop", "j", "test_kind", "worker-b", LONG)
            .await
            .unwrap(),
        Claim::HeldElsewhere { .. }
    ));
    store.release(&t).await.unwrap();
    // ... then the retry claims it, and its committed run is the only effect.
    let t2 = acquire(&store, "k3-drop", "worker-b", LONG).await;
    assert_eq!(t2.fencing, 2);
    let mut tx = store.begin_completion(&t2).await.unwrap();
    tx.execute(insert, &["k3-drop"]).await.unwrap();
    tx.commit(&json!(2)).await.unwrap();
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM test_effects WHERE name = 'k3-drop'"
        )
        .await,
        1
    );

    // Explicit rollback, then lease expiry instead of release.
    let t = acquire(&store, "k3-expire", "worker-a", Duration::from_millis(150)).await;
    let mut tx = store.begin_completion(&t).await.unwrap();
    tx.execute(insert, &["k3-expire"]).await.unwrap();
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t2 = acquire(&store, "k3-expire", "worker-b", LONG).await;
    assert_lease_lost(store.begin_completion(&t).await, "k3-expire");
    store.complete(&t2, &json!(null)).await.unwrap();
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM test_effects WHERE name = 'k3-expire'"
        )
        .await,
        0
    );
}

// 4. fail -> AlreadyFailed; forget -> claimable again.
async fn fail_then_forget_makes_key_claimable(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "k4", "worker-a", LONG).await;
    let err = json!({"class": "permanent", "message": "bad input"});
    store.fail(&t, &err).await.unwrap();
    assert_eq!(
        store
            .claim("k4", "j", "test_kind", "worker-b", LONG)
            .await
            .unwrap(),
        Claim::AlreadyFailed { error: err.clone() }
    );
    assert_lease_lost(store.complete(&t, &json!(1)).await, "k4");
    let rec = store.get("k4").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.error, Some(err));

    assert!(store.forget("k4").await.unwrap());
    assert!(!store.forget("k4").await.unwrap());
    assert!(store.get("k4").await.unwrap().is_none());
    let t2 = acquire(&store, "k4", "worker-b", LONG).await;
    store.complete(&t2, &json!("replayed")).await.unwrap();
}

// release gives the key to the next claim at once; extend_lease keeps a long job's key.
async fn release_and_extend_lease(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "k5", "worker-a", Duration::from_millis(200)).await;
    store
        .extend_lease(&t, Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    match store
        .claim("k5", "j", "test_kind", "worker-b", LONG)
        .await
        .unwrap()
    {
        Claim::HeldElsewhere { owner, expires_in } => {
            assert_eq!(owner, "worker-a");
            assert!(expires_in > Duration::from_secs(3), "{expires_in:?}");
        }
        other => panic!("expected HeldElsewhere after extend, got {other:?}"),
    }
    store.release(&t).await.unwrap();
    let t2 = acquire(&store, "k5", "worker-b", LONG).await;
    assert_eq!(t2.fencing, 2);
    assert_lease_lost(store.release(&t).await, "k5");
    store.complete(&t2, &json!("done")).await.unwrap();
    let rec = store.get("k5").await.unwrap().unwrap();
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.lease_expires_at, None);
}

// 5. 8 tasks, 2 store instances (each a pool of several connections), 1 000 keys x 3.
async fn concurrent_claims_run_each_key_exactly_once(url: String) {
    const KEYS: usize = 1_000;
    const COPIES: usize = 3;
    const TASKS: usize = 8;
    let opts = StoreOptions::default().max_connections(4);
    let stores = [
        Store::connect_with(&url, &opts).await.unwrap(),
        Store::connect_with(&url, &opts).await.unwrap(),
    ];
    create_effects(&stores[0]).await;

    // Deterministic shuffle (xorshift), so copies of one key are spread out and interleave.
    let mut items: Vec<usize> = (0..KEYS * COPIES).map(|i| i % KEYS).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let queue = Arc::new(Mutex::new(items));
    let acquired = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(AtomicUsize::new(0));

    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        let store = stores[n % stores.len()].clone();
        let (queue, acquired, skipped, held) = (
            queue.clone(),
            acquired.clone(),
            skipped.clone(),
            held.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let owner = format!("task-{n}");
            let insert = insert_effect_sql(&store);
            loop {
                let Some(i) = queue.lock().unwrap().pop() else {
                    break;
                };
                let key = format!("key-{i:04}");
                match store
                    .claim(&key, &format!("job-{i}"), "race", &owner, LONG)
                    .await
                {
                    Ok(Claim::Acquired(token)) => {
                        let mut tx = store.begin_completion(&token).await.unwrap();
                        assert_eq!(tx.execute(insert, &[&key]).await.unwrap(), 1);
                        tokio::task::yield_now().await;
                        tx.commit(&json!({"by": owner})).await.unwrap();
                        acquired.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Claim::AlreadyCompleted { .. }) => {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Claim::HeldElsewhere { .. }) => {
                        held.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => panic!("claim {key} failed: {e}"),
                }
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(180), all)
        .await
        .expect("concurrency test did not finish in 180 s (deadlock?)");
    let elapsed = started.elapsed();

    let store = &stores[1];
    assert_eq!(acquired.load(Ordering::Relaxed), KEYS);
    assert_eq!(
        acquired.load(Ordering::Relaxed)
            + skipped.load(Ordering::Relaxed)
            + held.load(Ordering::Relaxed),
        KEYS * COPIES
    );
    assert_eq!(
        count(store, "SELECT COUNT(*) FROM test_effects").await,
        KEYS as i64
    );
    assert_eq!(
        count(store, "SELECT COUNT(DISTINCT name) FROM test_effects").await,
        KEYS as i64
    );
    assert_eq!(
        count(
            store,
            "SELECT COUNT(*) FROM taskmill_jobs WHERE state = 'completed' AND attempts = 1"
        )
        .await,
        KEYS as i64
    );
    eprintln!(
        "concurrency ({:?}): {KEYS} keys x {COPIES} in {elapsed:?}: acquired {}, already completed {}, held elsewhere {}",
        kind_of(&url),
        acquired.load(Ordering::Relaxed),
        skipped.load(Ordering::Relaxed),
        held.load(Ordering::Relaxed),
    );
}

// 6. purge_older_than removes only old completed/failed rows.
async fn purge_removes_only_old_finished_rows(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "old-done", "w", LONG).await;
    store.complete(&t, &json!(1)).await.unwrap();
    let t = acquire(&store, "old-failed", "w", LONG).await;
    store.fail(&t, &json!("e")).await.unwrap();
    let _live = acquire(&store, "old-claimed-live", "w", LONG).await;
    let _dead = acquire(
        &store,
        "old-claimed-expired",
        "w",
        Duration::from_millis(10),
    )
    .await;

    // Wide margins (old rows ~1 s old, threshold 500 ms) so a loaded machine does not flake.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let t = acquire(&store, "new-done", "w", LONG).await;
    store.complete(&t, &json!(2)).await.unwrap();

    assert_eq!(
        store
            .purge_older_than(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_older_than(Duration::from_millis(500))
            .await
            .unwrap(),
        2
    );
    assert!(store.get("old-done").await.unwrap().is_none());
    assert!(store.get("old-failed").await.unwrap().is_none());
    assert!(store.get("old-claimed-live").await.unwrap().is_some());
    assert!(store.get("old-claimed-expired").await.unwrap().is_some());
    assert!(store.get("new-done").await.unwrap().is_some());
    assert_eq!(
        store
            .purge_older_than(Duration::from_millis(500))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.purge_older_than(Duration::ZERO).await.unwrap(), 1);
    assert!(store.get("new-done").await.unwrap().is_none());
}

// 7. several Store::connect at once on a fresh database (migration race).
async fn concurrent_connect_on_fresh_database(url: String) {
    let (a, b, c, d) = tokio::join!(
        Store::connect(&url),
        Store::connect(&url),
        Store::connect(&url),
        Store::connect(&url),
    );
    let stores: Vec<Store> = [a, b, c, d]
        .into_iter()
        .map(|r| r.expect("concurrent connect failed"))
        .collect();
    for s in &stores {
        s.ping().await.unwrap();
    }
    // Each migration file recorded once (not once per store), and the stores share one table.
    assert_eq!(
        count(&stores[0], "SELECT COUNT(*) FROM _sqlx_migrations").await,
        common::migration_files(kind_of(&url))
    );
    let t = acquire(&stores[0], "k7", "w", LONG).await;
    stores[3].complete(&t, &json!(7)).await.unwrap();
    assert!(matches!(
        stores[1]
            .claim("k7", "j", "test_kind", "x", LONG)
            .await
            .unwrap(),
        Claim::AlreadyCompleted { .. }
    ));
    // Reconnecting to the migrated database is a no-op.
    Store::connect(&url).await.unwrap();
    for s in &stores {
        s.close().await;
    }
}

async fn record_fields_and_ping(url: String) {
    let store = Store::connect(&url).await.unwrap();
    store.ping().await.unwrap();
    assert!(store.get("missing").await.unwrap().is_none());
    let before = std::time::SystemTime::now() - Duration::from_secs(5);
    let t = match store
        .claim("k9", "msg-9", "resize_image", "worker-9", LONG)
        .await
        .unwrap()
    {
        Claim::Acquired(t) => t,
        other => panic!("{other:?}"),
    };
    let rec = store.get("k9").await.unwrap().unwrap();
    assert_eq!(rec.key, "k9");
    assert_eq!(rec.state, JobState::Claimed);
    assert_eq!(rec.owner, "worker-9");
    assert_eq!(rec.job_id, "msg-9");
    assert_eq!(rec.kind, "resize_image");
    assert_eq!(rec.attempts, 1);
    assert!(rec.created_at > before);
    let lease_end = rec.lease_expires_at.unwrap();
    let left = lease_end.duration_since(rec.updated_at).unwrap();
    assert!(left > Duration::from_secs(55) && left <= LONG, "{left:?}");
    assert_eq!(rec.completed_at, None);
    store.complete(&t, &json!({"w": 1})).await.unwrap();
    let rec = store.get("k9").await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Completed);
    assert!(rec.completed_at.unwrap() >= rec.created_at);
}

// While a completion transaction is open the claim cannot be taken over, even if its lease
// runs out: the competing claim waits and then sees the committed outcome.
async fn open_completion_blocks_takeover_of_expired_lease(url: String) {
    let store = Store::connect(&url).await.unwrap();
    create_effects(&store).await;
    let t = acquire(&store, "k10", "worker-a", Duration::from_millis(100)).await;
    let mut tx = store.begin_completion(&t).await.unwrap();
    tx.execute(insert_effect_sql(&store), &["k10"])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // lease expired meanwhile

    let other = store.clone();
    let competitor = tokio::spawn(async move {
        other
            .claim("k10", "j", "test_kind", "worker-b", LONG)
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !competitor.is_finished(),
        "takeover must wait for the open completion"
    );
    tx.commit(&json!("a won")).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), competitor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen,
        Claim::AlreadyCompleted {
            result: Some(json!("a won"))
        }
    );
    assert_eq!(count(&store, "SELECT COUNT(*) FROM test_effects").await, 1);
}

// 8. a bad URL gives BadUrl with a clear message and no password in it.
#[tokio::test]
async fn bad_url_is_clear_and_redacted() {
    for url in [
        "mysql://admin:hunter2secret@db.example/jobs",
        "hunter2secret",
        "",
        "redis://:hunter2secret@localhost:6379",
    ] {
        match Store::connect(url).await {
            Err(StoreError::BadUrl(msg)) => {
                assert!(!msg.contains("hunter2secret"), "{msg}");
                assert!(msg.contains("sqlite://"), "{msg}");
                assert!(msg.contains("postgres://"), "{msg}");
                let display = StoreError::BadUrl(msg.clone()).to_string();
                assert!(!display.contains("hunter2secret"));
            }
            Err(other) => panic!("expected BadUrl for {url:?}, got {other:?}"),
            Ok(_) => panic!("{url:?} connected"),
        }
    }
    let msg = match Store::connect("mysql://admin:hunter2secret@db.example/jobs").await {
        Err(e) => e.to_string(),
        Ok(_) => unreachable!(),
    };
    assert!(msg.contains("mysql"), "{msg}");
    assert!(msg.contains("admin:***@db.example"), "{msg}");
}

#[tokio::test]
async fn postgres_connect_failure_hides_password() {
    // Port 1 on loopback: refused at once.
    let url = "postgres://admin:hunter2secret@127.0.0.1:1/jobs";
    let opts = StoreOptions::default().acquire_timeout(Duration::from_secs(3));
    let err = Store::connect_with(url, &opts).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Database { op: "connect", .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("hunter2secret"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2secret"), "{err:?}");

    // A wrong password against the real server: the message names the failure, not the secret.
    let real = format!(
        "{}/postgres",
        common::pg_base().replacen("://postgres@", "://no_such_user_x:hunter2secret@", 1)
    );
    if let Err(e) = Store::connect_with(&real, &opts).await {
        assert!(!e.to_string().contains("hunter2secret"), "{e}");
        assert!(!format!("{e:?}").contains("hunter2secret"), "{e:?}");
    }
}

#[tokio::test]
async fn sqlite_in_memory_works() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let t = acquire(&store, "m", "w", LONG).await;
    let mut tx = store.begin_completion(&t).await.unwrap();
    tx.execute("CREATE TABLE t (x TEXT)", &[]).await.unwrap();
    tx.commit(&json!(true)).await.unwrap();
    assert!(matches!(
        store.claim("m", "j", "k", "w", LONG).await.unwrap(),
        Claim::AlreadyCompleted { .. }
    ));
}

#[tokio::test]
async fn sqlite_file_is_wal_with_foreign_keys() {
    common::run(Kind::Sqlite, |url| async move {
        let store = Store::connect(&url).await.unwrap();
        let pool = store.as_sqlite().unwrap().pool();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(timeout >= 1000, "busy_timeout = {timeout}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_creates_missing_parent_directories() {
    common::run(Kind::Sqlite, |url| async move {
        let nested = url.replace("store.db", "a/b/nested.db");
        let store = Store::connect(&nested).await.unwrap();
        store.ping().await.unwrap();
        let path = nested.trim_start_matches("sqlite://").to_owned();
        assert!(std::path::Path::new(&path).exists(), "{path}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_busy_beyond_timeout_is_a_transient_error() {
    common::run(Kind::Sqlite, |url| async move {
        let a = Store::connect(&url).await.unwrap();
        let opts = StoreOptions::default().sqlite_busy_timeout(Duration::from_millis(100));
        let b = Store::connect_with(&url, &opts).await.unwrap();
        let t = acquire(&a, "busy", "worker-a", LONG).await;
        let mut tx = a.begin_completion(&t).await.unwrap();
        // The completion takes the write lock at its first statement, then holds it.
        tx.execute("SELECT 1", &[]).await.unwrap();
        let err = b
            .claim("other-key", "j", "test_kind", "worker-b", LONG)
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            matches!(err, StoreError::Database { op: "claim", .. }),
            "{err:?}"
        );
        drop(tx);
        // Once the lock is gone the same call succeeds.
        let t2 = acquire(&b, "other-key", "worker-b", LONG).await;
        b.complete(&t2, &json!(1)).await.unwrap();
        assert!(!StoreError::LeaseLost { key: "x".into() }.is_transient());
    })
    .await;
}
