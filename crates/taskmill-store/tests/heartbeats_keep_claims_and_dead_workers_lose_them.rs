//! The worker registry on both backends: one heartbeat extends every lease and names the
//! lost keys; a dead or deregistered worker's keys are taken over at once; NUL in text is a
//! permanent error.

#[macro_use]
mod common;

use std::time::Duration;

use common::{acquire, beat, worker};
use serde_json::json;
use taskmill_store::{Claim, ClaimToken, IdempotencyStore, Store, StoreError};

const LONG: Duration = Duration::from_secs(60);

async fn lease_left(store: &Store, key: &str) -> Duration {
    let rec = store.get(key).await.unwrap().unwrap();
    rec.lease_expires_at
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
}

async fn heartbeat_extends_every_lease_and_reports_lost_keys(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let short = Duration::from_millis(800);
    let mut tokens = Vec::new();
    for i in 0..50 {
        tokens.push(acquire(&store, &format!("hb-{i}"), "w1", short).await);
    }
    // Three keys leave the worker's hands: completed, taken over, forgotten.
    store.complete(&tokens[0], &json!(0)).await.unwrap();
    let stolen = tokens[1].clone();
    store.release(&stolen).await.unwrap();
    acquire(&store, "hb-1", "w2", LONG).await;
    store.forget("hb-2").await.unwrap();

    let reply = store
        .heartbeat(&beat("w1", tokens.clone(), LONG, Duration::from_secs(30)))
        .await
        .unwrap();
    let mut lost = reply.lost.clone();
    lost.sort();
    assert_eq!(lost, vec!["hb-0", "hb-1", "hb-2"]);
    // Every other lease now runs ~60 s, well past the 800 ms it was claimed with.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for t in &tokens[3..] {
        let left = lease_left(&store, &t.key).await;
        assert!(left > Duration::from_secs(50), "{}: {left:?}", t.key);
        assert!(matches!(
            store.claim(&t.key, "j", "kind", "w3", LONG).await.unwrap(),
            Claim::HeldElsewhere { .. }
        ));
    }
    // The fencing epoch is unchanged: the holder still completes.
    store.complete(&tokens[3], &json!(3)).await.unwrap();

    // The registry row holds what the heartbeat said.
    let workers = store.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker, worker("w1"));
    assert!(workers[0].alive && !workers[0].deregistered);
    assert_eq!(workers[0].dead_after, Duration::from_secs(30));

    // An empty heartbeat only registers.
    let reply = store
        .heartbeat(&beat("w9", Vec::new(), LONG, Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(reply.lost.is_empty());
    let ids: Vec<String> = store
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.worker.id)
        .collect();
    assert_eq!(ids, vec!["w9", "w1"], "newest heartbeat first");
}

async fn dead_workers_key_is_taken_over_before_its_lease(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "dead-1", "w-dead", LONG).await;
    let alive = acquire(&store, "dead-2", "w-alive", LONG).await;
    let unregistered = acquire(&store, "dead-3", "w-none", Duration::from_millis(300)).await;
    store
        .heartbeat(&beat(
            "w-dead",
            vec![t.clone()],
            LONG,
            Duration::from_millis(300),
        ))
        .await
        .unwrap();
    store
        .heartbeat(&beat("w-alive", vec![alive.clone()], LONG, LONG))
        .await
        .unwrap();
    // Within dead_after the owner is alive: its lease holds.
    assert!(matches!(
        store
            .claim("dead-1", "j", "kind", "w-new", LONG)
            .await
            .unwrap(),
        Claim::HeldElsewhere { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No heartbeat for dead_after: taken over at once, 59 s before its lease ends.
    let new = acquire(&store, "dead-1", "w-new", LONG).await;
    assert_eq!(new.fencing, t.fencing + 1);
    assert!(matches!(
        store.complete(&t, &json!("zombie")).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let reply = store
        .heartbeat(&beat("w-dead", vec![t.clone()], LONG, LONG))
        .await
        .unwrap();
    assert_eq!(reply.lost, vec!["dead-1"]);
    // A live owner keeps its key; an owner without a registry row keeps the lease rule.
    assert!(matches!(
        store
            .claim("dead-2", "j", "kind", "w-new", LONG)
            .await
            .unwrap(),
        Claim::HeldElsewhere { .. }
    ));
    let taken = acquire(&store, "dead-3", "w-new", LONG).await;
    assert_eq!(taken.fencing, unregistered.fencing + 1);
    let dead = store.workers().await.unwrap();
    let w = dead.iter().find(|w| w.worker.id == "w-dead").unwrap();
    assert!(w.alive, "the late heartbeat registered it again");
}

async fn deregistered_workers_key_is_taken_over_at_once(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "gone-1", "w-gone", LONG).await;
    store
        .heartbeat(&beat("w-gone", vec![t.clone()], LONG, LONG))
        .await
        .unwrap();
    assert!(matches!(
        store
            .claim("gone-1", "j", "kind", "w-next", LONG)
            .await
            .unwrap(),
        Claim::HeldElsewhere { .. }
    ));
    store.deregister_worker("w-gone").await.unwrap();
    let rec = &store.workers().await.unwrap()[0];
    assert!(rec.deregistered && !rec.alive);
    let next = acquire(&store, "gone-1", "w-next", LONG).await;
    assert_eq!(next.fencing, 2);
    // Deregistering an unknown worker is harmless.
    store.deregister_worker("never-seen").await.unwrap();
}

async fn nul_in_text_is_a_permanent_error(url: String) {
    let store = Store::connect(&url).await.unwrap();
    for (key, job, owner, what) in [
        ("k\0", "j", "o", "idempotency key"),
        ("k", "j\0", "o", "job id"),
        ("k", "j", "o\0", "owner"),
    ] {
        let err = store
            .claim(key, job, "kind", owner, LONG)
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{err:?}");
        match &err {
            StoreError::InvalidInput { what: w, .. } => assert_eq!(*w, what),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        assert!(err.to_string().contains("NUL"), "{err}");
    }
    let bad = ClaimToken {
        key: "a\0b".into(),
        owner: "o".into(),
        fencing: 1,
    };
    assert!(matches!(
        store.complete(&bad, &json!(1)).await,
        Err(StoreError::InvalidInput { .. })
    ));
    let mut w = beat("w\0", vec![bad], LONG, LONG);
    assert!(matches!(
        store.heartbeat(&w).await,
        Err(StoreError::InvalidInput { .. })
    ));
    w.worker.id = "w".into();
    assert!(matches!(
        store.heartbeat(&w).await,
        Err(StoreError::InvalidInput { .. })
    ));
    // The store still works for good input afterwards.
    let t = acquire(&store, "fine", "o", LONG).await;
    store
        .complete(&t, &json!("\u{0}inside json is fine"))
        .await
        .unwrap();
}

both_backends!(
    heartbeat_extends_every_lease_and_reports_lost_keys,
    dead_workers_key_is_taken_over_before_its_lease,
    deregistered_workers_key_is_taken_over_at_once,
    nul_in_text_is_a_permanent_error,
);
