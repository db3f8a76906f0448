//! Opening a ledger: its connections, each set up for durability, and its schema brought up to
//! date.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::TokioClock;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

use super::sqlite::Sqlite;
use super::writer::Writer;
use super::{Backend, KnownProfiles, Ledger, LedgerError, Postgres, ProfileTurns, Store};

/// A migration of the ledger's schema, with its text on each database: both keep the same history
/// of versions (`_sqlx_migrations`), and each database's checksum of a version is that of its
/// own text (what sqlx's migrator computes from the text it is given, and `sqlite::migrate`
/// likewise).
pub(super) struct SchemaMigration {
    pub(super) version: i64,
    pub(super) description: &'static str,
    /// Its text on SQLite.
    pub(super) sqlite: &'static str,
    /// Its text on PostgreSQL.
    pub(super) postgres: &'static str,
}

/// A migration in portable SQL: one text, run unchanged on both databases.
macro_rules! portable {
    ($version:literal, $description:literal, $file:literal) => {
        SchemaMigration {
            version: $version,
            description: $description,
            sqlite: include_str!(concat!("../../migrations/", $file)),
            postgres: include_str!(concat!("../../migrations/", $file)),
        }
    };
}

pub(super) const MIGRATIONS: &[SchemaMigration] = &[
    portable!(1, "opt-out ledger", "0001_opt_out_ledger.sql"),
    portable!(2, "requests by email", "0002_requests_by_email.sql"),
    portable!(3, "request fingerprints", "0003_request_fingerprints.sql"),
    portable!(4, "lease generations", "0004_lease_generations.sql"),
    portable!(5, "drift reconciliation", "0005_drift_reconciliation.sql"),
    portable!(
        6,
        "retry when ACS answers",
        "0006_retry_when_acs_answers.sql"
    ),
    portable!(
        7,
        "indexes that cost what they serve",
        "0007_requests_in_order.sql"
    ),
    // PostgreSQL's functions for one round trip per unit of work; SQLite, which makes no round
    // trips, gets a text that changes nothing, so that both histories reach version 8.
    SchemaMigration {
        version: 8,
        description: "one round trip per unit",
        sqlite: include_str!("../../migrations/0008_one_round_trip_units.sqlite.sql"),
        postgres: include_str!("../../migrations/0008_one_round_trip_units.postgres.sql"),
    },
    // The change feed: the same tables on both, written by triggers in each one's dialect.
    SchemaMigration {
        version: 9,
        description: "opt-out changes",
        sqlite: include_str!("../../migrations/0009_opt_out_changes.sqlite.sql"),
        postgres: include_str!("../../migrations/0009_opt_out_changes.postgres.sql"),
    },
    // Notifications to third parties: the same tables on both, filled by a trigger in each one's
    // dialect.
    SchemaMigration {
        version: 10,
        description: "notifications",
        sqlite: include_str!("../../migrations/0010_notifications.sqlite.sql"),
        postgres: include_str!("../../migrations/0010_notifications.postgres.sql"),
    },
];

/// A pool of `max_connections` to `url` (PostgreSQL), each set up for durability.
pub(super) async fn connect(
    url: &str,
    backend: Backend,
    max_connections: u32,
    purpose: Purpose,
) -> Result<AnyPool, LedgerError> {
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        // sqlx pings a connection before lending it by default: a round trip to PostgreSQL for
        // every query. A broken connection fails the query instead, which is answered
        // UNAVAILABLE, and the pool replaces it.
        .test_before_acquire(false)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                let settings: &[&'static str] = match backend {
                    // SQLite's connections are rusqlite's (see `sqlite`).
                    Backend::Sqlite => &[],
                    // The server's default, made explicit: a commit returns once on disk.
                    // Serving calls, no statement and no wait for a lock (a hot profile's
                    // advisory lock) may hold a pooled connection for long: past these it
                    // fails, the call is answered UNAVAILABLE, and the connection serves others.
                    // Migrations and `records` (an export streams for as long as it takes) run
                    // without them; a prune lifts the statement bound for its own transaction.
                    Backend::Postgres => match purpose {
                        Purpose::Serving => &[
                            "SET synchronous_commit TO on",
                            "SET statement_timeout TO '30s'",
                            "SET lock_timeout TO '10s'",
                        ],
                        Purpose::Maintenance => &["SET synchronous_commit TO on"],
                    },
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

/// What a pool's connections are for, on PostgreSQL: serving calls (bounded statements and
/// lock waits), or migrating and reading the ledger as a tool (unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Serving,
    Maintenance,
}

/// Brings the schema up to date (PostgreSQL; SQLite's is `sqlite::migrate`, to the same
/// history).
pub(super) async fn migrate(pool: &AnyPool) -> Result<(), LedgerError> {
    let migrations = MIGRATIONS
        .iter()
        .map(|migration| {
            Migration::new(
                migration.version,
                migration.description.into(),
                MigrationType::Simple,
                migration.postgres.into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}

/// Checks that the schema is this version's, without changing anything: a ledger that is not
/// up to date (or is not a ledger at all) is refused.
async fn verify(pool: &AnyPool) -> Result<(), LedgerError> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(|_| {
                LedgerError::Location(
                    "this database holds no ledger (no schema): check the location".into(),
                )
            })?;
    schema_is_this_versions(&applied)
}

/// Refuses a ledger whose applied migrations (`applied`, the versions that succeeded, in order)
/// are not exactly this version's: both databases' `verify`.
pub(super) fn schema_is_this_versions(applied: &[i64]) -> Result<(), LedgerError> {
    let expected: Vec<i64> = MIGRATIONS
        .iter()
        .map(|migration| migration.version)
        .collect();
    if applied != expected {
        return Err(LedgerError::Location(format!(
            "the ledger's schema is at versions {applied:?}, this gateway's at {expected:?}: \
             start this version's `serve` on it first, which migrates it"
        )));
    }
    Ok(())
}

/// Creates a SQLite ledger file readable and writable by its owner only, unless it exists.
/// SQLite gives its WAL and shared-memory files the database file's permissions.
fn create_private_file(path: &Path) -> Result<(), LedgerError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(LedgerError::Location(format!(
            "the ledger file {} cannot be created: {e}",
            path.display()
        ))),
    }
}

/// How a ledger is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// For serving: created if missing (a SQLite file, readable by its owner only), and its
    /// schema brought up to date.
    CreateOrMigrate,
    /// For reading it (`records`): it must exist with this version's schema; nothing is created
    /// or changed, so that a wrong location is an error rather than an empty ledger.
    Existing,
}

