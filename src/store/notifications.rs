//! Notifications' store: one row of `opt_out_notifications` per consumer request and recipient,
//! written by migration 10's trigger in the unit of work that records the request; claimed
//! under a lease by one gateway at a time, settled by what the recipient answered.
//!
//! Which recipients a request is notified to is decided as it is recorded, from
//! `notification_recipients`: the ids and kinds of request the recipients file names, written
//! here by [`Ledger::set_recipients`] whenever a gateway loads it. The file's URLs and secrets
//! never reach the ledger.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Ledger, LedgerError, NotificationState, Source, Store, sqlite};
use crate::store::sqlite::latest::Touches;

/// A recipient as the ledger knows it: the kinds of request it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientEvents {
    /// Its id.
    pub id: String,
    /// Whether it is told of opt-outs.
    pub opt_out: bool,
    /// Whether it is told of opt-ins.
    pub opt_in: bool,
}

/// A notification claimed for delivery, with what its event says of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueNotification {
    /// The request's id.
    pub request_id: String,
    /// The recipient's id.
    pub recipient: String,
    /// Attempts made before this one.
    pub attempts: i64,
    /// When the request was recorded (ms): the event's time.
    pub created_at: i64,
    /// For a request by email, the hex SHA-256 of the normalised address.
    pub email_sha256: Option<String>,
    /// The profile's key; `None` for a request by email itself.
    pub pkey: Option<String>,
    /// The requested value: true to opt out of sale.
    pub opt_out: bool,
    /// How the consumer made the request.
    pub source: Source,
    /// When the consumer made it (ms).
    pub received_at: i64,
}

/// A notification as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notification {
    /// The request's id.
    pub request_id: String,
    /// The recipient's id.
    pub recipient: String,
    /// Where it stands.
    pub state: NotificationState,
    /// When the request was recorded, and the notification with it (ms).
    pub created_at: i64,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due, while pending (ms).
    pub next_attempt_at: i64,
    /// When the recipient answered 2xx (ms).
    pub delivered_at: Option<i64>,
    /// When it failed for good (ms).
    pub failed_at: Option<i64>,
    /// The last failed attempt's class: `timeout`, `connection`, `http_<status>`.
    pub last_failure_class: Option<String>,
    /// For FAILED: why no further attempt is made.
    pub failure_reason: Option<String>,
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// The recipient answered 2xx.
    Yes,
    /// Not delivered; tried again at `next_attempt_at` (ms).
    Retry {
        /// The failure's class.
        class: String,
        /// When.
        next_attempt_at: i64,
    },
    /// Not delivered, and never will be.
    Failed {
        /// The last failure's class.
        class: String,
        /// Why no further attempt is made.
        reason: String,
    },
}

/// An attempt's outcome, to record under the lease it was made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    /// When the request was recorded (the notification's key starts with it).
    pub created_at: i64,
    /// The request's id.
    pub request_id: String,
    /// The recipient's id.
    pub recipient: String,
    /// What came of it.
    pub outcome: Delivered,
}

/// Pending notifications of one recipient: for its gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientBacklog {
    /// The recipient's id.
    pub recipient: String,
    /// How many are pending.
    pub pending: i64,
    /// When the oldest pending one was recorded (ms).
    pub oldest_created_at: Option<i64>,
}

/// Where a listing of notifications goes on from: the last one listed (when its request was
/// recorded, the request's id, the recipient's).
pub type NotificationCursor = (i64, String, String);

/// The columns of [`Notification`], in the order [`notification_of`] reads them.
macro_rules! notification_columns {
    () => {
        "request_id, recipient, state, created_at, attempts, next_attempt_at, delivered_at, \
         failed_at, last_failure_class, failure_reason"
    };
}

