//! Notifications' units and reads on SQLite: the statements of `store::notifications`, run on
//! the writer's batch or a reader's connection.

use rusqlite::{Connection, OptionalExtension, params};

use super::super::notifications::{
    ACTIVE_RECIPIENTS, BACKLOG, DEACTIVATE_RECIPIENT, DueNotification, LIST, Notification,
    NotificationCursor, OF_REQUEST, REQUEST_OF, RecipientBacklog, RecipientEvents, SETTLE,
    SQLITE_CLAIM, Settle, UPSERT_RECIPIENT, notification_of_sqlite,
};
use super::super::{LedgerError, Source};

pub(in crate::store) fn set_recipients(
    tx: &Connection,
    recipients: &[RecipientEvents],
    now: i64,
) -> Result<(), LedgerError> {
    for recipient in recipients {
        tx.prepare_cached(UPSERT_RECIPIENT)?.execute(params![
            recipient.id,
            i64::from(recipient.opt_out),
            i64::from(recipient.opt_in),
            now
        ])?;
    }
    let active: Vec<String> = tx
        .prepare_cached(ACTIVE_RECIPIENTS)?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    for id in active {
        if !recipients.iter().any(|r| r.id == id) {
            tx.prepare_cached(DEACTIVATE_RECIPIENT)?
                .execute(params![now, id])?;
        }
    }
    Ok(())
}

pub(in crate::store) fn claim(
    tx: &Connection,
    holder: &str,
    until: i64,
    now: i64,
    recipient: &str,
    limit: i64,
) -> Result<Vec<DueNotification>, LedgerError> {
    let claimed: Vec<(String, String, i64, i64, Option<String>)> = tx
        .prepare_cached(SQLITE_CLAIM)?
        .query_map(params![holder, until, now, recipient, limit], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut due = Vec::with_capacity(claimed.len());
    let mut request = tx.prepare_cached(REQUEST_OF)?;
    for (request_id, recipient, attempts, created_at, email_sha256) in claimed {
        let Some((pkey, opt_out, source, received_at)) = request
            .query_row([&request_id], |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .optional()?
        else {
            // Its record was pruned: the prune deletes the notification next.
            continue;
        };
        due.push(DueNotification {
            request_id,
            recipient,
            attempts,
            created_at,
            email_sha256,
            pkey,
            opt_out: opt_out != 0,
            source: Source::parse(&source)?,
            received_at,
        });
    }
    Ok(due)
}

pub(in crate::store) fn settle(
    tx: &Connection,
    settle: &Settle,
    now: i64,
    holder: &str,
) -> Result<bool, LedgerError> {
    let (state, next, delivered, failed, class, reason) = settle.outcome.fields(now);
    let settled = tx.prepare_cached(SETTLE)?.execute(params![
        state,
        next,
        delivered,
        failed,
        class,
        reason,
        settle.created_at,
        settle.request_id,
        settle.recipient,
        holder
    ])?;
    Ok(settled == 1)
}

pub(in crate::store) fn of_request(
    connection: &Connection,
    recorded_at: i64,
    request_id: &str,
) -> Result<Vec<Notification>, LedgerError> {
    let mut statement = connection.prepare_cached(OF_REQUEST)?;
    let mut rows = statement.query(params![recorded_at, request_id])?;
    let mut notifications = Vec::new();
    while let Some(row) = rows.next()? {
        notifications.push(notification_of_sqlite(row)?);
    }
    Ok(notifications)
}

pub(in crate::store) fn list(
    connection: &Connection,
    recipient: Option<&str>,
    state: Option<&str>,
    after: Option<&NotificationCursor>,
    limit: i64,
) -> Result<Vec<Notification>, LedgerError> {
    let mut statement = connection.prepare_cached(LIST)?;
    let (after_at, after_request, after_recipient) = match after {
        Some((at, request, recipient)) => (Some(at), Some(request), Some(recipient)),
        None => (None, None, None),
    };
    let mut rows = statement.query(params![
        recipient,
        state,
        after_at,
        after_request,
        after_recipient,
        limit
    ])?;
    let mut notifications = Vec::new();
    while let Some(row) = rows.next()? {
        notifications.push(notification_of_sqlite(row)?);
    }
    Ok(notifications)
}

pub(in crate::store) fn backlog(
    connection: &Connection,
) -> Result<Vec<RecipientBacklog>, LedgerError> {
    let mut statement = connection.prepare_cached(BACKLOG)?;
    let rows = statement.query_map([], |row| {
        Ok(RecipientBacklog {
            recipient: row.get(0)?,
            pending: row.get(1)?,
            oldest_created_at: row.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
