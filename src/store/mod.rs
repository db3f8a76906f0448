//! The ledger's store: the database and nothing else. Every consumer request to opt out of sale
//! (or back in) is written here, durably, before ACS is called, and kept here, as the record the
//! CCPA regulations require, for at least 24 months. What is done with those records (delivery
//! to ACS, drift, the read's protective answer) is the protocol's, in `crate::optout`; this
//! module knows nothing of ACS, health, access, telemetry or the API.
//!
//! One schema (`migrations/`), portable between SQLite (the default: a file, one gateway) and
//! PostgreSQL (several gateways sharing one ledger). Writes are durable when they return: SQLite
//! runs in WAL mode with `synchronous=FULL` (an fsync per commit, one commit for every write
//! queued at the time: see `sqlite`), PostgreSQL with `synchronous_commit=on`.
//!
//! Each storage operation is implemented once per database: on SQLite by `sqlite` (rusqlite,
//! run on the threads that own its connections), on PostgreSQL by the sqlx code of the modules
//! below, whose hot units (recording, settling, claiming and releasing) each call a function of
//! migration 8, one statement and one round trip; every public method of [`Ledger`] dispatches
//! on its `Store`.
//!
//! By job: `open` (connections, migrations), `intake` (recording a request), `leases` (who
//! applies a profile's requests, and what came of each attempt), `queries` (reads), `retention`
//! (pruning), `writer` (PostgreSQL's transactions, and its units of one statement), `sqlite`
//! (SQLite: the writer thread's group commit, its readers, its migrations and units),
//! `reconcile` (each profile's latest request, the schedule of re-reads, drift found), `changes`
//! (the change feed, in the order it is served), `notifications` (what is told to third
//! parties, and how far each delivery got), `report` (the yearly figures), `metrics` (what the store counts).
//!
//! Order: requests for one profile take effect in the order consumers made them
//! (`received_at`, then arrival), except that a request is never ordered later than the ledger's
//! clock when it was recorded: a caller's stated `received_at` ahead of that clock (a portal
//! whose clock runs fast, or a caller allowed only `opt-in` on purpose) would otherwise overtake
//! an opt-out the consumer makes after it. The stated value is kept as given, for the records
//! (11 CCR 7101); only the order uses [`Record::ordered_at`], in SQL `ordered_at!()`. A request
//! overtaken by a newer one before it was applied is SUPERSEDED and never applied; only the
//! holder of a profile's lease (see [`Ledger::claim`]) applies that profile's newest pending
//! request.

/// PostgreSQL's clock now (not at the transaction's start), in ms since the Unix epoch: an SQL
/// expression, spliced with `concat!` into the statements that read it.
macro_rules! database_now_ms {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

/// The instant a request is ordered by among its profile's requests: [`Record::ordered_at`]. An
/// SQL expression over the columns of `opt_out_records`, or of the table alias given, spliced
/// with `concat!`.
macro_rules! ordered_at {
    () => {
        "(CASE WHEN received_at > recorded_at AND restores_request_id IS NULL \
         THEN recorded_at ELSE received_at END)"
    };
    ($table:literal) => {
        concat!(
            "(CASE WHEN ",
            $table,
            ".received_at > ",
            $table,
            ".recorded_at AND ",
            $table,
            ".restores_request_id IS NULL THEN ",
            $table,
            ".recorded_at ELSE ",
            $table,
            ".received_at END)"
        )
    };
}

/// The start of every statement that supersedes: SUPERSEDED by request `1` at instant `2`, with
/// the placeholder prefix given (`"$"` on PostgreSQL, `"?"` on SQLite).
macro_rules! superseded_by {
    ($p:literal) => {
        concat!(
            "UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = ",
            $p,
            "1, resolved_at = ",
            $p,
            "2"
        )
    };
}

/// "Supersede the older pending requests": every pending request of profile `3` but `1`
/// becomes SUPERSEDED by request `1` at instant `2`. One text for both backends, each with its
/// placeholder prefix, run by one function each (`intake::supersede_older_pending`,
/// `sqlite::units::supersede_older_pending`).
macro_rules! supersede_older_pending {
    ($p:literal) => {
        concat!(
            superseded_by!($p),
            " WHERE pkey = ",
            $p,
            "3 AND state = 'PENDING' AND request_id <> ",
            $p,
            "1"
        )
    };
}

/// Supersedes one request: request `4` becomes SUPERSEDED by request `1` at instant `2`, and
/// answered then too when `3` is 1. One text for both backends, as `supersede_older_pending!`;
/// run by `intake::supersede` and `sqlite::units::supersede`.
macro_rules! supersede_request {
    ($p:literal) => {
        concat!(
            superseded_by!($p),
            ", answered_at = CASE WHEN ",
            $p,
            "3 = 1 THEN ",
            $p,
            "2 ELSE answered_at END WHERE request_id = ",
            $p,
            "4"
        )
    };
}

mod changes;
mod intake;
mod leases;
pub mod metrics;
mod notifications;
mod open;
mod queries;
mod reconcile;
mod record;
pub mod report;
mod retention;
mod sqlite;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool};

