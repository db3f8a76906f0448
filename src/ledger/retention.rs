//! Retention: records are kept at least 24 months after the response, then pruned.

use super::{Ledger, LedgerError};

/// 24 months: 731 days, the longest any 24 months can be (when they hold a 29 February), so that
/// a record is never pruned a day early.
pub const MIN_RETENTION: std::time::Duration = std::time::Duration::from_secs(731 * 24 * 3600);

impl Ledger {
    /// Deletes the records of requests resolved before `resolved_before`, except pending ones.
    /// Returns how many.
    pub async fn prune(&self, resolved_before: i64) -> Result<u64, LedgerError> {
        // Counted from the response, not the request: the regulations keep the record of how
        // the business responded for 24 months, and a request may have waited before it was.
        self.write(move |connection| {
            Box::pin(async move {
                let deleted = sqlx::query(
                    "DELETE FROM opt_out_records \
                     WHERE state <> 'PENDING' AND COALESCE(resolved_at, received_at) < $1",
                )
                .bind(resolved_before)
                .execute(&mut *connection)
                .await?
                .rows_affected();
                Ok(deleted)
            })
        })
        .await
    }
}
