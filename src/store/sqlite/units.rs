//! The ledger's units of work and reads on SQLite: the statements the PostgreSQL side runs
//! (same text, `?N` for `$N`; for its hot units, inside the functions of migration 8,
//! `migrations/0008_one_round_trip_units.postgres.sql`), in the same order, as plain synchronous
//! code over the connection's cached prepared statements. A unit runs inside the writer's batch (a savepoint
//! of it) and never begins or commits a transaction itself.

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

use super::super::changes::{ChangePosition, ChangesAfter, change_of, page_after_mark};
use super::super::intake::{reopenable, same_request};
use super::super::leases::{Claim, Outcome, Settled, fence};
use super::super::queries::{ListFilter, PendingSummary};
use super::super::{Cursor, FailureCode, Kind, LedgerError, NewRequest, Record, Recorded, State};

/// `SELECT <every column> FROM opt_out_records <rest>`, for a literal `rest`.
macro_rules! select_records {
    ($($rest:expr),+ $(,)?) => {
        concat!(
            "SELECT request_id, kind, pkey, opt_out, source, received_at, received_at_given, \
             recorded_at, caller, state, answered_at, resolved_at, attempts, next_attempt_at, \
             last_error, failure_reason, failure_code, superseded_by, parent_request_id, \
             fingerprint, restores_request_id FROM opt_out_records ",
            $($rest),+
        )
    };
}

/// The id of a pending or applied request of profile `?1` ordered after a request `?2` ordered
/// at `?3` and recorded at `?4`: the newest such. Like every query of a profile's order here, it
/// reads the first entry of `opt_out_records_in_order` (migration 7), not the whole history.
const NEWER_THAN: &str = concat!(
    "SELECT request_id FROM opt_out_records \
     WHERE pkey = ?1 AND request_id <> ?2 AND state IN ('PENDING', 'APPLIED') AND (",
    ordered_at!(),
    " > ?3 OR (",
    ordered_at!(),
    " = ?3 AND recorded_at > ?4)) ORDER BY ",
    ordered_at!(),
    " DESC, recorded_at DESC LIMIT 1"
);

/// The newest pending or applied request of profile `?1`: the one the deliverer applies.
const NEWEST_TO_APPLY: &str = concat!(
    "SELECT request_id, state FROM opt_out_records \
     WHERE pkey = ?1 AND state IN ('PENDING', 'APPLIED') ORDER BY ",
    ordered_at!(),
    " DESC, recorded_at DESC LIMIT 1"
);

/// Profile `?1`'s latest request (superseded ones aside): what a read answers from.
const LATEST: &str = select_records!(
    "WHERE pkey = ?1 AND state <> 'SUPERSEDED' ORDER BY ",
    ordered_at!(),
    " DESC, recorded_at DESC LIMIT 1"
);

pub(in crate::store) fn fetch_record(
    connection: &Connection,
    request_id: &str,
) -> Result<Option<Record>, LedgerError> {
    let mut statement = connection.prepare_cached(select_records!("WHERE request_id = ?1"))?;
    let mut rows = statement.query([request_id])?;
    rows.next()?.map(Record::from_sqlite).transpose()
}

/// The profile of the request `request_id`, if it has one.
pub(in crate::store) fn pkey_of(
    connection: &Connection,
    request_id: &str,
) -> Result<Option<String>, LedgerError> {
    Ok(connection
        .prepare_cached("SELECT pkey FROM opt_out_records WHERE request_id = ?1")?
        .query_row([request_id], |row| row.get(0))
        .optional()?
        .flatten())
}

