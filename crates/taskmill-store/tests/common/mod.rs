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

use sqlx::Connection;
use taskmill_store::Store;

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