impl Ledger {
    /// Whether `location` names a SQLite database in memory, in any of the forms SQLite or sqlx
    /// take (`sqlite::memory:`, `:memory:`, `file::memory:`, `mode=memory`): such a ledger
    /// keeps nothing past the process.
    pub fn in_memory(location: &str) -> bool {
        let location = location.to_ascii_lowercase();
        !location.starts_with("postgres")
            && (location.contains(":memory:") || location.contains("mode=memory"))
    }

    /// Opens the ledger at `location` (a file path, `sqlite::memory:`, or a `postgres://` URL),
    /// creating it if needed (a SQLite file readable by its owner only), and brings its schema
    /// up to date.
    pub async fn open(location: &str) -> Result<Self, LedgerError> {
        Self::open_as(location, Opening::CreateOrMigrate).await
    }

    /// Opens an existing ledger with this version's schema, creating and migrating nothing: for
    /// tools that read it. A location where no ledger is, or one that is not up to date, is an
    /// error.
    pub async fn open_existing(location: &str) -> Result<Self, LedgerError> {
        Self::open_as(location, Opening::Existing).await
    }

    async fn open_as(location: &str, opening: Opening) -> Result<Self, LedgerError> {
        sqlx::any::install_default_drivers();
        let (url, backend) = if location.starts_with("postgres://")
            || location.starts_with("postgresql://")
        {
            crate::transport::require_verified_postgres(location).map_err(LedgerError::Location)?;
            (location.to_owned(), Backend::Postgres)
        } else if location == "sqlite::memory:" {
            ("sqlite::memory:".to_owned(), Backend::Sqlite)
        } else if location.is_empty() || location.contains("://") {
            return Err(LedgerError::Location(format!(
                "the ledger must be a file path or a postgres:// URL, not {location:?}"
            )));
        } else {
            let path = Path::new(location);
            match opening {
                Opening::CreateOrMigrate => create_private_file(path)?,
                Opening::Existing if !path.is_file() => {
                    return Err(LedgerError::Location(format!(
                        "no ledger file at {location:?}: it is opened, never created, here"
                    )));
                }
                Opening::Existing => {}
            }
            // The file exists now: SQLite must not create one (opened read-write, not created).
            (location.to_owned(), Backend::Sqlite)
        };
        if opening == Opening::Existing && location == "sqlite::memory:" {
            return Err(LedgerError::Location(
                "an in-memory ledger exists only inside the gateway that made it".into(),
            ));
        }
        let serving = match opening {
            Opening::CreateOrMigrate => Purpose::Serving,
            Opening::Existing => Purpose::Maintenance,
        };
        let (store, file) = match (backend, location) {
            // PostgreSQL handles concurrent writers itself: one pool for everything, once the
            // schema is checked or migrated on a connection of its own (a migration may wait
            // for another replica's).
            (Backend::Postgres, _) => {
                let pool = connect(&url, backend, 1, Purpose::Maintenance).await?;
                match opening {
                    Opening::CreateOrMigrate => migrate(&pool).await?,
                    Opening::Existing => verify(&pool).await?,
                }
                pool.close().await;
                let pool = connect(&url, backend, 16, serving).await?;
                (
                    Store::Postgres(Postgres {
                        reader: pool.clone(),
                        writer: Writer::pooled(pool),
                    }),
                    None,
                )
            }
            // Each connection to an in-memory database sees a database of its own: the writer
            // thread's connection serves everything.
            (Backend::Sqlite, "sqlite::memory:") => (
                Store::Sqlite(Arc::new(Sqlite::open(None, opening).await?)),
                None,
            ),
            // SQLite has one writer at a time: one connection, owned by the thread that batches
            // every write into group commits, while readers use others beside it (WAL).
            (Backend::Sqlite, _) => {
                let file = PathBuf::from(url);
                (
                    Store::Sqlite(Arc::new(Sqlite::open(Some(file.clone()), opening).await?)),
                    Some(file),
                )
            }
        };
        Ok(Self {
            store,
            backend,
            file,
            turns: Arc::new(ProfileTurns::new()),
            known: Arc::new(KnownProfiles::new()),
            clock: Arc::new(TokioClock),
        })
    }
}