/// [`super::super::Ledger::record`]'s unit of work.
pub(in crate::store) fn record_unit(
    tx: &Connection,
    request: &NewRequest,
    claim: Option<&Claim>,
    answered: bool,
    now: i64,
    superseded: &AtomicU64,
) -> Result<(Recorded, bool), LedgerError> {
    // RETURNING: the new record comes back with the insert, one statement instead of two.
    let inserted = {
        let mut statement = tx.prepare_cached(select_records_returning())?;
        let mut rows = statement.query(params![
            request.request_id,
            request.kind.as_str(),
            request.pkey,
            i64::from(request.opt_out),
            request.source.as_str(),
            request.received_at.unwrap_or(now),
            i64::from(request.received_at.is_some()),
            now,
            request.caller,
            now + request.first_attempt_window_ms,
            request.parent_request_id,
            request.fingerprint,
            answered.then_some(now),
            request.restores_request_id,
        ])?;
        let inserted = rows.next()?.map(Record::from_sqlite).transpose()?;
        // Stepped to its end, so that the insert is complete before anything else reads.
        while rows.next()?.is_some() {}
        inserted
    };

    let Some(mut record) = inserted else {
        let existing = fetch_record(tx, &request.request_id)?
            .ok_or_else(|| LedgerError::Corrupt("a conflicting id vanished".into()))?;
        if !same_request(&existing, request) {
            return Ok((Recorded::Conflict(existing), false));
        }
        if reopenable(&existing) && !has_children(tx, &request.request_id)? {
            // A request by email that failed before reaching any profile did nothing: its
            // replay tries it again (see the PostgreSQL unit, `intake::record_unit`).
            tx.prepare_cached(
                "UPDATE opt_out_records SET state = 'PENDING', resolved_at = NULL, \
                     last_error = failure_reason, failure_reason = NULL, failure_code = NULL, \
                     attempts = attempts + 1 WHERE request_id = ?1 AND state = 'FAILED'",
            )?
            .execute([&request.request_id])?;
            let reopened = fetch_record(tx, &request.request_id)?
                .ok_or_else(|| LedgerError::Corrupt("a reopened request vanished".into()))?;
            return Ok((Recorded::New(reopened), false));
        }
        return Ok((Recorded::Replay(existing), false));
    };

    if let Some(pkey) = &request.pkey {
        // Ordered no later than now, whatever the caller stated (see the module's "Order").
        let ordered_at = record.ordered_at();
        // A newer request (pending or applied) already recorded for the profile overtakes
        // this one.
        let newer: Option<String> = tx
            .prepare_cached(NEWER_THAN)?
            .query_row(params![pkey, request.request_id, ordered_at, now], |row| {
                row.get(0)
            })
            .optional()?;
        match newer {
            Some(newer) => {
                supersede(tx, &request.request_id, &newer, now, true)?;
                superseded.fetch_add(1, Ordering::Relaxed);
                record = fetch_record(tx, &request.request_id)?.ok_or_else(|| {
                    LedgerError::Corrupt("a record vanished as it was written".into())
                })?;
            }
            None => {
                let overtaken = supersede_older_pending(tx, pkey, &request.request_id, now)?;
                superseded.fetch_add(overtaken, Ordering::Relaxed);
            }
        }
    }
    let claimed = match (claim, &record.pkey) {
        (Some(claim), Some(pkey)) if record.state == State::Pending => {
            claim_lease(tx, pkey, claim, now)?
        }
        _ => false,
    };
    Ok((Recorded::New(record), claimed))
}

/// The insert of a new request, returning it as written (no row when its id is taken).
fn select_records_returning() -> &'static str {
    "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
         received_at_given, recorded_at, caller, state, attempts, next_attempt_at, \
         parent_request_id, fingerprint, answered_at, restores_request_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'PENDING', 0, ?10, ?11, ?12, ?13, ?14) \
         ON CONFLICT (request_id) DO NOTHING RETURNING request_id, kind, pkey, opt_out, source, \
         received_at, received_at_given, recorded_at, caller, state, answered_at, resolved_at, \
         attempts, next_attempt_at, last_error, failure_reason, failure_code, superseded_by, \
         parent_request_id, fingerprint, restores_request_id"
}

