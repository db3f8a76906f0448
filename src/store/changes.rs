//! The change feed's store: each time a consumer request of a profile is recorded or changes
//! state, a row of `opt_out_changes` (written by migration 9's triggers, in the unit of work
//! that changes the record), read here in the order the feed serves them.
//!
//! The order is `(tx, position)`. On SQLite, one writer commits at a time, so `position` alone
//! is the commit order (`tx` is 0). On PostgreSQL, transactions commit out of the order of their
//! sequence values; a change is served only once every transaction with a lower id has ended
//! (below `pg_snapshot_xmin`), so a reader that resumes after the last change it saw never skips
//! one that committed later (see the migration).

use sqlx::Row;

use super::{Ledger, LedgerError, Source, State, Store, sqlite};

/// Where a change stands in the feed's order. A cursor names the last change a watcher saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ChangePosition {
    /// The id of the transaction that wrote it (PostgreSQL; 0 on SQLite).
    pub tx: i64,
    /// Its sequence number, in the order written.
    pub position: i64,
}

/// One change of a consumer request: recorded (its first state), or a later state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where it stands in the feed.
    pub at: ChangePosition,
    /// The request's id.
    pub request_id: String,
    /// The profile's key.
    pub pkey: String,
    /// The requested value: true to opt out of sale.
    pub opt_out: bool,
    /// How the consumer made the request.
    pub source: Source,
    /// When the consumer made it (ms).
    pub received_at: i64,
    /// The state it changed to.
    pub state: State,
    /// When it changed (ms, the ledger's clock).
    pub changed_at: i64,
    /// When ACS came to hold it (ms), for an APPLIED change.
    pub honored_at: Option<i64>,
}

/// A page of the feed after a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesAfter {
    /// The next changes, in order (none when the watcher has seen them all).
    Changes(Vec<Change>),
    /// Retention has pruned changes after the cursor: resuming there would skip them.
    Expired,
}

/// The columns of a change, in the order [`change_of`] reads them.
macro_rules! change_columns {
    () => {
        "tx, position, request_id, pkey, opt_out, source, received_at, state, changed_at, \
         honored_at"
    };
}

/// SQLite's page: every change written is committed (one writer).
pub(super) const SQLITE_PAGE: &str = concat!(
    "SELECT ",
    change_columns!(),
    " FROM opt_out_changes WHERE (tx, position) > (?1, ?2) AND (?3 = 1 OR opt_out = 1) \
     ORDER BY tx, position LIMIT ?4"
);

/// PostgreSQL's page: only below the oldest transaction still running, whose changes (and those
/// of any later one) may yet commit.
const POSTGRES_PAGE: &str = concat!(
    "SELECT ",
    change_columns!(),
    " FROM opt_out_changes WHERE (tx, position) > ($1, $2) AND ($3 = 1 OR opt_out = 1) \
     AND tx < pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT \
     ORDER BY tx, position LIMIT $4"
);

/// Where retention has pruned the feed up to.
pub(super) const PRUNED_THROUGH: &str =
    "SELECT tx, position FROM opt_out_changes_pruned WHERE only_row = 1";

/// Moves the pruned mark (`$1`: changed before) to the last change older than the records'
/// retention, then deletes the feed up to it: the feed's retained history is everything after
/// the mark, with no hole.
pub(super) const PRUNE_MARK: &str = "UPDATE opt_out_changes_pruned SET (tx, position) = \
     (SELECT tx, position FROM opt_out_changes WHERE changed_at < $1 \
      ORDER BY tx DESC, position DESC LIMIT 1) \
     WHERE only_row = 1 AND EXISTS (SELECT 1 FROM opt_out_changes WHERE changed_at < $1)";

/// See [`PRUNE_MARK`].
pub(super) const PRUNE_CHANGES: &str = "DELETE FROM opt_out_changes WHERE (tx, position) <= \
     (SELECT tx, position FROM opt_out_changes_pruned WHERE only_row = 1)";

/// A change from its columns (`change_columns!`), each read by `get`.
pub(super) fn change_of(
    get_i64: impl Fn(usize) -> Result<i64, LedgerError>,
    get_text: impl Fn(usize) -> Result<String, LedgerError>,
    get_opt_i64: impl Fn(usize) -> Result<Option<i64>, LedgerError>,
) -> Result<Change, LedgerError> {
    Ok(Change {
        at: ChangePosition {
            tx: get_i64(0)?,
            position: get_i64(1)?,
        },
        request_id: get_text(2)?,
        pkey: get_text(3)?,
        opt_out: get_i64(4)? != 0,
        source: Source::parse(&get_text(5)?)?,
        received_at: get_i64(6)?,
        state: State::parse(&get_text(7)?)?,
        changed_at: get_i64(8)?,
        honored_at: get_opt_i64(9)?,
    })
}

impl Ledger {
    /// At most `limit` changes after `after` (from the oldest retained without one), in the
    /// feed's order; opt-ins only with `include_opt_ins`. [`ChangesAfter::Expired`] when
    /// retention has pruned changes after `after`.
    pub async fn changes_after(
        &self,
        after: Option<ChangePosition>,
        include_opt_ins: bool,
        limit: u32,
    ) -> Result<ChangesAfter, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::units::changes_after(c, after, include_opt_ins, limit))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let mut connection = pg.reader.acquire().await?;
        let from = after.unwrap_or_default();
        let rows = sqlx::query(POSTGRES_PAGE)
            .bind(from.tx)
            .bind(from.position)
            .bind(i64::from(include_opt_ins))
            .bind(i64::from(limit))
            .fetch_all(&mut *connection)
            .await?;
        // Read after the page: a prune that committed before the page was read is seen here
        // (see `sqlite::units::changes_after`).
        let (tx, position): (i64, i64) = sqlx::query_as(PRUNED_THROUGH)
            .fetch_one(&mut *connection)
            .await?;
        let changes = rows
            .iter()
            .map(|row| {
                change_of(
                    |i| Ok(row.try_get::<i64, _>(i)?),
                    |i| Ok(row.try_get::<String, _>(i)?),
                    |i| Ok(row.try_get::<Option<i64>, _>(i)?),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page_after_mark(
            after,
            changes,
            ChangePosition { tx, position },
        ))
    }
}

/// A page read after `after`, with the pruned mark read after it: expired when retention has
/// pruned past the cursor; otherwise the page without what the prune deleted since it was read.
pub(super) fn page_after_mark(
    after: Option<ChangePosition>,
    mut changes: Vec<Change>,
    pruned: ChangePosition,
) -> ChangesAfter {
    if after.is_some_and(|after| after < pruned) {
        return ChangesAfter::Expired;
    }
    changes.retain(|change| change.at > pruned);
    ChangesAfter::Changes(changes)
}