/// Takes the lease of up to `$5` due notifications of recipient `$4` (now `$3`) for holder `$1`
/// until `$2`. SQLite: its writer runs one unit at a time, so the rows it selects are the rows
/// it updates; it reads each one's request after.
pub(super) const SQLITE_CLAIM: &str = "UPDATE opt_out_notifications \
     SET lease_holder = $1, lease_until = $2 \
     WHERE state = 'PENDING' AND (lease_until IS NULL OR lease_until <= $3) \
     AND (created_at, request_id, recipient) IN (SELECT created_at, request_id, recipient \
       FROM opt_out_notifications \
       WHERE recipient = $4 AND state = 'PENDING' AND next_attempt_at <= $3 \
       AND (lease_until IS NULL OR lease_until <= $3) ORDER BY next_attempt_at LIMIT $5) \
     RETURNING request_id, recipient, attempts, created_at, email_sha256";

/// The same on PostgreSQL, where several gateways claim at once: rows another is claiming are
/// skipped, not waited for, and a row is re-checked once locked (so two never both take it);
/// the request's fields come in the same statement.
const POSTGRES_CLAIM: &str = "WITH due AS (SELECT created_at, request_id, recipient \
       FROM opt_out_notifications WHERE recipient = $4 AND state = 'PENDING' \
       AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until <= $3) \
       ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED), \
     claimed AS (UPDATE opt_out_notifications n SET lease_holder = $1, lease_until = $2 \
       FROM due WHERE n.created_at = due.created_at AND n.request_id = due.request_id \
       AND n.recipient = due.recipient \
       RETURNING n.request_id, n.recipient, n.attempts, n.created_at, n.email_sha256) \
     SELECT c.request_id, c.recipient, c.attempts, c.created_at, c.email_sha256, r.pkey, \
       r.opt_out, r.source, r.received_at \
     FROM claimed c JOIN opt_out_records r ON r.request_id = c.request_id";

/// A claimed notification's request: `pkey, opt_out, source, received_at` of request `$1`.
pub(super) const REQUEST_OF: &str =
    "SELECT pkey, opt_out, source, received_at FROM opt_out_records WHERE request_id = $1";

/// Settles an attempt under the lease of `$10`: state `$1`, next attempt `$2`, delivered `$3`,
/// failed `$4`, class `$5`, reason `$6`, of the notification recorded at `$7` of request `$8` to
/// recipient `$9`. The address's digest is forgotten once no attempt needs it.
pub(super) const SETTLE: &str = "UPDATE opt_out_notifications SET state = $1, \
     attempts = attempts + 1, next_attempt_at = $2, delivered_at = $3, failed_at = $4, \
     last_failure_class = COALESCE($5, last_failure_class), failure_reason = $6, \
     lease_holder = NULL, lease_until = NULL, \
     email_sha256 = CASE WHEN $1 = 'PENDING' THEN email_sha256 END \
     WHERE created_at = $7 AND request_id = $8 AND recipient = $9 AND lease_holder = $10 \
     AND state = 'PENDING'";

/// Gives back, unattempted, every lease of holder `$1`.
pub(super) const RELEASE: &str = "UPDATE opt_out_notifications \
     SET lease_holder = NULL, lease_until = NULL WHERE lease_holder = $1 AND state = 'PENDING'";

/// Gives back every lease: for a gateway holding a SQLite ledger alone, whose leases can only be
/// those of a gateway that stopped.
pub(super) const RELEASE_ALL: &str = "UPDATE opt_out_notifications \
     SET lease_holder = NULL, lease_until = NULL WHERE lease_holder IS NOT NULL";

/// Sets the address's digest on the pending notifications of request `$3` recorded at `$2`, in
/// the unit that records it (or reopens it: those delivered meanwhile do not get it back).
pub(super) const SET_EMAIL_SHA256: &str = "UPDATE opt_out_notifications SET email_sha256 = $1 \
     WHERE created_at = $2 AND request_id = $3 AND state = 'PENDING'";

/// Adds (or updates, or brings back) recipient `$1`, now `$4`.
pub(super) const UPSERT_RECIPIENT: &str = "INSERT INTO notification_recipients \
     (id, opt_out, opt_in, active, added_at, changed_at) VALUES ($1, $2, $3, 1, $4, $4) \
     ON CONFLICT (id) DO UPDATE SET opt_out = excluded.opt_out, opt_in = excluded.opt_in, \
       active = 1, changed_at = excluded.changed_at, \
       added_at = CASE WHEN notification_recipients.active = 1 \
         THEN notification_recipients.added_at ELSE excluded.added_at END \
     WHERE notification_recipients.active = 0 \
       OR notification_recipients.opt_out <> excluded.opt_out \
       OR notification_recipients.opt_in <> excluded.opt_in";

