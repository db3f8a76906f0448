//! Leases and delivery: who applies a profile's newest request, and what came of each attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;
use sqlx::{AnyConnection, Executor};
use tokio::time::Instant;

use super::intake::supersede_older_pending;
use super::queries::fetch_record;
use super::sqlite::latest::Touches;
use super::{FailureCode, Kind, Ledger, LedgerError, Record, State, Store, sqlite};

/// A claim on a profile's lease, for one attempt at applying. A holder is unique to one claim,
/// so two tasks of one process never both think they hold it. Made by [`Ledger::new_claim`].
///
/// The lease's expiry is fixed where it is won, inside the write that takes it, from that
/// write's clock (the database's, on PostgreSQL, so that replicas with skewed clocks agree); the
/// generation it was won at is the fencing token that settling the attempt checks. This process
/// counts its hold on the ledger's clock from when the claim was made, before the write: never
/// later than the lease really ends.
#[derive(Debug, Clone)]
pub struct Claim {
    /// A name unique to this claim.
    pub holder: String,
    /// How long the lease lasts once won (ms).
    pub(super) lease_ms: i64,
    /// The ledger's clock.
    clock: Arc<dyn Clock>,
    /// When the claim was made, before the write that may win it, on `clock`.
    asked_at: Instant,
    /// The lease's generation once won (0 before): shared by the claim's clones, since the
    /// write that wins it runs on one.
    pub(super) generation: Arc<AtomicI64>,
}

impl Claim {
    /// The lease's generation, if it was won.
    pub fn generation(&self) -> Option<i64> {
        let generation = self.generation.load(Ordering::SeqCst);
        (generation > 0).then_some(generation)
    }

    /// How much longer this process surely holds the lease, if it was won: counted from before
    /// the write that won it, so never past the lease's recorded expiry.
    pub fn held_for(&self) -> Duration {
        let passed = self.clock.now().saturating_duration_since(self.asked_at);
        self.lease().saturating_sub(passed)
    }

    /// How much longer an attempt made under this claim may run: until a quarter of the lease
    /// (at most 5 s) before the lease can lapse, so that a PATCH abandoned then has that long to
    /// land or die at ACS before any other claim may send a newer one.
    pub fn time_to_fence(&self) -> Duration {
        let margin = (self.lease() / 4).min(Duration::from_secs(5));
        self.held_for().saturating_sub(margin)
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.lease_ms).unwrap_or(0))
    }

    /// Whether the write that tried to take the lease won it (`generation`, the lease's new
    /// one): if so, the claim learns the generation.
    pub(super) fn won(&self, generation: Option<i64>) -> bool {
        match generation {
            Some(generation) => {
                self.generation.store(generation, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }
}

/// The outcome of an attempt to apply a request.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// ACS holds it. `pkey` fills the key of a creation.
    Applied {
        /// The created profile's key, for a creation.
        pkey: Option<&'a str>,
    },
    /// It cannot be applied.
    Failed {
        /// The basis of the response.
        reason: &'a str,
        /// What the caller was told.
        code: FailureCode,
    },
    /// It may be applied later.
    Retry {
        /// What went wrong (a reason, never a body).
        error: &'a str,
        /// When to try again (ms).
        next_attempt_at: i64,
        /// Whether a request reached (or may have reached) ACS.
        attempted: bool,
        /// Whether the back-off comes from ACS being unavailable: the request is then due at
        /// once when ACS answers again ([`Ledger::retry_now_that_acs_answers`]).
        acs_unavailable: bool,
    },
}

/// What [`Ledger::settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The outcome is recorded.
    Recorded,
    /// The record was no longer pending (a newer request superseded it meanwhile): nothing
    /// changed.
    NotPending,
    /// The attempt's lease had been taken by another claim: nothing changed.
    LeaseLost,
}

/// An [`Outcome`] that owns its text, to travel to the writer.
pub(super) enum OwnedOutcome {
    Applied {
        pkey: Option<String>,
    },
    Failed {
        reason: String,
        code: FailureCode,
    },
    Retry {
        error: String,
        next_attempt_at: i64,
        attempted: bool,
        acs_unavailable: bool,
    },
}

