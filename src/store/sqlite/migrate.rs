//! The schema of a SQLite ledger, brought up to date as sqlx's migrator did it, in the same
//! history table (`_sqlx_migrations`, same columns, same checksums: SHA-384 of each migration's
//! SQLite text, see `open::SchemaMigration`):
//! a ledger written by an earlier release migrates here, and one migrated here is up to date for
//! sqlx (or an earlier gateway) too.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha384};
use sqlx::migrate::MigrateError;

use super::super::LedgerError;
use super::super::open::{MIGRATIONS, SchemaMigration};

/// sqlx's own DDL for its history table on SQLite.
const HISTORY: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
);";

/// The checksum sqlx keeps for a migration.
pub(super) fn checksum(sql: &str) -> Vec<u8> {
    Sha384::digest(sql.as_bytes()).to_vec()
}

/// Brings the schema up to date, each missing migration in a transaction of its own with its
/// row of history. Refuses, as sqlx did, a ledger with a failed migration, one that applied a
/// migration this version does not know, or one whose applied migration differs from this
/// version's.
pub(super) fn run(connection: &Connection) -> Result<(), LedgerError> {
    connection.execute_batch(HISTORY)?;
    let dirty: Option<i64> = connection
        .query_row(
            "SELECT version FROM _sqlx_migrations WHERE success = false ORDER BY version LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(version) = dirty {
        return Err(MigrateError::Dirty(version).into());
    }
    for (version, _) in applied(connection)? {
        if !MIGRATIONS.iter().any(|known| known.version == version) {
            return Err(MigrateError::VersionMissing(version).into());
        }
    }
    for SchemaMigration {
        version,
        description,
        sqlite: sql,
        ..
    } in MIGRATIONS
    {
        let started = std::time::Instant::now();
        let checksum = checksum(sql);
        // Read again inside the transaction: another process may have applied it meanwhile.
        connection.execute_batch("BEGIN IMMEDIATE")?;
        let applied = (|| {
            let recorded: Option<Vec<u8>> = connection
                .query_row(
                    "SELECT checksum FROM _sqlx_migrations WHERE version = ?1",
                    [version],
                    |row| row.get(0),
                )
                .optional()?;
            match recorded {
                Some(recorded) if recorded != checksum => {
                    Err(MigrateError::VersionMismatch(*version).into())
                }
                Some(_) => Ok(false),
                None => {
                    connection.execute_batch(sql)?;
                    connection.execute(
                        "INSERT INTO _sqlx_migrations \
                         (version, description, success, checksum, execution_time) \
                         VALUES (?1, ?2, TRUE, ?3, -1)",
                        params![version, description, checksum],
                    )?;
                    Ok(true)
                }
            }
        })();
        match applied {
            Ok(applied) => {
                connection.execute_batch("COMMIT")?;
                if applied {
                    // As sqlx does: the time is noted after the commit, for the record only.
                    let nanos = i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX);
                    connection.execute(
                        "UPDATE _sqlx_migrations SET execution_time = ?1 WHERE version = ?2",
                        params![nanos, version],
                    )?;
                    tracing::info!(version, description, "ledger migrated");
                }
            }
            Err(e) => {
                let _ = connection.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The versions applied, with their checksums.
fn applied(connection: &Connection) -> Result<Vec<(i64, Vec<u8>)>, LedgerError> {
    let mut statement =
        connection.prepare("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")?;
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Checks that the schema is this version's, without changing anything: a ledger that is not
/// up to date (or is not a ledger at all) is refused.
pub(super) fn verify(connection: &Connection) -> Result<(), LedgerError> {
    let no_ledger = |_| {
        LedgerError::Location(
            "this database holds no ledger (no schema): check the location".into(),
        )
    };
    let mut statement = connection
        .prepare("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .map_err(no_ledger)?;
    let applied = statement
        .query_map([], |row| row.get::<_, i64>(0))
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(no_ledger)?;
    super::super::open::schema_is_this_versions(&applied)
}
