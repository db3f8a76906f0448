//! Retention: records are kept at least 24 months after the response, then pruned.

use super::sqlite::latest::Touches;
use super::{Backend, Ledger, LedgerError, Store, sqlite};

/// How long a lapsed lease's row is kept (ms) before a prune may delete it: far longer than any
/// attempt that could still settle under it.
const LAPSED_LEASES_KEPT_MS: i64 = 3_600_000;

/// Deletes the records a prune may (`$1`: resolved before), keeping each profile's latest
/// request not overtaken and the consumer's request a kept restore names (see
/// [`Ledger::prune`]).
pub(super) const PRUNE_RECORDS: &str = concat!(
    "DELETE FROM opt_out_records \
                     WHERE state <> 'PENDING' AND COALESCE(resolved_at, received_at) < $1 \
                     AND (pkey IS NULL OR state = 'SUPERSEDED' OR EXISTS (SELECT 1 FROM \
                       opt_out_records newer WHERE newer.pkey = opt_out_records.pkey \
                       AND newer.state <> 'SUPERSEDED' AND (",
    ordered_at!("newer"),
    " > ",
    ordered_at!("opt_out_records"),
    " OR (",
    ordered_at!("newer"),
    " = ",
    ordered_at!("opt_out_records"),
    " AND newer.recorded_at > opt_out_records.recorded_at)))) \
                     AND NOT EXISTS (SELECT 1 FROM opt_out_records restore \
                       WHERE restore.restores_request_id = opt_out_records.request_id)"
);

/// Deletes the lease rows of profiles with nothing pending, lapsed before `$1`.
pub(super) const PRUNE_LEASES: &str = "DELETE FROM profile_leases WHERE expires_at < $1 AND pkey NOT \
     IN (SELECT pkey FROM opt_out_records WHERE state = 'PENDING' AND pkey IS NOT NULL)";

/// Deletes the schedule of profiles none of whose records is left.
pub(super) const PRUNE_SCHEDULE: &str = "DELETE FROM reconcile_schedule WHERE NOT EXISTS \
     (SELECT 1 FROM opt_out_records r WHERE r.pkey = reconcile_schedule.pkey)";

impl Ledger {
    /// Deletes the records of requests answered longer than `retention` ago on the ledger's
    /// clock, except pending ones and each profile's latest request (with the consumer's
    /// request it restores, if it is a restore). Returns how many.
    pub async fn prune(&self, retention: std::time::Duration) -> Result<u64, LedgerError> {
        let now = self.now_ms();
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let resolved_before = now.saturating_sub(retention_ms);
        // Counted from the response, not the request: the regulations keep the record of how
        // the business responded for 24 months, and a request may have waited before it was.
        let backend = self.backend;
        let lapsed_before = now.saturating_sub(LAPSED_LEASES_KEPT_MS);
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Everything, move |tx| {
                        sqlite::units::prune(tx, resolved_before, lapsed_before)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                if backend == Backend::Postgres {
                    // A prune of a large ledger may take longer than a call's statement may.
                    sqlx::query("SELECT set_config('statement_timeout', '0', true)")
                        .execute(&mut *connection)
                        .await?;
                }
                // A profile's latest request not overtaken (and the consumer's request a kept
                // restore names) is kept however old: it is what the profile's opt-out stands
                // on, what reads and the reconciler check ACS against, and what a consumer page
                // shows as honoured. The record of a standing opt-out outlives the retention.
                let deleted = sqlx::query(PRUNE_RECORDS)
                    .bind(resolved_before)
                    .execute(&mut *connection)
                    .await?
                    .rows_affected();
                // Leases given back (or lapsed) long ago, of profiles with nothing pending: a
                // lease row names a profile, and must not outlive its records. (Generations may
                // start again for such a profile: the fence also compares the holder, unique to
                // each claim.)
                sqlx::query(PRUNE_LEASES)
                    .bind(lapsed_before)
                    .execute(&mut *connection)
                    .await?;
                // Profiles no longer watched for drift: none of their records is left.
                sqlx::query(PRUNE_SCHEDULE)
                    .execute(&mut *connection)
                    .await?;
                // The change feed, up to the last change older than the records' retention:
                // it names profiles, and must not outlive the records it reports.
                sqlx::query(super::changes::PRUNE_MARK)
                    .bind(resolved_before)
                    .execute(&mut *connection)
                    .await?;
                sqlx::query(super::changes::PRUNE_CHANGES)
                    .execute(&mut *connection)
                    .await?;
                // Notifications of the records pruned: how the business told third parties of
                // a request is part of its record, and goes with it.
                sqlx::query(super::notifications::PRUNE)
                    .bind(resolved_before)
                    .execute(&mut *connection)
                    .await?;
                Ok(deleted)
            })
        })
        .await
    }
}
