//! Parked jobs on both backends: a copy of the message kept with the claim is cleared by
//! every outcome, fenced like any write, and taken over exactly once by the sweepers when,
//! and only when, its holder is gone.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{acquire, beat, count};
use serde_json::json;
use taskmill_store::{ClaimToken, IdempotencyStore, MAX_PARKED_MESSAGE, Parked, Store, StoreError};

const LONG: Duration = Duration::from_secs(60);

const PARKED_ROWS: &str = "SELECT COUNT(*) FROM taskmill_jobs WHERE parked_queue IS NOT NULL OR parked_message IS NOT NULL";

fn parked(n: u8) -> Parked {
    // Every byte value, so that no backend may treat the message as text.
    let mut message: Vec<u8> = (0..=255u8).collect();
    message.push(n);
    Parked {
        queue: format!("queue-{n}"),
        message,
    }
}

async fn assert_no_orphans(store: &Store) {
    let taken = store.take_orphans("sweeper", LONG, 10).await.unwrap();
    assert!(taken.is_empty(), "{taken:?}");
}

fn assert_lease_lost(r: Result<(), StoreError>) {
    assert!(matches!(r, Err(StoreError::LeaseLost { .. })), "{r:?}");
}

async fn every_outcome_clears_the_parked_copy(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let done = acquire(&store, "p-complete", "w", LONG).await;
    let failed = acquire(&store, "p-fail", "w", LONG).await;
    let released = acquire(&store, "p-release", "w", LONG).await;
    let forgotten = acquire(&store, "p-forget", "w", LONG).await;
    for (i, t) in [&done, &failed, &released, &forgotten]
        .into_iter()
        .enumerate()
    {
        store.park(t, &parked(i as u8)).await.unwrap();
    }
    // Parking again replaces the copy.
    store.park(&done, &parked(9)).await.unwrap();
    assert_eq!(count(&store, PARKED_ROWS).await, 4);

    store.complete(&done, &json!(1)).await.unwrap();
    store.fail(&failed, &json!("no")).await.unwrap();
    store.release(&released).await.unwrap();
    assert!(store.forget("p-forget").await.unwrap());
    assert_eq!(count(&store, PARKED_ROWS).await, 0);
    // The released key's lease expired, yet it is no orphan: nothing is parked with it.
    assert_no_orphans(&store).await;

    // A transactional completion clears it too.
    let tx_token = acquire(&store, "p-tx", "w", LONG).await;
    store.park(&tx_token, &parked(5)).await.unwrap();
    let tx = store.begin_completion(&tx_token).await.unwrap();
    tx.commit(&json!(2)).await.unwrap();
    assert_eq!(count(&store, PARKED_ROWS).await, 0);
}

