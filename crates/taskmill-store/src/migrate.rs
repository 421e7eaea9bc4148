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

    #[test]
    fn embedded_lists_match_files() {
        assert_eq!(listed(SQLITE_MIGRATIONS), files("../../migrations/sqlite"));
        assert_eq!(
            listed(POSTGRES_MIGRATIONS),
            files("../../migrations/postgres")
        );
    }
}
