//! The opt-out ledger: every consumer request to opt out of sale (or back in) is written here,
//! durably, before ACS is called; it is delivered to ACS from here until ACS holds it; and it is
//! kept here, as the record the CCPA regulations require, for at least 24 months.
//!
//! One schema (`migrations/`), portable between SQLite (the default: a file, one gateway) and
//! PostgreSQL (several gateways sharing one ledger). Writes are durable when they return: SQLite
//! runs in WAL mode with `synchronous=FULL` (an fsync per commit), PostgreSQL with
//! `synchronous_commit=on`.
//!
//! Order: requests for one profile take effect in the order consumers made them
//! (`received_at`, then arrival). A request overtaken by a newer one before it was applied is
//! SUPERSEDED and never applied; only the holder of a profile's lease (see [`Ledger::claim`])
//! applies that profile's newest pending request.

pub mod clock;
pub mod delivery;
mod record;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

pub use record::{Kind, Record, Source, State};

/// Why the ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database failed or could not be reached.
    #[error("the ledger's database failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("the ledger's schema could not be migrated: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A row holds a value this version does not know.
    #[error("the ledger holds an unreadable value: {0}")]
    Corrupt(String),
    /// The location is neither a path nor a `postgres://` URL.
    #[error("{0}")]
    Location(String),
    /// Another gateway serves this SQLite ledger.
    #[error(
        "another gateway already serves the SQLite ledger {0}: SQLite is for one gateway; run \
         several on a PostgreSQL ledger"
    )]
    Held(String),
    /// The lock file beside a SQLite ledger could not be opened.
    #[error("the lock file of the SQLite ledger could not be opened: {0}")]
    Lock(#[from] std::io::Error),
}

/// The database behind the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (or memory, for demos): one gateway.
    Sqlite,
    /// PostgreSQL: one or several gateways.
    Postgres,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

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

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "opt-out ledger",
        include_str!("../../migrations/0001_opt_out_ledger.sql"),
    ),
    (
        2,
        "requests by email",
        include_str!("../../migrations/0002_requests_by_email.sql"),
    ),
    (
        3,
        "request fingerprints",
        include_str!("../../migrations/0003_request_fingerprints.sql"),
    ),
];

/// Every column of `opt_out_records`, in the order [`Record::from_row`] reads them.
const COLUMNS: &str = "request_id, kind, pkey, opt_out, source, received_at, received_at_given, \
     recorded_at, caller, state, answered_at, resolved_at, attempts, next_attempt_at, last_error, \
     failure_reason, failure_code, superseded_by, parent_request_id, fingerprint";

/// The ledger.
#[derive(Clone)]
pub struct Ledger {
    /// For reads.
    reader: AnyPool,
    /// For writes: the same pool as `reader` on PostgreSQL, a single connection on SQLite.
    writer: AnyPool,
    backend: Backend,
    /// The SQLite file, if that is what it is.
    file: Option<PathBuf>,
    pending: Arc<PendingHint>,
}

/// Which profiles may have a pending request, so that the protective read can skip its query
/// for the others: most profiles, most of the time. On SQLite the query is most of a
/// GetOptOut's cost (sqlx hands each statement to a thread of its own, and on a busy machine
/// every hand-off waits for the scheduler). Only trusted where this process is the ledger's only
/// writer ([`Ledger::hold_exclusively`], SQLite); elsewhere every read asks the database.
///
/// A write adds its profile inside its transaction, holding SQLite's one writer connection, so
/// before it commits. [`Ledger::refresh_pending_hint`] replaces the set with the profiles the
/// database has pending, also holding that connection: no write is half done meanwhile, so none
/// can be missed.
struct PendingHint {
    trusted: AtomicBool,
    profiles: std::sync::Mutex<PendingProfiles>,
}

