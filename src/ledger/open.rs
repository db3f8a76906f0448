//! Opening a ledger: its connections, each set up for durability, and its schema brought up to
//! date.

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

use super::writer::Writer;
use super::{Backend, Ledger, LedgerError, PendingHint};

pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "opt-out ledger",
        include_str!("../../migrations/0001_opt_out_ledger.sql"),
    ),
    (
        2,
        "requests by email",
        include_str!("../../migrations/0002_requests_by_email.sql"),
    ),
    (
        3,
        "request fingerprints",
        include_str!("../../migrations/0003_request_fingerprints.sql"),
    ),
];

/// A pool of `max_connections` to `url`, each set up for durability.
pub(super) async fn connect(
    url: &str,
    backend: Backend,
    max_connections: u32,
) -> Result<AnyPool, LedgerError> {
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        // sqlx pings a connection before lending it by default: a round trip to SQLite's worker
        // thread (or to PostgreSQL) for every query. A broken connection fails the query
        // instead, which is answered UNAVAILABLE, and the pool replaces it.
        .test_before_acquire(false)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                let settings: &[&'static str] = match backend {
                    // WAL lets readers run beside the one writer; FULL fsyncs every commit, so a
                    // request the gateway has answered for survives a power cut.
                    Backend::Sqlite => &[
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 10000",
                        "PRAGMA foreign_keys = ON",
                    ],
                    // The server's default, made explicit: a commit returns once on disk.
                    Backend::Postgres => &["SET synchronous_commit TO on"],
                };
                for setting in settings {
                    connection.execute(*setting).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}

/// Brings the schema up to date.
pub(super) async fn migrate(pool: &AnyPool) -> Result<(), LedgerError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                (*description).into(),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}

impl Ledger {
    /// Opens the ledger at `location` (a file path, `sqlite::memory:`, or a `postgres://` URL),
    /// creating it if needed, and brings its schema up to date.
    pub async fn open(location: &str) -> Result<Self, LedgerError> {
        sqlx::any::install_default_drivers();
        let (url, backend) =
            if location.starts_with("postgres://") || location.starts_with("postgresql://") {
                crate::access::transport::require_verified_postgres(location)
                    .map_err(LedgerError::Location)?;
                (location.to_owned(), Backend::Postgres)
            } else if location == "sqlite::memory:" {
                ("sqlite::memory:".to_owned(), Backend::Sqlite)
            } else if location.is_empty() || location.contains("://") {
                return Err(LedgerError::Location(format!(
                    "the ledger must be a file path or a postgres:// URL, not {location:?}"
                )));
            } else {
                (format!("sqlite://{location}?mode=rwc"), Backend::Sqlite)
            };
        let pending = Arc::new(PendingHint::new());
        let (reader, writer, file) = match (backend, location) {
            // PostgreSQL handles concurrent writers itself: one pool for everything.
            (Backend::Postgres, _) => {
                let pool = connect(&url, backend, 16).await?;
                migrate(&pool).await?;
                (pool.clone(), Writer::pooled(pool), None)
            }
            // Each connection to an in-memory database sees a database of its own: one
            // connection for everything (and no disk to batch commits for).
            (Backend::Sqlite, "sqlite::memory:") => {
                let pool = connect(&url, backend, 1).await?;
                migrate(&pool).await?;
                (pool.clone(), Writer::pooled(pool), None)
            }
            // SQLite has one writer at a time: one connection, owned by the task that batches
            // every write into group commits, while readers use others beside it (WAL).
            (Backend::Sqlite, _) => {
                let writer_pool = connect(&url, backend, 1).await?;
                migrate(&writer_pool).await?;
                let reader = connect(&url, backend, 4).await?;
                let hint = pending.clone();
                // A batch that did not commit may have changed the hint for writes that are
                // not there: until the next refresh, every read asks the database.
                let on_failure = Box::new(move || hint.distrust());
                (
                    reader,
                    Writer::batched(writer_pool, on_failure),
                    Some(PathBuf::from(location)),
                )
            }
        };
        Ok(Self {
            reader,
            writer,
            backend,
            file,
            pending,
        })
    }
}
