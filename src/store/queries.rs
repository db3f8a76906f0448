//! Reading the ledger: one record, a request's profiles, pending changes, pages and exports.

use futures::StreamExt;
use futures::stream::BoxStream;
use sqlx::Executor;
use sqlx::any::AnyRow;

use super::{Ledger, LedgerError, Record, State, Store, sqlite};

/// What is pending in the ledger, in figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingSummary {
    /// Requests pending.
    pub pending: i64,
    /// When the oldest of them was received (Unix milliseconds).
    pub oldest_received_at: Option<i64>,
    /// Those received before the overdue threshold.
    pub overdue: i64,
}

/// The most profiles a request by email may reach (`--max-profiles-per-email` is at most this):
/// what bounds a request's records, and the answer that lists them.
pub const MAX_PROFILES_PER_EMAIL: u32 = 10_000;

/// Filters of a listing; every one optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this profile key.
    pub pkey: Option<String>,
    /// Only requests made at or after this instant (ms).
    pub received_after: Option<i64>,
    /// Only requests made before this instant (ms).
    pub received_before: Option<i64>,
    /// Only this state.
    pub state: Option<State>,
}

/// Where a page of a listing starts: after this record (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `received_at` of the last record of the previous page.
    pub received_at: i64,
    /// `request_id` of the last record of the previous page.
    pub request_id: String,
}

/// Every column of `opt_out_records`, in the order [`Record::from_row`] reads them. PostgreSQL's
/// `ccpa_record_request` (migration 8) answers with these columns by name: a column added here
/// is added to its output by a migration that replaces it.
pub(super) const COLUMNS: &str = "request_id, kind, pkey, opt_out, source, received_at, received_at_given, \
     recorded_at, caller, state, answered_at, resolved_at, attempts, next_attempt_at, last_error, \
     failure_reason, failure_code, superseded_by, parent_request_id, fingerprint, \
     restores_request_id";

/// `SELECT <every column> FROM opt_out_records <rest>`, for the static `rest` of a query.
pub(super) struct AssertColumns;

impl AssertColumns {
    pub(super) fn sql(rest: &'static str) -> sqlx::AssertSqlSafe<String> {
        // Both parts are constants of this module: nothing from a request reaches the text of
        // the query.
        sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM opt_out_records {rest}"))
    }
}

pub(super) async fn fetch_record<'e, E>(
    executor: E,
    request_id: &str,
) -> Result<Option<Record>, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let row: Option<AnyRow> = sqlx::query(AssertColumns::sql("WHERE request_id = $1"))
        .bind(request_id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(Record::from_row).transpose()
}

