//! What drift reconciliation keeps in the ledger: each profile's latest request, the schedule of
//! profiles the reconciler re-reads, and the drift found.

use futures::StreamExt;
use futures::stream::BoxStream;

use super::queries::AssertColumns;
use super::sqlite::latest::Touches;
use super::{Ledger, LedgerError, Record, Store, sqlite};

impl Ledger {
    /// A profile's newest request that was not overtaken (pending, applied or failed), restores
    /// included: what ACS holds, or is about to.
    ///
    /// For a read: it may skip the store for a profile the ledger's only writer knows to have no
    /// record. Background work uses [`Ledger::latest_in_store`].
    pub async fn latest(&self, pkey: &str) -> Result<Option<Record>, LedgerError> {
        if !self.known.maybe_known(pkey) {
            return Ok(None);
        }
        if let Store::Sqlite(db) = &self.store {
            // From memory when the ledger's only writer keeps it (see `sqlite::latest`).
            let owned = pkey.to_owned();
            return db
                .latest(pkey, move |c| sqlite::units::latest(c, &owned))
                .await;
        }
        self.latest_in_store(pkey).await
    }

    /// As [`Ledger::latest`], always asked of the store: for work that decides what to write
    /// (the reconciler, a restore), which no in-memory shortcut may mislead.
    pub async fn latest_in_store(&self, pkey: &str) -> Result<Option<Record>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let pkey = pkey.to_owned();
                return db.read(move |c| sqlite::units::latest(c, &pkey)).await;
            }
            Store::Postgres(pg) => pg,
        };
        let row = sqlx::query(AssertColumns::sql(concat!(
            "WHERE pkey = $1 AND state <> 'SUPERSEDED' ORDER BY ",
            ordered_at!(),
            " DESC, recorded_at DESC LIMIT 1"
        )))
        .bind(pkey)
        .fetch_optional(&pg.reader)
        .await?;
        row.as_ref().map(Record::from_row).transpose()
    }

    /// How many profiles the reconciler watches.
    pub async fn reconciled_profiles(&self) -> Result<i64, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => return db.read(sqlite::units::reconciled_profiles).await,
            Store::Postgres(pg) => pg,
        };
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM reconcile_schedule")
                .fetch_one(&pg.reader)
                .await?,
        )
    }

    /// Up to `limit` profiles last known held before `checked_before`, the longest unseen first.
    pub async fn due_for_reconcile(
        &self,
        checked_before: i64,
        limit: i64,
    ) -> Result<Vec<String>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::units::due_for_reconcile(c, checked_before, limit))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        Ok(sqlx::query_scalar(
            "SELECT pkey FROM reconcile_schedule WHERE checked_at < $1 \
             ORDER BY checked_at LIMIT $2",
        )
        .bind(checked_before)
        .bind(limit)
        .fetch_all(&pg.reader)
        .await?)
    }

    /// When ACS was last known to hold the profile's latest request, if it is watched.
    pub async fn checked_at(&self, pkey: &str) -> Result<Option<i64>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let pkey = pkey.to_owned();
                return db.read(move |c| sqlite::units::checked_at(c, &pkey)).await;
            }
            Store::Postgres(pg) => pg,
        };
        Ok(
            sqlx::query_scalar("SELECT checked_at FROM reconcile_schedule WHERE pkey = $1")
                .bind(pkey)
                .fetch_optional(&pg.reader)
                .await?,
        )
    }

    /// Notes that ACS was seen holding the profile's latest request at `at`.
    pub async fn mark_checked(&self, pkey: &str, at: i64) -> Result<(), LedgerError> {
        let pkey = pkey.to_owned();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::units::mark_checked(tx, &pkey, at)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                sqlx::query("UPDATE reconcile_schedule SET checked_at = $1 WHERE pkey = $2")
                    .bind(at)
                    .bind(&pkey)
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// Stops watching a profile (its latest request failed, or ACS no longer has it).
    pub async fn unwatch(&self, pkey: &str) -> Result<(), LedgerError> {
        let pkey = pkey.to_owned();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::units::unwatch(tx, &pkey)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                sqlx::query("DELETE FROM reconcile_schedule WHERE pkey = $1")
                    .bind(&pkey)
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// The drift found since `since` (ms): the restores recorded since, oldest first, row by
    /// row.
    pub fn drift(&self, since: i64) -> BoxStream<'_, Result<Record, LedgerError>> {
        let pg = match &self.store {
            Store::Sqlite(db) => return db.records(sqlite::units::DRIFT, vec![since]),
            Store::Postgres(pg) => pg,
        };
        sqlx::query(AssertColumns::sql(
            "WHERE restores_request_id IS NOT NULL AND recorded_at >= $1 \
             ORDER BY recorded_at, request_id",
        ))
        .bind(since)
        .fetch(&pg.reader)
        .map(|row| Record::from_row(&row?))
        .boxed()
    }
}