impl From<Outcome<'_>> for OwnedOutcome {
    fn from(outcome: Outcome<'_>) -> Self {
        match outcome {
            Outcome::Applied { pkey } => Self::Applied {
                pkey: pkey.map(str::to_owned),
            },
            Outcome::Failed { reason, code } => Self::Failed {
                reason: reason.to_owned(),
                code,
            },
            Outcome::Retry {
                error,
                next_attempt_at,
                attempted,
                acs_unavailable,
            } => Self::Retry {
                error: error.to_owned(),
                next_attempt_at,
                attempted,
                acs_unavailable,
            },
        }
    }
}

impl OwnedOutcome {
    fn borrowed(&self) -> Outcome<'_> {
        match self {
            Self::Applied { pkey } => Outcome::Applied {
                pkey: pkey.as_deref(),
            },
            Self::Failed { reason, code } => Outcome::Failed {
                reason,
                code: *code,
            },
            Self::Retry {
                error,
                next_attempt_at,
                attempted,
                acs_unavailable,
            } => Outcome::Retry {
                error,
                next_attempt_at: *next_attempt_at,
                attempted: *attempted,
                acs_unavailable: *acs_unavailable,
            },
        }
    }
}

impl Ledger {
    /// A new claim on a lease lasting `lease` once won, counted on the ledger's clock.
    pub fn new_claim(&self, lease: Duration) -> Claim {
        Claim {
            holder: uuid::Uuid::new_v4().to_string(),
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            clock: self.clock.clone(),
            asked_at: self.clock.now(),
            generation: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Takes the lease on a profile, unless someone else holds it. Whoever holds it is the only
    /// one applying that profile's requests.
    pub async fn claim(&self, pkey: &str, claim: &Claim) -> Result<bool, LedgerError> {
        let (pkey, claim) = (pkey.to_owned(), claim.clone());
        let pg = match &self.store {
            Store::Sqlite(db) => {
                let clock = self.clock.clone();
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::units::claim_lease(tx, &pkey, &claim, clock.unix_ms())
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let unit_clock = self.unit_clock();
        // One statement (`ccpa_claim_lease`, migration 8), its own transaction: the database's
        // clock is read inside it, with no round trip of its own.
        pg.statement(move |connection| {
            Box::pin(async move {
                let generation: Option<i64> =
                    sqlx::query_scalar("SELECT ccpa_claim_lease($1, $2, $3, $4)")
                        .bind(&pkey)
                        .bind(&claim.holder)
                        .bind(claim.lease_ms)
                        .bind(unit_clock.now_unless_database())
                        .fetch_all(&mut *connection)
                        .await
                        .map_err(LedgerError::from)
                        .and_then(super::writer::only_row)?;
                Ok(claim.won(generation))
            })
        })
        .await
    }

    /// Gives a lease back.
    pub async fn release(&self, pkey: &str, claim: &Claim) -> Result<(), LedgerError> {
        let (pkey, claim) = (pkey.to_owned(), claim.clone());
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Nothing, move |tx| {
                        sqlite::units::release_lease(tx, &pkey, &claim)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        // One statement (`ccpa_release_lease`, migration 8), its own transaction.
        pg.statement(move |connection| {
            Box::pin(async move {
                sqlx::query("SELECT ccpa_release_lease($1, $2, $3)")
                    .bind(&pkey)
                    .bind(&claim.holder)
                    .bind(claim.generation.load(Ordering::SeqCst))
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// The profile's newest pending request, once every older pending one is SUPERSEDED by it;
    /// or `None`, with every pending one SUPERSEDED, when an applied request is newer. Call it
    /// holding the profile's lease.
    pub async fn next_to_apply(&self, pkey: &str) -> Result<Option<Record>, LedgerError> {
        let pkey = pkey.to_owned();
        let now = self.now_ms();
        let superseded = Arc::new(AtomicU64::new(0));
        let counted = superseded.clone();
        let next = match &self.store {
            Store::Sqlite(db) => {
                db.write(Touches::Profile(pkey.clone()), move |tx| {
                    sqlite::units::next_to_apply_unit(tx, &pkey, now, &counted)
                })
                .await?
            }
            Store::Postgres(pg) => {
                pg.write(move |connection| {
                    Box::pin(
                        async move { next_to_apply_unit(connection, pkey, now, &counted).await },
                    )
                })
                .await?
            }
        };
        count_resolved(Some(State::Superseded), superseded.load(Ordering::Relaxed));
        Ok(next)
    }

    /// Records the outcome of an attempt to apply a request, and (with `release`) gives the
    /// profile's lease back, in one transaction. `answered` also records that the caller is being
    /// answered now.
    ///
    /// With `release`, the outcome is recorded only while that lease is the profile's current
    /// one (the fencing token, checked in the same statement): if another claim has taken it
    /// since, the attempt ran outside its lease, nothing is recorded, and the lease's holder
    /// applies the profile's newest request.
    pub async fn settle(
        &self,
        request_id: &str,
        outcome: Outcome<'_>,
        answered: bool,
        release: Option<(&str, &Claim)>,
    ) -> Result<Settled, LedgerError> {
        let request_id = request_id.to_owned();
        let resolved_state = match outcome {
            Outcome::Applied { .. } => Some(State::Applied),
            Outcome::Failed { .. } => Some(State::Failed),
            Outcome::Retry { .. } => None,
        };
        let outcome = OwnedOutcome::from(outcome);
        let release = release.map(|(pkey, claim)| (pkey.to_owned(), claim.clone()));
        let now = self.now_ms();
        let known = self.known.clone();
        let settled = match &self.store {
            Store::Sqlite(db) => {
                let touches = match &release {
                    // The record is that profile's (the lease was taken for it).
                    Some((pkey, _)) => Touches::Profile(pkey.clone()),
                    // A creation's settle gives its record a key: found within the unit.
                    None => Touches::Request(request_id.clone()),
                };
                db.write(touches, move |tx| {
                    if let OwnedOutcome::Applied {
                        pkey: Some(created),
                    } = &outcome
                    {
                        // A creation's record gains its key in this write: noted inside it,
                        // before it commits.
                        known.note(created);
                    }
                    let release = release.as_ref().map(|(pkey, claim)| (pkey.as_str(), claim));
                    sqlite::units::settle_unit(
                        tx,
                        now,
                        &request_id,
                        outcome.borrowed(),
                        answered,
                        release,
                    )
                })
                .await?
            }
            Store::Postgres(pg) => {
                // One statement (`ccpa_settle`, migration 8), its own transaction: the update
                // with its fence, the schedule of re-reads and the lease given back, where a
                // transaction of its own took a round trip for each and two more.
                pg.statement(move |connection| {
                    Box::pin(async move {
                        if let OwnedOutcome::Applied {
                            pkey: Some(created),
                        } = &outcome
                        {
                            // A creation's record gains its key in this write: noted inside it, before
                            // it commits.
                            known.note(created);
                        }
                        let release = release.as_ref().map(|(pkey, claim)| (pkey.as_str(), claim));
                        settle_statement(
                            connection,
                            now,
                            &request_id,
                            outcome.borrowed(),
                            answered,
                            release,
                        )
                        .await
                    })
                })
                .await?
            }
        };
        if settled == Settled::Recorded {
            count_resolved(resolved_state, 1);
        }
        Ok(settled)
    }

    /// Profiles with a pending request due for delivery, the oldest request first.
    pub async fn due_profiles(&self, now: i64, limit: i64) -> Result<Vec<String>, LedgerError> {
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .read(move |c| sqlite::units::due_profiles(c, now, limit))
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT pkey FROM opt_out_records \
             WHERE state = 'PENDING' AND kind = 'SET_OPT_OUT' AND next_attempt_at <= $1 \
             GROUP BY pkey ORDER BY MIN(received_at) LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&pg.reader)
        .await?;
        Ok(rows)
    }

    /// Makes due now every pending request whose back-off came from ACS being unavailable
    /// (see [`Outcome::Retry`]): for when ACS answers again. The client's throttle still paces
    /// them. Returns how many.
    pub async fn retry_now_that_acs_answers(&self) -> Result<u64, LedgerError> {
        let now = self.now_ms();
        let pg = match &self.store {
            Store::Sqlite(db) => {
                return db
                    .write(Touches::Everything, move |tx| {
                        sqlite::units::retry_now_that_acs_answers(tx, now)
                    })
                    .await;
            }
            Store::Postgres(pg) => pg,
        };
        pg.write(move |connection| {
            Box::pin(async move {
                Ok(sqlx::query(
                    "UPDATE opt_out_records SET next_attempt_at = $1, retry_when_acs_answers = 0 \
                     WHERE state = 'PENDING' AND next_attempt_at > $1 \
                       AND retry_when_acs_answers = 1",
                )
                .bind(now)
                .execute(&mut *connection)
                .await?
                .rows_affected())
            })
        })
        .await
    }

    /// Requests whose caller was never answered because the gateway stopped during the call,
    /// and which the ledger cannot complete later, are FAILED, with the reason the caller must
    /// retry:
    /// - a creation (the profile's data is not kept);
    /// - a by-email request interrupted before its profiles were all recorded (the address is
    ///   not kept). Its profiles that were recorded are delivered as usual.
    ///
    /// Only requests recorded more than `lease_ms` ago (none of them can still be in progress),
    /// on the clock their `recorded_at` was taken from. Returns how many.
    pub async fn fail_abandoned(&self, lease_ms: i64) -> Result<u64, LedgerError> {
        let unit_clock = self.unit_clock();
        let now = self.now_ms();
        let failed = match &self.store {
            Store::Sqlite(db) => {
                let clock = self.clock.clone();
                db.write(Touches::Everything, move |tx| {
                    // On the clock `recorded_at` was taken from.
                    let older_than = clock.unix_ms().saturating_sub(lease_ms);
                    sqlite::units::fail_abandoned_unit(tx, older_than, now)
                })
                .await?
            }
            Store::Postgres(pg) => {
                pg.write(move |connection| {
                    Box::pin(async move {
                        // On the clock `recorded_at` was taken from (the database's, on PostgreSQL).
                        let older_than = unit_clock
                            .now(&mut *connection)
                            .await?
                            .saturating_sub(lease_ms);
                        fail_abandoned_unit(connection, older_than, now).await
                    })
                })
                .await?
            }
        };
        count_resolved(Some(State::Failed), failed);
        Ok(failed)
    }
}

/// Takes the lease on `pkey` for `claim` unless someone holds it at `now` (the unit's clock),
/// until `now` plus the lease; on success, the claim learns the lease's new generation. For
/// `intake::record_unit`, the rare path of recording; every other claim on PostgreSQL is made
/// by `ccpa_claim_lease` (migration 8), the same statement in a function.
pub(super) async fn claim_lease<'e, E>(
    executor: E,
    pkey: &str,
    claim: &Claim,
    now: i64,
) -> Result<bool, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let generation: Option<i64> = sqlx::query_scalar(
        "INSERT INTO profile_leases (pkey, holder, expires_at, generation) VALUES ($1, $2, $3, 1) \
         ON CONFLICT (pkey) DO UPDATE SET holder = excluded.holder, \
         expires_at = excluded.expires_at, generation = profile_leases.generation + 1 \
         WHERE profile_leases.expires_at < $4 \
         RETURNING generation",
    )
    .bind(pkey)
    .bind(&claim.holder)
    .bind(now.saturating_add(claim.lease_ms))
    .bind(now)
    .fetch_optional(executor)
    .await?;
    Ok(claim.won(generation))
}

/// [`Ledger::next_to_apply`]'s unit of work.
pub(super) async fn next_to_apply_unit(
    connection: &mut AnyConnection,
    pkey: String,
    now: i64,
    superseded: &AtomicU64,
) -> Result<Option<Record>, LedgerError> {
    let pkey = pkey.as_str();
    // The writer holds the transaction (a savepoint of its batch on SQLite).
    let tx = connection;
    // A write first: on PostgreSQL it locks the profile's lease row until the transaction ends
    // (SQLite batches hold the write lock from their BEGIN IMMEDIATE).
    sqlx::query("UPDATE profile_leases SET expires_at = expires_at WHERE pkey = $1")
        .bind(pkey)
        .execute(&mut *tx)
        .await?;
    let newest = sqlx::query(concat!(
        "SELECT request_id, state FROM opt_out_records \
             WHERE pkey = $1 AND state IN ('PENDING', 'APPLIED') \
             ORDER BY ",
        ordered_at!(),
        " DESC, recorded_at DESC LIMIT 1"
    ))
    .bind(pkey)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(newest) = newest else {
        return Ok(None);
    };
    let newest_id: String = sqlx::Row::try_get(&newest, "request_id")?;
    let newest_state = State::parse(&sqlx::Row::try_get::<String, _>(&newest, "state")?)?;
    let overtaken = supersede_older_pending(&mut *tx, pkey, &newest_id, now).await?;
    // Counted by the caller once the write has committed.
    superseded.fetch_add(overtaken, Ordering::Relaxed);
    let next = if newest_state == State::Pending {
        fetch_record(&mut *tx, &newest_id).await?
    } else {
        None
    };
    Ok(next)
}

/// Counts `count` requests resolved into `state` (`ccpa_ledger_requests_total`), once their
/// write has committed.
pub(super) fn count_resolved(state: Option<State>, count: u64) {
    if let Some(state) = state
        && count > 0
    {
        metrics::counter!(
            super::metrics::LEDGER_REQUESTS_TOTAL,
            "state" => state.as_str(),
        )
        .increment(count);
    }
}

/// The fence a settle checks, as its statement binds it: the profile, holder and generation of
/// the lease to give back; empty (no fence) without one. Both databases' units use it (on
/// PostgreSQL, as the arguments of `ccpa_settle`).
pub(super) fn fence<'a>(release: Option<(&'a str, &'a Claim)>) -> (&'a str, &'a str, i64) {
    match release {
        Some((pkey, claim)) => (
            pkey,
            claim.holder.as_str(),
            claim.generation.load(Ordering::SeqCst),
        ),
        None => ("", "", 0),
    }
}

/// [`Ledger::settle`]'s unit of work on PostgreSQL: one statement, `ccpa_settle` (migration 8),
/// run outside any explicit transaction. With a lease to give back, the outcome is recorded only
/// if that lease is still the profile's current one (the fence, in the same statement: see
/// [`fence`]); the lease is given back whether or not the record was still pending, unless it
/// was lost.
async fn settle_statement(
    connection: &mut AnyConnection,
    now: i64,
    request_id: &str,
    outcome: Outcome<'_>,
    answered: bool,
    release: Option<(&str, &Claim)>,
) -> Result<Settled, LedgerError> {
    let (fence_pkey, fence_holder, fence_generation) = fence(release);
    // What the function reads of each outcome; the others' parameters are NULL.
    let (name, created, failure, retry) = match outcome {
        Outcome::Applied { pkey } => ("APPLIED", pkey, None, None),
        Outcome::Failed { reason, code } => ("FAILED", None, Some((reason, code.as_str())), None),
        Outcome::Retry {
            error,
            next_attempt_at,
            attempted,
            acs_unavailable,
        } => (
            "RETRY",
            None,
            None,
            Some((
                error,
                next_attempt_at,
                i64::from(attempted),
                i64::from(acs_unavailable),
            )),
        ),
    };
    let settled: String = sqlx::query_scalar(
        "SELECT ccpa_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(request_id)
    .bind(name)
    .bind(now)
    .bind(i64::from(answered))
    .bind(created)
    .bind(failure.map(|(reason, _)| reason))
    .bind(failure.map(|(_, code)| code))
    .bind(retry.map(|(error, ..)| error))
    .bind(retry.map(|(_, next_attempt_at, ..)| next_attempt_at))
    .bind(retry.map(|(_, _, attempted, _)| attempted))
    .bind(retry.map(|(.., acs_unavailable)| acs_unavailable))
    .bind(fence_pkey)
    .bind(fence_holder)
    .bind(fence_generation)
    .fetch_all(&mut *connection)
    .await
    .map_err(LedgerError::from)
    .and_then(super::writer::only_row)?;
    match settled.as_str() {
        "RECORDED" => Ok(Settled::Recorded),
        "NOT_PENDING" => Ok(Settled::NotPending),
        "LEASE_LOST" => Ok(Settled::LeaseLost),
        other => Err(LedgerError::Corrupt(format!(
            "ccpa_settle answered {other:?}"
        ))),
    }
}

/// What [`Ledger::fail_abandoned`] fails, and why.
pub(super) const ABANDONED: [(Kind, &str); 2] = [
    (
        Kind::CreateProfile,
        "the gateway stopped before ACS answered the creation; the caller was not answered and \
         must retry",
    ),
    (
        Kind::SetByEmail,
        "the gateway stopped before every profile of this email was recorded (those recorded \
         are delivered); the caller was not answered and must retry",
    ),
];

/// [`Ledger::fail_abandoned`]'s unit of work.
pub(super) async fn fail_abandoned_unit(
    connection: &mut AnyConnection,
    older_than: i64,
    now: i64,
) -> Result<u64, LedgerError> {
    let mut failed = 0;
    for (kind, reason) in ABANDONED {
        failed += sqlx::query(
            "UPDATE opt_out_records SET state = 'FAILED', resolved_at = $1, \
                 failure_reason = $2, failure_code = $3 \
                 WHERE kind = $4 AND state = 'PENDING' AND recorded_at < $5",
        )
        .bind(now)
        .bind(reason)
        .bind(FailureCode::Unavailable.as_str())
        .bind(kind.as_str())
        .bind(older_than)
        .execute(&mut *connection)
        .await?
        .rows_affected();
    }
    Ok(failed)
}