use crate::clock::Clock;

pub use changes::{Change, ChangePosition, ChangesAfter};
pub use intake::{NewRequest, Recorded, fingerprint};
pub use leases::{Claim, Outcome, Settled};
pub use notifications::{
    Delivered, DueNotification, Notification, NotificationCursor, RecipientBacklog,
    RecipientEvents, Settle,
};
pub use queries::{Cursor, ListFilter, MAX_PROFILES_PER_EMAIL, PendingSummary};
pub use record::{FailureCode, Kind, NotificationState, Record, Source, State};
use writer::Writer;

/// Why the ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database failed or could not be reached.
    #[error("the ledger's database failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The SQLite database failed.
    #[error("the ledger's database failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    /// A write was not committed (its batch's transaction failed, or the writer stopped).
    #[error("the write was not committed to the ledger: {0}")]
    Commit(String),
}

impl From<rusqlite::types::FromSqlError> for LedgerError {
    fn from(error: rusqlite::types::FromSqlError) -> Self {
        Self::Corrupt(error.to_string())
    }
}

/// The database behind the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (or memory, for demos): one gateway.
    Sqlite,
    /// PostgreSQL: one or several gateways.
    Postgres,
}

/// The ledger.
#[derive(Clone)]
pub struct Ledger {
    /// The database, and how it is reached.
    store: Store,
    backend: Backend,
    /// The SQLite file, if that is what it is.
    file: Option<PathBuf>,
    /// On PostgreSQL, where recording a profile's request waits for that profile's advisory
    /// lock while holding a pooled connection: the turns of this process's calls, so that a
    /// burst of calls for one profile waits here, in memory, on one connection at most.
    turns: Arc<ProfileTurns>,
    /// Which profiles have records, once trusted (see [`KnownProfiles`]).
    known: Arc<KnownProfiles>,
    /// Where every rule of the ledger and its deliverer reads the time (leases, back-off, the
    /// overdue clock, retention): the system's, unless a test sets it.
    clock: Arc<dyn Clock>,
}

/// The database behind a ledger, and how it is reached: each storage operation is implemented
/// once per database, and every public method of [`Ledger`] dispatches on this.
#[derive(Clone)]
enum Store {
    /// rusqlite: a writer thread batching units into group commits, readers beside it (see
    /// `sqlite`).
    Sqlite(Arc<sqlite::Sqlite>),
    /// sqlx: a pool, each unit in a transaction of its own, the hot units each one statement (a
    /// function of migration 8: see `writer`).
    Postgres(Postgres),
}

/// PostgreSQL's pool, for reads and writes.
#[derive(Clone)]
struct Postgres {
    /// For reads.
    reader: AnyPool,
    /// For writes: a transaction per unit; the hot units each one statement, its own
    /// transaction.
    writer: Writer,
}

