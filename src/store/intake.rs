//! Intake: recording a request, durably, before anything else is done with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use futures::future::BoxFuture;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Executor};

use super::leases::{claim_lease, count_resolved};
use super::queries::{COLUMNS, fetch_record};
use super::sqlite::latest::Touches;
use super::{
    Backend, Claim, FailureCode, Kind, KnownProfiles, Ledger, LedgerError, Record, Source, State,
    Store, UnitClock, sqlite,
};

/// A request to record.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The request's id (the caller's, or generated).
    pub request_id: String,
    /// The call making it.
    pub kind: Kind,
    /// The profile's key; `None` for a creation.
    pub pkey: Option<String>,
    /// The requested value.
    pub opt_out: bool,
    /// How the consumer made it.
    pub source: Source,
    /// When the consumer made it, if the caller said.
    pub received_at: Option<i64>,
    /// The calling service.
    pub caller: String,
    /// How long the call itself has to apply it before the deliverer may take over.
    pub first_attempt_window_ms: i64,
    /// The request made by email this one is a part of.
    pub parent_request_id: Option<String>,
    /// A digest of what the request holds but the ledger does not keep (an email address, a
    /// name), so that its id replayed with other content is told apart: see [`fingerprint`].
    pub fingerprint: Option<String>,
    /// For a restore by the reconciler: the consumer's request whose value it puts back.
    pub restores_request_id: Option<String>,
    /// For a request by email itself: the hex SHA-256 of the normalised address, which its
    /// notifications to third parties carry (kept with them until delivered; never in the
    /// record).
    pub email_sha256: Option<String>,
}

/// A digest of content the ledger must not keep, to tell a replay from a conflicting reuse of
/// its request id. Salted with the request id, so that one address gives unrelated digests in
/// different records and a table of digests cannot be joined across requests; SHA-256, so the
/// content cannot be read back from it (a guess at an address can still be checked against one
/// record, as it could against the profile in ACS).
pub fn fingerprint(request_id: &str, parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    digest.update(b"ccpa-gateway request fingerprint v1");
    for part in std::iter::once(request_id).chain(parts.iter().copied()) {
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part.as_bytes());
    }
    digest
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Inserts a request unless its id is taken, and returns it as written (no row when taken).
static INSERT_RETURNING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
         received_at_given, recorded_at, caller, state, attempts, next_attempt_at, \
         parent_request_id, fingerprint, answered_at, restores_request_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PENDING', 0, $10, $11, $12, $13, $14) \
         ON CONFLICT (request_id) DO NOTHING RETURNING {COLUMNS}"
    )
});

/// What recording a request did.
#[derive(Debug)]
pub enum Recorded {
    /// A new record. It is SUPERSEDED already if a newer request for the profile was recorded
    /// before it.
    New(Record),
    /// The request id was recorded before, for the same request: nothing changed.
    Replay(Record),
    /// The request id was recorded before, for a different request.
    Conflict(Record),
}

impl Ledger {
    /// Records a request, durably, unless its id was recorded before. A new request overtaken by
    /// a newer one recorded earlier is SUPERSEDED at once; older pending requests for the same
    /// profile are SUPERSEDED by it. With `claim`, a new pending request also takes its
    /// profile's lease when it is free, in the same transaction (one write to disk for both).
    pub async fn record(
        &self,
        request: &NewRequest,
        claim: Option<&Claim>,
    ) -> Result<(Recorded, bool), LedgerError> {
        self.record_as(request, claim, false).await
    }

    /// Records a request, as [`Ledger::record`] does, and that its caller is answered now, in
    /// the same write: for a request answered as soon as it is recorded, which the deliverer
    /// applies later.
    pub async fn record_answered(&self, request: &NewRequest) -> Result<Recorded, LedgerError> {
        Ok(self.record_as(request, None, true).await?.0)
    }