async fn parking_a_lost_or_bad_claim_is_refused(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let old = acquire(&store, "p-lost", "w1", LONG).await;
    store.release(&old).await.unwrap();
    let new = acquire(&store, "p-lost", "w2", LONG).await;
    assert_lease_lost(store.park(&old, &parked(1)).await);
    store.complete(&new, &json!(1)).await.unwrap();
    assert_lease_lost(store.park(&new, &parked(1)).await);
    let never = ClaimToken {
        key: "p-never-claimed".into(),
        owner: "w1".into(),
        fencing: 1,
    };
    assert_lease_lost(store.park(&never, &parked(1)).await);
    assert_eq!(count(&store, PARKED_ROWS).await, 0);

    let t = acquire(&store, "p-bad", "w1", LONG).await;
    let too_big = Parked {
        queue: "q".into(),
        message: vec![7; MAX_PARKED_MESSAGE + 1],
    };
    let nul_queue = Parked {
        queue: "q\0".into(),
        message: vec![1],
    };
    for (bad, what) in [
        (too_big, "parked message"),
        (nul_queue, "parked queue name"),
    ] {
        match store.park(&t, &bad).await {
            Err(e @ StoreError::InvalidInput { .. }) => {
                assert!(!e.is_transient());
                assert!(e.to_string().contains(what), "{e}");
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    // The largest allowed message is kept and comes back whole.
    let biggest = Parked {
        queue: "q".into(),
        message: vec![0xa5; MAX_PARKED_MESSAGE],
    };
    store.park(&t, &biggest).await.unwrap();
    // Its holder shuts down: the copy is an orphan and comes back byte for byte.
    store
        .heartbeat(&beat("w1", vec![], LONG, LONG))
        .await
        .unwrap();
    store.deregister_worker("w1").await.unwrap();
    let taken = store.take_orphans("sweeper", LONG, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].1, biggest);
}

async fn two_sweepers_take_each_orphan_exactly_once(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let mut expected = HashSet::new();
    // Half the orphans belong to a worker that deregistered (their leases still run), half
    // to an owner without a registry row whose leases expire.
    let mut gone_tokens = Vec::new();
    for i in 0..20u8 {
        let t = acquire(&store, &format!("o-gone-{i}"), "w-gone", LONG).await;
        store.park(&t, &parked(i)).await.unwrap();
        expected.insert((t.key.clone(), parked(i)));
        gone_tokens.push(t);
    }
    for i in 20..40u8 {
        let t = acquire(
            &store,
            &format!("o-exp-{i}"),
            "w-old",
            Duration::from_millis(300),
        )
        .await;
        store.park(&t, &parked(i)).await.unwrap();
        expected.insert((t.key.clone(), parked(i)));
    }
    store
        .heartbeat(&beat("w-gone", gone_tokens.clone(), LONG, LONG))
        .await
        .unwrap();
    store.deregister_worker("w-gone").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let sweep = |id: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            let own = Store::connect(&url).await.unwrap();
            let mut got = Vec::new();
            loop {
                let batch = own.take_orphans(id, LONG, 3).await.unwrap();
                if batch.is_empty() {
                    break got;
                }
                got.extend(batch);
            }
        })
    };
    let (a, b) = (sweep("sweeper-a"), sweep("sweeper-b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut seen = HashSet::new();
    for (token, p) in a.iter().chain(&b) {
        assert!(
            seen.insert((token.key.clone(), p.clone())),
            "{} taken twice",
            token.key
        );
        assert_eq!(token.fencing, 2, "{}", token.key);
        assert!(token.owner == "sweeper-a" || token.owner == "sweeper-b");
    }
    assert_eq!(seen, expected);
    // Taken over: the sweepers now hold them, with live leases.
    assert!(
        store
            .take_orphans("sweeper-c", LONG, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_lease_lost(store.complete(&gone_tokens[0], &json!("zombie")).await);
}

async fn a_heartbeating_workers_parked_claim_is_never_an_orphan(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let lease = Duration::from_secs(2);
    let mut tokens = Vec::new();
    for i in 0..5u8 {
        let t = acquire(&store, &format!("live-{i}"), "w-live", lease).await;
        store.park(&t, &parked(i)).await.unwrap();
        tokens.push(t);
    }
    let beats = beat("w-live", tokens.clone(), lease, lease);
    store.heartbeat(&beats).await.unwrap();
    // Three leases long, with a heartbeat every 300 ms, while a sweeper keeps looking.
    let until = Instant::now() + lease * 3;
    let mut last_beat = Instant::now();
    while Instant::now() < until {
        let taken = store.take_orphans("sweeper", LONG, 100).await.unwrap();
        assert!(
            taken.is_empty(),
            "a live worker's claim was swept: {taken:?}"
        );
        if last_beat.elapsed() >= Duration::from_millis(300) {
            assert!(store.heartbeat(&beats).await.unwrap().lost.is_empty());
            last_beat = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The worker goes silent: once its lease and dead_after pass, all five are orphans.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    let taken = store.take_orphans("sweeper", LONG, 100).await.unwrap();
    let keys: HashSet<String> = taken.into_iter().map(|(t, _)| t.key).collect();
    let want: HashSet<String> = tokens.into_iter().map(|t| t.key).collect();
    assert_eq!(keys, want);
}

async fn release_after_takeover_makes_the_key_claimable(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let first = acquire(&store, "r-1", "w-dead", LONG).await;
    store.park(&first, &parked(1)).await.unwrap();
    store
        .heartbeat(&beat(
            "w-dead",
            vec![first.clone()],
            LONG,
            Duration::from_millis(200),
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut taken = store.take_orphans("sweeper", LONG, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    let (token, p) = taken.pop().unwrap();
    assert_eq!((token.key.as_str(), token.fencing), ("r-1", 2));
    assert_eq!(p, parked(1));
    // The sweeper republishes, then releases: the republished copy claims anew at once.
    store.release(&token).await.unwrap();
    assert_no_orphans(&store).await;
    let again = acquire(&store, "r-1", "w-next", LONG).await;
    assert_eq!(again.fencing, 3);
    assert_lease_lost(store.complete(&first, &json!("zombie")).await);
    store.complete(&again, &json!("done once")).await.unwrap();
}

both_backends!(
    every_outcome_clears_the_parked_copy,
    parking_a_lost_or_bad_claim_is_refused,
    two_sweepers_take_each_orphan_exactly_once,
    a_heartbeating_workers_parked_claim_is_never_an_orphan,
    release_after_takeover_makes_the_key_claimable,
);