pub(in crate::store) fn supersede(
    tx: &Connection,
    request_id: &str,
    by: &str,
    now: i64,
    answered: bool,
) -> Result<(), LedgerError> {
    tx.prepare_cached(supersede_request!("?"))?
        .execute(params![by, now, i64::from(answered), request_id])?;
    Ok(())
}

/// Supersedes every pending request of profile `pkey` but `by` (see
/// `supersede_older_pending!`); returns how many.
fn supersede_older_pending(
    tx: &Connection,
    pkey: &str,
    by: &str,
    now: i64,
) -> Result<u64, LedgerError> {
    let overtaken = tx
        .prepare_cached(supersede_older_pending!("?"))?
        .execute(params![by, now, pkey])?;
    // A row count, never negative; usize fits in u64 on every target Rust supports.
    Ok(u64::try_from(overtaken).unwrap_or(u64::MAX))
}

pub(in crate::store) fn has_children(
    connection: &Connection,
    request_id: &str,
) -> Result<bool, LedgerError> {
    let children: i64 = connection
        .prepare_cached("SELECT COUNT(*) FROM opt_out_records WHERE parent_request_id = ?1")?
        .query_row([request_id], |row| row.get(0))?;
    Ok(children > 0)
}

pub(in crate::store) fn mark_answered(
    tx: &Connection,
    request_id: &str,
    now: i64,
) -> Result<(), LedgerError> {
    tx.prepare_cached(
        "UPDATE opt_out_records SET answered_at = COALESCE(answered_at, ?1) \
         WHERE request_id = ?2",
    )?
    .execute(params![now, request_id])?;
    Ok(())
}