    async fn record_as(
        &self,
        request: &NewRequest,
        claim: Option<&Claim>,
        answered: bool,
    ) -> Result<(Recorded, bool), LedgerError> {
        // On PostgreSQL, this process's calls for a profile take turns here before one of them
        // takes a pooled connection to wait for the profile's advisory lock.
        let _turn = match (self.backend, &request.pkey) {
            (Backend::Postgres, Some(pkey)) => Some(self.turns.take(pkey).await),
            _ => None,
        };
        let request = request.clone();
        let claim = claim.cloned();
        let unit_clock = self.unit_clock();
        let known = self.known.clone();
        let superseded = Arc::new(AtomicU64::new(0));
        let counted = superseded.clone();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let clock = self.clock.clone();
                let touches = match &request.pkey {
                    Some(pkey) => Touches::Profile(pkey.clone()),
                    // A creation's record has no profile until ACS answers (its settle).
                    None => Touches::Nothing,
                };
                let recorded = db
                    .write(touches, move |tx| {
                        if let Some(pkey) = &request.pkey {
                            // Inside the write, before it commits: no read after the commit can
                            // skip this profile.
                            known.note(pkey);
                        }
                        // The unit's clock on SQLite is the ledger's, read within the unit.
                        let now = clock.unix_ms();
                        let recorded = sqlite::units::record_unit(
                            tx,
                            &request,
                            claim.as_ref(),
                            answered,
                            now,
                            &counted,
                        )?;
                        if let (Recorded::New(record), Some(digest)) =
                            (&recorded.0, &request.email_sha256)
                        {
                            tx.prepare_cached(super::notifications::SET_EMAIL_SHA256)?
                                .execute(rusqlite::params![
                                    digest,
                                    record.recorded_at,
                                    record.request_id
                                ])?;
                        }
                        Ok(recorded)
                    })
                    .await?;
                count_resolved(Some(State::Superseded), superseded.load(Ordering::Relaxed));
                return Ok(recorded);
            }
            Store::Postgres(pg) => pg,
        };
        // One statement (`ccpa_record_request`, migration 8), its own transaction: one round
        // trip, where the unit below takes one per statement and two more for its transaction.
        let request = Arc::new(request);
        let unit = statement_unit(
            request.clone(),
            claim.clone(),
            answered,
            unit_clock.clone(),
            counted.clone(),
            known.clone(),
        );
        let by_statement = if request.email_sha256.is_some() {
            // A request by email itself: the address's digest goes onto its notifications in
            // the transaction that records it (and them), one round trip more.
            pg.write(unit).await?
        } else {
            pg.statement(unit).await?
        };
        let recorded = match by_statement {
            Some(recorded) => recorded,
            // The rare path: a failed request by email replayed under its id may be reopened,
            // which today's unit of several statements decides and does, in a transaction.
            None => {
                pg.write(move |connection| {
                    Box::pin(async move {
                        if let Some(pkey) = &request.pkey {
                            known.note(pkey);
                        }
                        record_unit(
                            connection,
                            &request,
                            claim.as_ref(),
                            answered,
                            &unit_clock,
                            &counted,
                        )
                        .await
                    })
                })
                .await?
            }
        };
        count_resolved(Some(State::Superseded), superseded.load(Ordering::Relaxed));
        Ok(recorded)
    }

    /// Records that the caller is being answered now, if it was not before.
    pub async fn mark_answered(&self, request_id: &str) -> Result<(), LedgerError> {
        let request_id = request_id.to_owned();
        let now = self.now_ms();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Request(request_id.clone()), move |tx| {
                        sqlite::units::mark_answered(tx, &request_id, now)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        // One statement, its own transaction: one round trip (a SetOptOut answered without
        // applying its request within the call, its profile's lease being held, makes it).
        pg.statement(move |connection| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE opt_out_records SET answered_at = COALESCE(answered_at, $1) \
                     WHERE request_id = $2",
                )
                .bind(now)
                .bind(&request_id)
                .execute(&mut *connection)
                .await?;
                Ok(())
            })
        })
        .await
    }
}