impl Postgres {
    /// Runs a unit of writes durably (see `writer`): `Ok` once its commit is on disk.
    async fn write<T, F>(&self, unit: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, LedgerError>>
            + Send
            + 'static,
    {
        self.writer.write(Box::new(unit)).await
    }

    /// Runs a unit of one statement durably, the statement its own transaction (see `writer`):
    /// `Ok` once it has committed.
    async fn statement<T, F>(&self, unit: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, LedgerError>>
            + Send
            + 'static,
    {
        self.writer.statement(Box::new(unit)).await
    }
}

/// Striped turns: a request for a profile is recorded after the earlier ones of this process
/// for profiles of the same stripe. Bounded memory whatever the number of profiles; two
/// profiles share a stripe one time in [`ProfileTurns::STRIPES`], and then only wait for each
/// other's short recording.
struct ProfileTurns(Vec<tokio::sync::Mutex<()>>);

impl ProfileTurns {
    const STRIPES: usize = 64;

    fn new() -> Self {
        Self(
            (0..Self::STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        )
    }

    async fn take(&self, pkey: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        // Fixed keys: a profile's stripe is the same for the life of the process.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pkey.hash(&mut hasher);
        let stripe = usize::try_from(hasher.finish() % Self::STRIPES as u64).unwrap_or(0);
        // In range: `stripe` is a remainder of STRIPES, the vector's length.
        self.0[stripe].lock().await
    }
}

/// Which profiles the ledger has any record of, so that a read of a profile it has none of (most
/// profiles read, most of the time) skips its query: on SQLite that query is most of a
/// GetOptOut's cost (a read is handed to a blocking thread and back, and on a busy machine every
/// hand-off waits for the scheduler).
///
/// A Bloom filter: it has no false negatives, so a profile it does not know has no record; a few
/// it wrongly knows are asked for anyway. Trusted only where this process is the ledger's only
/// writer ([`Ledger::hold_exclusively`], SQLite), and only once filled: the filling runs as a
/// write, holding the writer, so it sees every committed key; every later write notes its key
/// inside its transaction, before it commits. Keys are never removed (a pruned profile is only
/// asked for again). Elsewhere every read asks the database.
struct KnownProfiles {
    /// The filter, while trusted: from the end of [`Ledger::learn_known_profiles`] until the
    /// exclusive hold it was learnt under is dropped.
    filter: std::sync::RwLock<Option<fastbloom::AtomicBloomFilter>>,
}

impl KnownProfiles {
    /// The false-positive rate the filter is sized for.
    const FALSE_POSITIVES: f64 = 0.01;
    /// Sized for at least this many profiles (about 1.2 MB), and twice those recorded at start.
    const MIN_CAPACITY: usize = 1_000_000;
    /// And for at most this many (about 80 MB): past it, more profiles are asked for anyway;
    /// none is ever skipped wrongly.
    const MAX_CAPACITY: usize = 1 << 26;

    fn new() -> Self {
        Self {
            filter: std::sync::RwLock::new(None),
        }
    }

    fn filter(&self) -> std::sync::RwLockReadGuard<'_, Option<fastbloom::AtomicBloomFilter>> {
        // A panic while the lock was held leaves a filter that at worst knows too much.
        self.filter
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, filter: Option<fastbloom::AtomicBloomFilter>) {
        *self
            .filter
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = filter;
    }

    /// Inside a write that records `pkey`, before it commits.
    fn note(&self, pkey: &str) {
        if let Some(filter) = self.filter().as_ref() {
            filter.insert(pkey);
        }
    }

    /// False only when the ledger surely has no record of `pkey`.
    fn maybe_known(&self, pkey: &str) -> bool {
        self.filter()
            .as_ref()
            .is_none_or(|filter| filter.contains(pkey))
    }
}

/// The clock a unit of work orders its records and leases by: the database's on PostgreSQL,
/// which every replica shares (its clock, not theirs, orders leases and records); the ledger's on
/// SQLite, which one gateway serves, and wherever the ledger was given a clock of its own (a
/// test's, `Clock::is_system_time`).
#[derive(Debug, Clone)]
struct UnitClock {
    backend: Backend,
    clock: Arc<dyn Clock>,
}

impl UnitClock {
    /// Whether the database's clock is the one.
    fn database_keeps_time(&self) -> bool {
        self.backend == Backend::Postgres && self.clock.is_system_time()
    }

    /// Now for a function of migration 8, which reads the database's clock itself, inside its
    /// statement, when given none: `None` when the database keeps time, else the ledger's clock
    /// now.
    fn now_unless_database(&self) -> Option<i64> {
        (!self.database_keeps_time()).then(|| self.clock.unix_ms())
    }

    /// Now, in ms since the Unix epoch, read within the unit.
    async fn now(&self, connection: &mut AnyConnection) -> Result<i64, LedgerError> {
        if !self.database_keeps_time() {
            return Ok(self.clock.unix_ms());
        }
        Ok(sqlx::query_scalar(concat!("SELECT ", database_now_ms!()))
            .fetch_one(&mut *connection)
            .await?)
    }
}

/// A SQLite ledger held by one serving gateway; released when dropped (or when the process
/// dies: the operating system drops the lock).
pub struct ExclusiveHold {
    _lock: Option<std::fs::File>,
    /// Forgotten when the hold ends: another gateway may write the file then.
    known: Arc<KnownProfiles>,
    /// Likewise (a SQLite file's).
    latest: Option<Arc<sqlite::latest::LatestRequests>>,
}

impl std::fmt::Debug for ExclusiveHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusiveHold")
            .field("held", &self._lock.is_some())
            .finish()
    }
}