/// Takes the lease on `pkey` for `claim` unless someone holds it at `now`; on success, the
/// claim learns the lease's new generation.
pub(in crate::store) fn claim_lease(
    tx: &Connection,
    pkey: &str,
    claim: &Claim,
    now: i64,
) -> Result<bool, LedgerError> {
    let generation: Option<i64> = {
        let mut statement = tx.prepare_cached(
            "INSERT INTO profile_leases (pkey, holder, expires_at, generation) \
             VALUES (?1, ?2, ?3, 1) \
             ON CONFLICT (pkey) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at, generation = profile_leases.generation + 1 \
             WHERE profile_leases.expires_at < ?4 \
             RETURNING generation",
        )?;
        let mut rows = statement.query(params![
            pkey,
            claim.holder,
            now.saturating_add(claim.lease_ms),
            now
        ])?;
        let generation = match rows.next()? {
            Some(row) => Some(row.get(0)?),
            None => None,
        };
        while rows.next()?.is_some() {}
        generation
    };
    match generation {
        Some(generation) => {
            claim.generation.store(generation, Ordering::SeqCst);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Gives the lease back, if `claim` still holds it: it lapses at once.
pub(in crate::store) fn release_lease(
    tx: &Connection,
    pkey: &str,
    claim: &Claim,
) -> Result<(), LedgerError> {
    tx.prepare_cached(
        "UPDATE profile_leases SET expires_at = 0 \
         WHERE pkey = ?1 AND holder = ?2 AND generation = ?3",
    )?
    .execute(params![
        pkey,
        claim.holder,
        claim.generation.load(Ordering::SeqCst)
    ])?;
    Ok(())
}

/// Whether `claim`'s lease on `pkey` is still the current one (the fencing check).
fn lease_is_current(tx: &Connection, pkey: &str, claim: &Claim) -> Result<bool, LedgerError> {
    let current: Option<i64> = tx
        .prepare_cached(
            "SELECT 1 FROM profile_leases WHERE pkey = ?1 AND holder = ?2 AND generation = ?3",
        )?
        .query_row(
            params![pkey, claim.holder, claim.generation.load(Ordering::SeqCst)],
            |row| row.get(0),
        )
        .optional()?;
    Ok(current.is_some())
}

/// [`super::super::Ledger::next_to_apply`]'s unit of work.
pub(in crate::store) fn next_to_apply_unit(
    tx: &Connection,
    pkey: &str,
    now: i64,
    superseded: &AtomicU64,
) -> Result<Option<Record>, LedgerError> {
    // As on PostgreSQL, where it locks the lease row (the batch holds SQLite's write lock).
    tx.prepare_cached("UPDATE profile_leases SET expires_at = expires_at WHERE pkey = ?1")?
        .execute([pkey])?;
    let newest: Option<(String, String)> = tx
        .prepare_cached(NEWEST_TO_APPLY)?
        .query_row([pkey], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((newest_id, newest_state)) = newest else {
        return Ok(None);
    };
    let newest_state = State::parse(&newest_state)?;
    let overtaken = supersede_older_pending(tx, pkey, &newest_id, now)?;
    // Counted by the caller once the write has committed.
    superseded.fetch_add(overtaken, Ordering::Relaxed);
    if newest_state == State::Pending {
        fetch_record(tx, &newest_id)
    } else {
        Ok(None)
    }
}

/// [`super::super::Ledger::settle`]'s unit of work.
pub(in crate::store) fn settle_unit(
    tx: &Connection,
    now: i64,
    request_id: &str,
    outcome: Outcome<'_>,
    answered: bool,
    release: Option<(&str, &Claim)>,
) -> Result<Settled, LedgerError> {
    // The fence: see the PostgreSQL unit (`ccpa_settle`, migration 8).
    let (fence_pkey, fence_holder, fence_generation) = fence(release);
    let answered = i64::from(answered);
    let updated = match outcome {
        Outcome::Applied { pkey } => tx
            .prepare_cached(
                "UPDATE opt_out_records SET state = 'APPLIED', resolved_at = ?1, \
                 attempts = attempts + 1, pkey = COALESCE(pkey, ?2), \
                 answered_at = CASE WHEN ?3 = 1 THEN COALESCE(answered_at, ?1) \
                 ELSE answered_at END, \
                 last_error = CASE WHEN state = 'FAILED' THEN failure_reason ELSE last_error END, \
                 failure_reason = NULL, failure_code = NULL \
                 WHERE request_id = ?4 AND (state = 'PENDING' OR (state = 'FAILED' \
                   AND kind = 'CREATE_PROFILE' AND pkey IS NULL AND COALESCE(?2, '') <> '')) \
                 AND (?5 = '' OR EXISTS (SELECT 1 FROM \
                 profile_leases WHERE pkey = ?5 AND holder = ?6 AND generation = ?7))",
            )?
            .execute(params![
                now,
                pkey,
                answered,
                request_id,
                fence_pkey,
                fence_holder,
                fence_generation
            ])?,
        Outcome::Failed { reason, code } => tx
            .prepare_cached(
                "UPDATE opt_out_records SET state = 'FAILED', resolved_at = ?1, \
                 attempts = attempts + 1, failure_reason = ?2, failure_code = ?3, \
                 answered_at = CASE WHEN ?4 = 1 THEN COALESCE(answered_at, ?1) \
                 ELSE answered_at END \
                 WHERE request_id = ?5 AND state = 'PENDING' AND (?6 = '' OR EXISTS (SELECT 1 \
                 FROM profile_leases WHERE pkey = ?6 AND holder = ?7 AND generation = ?8))",
            )?
            .execute(params![
                now,
                reason,
                code.as_str(),
                answered,
                request_id,
                fence_pkey,
                fence_holder,
                fence_generation
            ])?,
        Outcome::Retry {
            error,
            next_attempt_at,
            attempted,
            acs_unavailable,
        } => tx
            .prepare_cached(
                "UPDATE opt_out_records SET attempts = attempts + ?1, last_error = ?2, \
                 next_attempt_at = ?3, retry_when_acs_answers = ?4, \
                 answered_at = CASE WHEN ?5 = 1 THEN COALESCE(answered_at, ?6) \
                 ELSE answered_at END \
                 WHERE request_id = ?7 AND state = 'PENDING' AND (?8 = '' OR EXISTS (SELECT 1 \
                 FROM profile_leases WHERE pkey = ?8 AND holder = ?9 AND generation = ?10))",
            )?
            .execute(params![
                i64::from(attempted),
                error,
                next_attempt_at,
                i64::from(acs_unavailable),
                answered,
                now,
                request_id,
                fence_pkey,
                fence_holder,
                fence_generation
            ])?,
    };
    if updated == 1 {
        if matches!(outcome, Outcome::Applied { .. }) {
            // ACS holds the profile's newest request now: the reconciler re-reads it an
            // interval from here.
            tx.prepare_cached(
                "INSERT INTO reconcile_schedule (pkey, checked_at) \
                 SELECT pkey, ?1 FROM opt_out_records WHERE request_id = ?2 \
                 AND pkey IS NOT NULL \
                 ON CONFLICT (pkey) DO UPDATE SET checked_at = excluded.checked_at",
            )?
            .execute(params![now, request_id])?;
        }
        if let Some((pkey, claim)) = release {
            release_lease(tx, pkey, claim)?;
        }
        return Ok(Settled::Recorded);
    }
    // Nothing recorded: tell a lost lease from a record no longer pending.
    match release {
        Some((pkey, claim)) if !lease_is_current(tx, pkey, claim)? => Ok(Settled::LeaseLost),
        Some((pkey, claim)) => {
            release_lease(tx, pkey, claim)?;
            Ok(Settled::NotPending)
        }
        None => Ok(Settled::NotPending),
    }
}

/// [`super::super::Ledger::fail_abandoned`]'s unit of work.
pub(in crate::store) fn fail_abandoned_unit(
    tx: &Connection,
    older_than: i64,
    now: i64,
) -> Result<u64, LedgerError> {
    let mut failed = 0;
    for (kind, reason) in super::super::leases::ABANDONED {
        failed += tx
            .prepare_cached(
                "UPDATE opt_out_records SET state = 'FAILED', resolved_at = ?1, \
                 failure_reason = ?2, failure_code = ?3 \
                 WHERE kind = ?4 AND state = 'PENDING' AND recorded_at < ?5",
            )?
            .execute(params![
                now,
                reason,
                FailureCode::Unavailable.as_str(),
                kind.as_str(),
                older_than
            ])? as u64;
    }
    Ok(failed)
}

pub(in crate::store) fn retry_now_that_acs_answers(
    tx: &Connection,
    now: i64,
) -> Result<u64, LedgerError> {
    Ok(tx
        .prepare_cached(
            "UPDATE opt_out_records SET next_attempt_at = ?1, retry_when_acs_answers = 0 \
             WHERE state = 'PENDING' AND next_attempt_at > ?1 \
               AND retry_when_acs_answers = 1",
        )?
        .execute([now])? as u64)
}

pub(in crate::store) fn mark_checked(
    tx: &Connection,
    pkey: &str,
    at: i64,
) -> Result<(), LedgerError> {
    tx.prepare_cached("UPDATE reconcile_schedule SET checked_at = ?1 WHERE pkey = ?2")?
        .execute(params![at, pkey])?;
    Ok(())
}

pub(in crate::store) fn unwatch(tx: &Connection, pkey: &str) -> Result<(), LedgerError> {
    tx.prepare_cached("DELETE FROM reconcile_schedule WHERE pkey = ?1")?
        .execute([pkey])?;
    Ok(())
}

/// [`super::super::Ledger::prune`]'s unit of work (see the PostgreSQL one for what is kept).
pub(in crate::store) fn prune(
    tx: &Connection,
    resolved_before: i64,
    lapsed_before: i64,
) -> Result<u64, LedgerError> {
    let deleted = tx
        .prepare_cached(super::super::retention::PRUNE_RECORDS)?
        .execute([resolved_before])?;
    tx.prepare_cached(super::super::retention::PRUNE_LEASES)?
        .execute([lapsed_before])?;
    tx.prepare_cached(super::super::retention::PRUNE_SCHEDULE)?
        .execute([])?;
    tx.prepare_cached(super::super::changes::PRUNE_MARK)?
        .execute([resolved_before])?;
    tx.prepare_cached(super::super::changes::PRUNE_CHANGES)?
        .execute([])?;
    tx.prepare_cached(super::super::notifications::PRUNE)?
        .execute([resolved_before])?;
    Ok(deleted as u64)
}

/// A Bloom filter of every profile with a record (see `KnownProfiles`).
pub(in crate::store) fn known_profiles(
    tx: &Connection,
) -> Result<fastbloom::AtomicBloomFilter, LedgerError> {
    use super::super::KnownProfiles;
    let recorded: i64 = tx
        .prepare_cached("SELECT COUNT(DISTINCT pkey) FROM opt_out_records WHERE pkey IS NOT NULL")?
        .query_row([], |row| row.get(0))?;
    let capacity = usize::try_from(recorded)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .clamp(KnownProfiles::MIN_CAPACITY, KnownProfiles::MAX_CAPACITY);
    let filter = fastbloom::AtomicBloomFilter::with_false_pos(KnownProfiles::FALSE_POSITIVES)
        .expected_items(capacity);
    let mut statement =
        tx.prepare_cached("SELECT DISTINCT pkey FROM opt_out_records WHERE pkey IS NOT NULL")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        filter.insert(row.get_ref(0)?.as_str()?);
    }
    Ok(filter)
}

// Reads.

pub(in crate::store) fn children(
    connection: &Connection,
    parent_request_id: &str,
) -> Result<Vec<Record>, LedgerError> {
    const _: () = assert!(
        super::super::MAX_PROFILES_PER_EMAIL == 10_000,
        "the LIMIT below"
    );
    let mut statement = connection.prepare_cached(select_records!(
        "WHERE parent_request_id = ?1 ORDER BY request_id LIMIT 10000"
    ))?;
    let mut rows = statement.query([parent_request_id])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        records.push(Record::from_sqlite(row)?);
    }
    Ok(records)
}

pub(in crate::store) const PENDING_BEFORE: &str =
    select_records!("WHERE state = 'PENDING' AND received_at < ?1 ORDER BY received_at");

pub(in crate::store) const EXPORT: &str = select_records!(
    "WHERE received_at >= ?1 AND received_at < ?2 ORDER BY received_at, request_id"
);

pub(in crate::store) const DRIFT: &str = select_records!(
    "WHERE restores_request_id IS NOT NULL AND recorded_at >= ?1 \
     ORDER BY recorded_at, request_id"
);

/// [`super::super::Ledger::changes_after`] on SQLite: the page, then the pruned mark (read after
/// it, each statement its own snapshot: a prune committed before the page was read is seen by
/// the mark's read, so a cursor it passed is told expired rather than served past a hole).
pub(in crate::store) fn changes_after(
    connection: &Connection,
    after: Option<ChangePosition>,
    include_opt_ins: bool,
    limit: u32,
) -> Result<ChangesAfter, LedgerError> {
    let from = after.unwrap_or_default();
    let mut statement = connection.prepare_cached(super::super::changes::SQLITE_PAGE)?;
    let mut rows = statement.query(params![
        from.tx,
        from.position,
        i64::from(include_opt_ins),
        i64::from(limit)
    ])?;
    let mut changes = Vec::new();
    while let Some(row) = rows.next()? {
        changes.push(change_of(
            |i| Ok(row.get::<_, i64>(i)?),
            |i| Ok(row.get::<_, String>(i)?),
            |i| Ok(row.get::<_, Option<i64>>(i)?),
        )?);
    }
    let pruned = connection
        .prepare_cached(super::super::changes::PRUNED_THROUGH)?
        .query_row([], |row| {
            Ok(ChangePosition {
                tx: row.get(0)?,
                position: row.get(1)?,
            })
        })?;
    Ok(page_after_mark(after, changes, pruned))
}

pub(in crate::store) fn pending_summary(
    connection: &Connection,
    overdue_before: i64,
) -> Result<PendingSummary, LedgerError> {
    let (pending, oldest, overdue): (i64, Option<i64>, Option<i64>) = connection
        .prepare_cached(
            "SELECT COUNT(*), MIN(received_at), \
                    SUM(CASE WHEN received_at < ?1 THEN 1 ELSE 0 END) \
             FROM opt_out_records WHERE state = 'PENDING'",
        )?
        .query_row([overdue_before], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    Ok(PendingSummary {
        pending,
        oldest_received_at: oldest,
        overdue: overdue.unwrap_or(0),
    })
}

pub(in crate::store) fn overdue_summary(
    connection: &Connection,
    received_before: i64,
) -> Result<Option<(i64, Record)>, LedgerError> {
    let count: i64 = connection
        .prepare_cached(
            "SELECT COUNT(*) FROM opt_out_records WHERE state = 'PENDING' AND received_at < ?1",
        )?
        .query_row([received_before], |row| row.get(0))?;
    if count == 0 {
        return Ok(None);
    }
    let mut statement = connection.prepare_cached(select_records!(
        "WHERE state = 'PENDING' AND received_at < ?1 ORDER BY received_at LIMIT 1"
    ))?;
    let mut rows = statement.query([received_before])?;
    // Resolved between the two reads: nothing overdue any more.
    let oldest = rows.next()?.map(Record::from_sqlite).transpose()?;
    Ok(oldest.map(|oldest| (count, oldest)))
}

pub(in crate::store) fn list(
    connection: &Connection,
    filter: &ListFilter,
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Vec<Record>, LedgerError> {
    let mut statement = connection.prepare_cached(select_records!(
        "WHERE (CAST(?1 AS TEXT) IS NULL OR pkey = ?1) \
           AND (CAST(?2 AS BIGINT) IS NULL OR received_at >= ?2) \
           AND (CAST(?3 AS BIGINT) IS NULL OR received_at < ?3) \
           AND (CAST(?4 AS TEXT) IS NULL OR state = ?4) \
           AND (CAST(?5 AS BIGINT) IS NULL OR received_at < ?5 \
                OR (received_at = ?5 AND request_id < ?6)) \
         ORDER BY received_at DESC, request_id DESC LIMIT ?7"
    ))?;
    let mut rows = statement.query(params![
        filter.pkey,
        filter.received_after,
        filter.received_before,
        filter.state.map(State::as_str),
        after.map(|c| c.received_at),
        after.map(|c| c.request_id.as_str()).unwrap_or_default(),
        limit
    ])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        records.push(Record::from_sqlite(row)?);
    }
    Ok(records)
}

pub(in crate::store) fn latest(
    connection: &Connection,
    pkey: &str,
) -> Result<Option<Record>, LedgerError> {
    let mut statement = connection.prepare_cached(LATEST)?;
    let mut rows = statement.query([pkey])?;
    rows.next()?.map(Record::from_sqlite).transpose()
}

pub(in crate::store) fn due_profiles(
    connection: &Connection,
    now: i64,
    limit: i64,
) -> Result<Vec<String>, LedgerError> {
    let mut statement = connection.prepare_cached(
        "SELECT pkey FROM opt_out_records \
         WHERE state = 'PENDING' AND kind = 'SET_OPT_OUT' AND next_attempt_at <= ?1 \
         GROUP BY pkey ORDER BY MIN(received_at) LIMIT ?2",
    )?;
    let rows = statement
        .query_map([now, limit], |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

pub(in crate::store) fn reconciled_profiles(connection: &Connection) -> Result<i64, LedgerError> {
    Ok(connection
        .prepare_cached("SELECT COUNT(*) FROM reconcile_schedule")?
        .query_row([], |row| row.get(0))?)
}

pub(in crate::store) fn due_for_reconcile(
    connection: &Connection,
    checked_before: i64,
    limit: i64,
) -> Result<Vec<String>, LedgerError> {
    let mut statement = connection.prepare_cached(
        "SELECT pkey FROM reconcile_schedule WHERE checked_at < ?1 \
         ORDER BY checked_at LIMIT ?2",
    )?;
    let rows = statement
        .query_map([checked_before, limit], |row| row.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

pub(in crate::store) fn checked_at(
    connection: &Connection,
    pkey: &str,
) -> Result<Option<i64>, LedgerError> {
    Ok(connection
        .prepare_cached("SELECT checked_at FROM reconcile_schedule WHERE pkey = ?1")?
        .query_row([pkey], |row| row.get(0))
        .optional()?)
}

/// The rows of the yearly report (see `report`), each handed to `each`.
pub(in crate::store) fn consumer_requests(
    connection: &Connection,
    from: i64,
    until: i64,
    mut each: impl FnMut(super::super::report::ConsumerRequest) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let mut statement =
        connection.prepare_cached(super::super::report::CONSUMER_REQUESTS_SQLITE)?;
    let mut rows = statement.query([from, until])?;
    while let Some(row) = rows.next()? {
        each(super::super::report::ConsumerRequest {
            kind: Kind::parse(row.get_ref("kind")?.as_str()?)?,
            opt_out: row.get::<_, i64>("opt_out")? != 0,
            source: super::super::Source::parse(row.get_ref("source")?.as_str()?)?,
            received_at: row.get("received_at")?,
            state: State::parse(row.get_ref("state")?.as_str()?)?,
            resolved_at: row.get("resolved_at")?,
            parts: row.get("parts")?,
            parts_complied: row.get("parts_complied")?,
            parts_pending: row.get("parts_pending")?,
            parts_resolved_at: row.get("parts_resolved_at")?,
            notifications: super::super::report::Notifications::of(
                row.get("notifications_delivered")?,
                row.get("notifications_failed")?,
                row.get("notifications_pending")?,
            ),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile's order is read from the index built for it, never by sorting its history:
    /// the expression in the queries must stay the index's (migration 7) for the planner to
    /// match them.
    #[test]
    fn queries_of_a_profiles_order_read_the_first_entry_of_its_index() {
        let connection = Connection::open_in_memory().unwrap();
        super::super::migrate::run(&connection).unwrap();
        for sql in [NEWER_THAN, NEWEST_TO_APPLY, LATEST] {
            let mut statement = connection
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let unbound = statement.parameter_count();
            let nulls = std::iter::repeat_n(rusqlite::types::Null, unbound);
            let plan = statement
                .query_map(rusqlite::params_from_iter(nulls), |row| {
                    row.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join("; ");
            assert!(
                plan.contains("USING INDEX opt_out_records_in_order") && !plan.contains("B-TREE"),
                "{sql}\n{plan}"
            );
        }
    }

    /// The queries of pending requests by age (`records --overdue`,
    /// the deliverer's overdue clock every minute) read the pending requests only, as they did
    /// through the dropped `(state, next_attempt_at)` index; never every record received before
    /// the cutoff, which is nearly the whole history of the ledger.
    #[test]
    fn pending_requests_by_age_read_only_pending_entries() {
        let connection = Connection::open_in_memory().unwrap();
        super::super::migrate::run(&connection).unwrap();
        for sql in [
            PENDING_BEFORE,
            "SELECT COUNT(*) FROM opt_out_records WHERE state = 'PENDING' AND received_at < ?1",
            select_records!(
                "WHERE state = 'PENDING' AND received_at < ?1 ORDER BY received_at LIMIT 1"
            ),
        ] {
            let plan = connection
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([0_i64], |row| row.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join("; ");
            assert!(
                !plan.contains("opt_out_records_by_time")
                    && !plan.starts_with("SCAN opt_out_records;"),
                "{sql}\n{plan}"
            );
        }
    }
}