/// [`Ledger::record`] on PostgreSQL in one statement, `ccpa_record_request` (migration 8):
/// [`record_unit`]'s statements, run by the server in the same order.
const RECORD_REQUEST: &str = "SELECT * FROM ccpa_record_request($1, $2, $3, $4, $5, $6, $7, $8, \
     $9, $10, $11, $12, $13, $14, $15)";

/// [`Ledger::record`]'s unit of work on PostgreSQL, as one statement outside any explicit
/// transaction: the function locks the profile, reads the database's clock unless given `now`,
/// inserts, supersedes and takes the lease as [`record_unit`] does. `superseded` counts what it
/// superseded; a lease it took gives `claim` its generation.
///
/// `None` when it did nothing: the id was recorded before, for this request, which failed in a
/// way that may let its replay reopen it ([`reopenable`]); [`record_unit`] decides, and does it.
async fn record_statement(
    connection: &mut AnyConnection,
    request: &NewRequest,
    claim: Option<&Claim>,
    answered: bool,
    now: Option<i64>,
    superseded: &AtomicU64,
) -> Result<Option<(Recorded, bool)>, LedgerError> {
    let row: AnyRow = sqlx::query(RECORD_REQUEST)
        .bind(&request.request_id)
        .bind(request.kind.as_str())
        .bind(&request.pkey)
        .bind(i64::from(request.opt_out))
        .bind(request.source.as_str())
        .bind(request.received_at)
        .bind(&request.caller)
        .bind(request.first_attempt_window_ms)
        .bind(&request.parent_request_id)
        .bind(&request.fingerprint)
        .bind(i64::from(answered))
        .bind(&request.restores_request_id)
        .bind(now)
        .bind(claim.map(|claim| claim.holder.as_str()))
        .bind(claim.map(|claim| claim.lease_ms))
        .fetch_all(&mut *connection)
        .await
        .map_err(LedgerError::from)
        .and_then(super::writer::only_row)?;
    let outcome: String = sqlx::Row::try_get(&row, "outcome")?;
    match outcome.as_str() {
        "NEW" => {}
        "EXISTS" => {
            // Deleted (pruned) between the insert that found it and the read.
            if sqlx::Row::try_get::<Option<String>, _>(&row, "request_id")?.is_none() {
                return Err(LedgerError::Corrupt("a conflicting id vanished".into()));
            }
            let existing = Record::from_row(&row)?;
            if !same_request(&existing, request) {
                return Ok(Some((Recorded::Conflict(existing), false)));
            }
            if reopenable(&existing) {
                return Ok(None);
            }
            return Ok(Some((Recorded::Replay(existing), false)));
        }
        other => {
            return Err(LedgerError::Corrupt(format!(
                "ccpa_record_request answered {other:?}"
            )));
        }
    }
    let record = Record::from_row(&row)?;
    let overtaken: i64 = sqlx::Row::try_get(&row, "superseded")?;
    superseded.fetch_add(u64::try_from(overtaken).unwrap_or(0), Ordering::Relaxed);
    let generation: Option<i64> = sqlx::Row::try_get(&row, "generation")?;
    let claimed = claim.is_some_and(|claim| claim.won(generation));
    Ok(Some((Recorded::New(record), claimed)))
}

/// What [`record_statement`] answers.
type StatementRecorded = Result<Option<(Recorded, bool)>, LedgerError>;

/// [`Ledger::record`]'s unit on PostgreSQL around [`record_statement`]: notes the profile as
/// known before the commit, and puts a request by email's address digest on the notifications
/// the statement's trigger wrote (in a transaction, when there is one to put).
fn statement_unit(
    request: Arc<NewRequest>,
    claim: Option<Claim>,
    answered: bool,
    unit_clock: UnitClock,
    counted: Arc<AtomicU64>,
    known: Arc<KnownProfiles>,
) -> impl for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, StatementRecorded> + Send + 'static
{
    move |connection| {
        Box::pin(async move {
            if let Some(pkey) = &request.pkey {
                // Inside the write, before it commits: no read after the commit can skip this
                // profile.
                known.note(pkey);
            }
            let now = unit_clock.now_unless_database();
            let recorded = record_statement(
                connection,
                &request,
                claim.as_ref(),
                answered,
                now,
                &counted,
            )
            .await?;
            if let (Some((Recorded::New(record), _)), Some(digest)) =
                (&recorded, &request.email_sha256)
            {
                sqlx::query(super::notifications::SET_EMAIL_SHA256)
                    .bind(digest)
                    .bind(record.recorded_at)
                    .bind(&record.request_id)
                    .execute(&mut *connection)
                    .await?;
            }
            Ok(recorded)
        })
    }
}