impl Drop for ExclusiveHold {
    fn drop(&mut self) {
        self.known.set(None);
        if let Some(latest) = &self.latest {
            latest.held(false);
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// The same ledger, reading the time from `clock` (a test's `ManualClock`): its records,
    /// leases, back-off, overdue clock and retention, and those of the gateway serving it. Such a
    /// clock orders records and leases on PostgreSQL too, in place of the database's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Where the ledger reads the time.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Now on the ledger's clock, in ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.clock.unix_ms()
    }

    /// The clock of the ledger's units of work (see [`UnitClock`]).
    fn unit_clock(&self) -> UnitClock {
        UnitClock {
            backend: self.backend,
            clock: self.clock.clone(),
        }
    }

    /// Which database is behind it.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// For a serving gateway: on a SQLite file, makes sure no other gateway serves it (a lock
    /// on `<file>.lock`, held while the returned value lives). On PostgreSQL, which several
    /// gateways share, nothing is held.
    pub fn hold_exclusively(&self) -> Result<ExclusiveHold, LedgerError> {
        let Some(file) = &self.file else {
            return Ok(ExclusiveHold {
                _lock: None,
                known: self.known.clone(),
                latest: None,
            });
        };
        // The file itself, whatever name it was given (a symbolic link, say): one lock per file.
        let mut lock_path = std::fs::canonicalize(file)?.into_os_string();
        lock_path.push(".lock");
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        // Readable by the owner only, like the ledger beside it.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let lock = options.open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Held(file.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(LedgerError::Lock(error)),
        }
        let latest = match &self.store {
            Store::Sqlite(db) => Some(db.latest_requests().clone()),
            Store::Postgres(_) => None,
        };
        if let Some(latest) = &latest {
            latest.held(true);
        }
        Ok(ExclusiveHold {
            _lock: Some(lock),
            known: self.known.clone(),
            latest,
        })
    }

    /// For a gateway holding a SQLite ledger exclusively: learns which profiles have records,
    /// so that reads of the others skip the ledger (a Bloom filter), and from then on keeps each
    /// read profile's latest request in memory (`sqlite::latest`). Elsewhere, nothing.
    pub async fn learn_known_profiles(&self, hold: &ExclusiveHold) -> Result<(), LedgerError> {
        if hold._lock.is_none() || !Arc::ptr_eq(&hold.known, &self.known) {
            return Ok(());
        }
        let known = self.known.clone();
        // As a write: no other write is half done meanwhile, and each one after it notes its
        // key in the filter.
        match &self.store {
            Store::Sqlite(db) => {
                let latest = hold.latest.clone();
                db.write(sqlite::latest::Touches::Nothing, move |tx| {
                    known.set(Some(sqlite::units::known_profiles(tx)?));
                    // Inside a write: every later one forgets what it touches, after its commit.
                    if let Some(latest) = &latest {
                        latest.trust();
                    }
                    Ok(())
                })
                .await
            }
            Store::Postgres(pg) => {
                pg.write(move |connection| {
                    Box::pin(async move {
                        use futures::StreamExt;
                        let recorded: i64 = sqlx::query_scalar(
                            "SELECT COUNT(DISTINCT pkey) FROM opt_out_records \
                             WHERE pkey IS NOT NULL",
                        )
                        .fetch_one(&mut *connection)
                        .await?;
                        let capacity = usize::try_from(recorded)
                            .unwrap_or(usize::MAX)
                            .saturating_mul(2)
                            .clamp(KnownProfiles::MIN_CAPACITY, KnownProfiles::MAX_CAPACITY);
                        let filter = fastbloom::AtomicBloomFilter::with_false_pos(
                            KnownProfiles::FALSE_POSITIVES,
                        )
                        .expected_items(capacity);
                        let mut keys = sqlx::query_scalar::<_, String>(
                            "SELECT DISTINCT pkey FROM opt_out_records WHERE pkey IS NOT NULL",
                        )
                        .fetch(&mut *connection);
                        while let Some(pkey) = keys.next().await {
                            filter.insert(pkey?.as_str());
                        }
                        known.set(Some(filter));
                        Ok(())
                    })
                })
                .await
            }
        }
    }
}