impl Ledger {
    /// One record, by request id.
    pub async fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let request_id = request_id.to_owned();
                return db
                    .read(move |c| sqlite::units::fetch_record(c, &request_id))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let mut connection = pg.reader.acquire().await?;
        fetch_record(&mut *connection, request_id).await
    }

    /// The records a request made by email fanned out to, in the order they were made: at most
    /// [`MAX_PROFILES_PER_EMAIL`], the most a request by email may reach.
    pub async fn children(&self, parent_request_id: &str) -> Result<Vec<Record>, LedgerError> {
        const _: () = assert!(MAX_PROFILES_PER_EMAIL == 10_000, "the LIMIT below");
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let parent_request_id = parent_request_id.to_owned();
                return db
                    .read(move |c| sqlite::units::children(c, &parent_request_id))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let rows = sqlx::query(AssertColumns::sql(
            "WHERE parent_request_id = $1 ORDER BY request_id LIMIT 10000",
        ))
        .bind(parent_request_id)
        .fetch_all(&pg.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// Pending requests made before `received_before`, oldest first, row by row: a backlog of
    /// any size is read in constant memory.
    pub fn pending_before(
        &self,
        received_before: i64,
    ) -> BoxStream<'_, Result<Record, LedgerError>> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db.records(sqlite::units::PENDING_BEFORE, vec![received_before]);
            }
            Store::Postgres(pg) => pg,
        };
        sqlx::query(AssertColumns::sql(
            "WHERE state = 'PENDING' AND received_at < $1 ORDER BY received_at",
        ))
        .bind(received_before)
        .fetch(&pg.reader)
        .map(|row| Record::from_row(&row?))
        .boxed()
    }

    /// Pending requests: how many, when the oldest was received, and how many were received
    /// before `overdue_before`. One statement, counted on the index of pending requests.
    pub async fn pending_summary(
        &self,
        overdue_before: i64,
    ) -> Result<PendingSummary, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::units::pending_summary(c, overdue_before))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let (pending, oldest, overdue): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(received_at), \
                    SUM(CASE WHEN received_at < $1 THEN 1 ELSE 0 END) \
             FROM opt_out_records WHERE state = 'PENDING'",
        )
        .bind(overdue_before)
        .fetch_one(&pg.reader)
        .await?;
        Ok(PendingSummary {
            pending,
            oldest_received_at: oldest,
            overdue: overdue.unwrap_or(0),
        })
    }

    /// How many pending requests were received before `received_before`, and the oldest of
    /// them: what the overdue clock needs, without loading a backlog of any size.
    pub async fn overdue_summary(
        &self,
        received_before: i64,
    ) -> Result<Option<(i64, Record)>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::units::overdue_summary(c, received_before))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM opt_out_records WHERE state = 'PENDING' AND received_at < $1",
        )
        .bind(received_before)
        .fetch_one(&pg.reader)
        .await?;
        if count == 0 {
            return Ok(None);
        }
        let oldest = sqlx::query(AssertColumns::sql(
            "WHERE state = 'PENDING' AND received_at < $1 ORDER BY received_at LIMIT 1",
        ))
        .bind(received_before)
        .fetch_optional(&pg.reader)
        .await?;
        // Resolved between the two reads: nothing overdue any more.
        oldest
            .as_ref()
            .map(Record::from_row)
            .transpose()
            .map(|oldest| oldest.map(|oldest| (count, oldest)))
    }

    /// A page of records, newest request first.
    pub async fn list(
        &self,
        filter: &ListFilter,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Record>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let (filter, after) = (filter.clone(), after.cloned());
                return db
                    .read(move |c| sqlite::units::list(c, &filter, after.as_ref(), limit))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let rows = sqlx::query(AssertColumns::sql(
            "WHERE (CAST($1 AS TEXT) IS NULL OR pkey = $1) \
               AND (CAST($2 AS BIGINT) IS NULL OR received_at >= $2) \
               AND (CAST($3 AS BIGINT) IS NULL OR received_at < $3) \
               AND (CAST($4 AS TEXT) IS NULL OR state = $4) \
               AND (CAST($5 AS BIGINT) IS NULL OR received_at < $5 \
                    OR (received_at = $5 AND request_id < $6)) \
             ORDER BY received_at DESC, request_id DESC LIMIT $7",
        ))
        .bind(&filter.pkey)
        .bind(filter.received_after)
        .bind(filter.received_before)
        .bind(filter.state.map(State::as_str))
        .bind(after.map(|c| c.received_at))
        .bind(after.map(|c| c.request_id.clone()).unwrap_or_default())
        .bind(limit)
        .fetch_all(&pg.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// Every record of requests made in `[since, until)`, oldest first, row by row: an export
    /// of any size is read in constant memory.
    pub fn export(&self, since: i64, until: i64) -> BoxStream<'_, Result<Record, LedgerError>> {
        let pg = match &self.store {
            Store::Sqlite(db) => return db.records(sqlite::units::EXPORT, vec![since, until]),
            Store::Postgres(pg) => pg,
        };
        sqlx::query(AssertColumns::sql(
            "WHERE received_at >= $1 AND received_at < $2 ORDER BY received_at, request_id",
        ))
        .bind(since)
        .bind(until)
        .fetch(&pg.reader)
        .map(|row| Record::from_row(&row?))
        .boxed()
    }
}