/// [`Ledger::record`]'s unit of work, in statements of its own: on PostgreSQL, for a request id
/// recorded before that may be reopened (every other request is [`record_statement`]'s).
pub(super) async fn record_unit(
    connection: &mut AnyConnection,
    request: &NewRequest,
    claim: Option<&Claim>,
    answered: bool,
    unit_clock: &UnitClock,
    superseded: &AtomicU64,
) -> Result<(Recorded, bool), LedgerError> {
    // The writer holds the transaction (a savepoint of its batch on SQLite).
    let tx = connection;
    // `recorded_at`, and the expiry of a lease taken here, come from the unit's clock: on
    // PostgreSQL the database's, read once the profile is locked, so that replicas with skewed
    // clocks still agree on the order of a profile's requests.
    let now = match (unit_clock.backend, &request.pkey) {
        (Backend::Postgres, Some(pkey)) => {
            // Requests for one profile are recorded one at a time, so that each sees the
            // others. (SQLite has one writer at a time anyway.)
            let locked = sqlx::query(concat!(
                "SELECT pg_advisory_xact_lock(hashtext($1))::text, ",
                database_now_ms!(),
                " AS now_ms"
            ))
            .bind(pkey)
            .fetch_one(&mut *tx)
            .await?;
            if unit_clock.database_keeps_time() {
                sqlx::Row::try_get::<i64, _>(&locked, "now_ms")?
            } else {
                unit_clock.clock.unix_ms()
            }
        }
        _ => unit_clock.now(&mut *tx).await?,
    };
    // RETURNING: the new record comes back with the insert, one statement instead of two.
    let inserted: Option<AnyRow> = sqlx::query(INSERT_RETURNING.as_str())
        .bind(&request.request_id)
        .bind(request.kind.as_str())
        .bind(&request.pkey)
        .bind(i64::from(request.opt_out))
        .bind(request.source.as_str())
        .bind(request.received_at.unwrap_or(now))
        .bind(i64::from(request.received_at.is_some()))
        .bind(now)
        .bind(&request.caller)
        .bind(now + request.first_attempt_window_ms)
        .bind(&request.parent_request_id)
        .bind(&request.fingerprint)
        .bind(answered.then_some(now))
        .bind(&request.restores_request_id)
        .fetch_optional(&mut *tx)
        .await?;

    let Some(inserted) = inserted else {
        let existing = fetch_record(&mut *tx, &request.request_id)
            .await?
            .ok_or_else(|| LedgerError::Corrupt("a conflicting id vanished".into()))?;
        if !same_request(&existing, request) {
            return Ok((Recorded::Conflict(existing), false));
        }
        if reopenable(&existing) && !has_children(&mut *tx, &request.request_id).await? {
            // A request by email that failed before reaching any profile (its lookup could
            // not be made, or the gateway stopped first) did nothing: its replay tries it
            // again, so that a caller (or a re-run file) can complete it under the same id.
            // The earlier failure stays in `last_error` and `attempts`.
            sqlx::query(
                "UPDATE opt_out_records SET state = 'PENDING', resolved_at = NULL, \
                     last_error = failure_reason, failure_reason = NULL, failure_code = NULL, \
                     attempts = attempts + 1 WHERE request_id = $1 AND state = 'FAILED'",
            )
            .bind(&request.request_id)
            .execute(&mut *tx)
            .await?;
            let reopened = fetch_record(&mut *tx, &request.request_id)
                .await?
                .ok_or_else(|| LedgerError::Corrupt("a reopened request vanished".into()))?;
            return Ok((Recorded::New(reopened), false));
        }
        return Ok((Recorded::Replay(existing), false));
    };
    let mut record = Record::from_row(&inserted)?;

    if let Some(pkey) = &request.pkey {
        // Ordered no later than now, whatever the caller stated (see the module's "Order").
        let ordered_at = record.ordered_at();
        // A newer request (pending or applied) already recorded for the profile overtakes
        // this one.
        let newer: Option<String> = sqlx::query_scalar(concat!(
            "SELECT request_id FROM opt_out_records \
                 WHERE pkey = $1 AND request_id <> $2 AND state IN ('PENDING', 'APPLIED') \
                   AND (",
            ordered_at!(),
            " > $3 OR (",
            ordered_at!(),
            " = $3 AND recorded_at > $4)) \
                 ORDER BY ",
            ordered_at!(),
            " DESC, recorded_at DESC LIMIT 1"
        ))
        .bind(pkey)
        .bind(&request.request_id)
        .bind(ordered_at)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        match newer {
            Some(newer) => {
                supersede(&mut *tx, &request.request_id, &newer, now, true).await?;
                superseded.fetch_add(1, Ordering::Relaxed);
                record = fetch_record(&mut *tx, &request.request_id)
                    .await?
                    .ok_or_else(|| {
                        LedgerError::Corrupt("a record vanished as it was written".into())
                    })?;
            }
            None => {
                let overtaken =
                    supersede_older_pending(&mut *tx, pkey, &request.request_id, now).await?;
                superseded.fetch_add(overtaken, Ordering::Relaxed);
            }
        }
    }
    let claimed = match (claim, &record.pkey) {
        (Some(claim), Some(pkey)) if record.state == State::Pending => {
            claim_lease(&mut *tx, pkey, claim, now).await?
        }
        _ => false,
    };
    Ok((Recorded::New(record), claimed))
}