#[derive(Default)]
struct PendingProfiles {
    keys: HashSet<String>,
    /// Every profile may have one: before the first refresh, or when more than
    /// [`PendingHint::MAX_KEYS`] did.
    overflowed: bool,
}

impl PendingHint {
    /// Beyond this many profiles with pending requests (an ACS outage), the hint stops naming
    /// them, to keep memory bounded, and every read asks the database.
    const MAX_KEYS: usize = 100_000;

    fn new() -> Self {
        Self {
            trusted: AtomicBool::new(false),
            // Unknown until the first refresh: requests left pending by an earlier run count.
            profiles: std::sync::Mutex::new(PendingProfiles {
                keys: HashSet::new(),
                overflowed: true,
            }),
        }
    }

    fn profiles(&self) -> std::sync::MutexGuard<'_, PendingProfiles> {
        // A panic while the lock was held leaves a set that is at worst too large: still safe.
        self.profiles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Inside a write that may record a pending request for `pkey`, before it commits.
    fn note(&self, pkey: &str) {
        let mut profiles = self.profiles();
        if profiles.overflowed {
            return;
        }
        if profiles.keys.len() >= Self::MAX_KEYS {
            profiles.overflowed = true;
            profiles.keys = HashSet::new();
        } else if !profiles.keys.contains(pkey) {
            profiles.keys.insert(pkey.to_owned());
        }
    }

    /// False only when the profile cannot have a pending request.
    fn maybe_pending(&self, pkey: &str) -> bool {
        if !self.trusted.load(Ordering::SeqCst) {
            return true;
        }
        let profiles = self.profiles();
        profiles.overflowed || profiles.keys.contains(pkey)
    }
}

/// A SQLite ledger held by one serving gateway; released when dropped (or when the process
/// dies: the operating system drops the lock).
#[derive(Debug)]
pub struct ExclusiveHold {
    _lock: Option<std::fs::File>,
}

