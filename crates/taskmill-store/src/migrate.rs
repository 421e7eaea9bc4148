//! The schema migrations, embedded in the binary.
//!
//! `sqlx::migrate!` lives behind sqlx's `macros` feature, which would compile sqlx and
//! libsqlite3 a second time for the proc-macro host in every crate of the workspace (feature
//! unification). So the files are embedded with `include_str!` and the same
//! [`Migrator`] is built by hand: version and description follow sqlx's file naming
//! (`NNNN_description.sql`), and the checksums are sqlx's own, so `sqlx migrate info` agrees.
//!
//! To add a migration: add `migrations/{sqlite,postgres}/NNNN_name.sql` and a line to both
//! lists below (the test `embedded_lists_match_files` fails until both are done).

use std::sync::LazyLock;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// `(version, description, sql)` of each SQLite migration.
pub(crate) const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "workers",
        include_str!("../../../migrations/sqlite/0002_workers.sql"),
    ),
    (
        3,
        "parked",
        include_str!("../../../migrations/sqlite/0003_parked.sql"),
    ),
];

/// `(version, description, sql)` of each PostgreSQL migration.
pub(crate) const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "workers",
        include_str!("../../../migrations/postgres/0002_workers.sql"),
    ),
    (
        3,
        "parked",
        include_str!("../../../migrations/postgres/0003_parked.sql"),
    ),
];

fn build(list: &'static [(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        list.iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Migrator for SQLite. Its `lock()` is a no-op in sqlx, so the caller runs it inside
/// `BEGIN IMMEDIATE` (see `SqliteStore::connect`).
pub(crate) static SQLITE: LazyLock<Migrator> = LazyLock::new(|| build(SQLITE_MIGRATIONS));

/// Migrator for PostgreSQL; sqlx serializes concurrent runs with an advisory lock.
pub(crate) static POSTGRES: LazyLock<Migrator> = LazyLock::new(|| build(POSTGRES_MIGRATIONS));

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &str) -> Vec<(i64, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut out: Vec<(i64, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| {
                let stem = n.trim_end_matches(".sql");
                let (v, d) = stem.split_once('_').unwrap();
                (v.parse().unwrap(), d.replace('_', " "))
            })
            .collect();
        out.sort();
        out
    }

    fn listed(list: &[(i64, &str, &str)]) -> Vec<(i64, String)> {
        list.iter().map(|&(v, d, _)| (v, d.to_owned())).collect()
    }

    /// One row as a store before migration 3 wrote it.
    const OLD_ROW: &str = "INSERT INTO taskmill_jobs (key, state, owner, attempts, job_id, kind, \
        created_at, updated_at, result) VALUES ('old', 'completed', 'w', 2, 'j', 'k', 1, 1, '7')";

    /// `attempts, result, parked_queue, parked_message` of that row after the upgrade.
    type Upgraded = (i64, String, Option<String>, Option<Vec<u8>>);
    const READ_BACK: &str =
        "SELECT attempts, result, parked_queue, parked_message FROM taskmill_jobs";

    fn assert_row_kept_unparked(row: Upgraded) {
        let (attempts, result, queue, message) = row;
        assert_eq!(
            (attempts, result.as_str(), queue, message),
            (2, "7", None, None)
        );
    }

    /// Applies migrations 1 and 2 and writes a row, then the rest: the row must survive
    /// unchanged with no parked copy.
    #[tokio::test]
    async fn parked_columns_apply_to_a_database_with_rows_sqlite() {
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
        let dir = std::env::temp_dir().join(format!("taskmill_migrate_{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("old.db"))
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new().connect_with(opts).await.unwrap();
        build(&SQLITE_MIGRATIONS[..2]).run(&pool).await.unwrap();
        sqlx::query(OLD_ROW).execute(&pool).await.unwrap();
        SQLITE.run(&pool).await.unwrap();
        let row: Upgraded = sqlx::query_as(READ_BACK).fetch_one(&pool).await.unwrap();
        assert_row_kept_unparked(row);
        pool.close().await;
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn parked_columns_apply_to_a_database_with_rows_postgres() {
        use sqlx::Connection;
        let base = std::env::var("TASKMILL_STORE_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("taskmill_migrate_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
            .await
            .expect("PostgreSQL test server reachable");
        let raw = |sql: String| sqlx::query(sqlx::AssertSqlSafe(sql));
        raw(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&format!("{base}/{name}"))
            .await
            .unwrap();
        build(&POSTGRES_MIGRATIONS[..2]).run(&pool).await.unwrap();
        raw(OLD_ROW.replace(", 1, 1,", ", now(), now(),"))
            .execute(&pool)
            .await
            .unwrap();
        let outcome = POSTGRES.run(&pool).await;
        let row: Result<Upgraded, _> = sqlx::query_as(READ_BACK).fetch_one(&pool).await;
        pool.close().await;
        raw(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .ok();
        outcome.unwrap();
        assert_row_kept_unparked(row.unwrap());
    }

    #[test]
    fn embedded_lists_match_files() {
        assert_eq!(listed(SQLITE_MIGRATIONS), files("../../migrations/sqlite"));
        assert_eq!(
            listed(POSTGRES_MIGRATIONS),
            files("../../migrations/postgres")
        );
    }
}