/// The recipients requests are notified to now.
pub(super) const ACTIVE_RECIPIENTS: &str =
    "SELECT id FROM notification_recipients WHERE active = 1";

/// Takes recipient `$2` out (now `$1`): no request recorded from now on is notified to it.
pub(super) const DEACTIVATE_RECIPIENT: &str =
    "UPDATE notification_recipients SET active = 0, changed_at = $1 WHERE id = $2";

/// The notifications of the request recorded at `$1` with id `$2`.
pub(super) const OF_REQUEST: &str = concat!(
    "SELECT ",
    notification_columns!(),
    " FROM opt_out_notifications WHERE created_at = $1 AND request_id = $2 ORDER BY recipient"
);

/// A page of notifications (recipient `$1`, state `$2`, each or both NULL for any), after
/// (`$3`, `$4`, `$5`), in the order recorded (the key's).
pub(super) const LIST: &str = concat!(
    "SELECT ",
    notification_columns!(),
    " FROM opt_out_notifications \
     WHERE (CAST($1 AS TEXT) IS NULL OR recipient = $1) \
       AND (CAST($2 AS TEXT) IS NULL OR state = $2) \
       AND (CAST($3 AS BIGINT) IS NULL OR (created_at, request_id, recipient) > ($3, $4, $5)) \
     ORDER BY created_at, request_id, recipient LIMIT $6"
);

/// Pending notifications per recipient: how many, and the oldest.
pub(super) const BACKLOG: &str = "SELECT recipient, COUNT(*), MIN(created_at) \
     FROM opt_out_notifications WHERE state = 'PENDING' GROUP BY recipient ORDER BY recipient";

/// Pending notifications recorded before `$1`: overdue.
pub(super) const OVERDUE: &str = "SELECT COUNT(*) FROM opt_out_notifications \
     WHERE state = 'PENDING' AND created_at < $1";

/// Deletes the notifications of requests retention has pruned: recorded before `$1`, when the
/// prune's oldest kept response was (a pruned record was recorded before its response).
pub(super) const PRUNE: &str = "DELETE FROM opt_out_notifications WHERE created_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM opt_out_records r \
       WHERE r.request_id = opt_out_notifications.request_id)";

/// The stored fields of a settle: state, next attempt, delivered, failed, class, reason.
pub(super) type SettleFields<'a> = (
    &'static str,
    i64,
    Option<i64>,
    Option<i64>,
    Option<&'a str>,
    Option<&'a str>,
);

impl Delivered {
    /// What a settle at `now` stores.
    pub(super) fn fields(&self, now: i64) -> SettleFields<'_> {
        match self {
            Delivered::Yes => (
                NotificationState::Delivered.as_str(),
                now,
                Some(now),
                None,
                None,
                None,
            ),
            Delivered::Retry {
                class,
                next_attempt_at,
            } => (
                NotificationState::Pending.as_str(),
                *next_attempt_at,
                None,
                None,
                Some(class),
                None,
            ),
            Delivered::Failed { class, reason } => (
                NotificationState::Failed.as_str(),
                now,
                None,
                Some(now),
                Some(class),
                Some(reason),
            ),
        }
    }
}

/// A row of [`notification_columns!`] (PostgreSQL).
fn notification_of(row: &AnyRow) -> Result<Notification, LedgerError> {
    Ok(Notification {
        request_id: row.try_get(0)?,
        recipient: row.try_get(1)?,
        state: NotificationState::parse(&row.try_get::<String, _>(2)?)?,
        created_at: row.try_get(3)?,
        attempts: row.try_get(4)?,
        next_attempt_at: row.try_get(5)?,
        delivered_at: row.try_get(6)?,
        failed_at: row.try_get(7)?,
        last_failure_class: row.try_get(8)?,
        failure_reason: row.try_get(9)?,
    })
}