/// A pool of `max_connections` to `url`, each set up for durability.
async fn connect(
    url: &str,
    backend: Backend,
    max_connections: u32,
) -> Result<AnyPool, LedgerError> {
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        // sqlx pings a connection before lending it by default: a round trip to SQLite's worker
        // thread (or to PostgreSQL) for every query. A broken connection fails the query
        // instead, which is answered UNAVAILABLE, and the pool replaces it.
        .test_before_acquire(false)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                let settings: &[&'static str] = match backend {
                    // WAL lets readers run beside the one writer; FULL fsyncs every commit, so a
                    // request the gateway has answered for survives a power cut.
                    Backend::Sqlite => &[
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 10000",
                        "PRAGMA foreign_keys = ON",
                    ],
                    // The server's default, made explicit: a commit returns once on disk.
                    Backend::Postgres => &["SET synchronous_commit TO on"],
                };
                for setting in settings {
                    connection.execute(*setting).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?;
    Ok(pool)
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens the ledger at `location` (a file path, `sqlite::memory:`, or a `postgres://` URL),
    /// creating it if needed, and brings its schema up to date.
    pub async fn open(location: &str) -> Result<Self, LedgerError> {
        sqlx::any::install_default_drivers();
        let (url, backend) =
            if location.starts_with("postgres://") || location.starts_with("postgresql://") {
                crate::access::transport::require_verified_postgres(location)
                    .map_err(LedgerError::Location)?;
                (location.to_owned(), Backend::Postgres)
            } else if location == "sqlite::memory:" {
                ("sqlite::memory:".to_owned(), Backend::Sqlite)
            } else if location.is_empty() || location.contains("://") {
                return Err(LedgerError::Location(format!(
                    "the ledger must be a file path or a postgres:// URL, not {location:?}"
                )));
            } else {
                (format!("sqlite://{location}?mode=rwc"), Backend::Sqlite)
            };
        let ledger = match (backend, location) {
            // PostgreSQL handles concurrent writers itself: one pool for everything.
            (Backend::Postgres, _) => {
                let pool = connect(&url, backend, 16).await?;
                Self {
                    reader: pool.clone(),
                    writer: pool,
                    backend,
                    file: None,
                    pending: Arc::new(PendingHint::new()),
                }
            }
            // Each connection to an in-memory database sees a database of its own: one
            // connection for everything.
            (Backend::Sqlite, "sqlite::memory:") => {
                let pool = connect(&url, backend, 1).await?;
                Self {
                    reader: pool.clone(),
                    writer: pool,
                    backend,
                    file: None,
                    pending: Arc::new(PendingHint::new()),
                }
            }
            // SQLite has one writer at a time: writers queue for a single connection (in order,
            // without SQLite's busy-wait), while readers use others beside it (WAL).
            (Backend::Sqlite, _) => {
                let writer = connect(&url, backend, 1).await?;
                let reader = connect(&url, backend, 4).await?;
                Self {
                    reader,
                    writer,
                    backend,
                    file: Some(PathBuf::from(location)),
                    pending: Arc::new(PendingHint::new()),
                }
            }
        };
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    (*description).into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&ledger.writer)
            .await?;
        Ok(ledger)
    }

    /// Which database is behind it.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// For a serving gateway: on a SQLite file, makes sure no other gateway serves it (a lock
    /// on `<file>.lock`, held while the returned value lives) and, being then its only writer,
    /// lets the protective read trust the in-process hint of whether anything is pending. On
    /// PostgreSQL, which several gateways share, nothing is held and every read asks.
    pub fn hold_exclusively(&self) -> Result<ExclusiveHold, LedgerError> {
        let Some(file) = &self.file else {
            return Ok(ExclusiveHold { _lock: None });
        };
        let mut lock_path = file.clone().into_os_string();
        lock_path.push(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Held(file.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(LedgerError::Lock(error)),
        }
        self.pending.trusted.store(true, Ordering::SeqCst);
        Ok(ExclusiveHold { _lock: Some(lock) })
    }

    /// Brings the hint of which profiles may have a pending request down to those that do (see
    /// `PendingHint`). The deliverer calls it on each round.
    pub async fn refresh_pending_hint(&self) -> Result<(), LedgerError> {
        if !self.pending.trusted.load(Ordering::SeqCst) {
            return Ok(());
        }
        // On the writer connection: every write that noted a profile has committed, and none
        // can start until this is done.
        let mut writer = self.writer.acquire().await?;
        let pending: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT pkey FROM opt_out_records \
             WHERE state = 'PENDING' AND pkey IS NOT NULL LIMIT $1",
        )
        .bind(i64::try_from(PendingHint::MAX_KEYS).unwrap_or(i64::MAX) + 1)
        .fetch_all(&mut *writer)
        .await?;
        let mut profiles = self.pending.profiles();
        profiles.overflowed = pending.len() > PendingHint::MAX_KEYS;
        profiles.keys = if profiles.overflowed {
            HashSet::new()
        } else {
            pending.into_iter().collect()
        };
        Ok(())
    }

    /// Records a request, durably, unless its id was recorded before. A new request overtaken by
    /// a newer one recorded earlier is SUPERSEDED at once; older pending requests for the same
    /// profile are SUPERSEDED by it. With `claim`, a new pending request also takes its
    /// profile's lease when it is free, in the same transaction (one write to disk for both).
    pub async fn record(
        &self,
        request: &NewRequest,
        claim: Option<&Claim>,
    ) -> Result<(Recorded, bool), LedgerError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        if let Some(pkey) = &request.pkey {
            // Holding the writer connection, before the write commits: no read after the commit
            // can skip this profile, and no refresh of the hint can run meanwhile.
            self.pending.note(pkey);
        }
        if let (Backend::Postgres, Some(pkey)) = (self.backend, &request.pkey) {
            // Requests for one profile are recorded one at a time, so that each sees the others.
            // (SQLite has one writer at a time anyway.)
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))::text")
                .bind(pkey)
                .fetch_one(&mut *tx)
                .await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at, \
             received_at_given, recorded_at, caller, state, attempts, next_attempt_at, \
             parent_request_id, fingerprint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PENDING', 0, $10, $11, $12) \
             ON CONFLICT (request_id) DO NOTHING",
        )
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
        .execute(&mut *tx)
        .await?
        .rows_affected();

        if inserted == 0 {
            let existing = fetch_record(&mut *tx, &request.request_id)
                .await?
                .ok_or_else(|| LedgerError::Corrupt("a conflicting id vanished".into()))?;
            if !same_request(&existing, request) {
                tx.commit().await?;
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
                tx.commit().await?;
                return Ok((Recorded::New(reopened), false));
            }
            tx.commit().await?;
            return Ok((Recorded::Replay(existing), false));
        }

        if let Some(pkey) = &request.pkey {
            let received_at = request.received_at.unwrap_or(now);
            // A newer request (pending or applied) already recorded for the profile overtakes
            // this one.
            let newer: Option<String> = sqlx::query_scalar(
                "SELECT request_id FROM opt_out_records \
                 WHERE pkey = $1 AND request_id <> $2 AND state IN ('PENDING', 'APPLIED') \
                   AND (received_at > $3 OR (received_at = $3 AND recorded_at > $4)) \
                 ORDER BY received_at DESC, recorded_at DESC LIMIT 1",
            )
            .bind(pkey)
            .bind(&request.request_id)
            .bind(received_at)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            match newer {
                Some(newer) => {
                    supersede(&mut *tx, &request.request_id, &newer, now, true).await?;
                }
                None => {
                    sqlx::query(
                        "UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = $1, \
                         resolved_at = $2 \
                         WHERE pkey = $3 AND state = 'PENDING' AND request_id <> $1",
                    )
                    .bind(&request.request_id)
                    .bind(now)
                    .bind(pkey)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        let record = fetch_record(&mut *tx, &request.request_id)
            .await?
            .ok_or_else(|| LedgerError::Corrupt("a record vanished as it was written".into()))?;
        let claimed = match (claim, &record.pkey) {
            (Some(claim), Some(pkey)) if record.state == State::Pending => {
                claim_lease(&mut *tx, pkey, claim, now).await?
            }
            _ => false,
        };
        tx.commit().await?;
        Ok((Recorded::New(record), claimed))
    }

    /// One record, by request id.
    pub async fn get(&self, request_id: &str) -> Result<Option<Record>, LedgerError> {
        let mut connection = self.reader.acquire().await?;
        fetch_record(&mut *connection, request_id).await
    }

    /// The records a request made by email fanned out to, in the order they were made.
    pub async fn children(&self, parent_request_id: &str) -> Result<Vec<Record>, LedgerError> {
        let rows = sqlx::query(AssertColumns::sql(
            "WHERE parent_request_id = $1 ORDER BY request_id",
        ))
        .bind(parent_request_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// The value of the newest pending request for a profile, if any.
    pub async fn pending_change(&self, pkey: &str) -> Result<Option<bool>, LedgerError> {
        if !self.pending.maybe_pending(pkey) {
            return Ok(None);
        }
        let value: Option<i64> = sqlx::query_scalar(
            "SELECT opt_out FROM opt_out_records WHERE pkey = $1 AND state = 'PENDING' \
             ORDER BY received_at DESC, recorded_at DESC LIMIT 1",
        )
        .bind(pkey)
        .fetch_optional(&self.reader)
        .await?;
        Ok(value.map(|v| v != 0))
    }

    /// Takes the lease on a profile, unless someone else holds it. Whoever holds it is the only
    /// one applying that profile's requests.
    pub async fn claim(&self, pkey: &str, claim: &Claim) -> Result<bool, LedgerError> {
        let mut connection = self.writer.acquire().await?;
        claim_lease(&mut *connection, pkey, claim, now_ms()).await
    }

    /// Gives a lease back.
    pub async fn release(&self, pkey: &str, claim: &Claim) -> Result<(), LedgerError> {
        let mut connection = self.writer.acquire().await?;
        release_lease(&mut *connection, pkey, claim).await
    }

    /// The profile's newest pending request, once every older pending one is SUPERSEDED by it;
    /// or `None`, with every pending one SUPERSEDED, when an applied request is newer. Call it
    /// holding the profile's lease.
    pub async fn next_to_apply(&self, pkey: &str) -> Result<Option<Record>, LedgerError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        // A write first, so that SQLite takes its write lock now rather than on upgrade.
        sqlx::query("UPDATE profile_leases SET expires_at = expires_at WHERE pkey = $1")
            .bind(pkey)
            .execute(&mut *tx)
            .await?;
        let newest = sqlx::query(
            "SELECT request_id, state FROM opt_out_records \
             WHERE pkey = $1 AND state IN ('PENDING', 'APPLIED') \
             ORDER BY received_at DESC, recorded_at DESC LIMIT 1",
        )
        .bind(pkey)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(newest) = newest else {
            tx.commit().await?;
            return Ok(None);
        };
        let newest_id: String = sqlx::Row::try_get(&newest, "request_id")?;
        let newest_state = State::parse(&sqlx::Row::try_get::<String, _>(&newest, "state")?)?;
        sqlx::query(
            "UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = $1, resolved_at = $2 \
             WHERE pkey = $3 AND state = 'PENDING' AND request_id <> $1",
        )
        .bind(&newest_id)
        .bind(now)
        .bind(pkey)
        .execute(&mut *tx)
        .await?;
        let next = if newest_state == State::Pending {
            fetch_record(&mut *tx, &newest_id).await?
        } else {
            None
        };
        tx.commit().await?;
        Ok(next)
    }

    /// Records the outcome of an attempt to apply a request, and (with `release`) gives the
    /// profile's lease back, in one transaction. `answered` also records that the caller is being
    /// answered now. False when the record was no longer pending (a newer request superseded it
    /// meanwhile).
    pub async fn settle(
        &self,
        request_id: &str,
        outcome: Outcome<'_>,
        answered: bool,
        release: Option<(&str, &Claim)>,
    ) -> Result<bool, LedgerError> {
        let now = now_ms();
        let mut tx = self.writer.begin().await?;
        let query = match outcome {
            Outcome::Applied { pkey } => sqlx::query(
                "UPDATE opt_out_records SET state = 'APPLIED', resolved_at = $1, \
                 attempts = attempts + 1, pkey = COALESCE(pkey, $2), \
                 answered_at = CASE WHEN $3 = 1 THEN COALESCE(answered_at, $1) ELSE answered_at END \
                 WHERE request_id = $4 AND state = 'PENDING'",
            )
            .bind(now)
            .bind(pkey)
            .bind(i64::from(answered))
            .bind(request_id),
            Outcome::Failed { reason, code } => sqlx::query(
                "UPDATE opt_out_records SET state = 'FAILED', resolved_at = $1, \
                 attempts = attempts + 1, failure_reason = $2, failure_code = $3, \
                 answered_at = CASE WHEN $4 = 1 THEN COALESCE(answered_at, $1) ELSE answered_at END \
                 WHERE request_id = $5 AND state = 'PENDING'",
            )
            .bind(now)
            .bind(reason)
            .bind(code)
            .bind(i64::from(answered))
            .bind(request_id),
            Outcome::Retry {
                error,
                next_attempt_at,
                attempted,
            } => sqlx::query(
                "UPDATE opt_out_records SET attempts = attempts + $1, last_error = $2, \
                 next_attempt_at = $3, \
                 answered_at = CASE WHEN $4 = 1 THEN COALESCE(answered_at, $5) ELSE answered_at END \
                 WHERE request_id = $6 AND state = 'PENDING'",
            )
            .bind(i64::from(attempted))
            .bind(error)
            .bind(next_attempt_at)
            .bind(i64::from(answered))
            .bind(now)
            .bind(request_id),
        };
        let updated = query.execute(&mut *tx).await?.rows_affected();
        if let Some((pkey, claim)) = release {
            release_lease(&mut *tx, pkey, claim).await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    /// Records that the caller is being answered now, if it was not before.
    pub async fn mark_answered(&self, request_id: &str) -> Result<(), LedgerError> {
        sqlx::query(
            "UPDATE opt_out_records SET answered_at = COALESCE(answered_at, $1) \
             WHERE request_id = $2",
        )
        .bind(now_ms())
        .bind(request_id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Profiles with a pending request due for delivery, the oldest request first.
    pub async fn due_profiles(&self, now: i64, limit: i64) -> Result<Vec<String>, LedgerError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT pkey FROM opt_out_records \
             WHERE state = 'PENDING' AND kind = 'SET_OPT_OUT' AND next_attempt_at <= $1 \
             GROUP BY pkey ORDER BY MIN(received_at) LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows)
    }

    /// Requests whose caller was never answered because the gateway stopped during the call,
    /// and which the ledger cannot complete later, are FAILED, with the reason the caller must
    /// retry:
    /// - a creation (the profile's data is not kept);
    /// - a by-email request interrupted before its profiles were all recorded (the address is
    ///   not kept). Its profiles that were recorded are delivered as usual.
    ///
    /// `older_than`: only requests recorded before it (a lease's length ago: none of them can
    /// still be in progress). Returns how many.
    pub async fn fail_abandoned(&self, older_than: i64) -> Result<u64, LedgerError> {
        let mut failed = 0;
        for (kind, reason) in [
            (
                Kind::CreateProfile,
                "the gateway stopped before ACS answered the creation; the caller was not \
                 answered and must retry",
            ),
            (
                Kind::SetByEmail,
                "the gateway stopped before every profile of this email was recorded (those \
                 recorded are delivered); the caller was not answered and must retry",
            ),
        ] {
            failed += sqlx::query(
                "UPDATE opt_out_records SET state = 'FAILED', resolved_at = $1, \
                 failure_reason = $2, failure_code = 'UNAVAILABLE' \
                 WHERE kind = $3 AND state = 'PENDING' AND recorded_at < $4",
            )
            .bind(now_ms())
            .bind(reason)
            .bind(kind.as_str())
            .bind(older_than)
            .execute(&self.writer)
            .await?
            .rows_affected();
        }
        Ok(failed)
    }

    /// Pending requests made before `received_before`, oldest first.
    pub async fn pending_before(&self, received_before: i64) -> Result<Vec<Record>, LedgerError> {
        let rows = sqlx::query(AssertColumns::sql(
            "WHERE state = 'PENDING' AND received_at < $1 ORDER BY received_at",
        ))
        .bind(received_before)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// A page of records, newest request first.
    pub async fn list(
        &self,
        filter: &ListFilter,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<Record>, LedgerError> {
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
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// Every record of requests made in `[since, until)`, oldest first.
    pub async fn export(&self, since: i64, until: i64) -> Result<Vec<Record>, LedgerError> {
        let rows = sqlx::query(AssertColumns::sql(
            "WHERE received_at >= $1 AND received_at < $2 ORDER BY received_at, request_id",
        ))
        .bind(since)
        .bind(until)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(Record::from_row).collect()
    }

    /// Deletes the records of requests resolved before `resolved_before`, except pending ones.
    /// Returns how many.
    pub async fn prune(&self, resolved_before: i64) -> Result<u64, LedgerError> {
        // Counted from the response, not the request: the regulations keep the record of how
        // the business responded for 24 months, and a request may have waited before it was.
        let deleted = sqlx::query(
            "DELETE FROM opt_out_records \
             WHERE state <> 'PENDING' AND COALESCE(resolved_at, received_at) < $1",
        )
        .bind(resolved_before)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(deleted)
    }
}

/// Who holds a profile's lease, and until when. A holder is unique to one attempt at applying,
/// so two tasks of one process never both think they hold it.
#[derive(Debug, Clone)]
pub struct Claim {
    /// A name unique to this claim.
    pub holder: String,
    /// When the lease lapses if not given back (ms): longer than any attempt can take.
    pub expires_at: i64,
}

impl Claim {
    /// A new claim lasting `lease_ms` from now.
    pub fn new(lease_ms: i64) -> Self {
        Self {
            holder: uuid::Uuid::new_v4().to_string(),
            expires_at: now_ms() + lease_ms,
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
        /// The gRPC code the caller was given.
        code: &'a str,
    },
    /// It may be applied later.
    Retry {
        /// What went wrong (a reason, never a body).
        error: &'a str,
        /// When to try again (ms).
        next_attempt_at: i64,
        /// Whether a request reached (or may have reached) ACS.
        attempted: bool,
    },
}

async fn claim_lease<'e, E>(
    executor: E,
    pkey: &str,
    claim: &Claim,
    now: i64,
) -> Result<bool, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let claimed = sqlx::query(
        "INSERT INTO profile_leases (pkey, holder, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (pkey) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE profile_leases.expires_at < $4",
    )
    .bind(pkey)
    .bind(&claim.holder)
    .bind(claim.expires_at)
    .bind(now)
    .execute(executor)
    .await?
    .rows_affected();
    Ok(claimed == 1)
}

async fn release_lease<'e, E>(executor: E, pkey: &str, claim: &Claim) -> Result<(), LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    sqlx::query("DELETE FROM profile_leases WHERE pkey = $1 AND holder = $2")
        .bind(pkey)
        .bind(&claim.holder)
        .execute(executor)
        .await?;
    Ok(())
}

/// `SELECT <every column> FROM opt_out_records <rest>`, for the static `rest` of a query.
struct AssertColumns;

impl AssertColumns {
    fn sql(rest: &'static str) -> sqlx::AssertSqlSafe<String> {
        // Both parts are constants of this module: nothing from a request reaches the text of
        // the query.
        sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM opt_out_records {rest}"))
    }
}

async fn fetch_record<'e, E>(executor: E, request_id: &str) -> Result<Option<Record>, LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    let row: Option<AnyRow> = sqlx::query(AssertColumns::sql("WHERE request_id = $1"))
        .bind(request_id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(Record::from_row).transpose()
}

async fn supersede<'e, E>(
    executor: E,
    request_id: &str,
    by: &str,
    now: i64,
    answered: bool,
) -> Result<(), LedgerError>
where
    E: Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = $1, resolved_at = $2, \
         answered_at = CASE WHEN $3 = 1 THEN $2 ELSE answered_at END WHERE request_id = $4",
    )
    .bind(by)
    .bind(now)
    .bind(i64::from(answered))
    .bind(request_id)
    .execute(executor)
    .await?;
    Ok(())
}

/// Whether a replayed request is the one recorded under its id. `received_at` counts only when
/// both gave it: a retry without it must not look different because the clock moved.
/// Whether a failed request may be tried again under its id: a request by email whose failure
/// was transient (see [`Ledger::record`]).
fn reopenable(recorded: &Record) -> bool {
    recorded.kind == Kind::SetByEmail
        && recorded.state == State::Failed
        && matches!(
            recorded.failure_code.as_deref(),
            Some("UNAVAILABLE" | "DEADLINE_EXCEEDED")
        )
}

async fn has_children<'e, E>(executor: E, request_id: &str) -> Result<bool, LedgerError>
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

fn same_request(recorded: &Record, request: &NewRequest) -> bool {
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