pub(super) async fn supersede<'e, E>(
    executor: E,
    request_id: &str,
    by: &str,
    now: i64,
    answered: bool,
) -> Result<(), LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(supersede_request!("$"))
        .bind(by)
        .bind(now)
        .bind(i64::from(answered))
        .bind(request_id)
        .execute(executor)
        .await?;
    Ok(())
}

/// Supersedes every pending request of profile `pkey` but `by` (see
/// `supersede_older_pending!`); returns how many.
pub(super) async fn supersede_older_pending<'e, E>(
    executor: E,
    pkey: &str,
    by: &str,
    now: i64,
) -> Result<u64, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    Ok(sqlx::query(supersede_older_pending!("$"))
        .bind(by)
        .bind(now)
        .bind(pkey)
        .execute(executor)
        .await?
        .rows_affected())
}

/// Whether a replayed request is the one recorded under its id. `received_at` counts only when
/// both gave it: a retry without it must not look different because the clock moved.
/// Whether a failed request may be tried again under its id: a request by email whose failure
/// was transient (see [`Ledger::record`]).
pub(super) fn reopenable(recorded: &Record) -> bool {
    recorded.kind == Kind::SetByEmail
        && recorded.state == State::Failed
        && recorded.failure_code.is_some_and(FailureCode::is_transient)
}

pub(super) async fn has_children<'e, E>(executor: E, request_id: &str) -> Result<bool, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let children: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM opt_out_records WHERE parent_request_id = $1")
            .bind(request_id)
            .fetch_one(executor)
            .await?;
    Ok(children > 0)
}

pub(super) fn same_request(recorded: &Record, request: &NewRequest) -> bool {
    recorded.kind == request.kind
        && (request.kind == Kind::CreateProfile || recorded.pkey == request.pkey)
        && recorded.opt_out == request.opt_out
        && recorded.source == request.source
        // Records written before fingerprints were kept have none: nothing to compare.
        && (recorded.fingerprint.is_none() || recorded.fingerprint == request.fingerprint)
        && match (recorded.received_at_given, request.received_at) {
            (true, Some(at)) => recorded.received_at == at,
            (false, Some(_)) => false,
            (_, None) => true,
        }
}