/// A row of [`notification_columns!`] (SQLite).
pub(super) fn notification_of_sqlite(row: &rusqlite::Row<'_>) -> Result<Notification, LedgerError> {
    Ok(Notification {
        request_id: row.get(0)?,
        recipient: row.get(1)?,
        state: NotificationState::parse(&row.get::<_, String>(2)?)?,
        created_at: row.get(3)?,
        attempts: row.get(4)?,
        next_attempt_at: row.get(5)?,
        delivered_at: row.get(6)?,
        failed_at: row.get(7)?,
        last_failure_class: row.get(8)?,
        failure_reason: row.get(9)?,
    })
}

impl Ledger {
    /// Makes `recipients` the ones requests recorded from now on are notified to: new ones are
    /// added, changed ones updated, those no longer named taken out (their pending notifications
    /// stay, and are delivered if they come back).
    pub async fn set_recipients(&self, recipients: &[RecipientEvents]) -> Result<(), LedgerError> {
        let recipients = recipients.to_vec();
        let now = self.now_ms();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::notifications::set_recipients(tx, &recipients, now)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                for recipient in &recipients {
                    sqlx::query(UPSERT_RECIPIENT)
                        .bind(&recipient.id)
                        .bind(i64::from(recipient.opt_out))
                        .bind(i64::from(recipient.opt_in))
                        .bind(now)
                        .execute(&mut *connection)
                        .await?;
                }
                let active: Vec<String> = sqlx::query_scalar(ACTIVE_RECIPIENTS)
                    .fetch_all(&mut *connection)
                    .await?;
                for id in active {
                    if !recipients.iter().any(|r| r.id == id) {
                        sqlx::query(DEACTIVATE_RECIPIENT)
                            .bind(now)
                            .bind(&id)
                            .execute(&mut *connection)
                            .await?;
                    }
                }
                Ok(())
            })
        })
        .await
    }

    /// Takes the lease of up to `limit` notifications of `recipient` due now, for `holder`,
    /// for `lease_ms`: no other gateway attempts them meanwhile.
    pub async fn claim_notifications(
        &self,
        recipient: &str,
        holder: &str,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<DueNotification>, LedgerError> {
        let now = self.now_ms();
        let until = now.saturating_add(lease_ms);
        let (recipient, holder) = (recipient.to_owned(), holder.to_owned());
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::notifications::claim(tx, &holder, until, now, &recipient, limit)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.statement(move |connection| {
            Box::pin(async move {
                let rows = sqlx::query(POSTGRES_CLAIM)
                    .bind(&holder)
                    .bind(until)
                    .bind(now)
                    .bind(&recipient)
                    .bind(limit)
                    .fetch_all(&mut *connection)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok(DueNotification {
                            request_id: row.try_get(0)?,
                            recipient: row.try_get(1)?,
                            attempts: row.try_get(2)?,
                            created_at: row.try_get(3)?,
                            email_sha256: row.try_get(4)?,
                            pkey: row.try_get(5)?,
                            opt_out: row.try_get::<i64, _>(6)? != 0,
                            source: Source::parse(&row.try_get::<String, _>(7)?)?,
                            received_at: row.try_get(8)?,
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    /// Records what attempts under `holder`'s lease came to, all in one unit of work (one
    /// commit for a batch of answers). For each, false when the lease was lost meanwhile (it
    /// lapsed and another gateway took it): that one's attempt decides.
    pub async fn settle_notifications(
        &self,
        holder: &str,
        settles: Vec<Settle>,
    ) -> Result<Vec<bool>, LedgerError> {
        let now = self.now_ms();
        let holder = holder.to_owned();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        settles
                            .iter()
                            .map(|settle| sqlite::notifications::settle(tx, settle, now, &holder))
                            .collect()
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                let mut settled = Vec::with_capacity(settles.len());
                for settle in &settles {
                    let (state, next, delivered, failed, class, reason) =
                        settle.outcome.fields(now);
                    let rows = sqlx::query(SETTLE)
                        .bind(state)
                        .bind(next)
                        .bind(delivered)
                        .bind(failed)
                        .bind(class)
                        .bind(reason)
                        .bind(settle.created_at)
                        .bind(&settle.request_id)
                        .bind(&settle.recipient)
                        .bind(&holder)
                        .execute(&mut *connection)
                        .await?
                        .rows_affected();
                    settled.push(rows == 1);
                }
                Ok(settled)
            })
        })
        .await
    }

    /// Gives back the leases of `holder` on notifications it did not attempt.
    pub async fn release_notifications(&self, holder: &str) -> Result<(), LedgerError> {
        let holder = holder.to_owned();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        tx.prepare_cached(RELEASE)?.execute([&holder])?;
                        Ok(())
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.statement(move |connection| {
            Box::pin(async move {
                sqlx::query(RELEASE)
                    .bind(&holder)
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// For a gateway holding a SQLite ledger alone: the leases left by a gateway that stopped
    /// (killed while it delivered) are given back now, not when they lapse. Elsewhere nothing:
    /// on PostgreSQL another gateway may hold them.
    pub async fn release_stale_notification_leases(
        &self,
        hold: &super::ExclusiveHold,
    ) -> Result<u64, LedgerError> {
        let Store::Sqlite(db) = &self.store else {
            return Ok(0);
        };
        if hold._lock.is_none() {
            return Ok(0);
        }
        db.write(Touches::Nothing, move |tx| {
            Ok(tx.prepare_cached(RELEASE_ALL)?.execute([])? as u64)
        })
        .await
    }

    /// The notifications of one request (`record`), by recipient.
    pub async fn notifications_of(
        &self,
        record: &super::Record,
    ) -> Result<Vec<Notification>, LedgerError> {
        let (recorded_at, request_id) = (record.recorded_at, record.request_id.clone());
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::notifications::of_request(c, recorded_at, &request_id))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let rows = sqlx::query(OF_REQUEST)
            .bind(recorded_at)
            .bind(&request_id)
            .fetch_all(&pg.reader)
            .await?;
        rows.iter().map(notification_of).collect()
    }

    /// A page of notifications after `after`, of `recipient` and in `state` if given.
    pub async fn list_notifications(
        &self,
        recipient: Option<&str>,
        state: Option<NotificationState>,
        after: Option<&NotificationCursor>,
        limit: i64,
    ) -> Result<Vec<Notification>, LedgerError> {
        let recipient = recipient.map(str::to_owned);
        let state = state.map(NotificationState::as_str);
        let after = after.cloned();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| {
                        sqlite::notifications::list(
                            c,
                            recipient.as_deref(),
                            state,
                            after.as_ref(),
                            limit,
                        )
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let (after_at, after_request, after_recipient) = match after {
            Some((at, request, recipient)) => (Some(at), Some(request), Some(recipient)),
            None => (None, None, None),
        };
        let rows = sqlx::query(LIST)
            .bind(recipient)
            .bind(state)
            .bind(after_at)
            .bind(after_request)
            .bind(after_recipient)
            .bind(limit)
            .fetch_all(&pg.reader)
            .await?;
        rows.iter().map(notification_of).collect()
    }

    /// Pending notifications per recipient with any.
    pub async fn notification_backlog(&self) -> Result<Vec<RecipientBacklog>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => return db.read(sqlite::notifications::backlog).await,
            Store::Postgres(pg) => pg,
        };
        let rows = sqlx::query(BACKLOG).fetch_all(&pg.reader).await?;
        rows.iter()
            .map(|row| {
                Ok(RecipientBacklog {
                    recipient: row.try_get(0)?,
                    pending: row.try_get(1)?,
                    oldest_created_at: row.try_get(2)?,
                })
            })
            .collect()
    }

    /// How many notifications are still pending that were recorded before `recorded_before`.
    pub async fn overdue_notifications(&self, recorded_before: i64) -> Result<i64, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| {
                        Ok(c.prepare_cached(OVERDUE)?
                            .query_row([recorded_before], |row| row.get(0))?)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        Ok(sqlx::query_scalar(OVERDUE)
            .bind(recorded_before)
            .fetch_one(&pg.reader)
            .await?)
    }
}
