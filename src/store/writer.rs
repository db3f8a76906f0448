//! Writes on PostgreSQL: every write to the ledger is a unit of work run by the writer, which
//! owns its transaction. A unit never begins or commits one itself.
//!
//! A unit of several statements runs by [`Writer::write`] in a transaction of its own on the
//! pool; a unit that is one statement (the hot ones: a function of migration 8, or a statement
//! alone) runs by [`Writer::statement`] outside any explicit transaction, so that the statement
//! is its own transaction: one round trip instead of a BEGIN, the statement and a COMMIT, each
//! a round trip. PostgreSQL groups concurrent commits into one WAL flush itself
//! (`docs/performance-history.md`). (SQLite's group commit is `sqlite`'s writer thread.)

use futures::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool};

use super::LedgerError;

/// A unit of work, run on a connection inside a transaction it must not end.
pub(super) type Unit<T> =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, LedgerError>> + Send>;

/// How writes reach the database: the pool; each unit in its own transaction.
#[derive(Clone)]
pub(super) struct Writer(AnyPool);

impl Writer {
    /// A writer running each unit in a transaction of its own on `pool`.
    pub(super) fn pooled(pool: AnyPool) -> Self {
        Self(pool)
    }

    /// Runs `unit` durably: `Ok` only once the transaction holding it has committed.
    pub(super) async fn write<T: Send + 'static>(&self, unit: Unit<T>) -> Result<T, LedgerError> {
        let started = std::time::Instant::now();
        let written = async {
            let mut transaction = self.0.begin().await?;
            let value = unit(&mut transaction).await?;
            transaction.commit().await?;
            Ok(value)
        }
        .await;
        super::metrics::observe_commit(started, 1, written.is_ok());
        written
    }

    /// Runs `unit`, which must send exactly one statement, durably: on a pooled connection
    /// outside any explicit transaction, so that PostgreSQL commits the statement as soon as it
    /// has run (or undoes all of it if it fails): `Ok` only once it has committed. A unit of more
    /// than one statement must run by [`Writer::write`], or its statements would commit apart.
    pub(super) async fn statement<T: Send + 'static>(
        &self,
        unit: Unit<T>,
    ) -> Result<T, LedgerError> {
        let started = std::time::Instant::now();
        let written = async {
            let mut connection = self.0.acquire().await?;
            unit(&mut connection).await
        }
        .await;
        super::metrics::observe_commit(started, 1, written.is_ok());
        written
    }
}

/// The one row a statement sent outside any transaction answers, taken from all its rows: read
/// with `fetch_all`, which reads the server's answer to its end, the implicit commit's outcome
/// included. `fetch_one` and `fetch_optional` on an `AnyConnection` return at the first row and
/// leave the rest unread: an error the commit raises after the row (a deferred constraint, a
/// serialization failure) would be missed, the unit answered `Ok` for a write that is not in the
/// ledger, and the error would fail the connection's next, unrelated query instead.
pub(super) fn only_row<R>(rows: Vec<R>) -> Result<R, LedgerError> {
    let count = rows.len();
    let mut rows = rows.into_iter();
    match (rows.next(), count) {
        (Some(row), 1) => Ok(row),
        _ => Err(LedgerError::Corrupt(format!(
            "a ledger function answered {count} rows, not one"
        ))),
    }
}
