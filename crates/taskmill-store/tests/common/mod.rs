//! Test harness: every test gets its own SQLite file in a fresh temp dir, or its own
//! PostgreSQL database, and removes it afterwards (also when the test body panics).
//!
//! PostgreSQL is found at `TASKMILL_STORE_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432`, no database part). The tests fail, not skip, when it
//! is unreachable: start it with
//! `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::Connection;
use taskmill_store::{Claim, ClaimToken, Heartbeat, IdempotencyStore, Store, WorkerInfo};

/// One `#[tokio::test]` per backend for each listed `async fn(url)` scenario of the test
/// file (in modules `sqlite` and `postgres`).
#[allow(unused_macros)] // not every test file runs on both backends
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    crate::common::run(crate::common::Kind::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    crate::common::run(crate::common::Kind::Postgres, super::$name).await;
                }
            )*
        }
    };
}

/// Claims `key` for `owner`, which must acquire.
pub async fn acquire(store: &Store, key: &str, owner: &str, lease: Duration) -> ClaimToken {
    match store
        .claim(key, "job-1", "test_kind", owner, lease)
        .await
        .unwrap()
    {
        Claim::Acquired(t) => t,
        other => panic!("expected Acquired for {key}, got {other:?}"),
    }
}

/// A worker's registry data, as a heartbeat reports it.
pub fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.to_owned(),
        host: "host-1".to_owned(),
        version: "0.1.0".to_owned(),
        queues: vec!["default".to_owned(), "cpu".to_owned()],
        concurrency: 8,
        pool_size: 2,
        started_at_ms: 1_700_000_000_000,
        in_flight: 3,
        jobs_done: 41,
    }
}

/// A heartbeat of worker `id` for `tokens`.
pub fn beat(id: &str, tokens: Vec<ClaimToken>, lease: Duration, dead_after: Duration) -> Heartbeat {
    Heartbeat {
        worker: worker(id),
        tokens,
        lease,
        dead_after,
    }
}

/// Which backend a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

pub fn pg_base() -> String {
    std::env::var("TASKMILL_STORE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A fresh, empty place for a store (no file / no tables yet) and its cleanup.
pub struct Scratch {
    pub url: String,
    dir: Option<PathBuf>,
    db: Option<String>,
}

impl Scratch {
    pub async fn new(kind: Kind) -> Scratch {
        match kind {
            Kind::Sqlite => {
                let dir = std::env::temp_dir().join(unique("taskmill_store_test"));
                std::fs::create_dir_all(&dir).unwrap();
                let url = format!("sqlite://{}", dir.join("store.db").display());
                Scratch {
                    url,
                    dir: Some(dir),
                    db: None,
                }
            }
            Kind::Postgres => {
                let name = unique("taskmill_store_test");
                let admin = format!("{}/postgres", pg_base());
                let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL test server unreachable at {admin}: {e}\n\
                         start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
                    )
                });
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.ok();
                Scratch {
                    url: format!("{}/{name}", pg_base()),
                    dir: None,
                    db: Some(name),
                }
            }
        }
    }

    pub async fn cleanup(self) {
        if let Some(dir) = &self.dir {
            std::fs::remove_dir_all(dir).ok();
        }
        if let Some(name) = &self.db {
            let admin = format!("{}/postgres", pg_base());
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                // FORCE: pools of the finished test may still be closing their connections.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok();
                conn.close().await.ok();
            }
        }
    }
}

/// Runs `body(url)` on a fresh scratch database of `kind`, then removes it, re-raising a
/// panic of the body after the cleanup.
pub async fn run<F, Fut>(kind: Kind, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let scratch = Scratch::new(kind).await;
    let outcome = tokio::spawn(body(scratch.url.clone())).await;
    scratch.cleanup().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

pub fn kind_of(url: &str) -> Kind {
    if url.starts_with("sqlite:") {
        Kind::Sqlite
    } else {
        Kind::Postgres
    }
}

/// Creates the handler-side table the exactly-once tests write to.
pub async fn create_effects(store: &Store) {
    const SQL: &str = "CREATE TABLE IF NOT EXISTS test_effects (name TEXT NOT NULL)";
    match store {
        Store::Sqlite(s) => {
            sqlx::query(SQL).execute(s.pool()).await.unwrap();
        }
        Store::Postgres(s) => {
            sqlx::query(SQL).execute(s.pool()).await.unwrap();
        }
    }
}

/// Runs a scalar count query on the store's own database.
pub async fn count(store: &Store, sql: &'static str) -> i64 {
    match store {
        Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await.unwrap(),
        Store::Postgres(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await.unwrap(),
    }
}

/// The effect insert in the backend's placeholder style.
pub fn insert_effect_sql(store: &Store) -> &'static str {
    match kind_of_store(store) {
        Kind::Sqlite => "INSERT INTO test_effects (name) VALUES (?)",
        Kind::Postgres => "INSERT INTO test_effects (name) VALUES ($1)",
    }
}

pub fn kind_of_store(store: &Store) -> Kind {
    match store.backend() {
        taskmill_store::Backend::Sqlite => Kind::Sqlite,
        taskmill_store::Backend::Postgres => Kind::Postgres,
    }
}

/// How many migration files the backend has (`migrations/<backend>/*.sql`): what a fresh
/// database must record in `_sqlx_migrations`, each exactly once.
pub fn migration_files(kind: Kind) -> i64 {
    let dir = match kind {
        Kind::Sqlite => "sqlite",
        Kind::Postgres => "postgres",
    };
    let dir = format!("{}/../../migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
    let n = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    // 0001 init, 0002 workers, 0003 parked at least: an empty listing is a wrong path.
    assert!(n >= 3, "only {n} migration files in {dir}");
    n as i64
}
