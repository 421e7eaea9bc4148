//! `Claim::HeldElsewhere { expires_in }` is the time until the key becomes claimable: the
//! lease left, or sooner the holder's registry deadline (`last_heartbeat + dead_after`). The
//! worker defers a redelivered copy by it, so it decides how fast a `kill -9` is recovered.

#[macro_use]
mod common;

use std::time::Duration;

use common::{acquire, beat};
use taskmill_store::{Claim, IdempotencyStore, Store};

const LONG: Duration = Duration::from_secs(60);

async fn held_for(store: &Store, key: &str) -> Duration {
    match store.claim(key, "j", "kind", "other", LONG).await.unwrap() {
        Claim::HeldElsewhere { expires_in, .. } => expires_in,
        other => panic!("expected HeldElsewhere for {key}, got {other:?}"),
    }
}

async fn expires_in_is_the_lease_without_a_registry_row(url: String) {
    let store = Store::connect(&url).await.unwrap();
    acquire(&store, "plain", "w-unregistered", LONG).await;
    let left = held_for(&store, "plain").await;
    assert!(left > Duration::from_secs(55) && left <= LONG, "{left:?}");
}

async fn expires_in_is_the_owners_death_deadline_when_sooner(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "crashed", "w-crash", LONG).await;
    let dead_after = Duration::from_secs(2);
    store
        .heartbeat(&beat("w-crash", vec![t], LONG, dead_after))
        .await
        .unwrap();
    // The lease runs 60 s, but the owner counts as dead 2 s after its heartbeat.
    let left = held_for(&store, "crashed").await;
    assert!(
        left <= dead_after && left > Duration::from_millis(1200),
        "{left:?}"
    );
    // Waiting exactly that long (the worker's defer) is enough: the claim then takes over.
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    let next = acquire(&store, "crashed", "w-next", LONG).await;
    assert_eq!(next.fencing, 2);
}

async fn expires_in_is_the_lease_when_it_ends_before_the_owners_deadline(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "short", "w-live", LONG).await;
    store
        .heartbeat(&beat("w-live", vec![t], Duration::from_secs(3), LONG))
        .await
        .unwrap();
    let left = held_for(&store, "short").await;
    assert!(
        left <= Duration::from_secs(3) && left > Duration::from_secs(2),
        "{left:?}"
    );
}

async fn a_deregistered_owner_never_makes_anyone_wait(url: String) {
    let store = Store::connect(&url).await.unwrap();
    let t = acquire(&store, "gone", "w-gone", LONG).await;
    store
        .heartbeat(&beat("w-gone", vec![t], LONG, LONG))
        .await
        .unwrap();
    assert!(held_for(&store, "gone").await > Duration::from_secs(55));
    store.deregister_worker("w-gone").await.unwrap();
    // Claimable at once, so the claim takes it rather than answering "0 s left".
    assert_eq!(acquire(&store, "gone", "w-next", LONG).await.fencing, 2);
}

both_backends!(
    expires_in_is_the_lease_without_a_registry_row,
    expires_in_is_the_owners_death_deadline_when_sooner,
    expires_in_is_the_lease_when_it_ends_before_the_owners_deadline,
    a_deregistered_owner_never_makes_anyone_wait,
);
