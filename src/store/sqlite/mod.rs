//! SQLite, run where its connection lives (issue #25, point 2): rusqlite connections used by
//! the threads that own them, so that a unit of work is plain synchronous code over cached
//! prepared statements, with no hand-off to another thread per statement.
//!
//! Writes: one thread owns the writer connection. It takes every unit queued at the moment (up
//! to [`MAX_BATCH`]), opens one transaction (`BEGIN IMMEDIATE`: the write lock is taken at once),
//! runs each unit between a `SAVEPOINT` and its `RELEASE` (or `ROLLBACK TO` when the unit fails,
//! so that only its own work is undone), commits once (one fsync with `synchronous=FULL`), and
//! only then answers each caller. If a savepoint cannot be rolled back or released, or the
//! commit fails, SQLite may have ended the transaction on its own (disk full, I/O error), so
//! nothing of the batch is trusted: it is rolled back, every caller is told the write failed,
//! and the connection is closed and replaced. Nobody is answered `Ok` before the commit holding
//! their write has succeeded. A panicking unit fails alone. The thread ends when every sender
//! is dropped.
//!
//! Reads, on a file: read-only connections beside the writer (WAL), kept idle between reads; a
//! read takes one on a blocking thread of the runtime and runs all its statements there (one
//! hand-off per read, never one per statement, and never behind the writer's batch). A stream
//! (an export, a backlog) runs its query on such a thread and hands its rows over a bounded
//! channel: constant memory whatever its size.
//!
//! A read of a profile's latest request (every GetOptOut of a recorded profile) is answered from
//! memory where it can: on a file this gateway holds, the writer forgets each profile a batch
//! touched after its commit, before answering, so what is kept is never older than what any
//! caller was told (see `latest`).
//!
//! In memory (`sqlite::memory:`, demos and tests), every connection would see a database of its
//! own: the writer's connection is the only one, and reads run on its thread too, between
//! batches (a stream is read whole there: the database is in memory anyway).

pub(super) mod latest;
mod migrate;
pub(super) mod notifications;
pub(super) mod units;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::open::Opening;
use super::{LedgerError, Record};
use latest::{LatestRequests, Touches};

/// Units waiting for the writer, at most: beyond, callers wait for room (back-pressure).
const QUEUE: usize = 4_096;

/// Units in one commit, at most: a bound on how long the first of them waits.
const MAX_BATCH: usize = 256;

/// Read-only connections kept open between reads, at most (more are opened while needed).
const IDLE_READERS: usize = 4;

/// Prepared statements each connection keeps (every statement of the ledger fits).
const STATEMENT_CACHE: usize = 128;

/// Rows a stream reads ahead of its consumer, at most.
const STREAM_AHEAD: usize = 64;

/// How long a statement waits for a lock held by another connection (another process's, say).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the writer does with a queued unit: runs it, and hands back whether it succeeded, what
/// answers its caller once the batch's fate is known, and the profiles whose latest request it
/// may have changed (`None`: any profile's).
type Job = Box<dyn FnOnce(&Connection) -> (bool, Box<dyn Answer>, Option<Vec<String>>) + Send>;

/// A read run on the writer's connection (in memory only), outside any batch; it answers its
/// caller itself.
type Read = Box<dyn FnOnce(&Connection) + Send>;

enum Queued {
    Unit(Job),
    Read(Read),
}

/// Answers one caller, given whether the batch committed.
trait Answer: Send {
    fn answer(self: Box<Self>, committed: Result<(), &str>);
}

struct Pending<T> {
    result: Result<T, LedgerError>,
    to: oneshot::Sender<Result<T, LedgerError>>,
}

impl<T: Send> Answer for Pending<T> {
    fn answer(self: Box<Self>, committed: Result<(), &str>) {
        let result = match committed {
            Ok(()) => self.result,
            // The unit's work is gone with the transaction, whatever it returned.
            Err(reason) => Err(LedgerError::Commit(reason.to_owned())),
        };
        // The caller may have stopped waiting; its write is durable (or not) all the same.
        let _ = self.to.send(result);
    }
}

/// A SQLite ledger: the writer thread's queue, and the readers beside it (on a file).
pub(super) struct Sqlite {
    queue: mpsc::Sender<Queued>,
    /// `None` in memory: reads go to the writer's thread.
    readers: Option<Arc<Readers>>,
    /// Each profile's latest request, kept by the writer (see `latest`).
    latest: Arc<LatestRequests>,
}

/// Idle read-only connections to a ledger file.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    /// Runs `read` on an idle connection (or a new one), on the calling thread.
    fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let connection = match idle {
            Some(connection) => connection,
            None => connect_reader(&self.path)?,
        };
        let result = read(&connection);
        // A connection whose read failed is dropped: the next read opens a fresh one.
        if result.is_ok() {
            let mut idle = self
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < IDLE_READERS {
                idle.push(connection);
            }
        }
        result
    }
}

/// A blocking task that did not finish (it panicked, or the runtime is shutting down).
fn not_finished(error: tokio::task::JoinError) -> LedgerError {
    LedgerError::Commit(format!("the ledger's task did not finish: {error}"))
}

/// The writer connection: read-write (created beforehand, never here, for a file), set up for
/// durability.
fn connect_writer(path: Option<&Path>) -> Result<Connection, LedgerError> {
    let connection = match path {
        Some(path) => Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?,
        None => Connection::open_in_memory()?,
    };
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.busy_timeout(BUSY_TIMEOUT)?;
    // WAL lets readers run beside the one writer; FULL fsyncs every commit, so a request the
    // gateway has answered for survives a power cut.
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )?;
    Ok(connection)
}

/// A read-only connection to the ledger file (in WAL mode, set by the writer).
fn connect_reader(path: &Path) -> Result<Connection, LedgerError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.execute_batch("PRAGMA foreign_keys = ON;")?;
    Ok(connection)
}

impl Sqlite {
    /// Opens the ledger at `file` (in memory without one), migrating or verifying its schema,
    /// and starts its writer thread.
    pub(super) async fn open(file: Option<PathBuf>, opening: Opening) -> Result<Self, LedgerError> {
        let path = file.clone();
        let connection = tokio::task::spawn_blocking(move || {
            let connection = connect_writer(path.as_deref())?;
            match opening {
                Opening::CreateOrMigrate => migrate::run(&connection)?,
                Opening::Existing => migrate::verify(&connection)?,
            }
            Ok::<_, LedgerError>(connection)
        })
        .await
        .map_err(not_finished)??;
        let (queue, receiver) = mpsc::channel(QUEUE);
        let readers = file.as_ref().map(|path| {
            Arc::new(Readers {
                path: path.clone(),
                idle: Mutex::new(Vec::new()),
            })
        });
        let latest = Arc::new(LatestRequests::new());
        let forget = latest.clone();
        std::thread::Builder::new()
            .name("ccpa-ledger-writer".into())
            .spawn(move || run(file, connection, receiver, &forget))
            .map_err(|e| {
                LedgerError::Commit(format!("the ledger's writer thread cannot start: {e}"))
            })?;
        Ok(Self {
            queue,
            readers,
            latest,
        })
    }

    /// Each profile's latest request, as the writer keeps it.
    pub(super) fn latest_requests(&self) -> &Arc<LatestRequests> {
        &self.latest
    }

    /// Profile `pkey`'s latest request: from memory when the writer keeps it, else from the
    /// store by `read`, which is then kept (unless a write touched the profile meanwhile).
    pub(super) async fn latest<F>(&self, pkey: &str, read: F) -> Result<Option<Record>, LedgerError>
    where
        F: FnOnce(&Connection) -> Result<Option<Record>, LedgerError> + Send + 'static,
    {
        let ticket = match self.latest.get(pkey) {
            Ok(latest) => return Ok(latest),
            Err(ticket) => ticket,
        };
        let latest = self.read(read).await?;
        if let Some(ticket) = ticket {
            self.latest.fill(ticket, pkey, &latest);
        }
        Ok(latest)
    }

    /// Runs `unit` durably in the writer's next batch: `Ok` only once the transaction holding it
    /// has committed. `touches` says whose records it may change: the writer forgets their
    /// latest request after the commit, before answering.
    pub(super) async fn write<T, F>(&self, touches: Touches, unit: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let (to, from) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            // A panicking unit fails alone, like any failing unit.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| unit(connection)))
                .unwrap_or_else(|_| Err(LedgerError::Commit("the write panicked".into())));
            let succeeded = result.is_ok();
            let touched = match touches {
                Touches::Nothing => Some(Vec::new()),
                Touches::Profile(pkey) => Some(vec![pkey]),
                // Within the unit's transaction, after it: a creation's new key included. Not
                // found (or not readable): any profile, to be safe.
                Touches::Request(request_id) => units::pkey_of(connection, &request_id)
                    .map(|pkey| pkey.into_iter().collect())
                    .ok(),
                Touches::Everything => None,
            };
            let answer: Box<dyn Answer> = Box::new(Pending { result, to });
            (succeeded, answer, touched)
        });
        self.queue
            .send(Queued::Unit(job))
            .await
            .map_err(|_| LedgerError::Commit("the ledger's writer is not running".into()))?;
        // Dropped unanswered only if the writer thread dropped the unit unrun.
        from.await.map_err(|_| {
            LedgerError::Commit("the ledger's writer stopped before answering".into())
        })?
    }

    /// Runs `read` on a connection of its own (on a file; the writer's, between batches, in
    /// memory), all its statements on one thread.
    pub(super) async fn read<T, F>(&self, read: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        if let Some(readers) = &self.readers {
            let readers = readers.clone();
            return tokio::task::spawn_blocking(move || readers.with(read))
                .await
                .map_err(not_finished)?;
        }
        read_on_writer(self.queue.clone(), read).await
    }

    /// The records `sql` selects (every column, in [`super::queries::COLUMNS`]' order), bound to
    /// `params`, row by row.
    pub(super) fn records(
        &self,
        sql: &'static str,
        params: Vec<i64>,
    ) -> BoxStream<'static, Result<Record, LedgerError>> {
        let Some(readers) = &self.readers else {
            // In memory: read whole on the writer's thread (never a stream held open there,
            // which would stall every write while its consumer waits).
            let read = read_on_writer(self.queue.clone(), move |connection| {
                let mut statement = connection.prepare_cached(sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(params))?;
                let mut records = Vec::new();
                while let Some(row) = rows.next()? {
                    records.push(Record::from_sqlite(row)?);
                }
                Ok(records)
            });
            return futures::stream::once(read)
                .flat_map(|read| match read {
                    Ok(records) => futures::stream::iter(records.into_iter().map(Ok)).boxed(),
                    Err(e) => futures::stream::iter([Err(e)]).boxed(),
                })
                .boxed();
        };
        let readers = readers.clone();
        let (sender, receiver) = mpsc::channel(STREAM_AHEAD);
        tokio::task::spawn_blocking(move || {
            let streamed = readers.with(|connection| {
                let mut statement = connection.prepare_cached(sql)?;
                let mut rows = statement.query(rusqlite::params_from_iter(params))?;
                while let Some(row) = rows.next()? {
                    if sender.blocking_send(Record::from_sqlite(row)).is_err() {
                        // The consumer stopped reading.
                        return Ok(());
                    }
                }
                Ok(())
            });
            if let Err(e) = streamed {
                let _ = sender.blocking_send(Err(e));
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(receiver).boxed()
    }
}

/// Runs `read` on the writer's thread, between batches (in memory).
async fn read_on_writer<T, F>(queue: mpsc::Sender<Queued>, read: F) -> Result<T, LedgerError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
{
    let (to, from) = oneshot::channel();
    let job: Read = Box::new(move |connection| {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| read(connection)))
            .unwrap_or_else(|_| Err(LedgerError::Commit("the read panicked".into())));
        let _ = to.send(result);
    });
    queue
        .send(Queued::Read(job))
        .await
        .map_err(|_| LedgerError::Commit("the ledger's writer is not running".into()))?;
    from.await
        .map_err(|_| LedgerError::Commit("the ledger's writer stopped before answering".into()))?
}

/// Distrusts the kept latest requests when dropped.
struct DistrustOnExit<'a>(&'a LatestRequests);

impl Drop for DistrustOnExit<'_> {
    fn drop(&mut self) {
        self.0.distrust();
    }
}

/// The writer thread: batch, run, commit, forget what the batch touched, answer; until every
/// sender is gone.
fn run(
    file: Option<PathBuf>,
    connection: Connection,
    mut queue: mpsc::Receiver<Queued>,
    latest: &LatestRequests,
) {
    // However the thread ends (every sender gone, or a panic between a commit and its
    // forgetting), nothing kept in memory is trusted after it: no write is forgotten any more.
    let _distrust = DistrustOnExit(latest);
    let mut connection = Some(connection);
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            match queued {
                Queued::Unit(job) => batch.push(job),
                // In memory, where the connection is never replaced: run at once, outside any
                // transaction.
                Queued::Read(read) => {
                    if let Some(connection) = &connection {
                        read(connection);
                    }
                }
            }
            if batch.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        if connection.is_none()
            && let Some(path) = &file
        {
            connection = connect_writer(Some(path))
                .inspect_err(|e| tracing::error!(error = %e, "the ledger's writer cannot connect"))
                .ok();
        }
        let units = batch.len();
        let mut answers: Vec<Box<dyn Answer>> = Vec::with_capacity(units);
        let mut touched = Some(Vec::new());
        let started = std::time::Instant::now();
        let committed = match &connection {
            None => Err("the ledger's writer connection is unavailable".to_owned()),
            Some(connection) => run_batch(connection, batch.drain(..), &mut answers, &mut touched),
        };
        // Units never run (no connection, or the batch stopped) answer through their dropped
        // senders.
        // Committed or not, first, before anyone hears of it: no read may keep answering what
        // was latest before a commit its caller was told of.
        match &touched {
            Some(pkeys) => latest.forget(pkeys),
            None => latest.forget_everything(),
        }
        batch.clear();
        if committed.is_err() && file.is_some() {
            // Whatever state SQLite left the connection in, a new one starts clean.
            connection = None;
        }
        super::metrics::observe_commit(started, units, committed.is_ok());
        tracing::trace!(units, committed = committed.is_ok(), "ledger batch");
        for answer in answers {
            answer.answer(committed.as_ref().copied().map_err(String::as_str));
        }
    }
}

/// Runs a transaction-control statement.
fn control(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs a batch in one transaction, each unit in a savepoint of its own, and commits it. `Err`
/// when nothing of the batch may be trusted to be on disk.
fn run_batch(
    connection: &Connection,
    jobs: impl Iterator<Item = Job>,
    answers: &mut Vec<Box<dyn Answer>>,
    touched: &mut Option<Vec<String>>,
) -> Result<(), String> {
    control(connection, "BEGIN IMMEDIATE")
        .map_err(|e| format!("the ledger's transaction could not begin: {e}"))?;
    let outcome = run_units(connection, jobs, answers, touched).and_then(|()| {
        control(connection, "COMMIT").map_err(|e| format!("the ledger's commit failed: {e}"))
    });
    if outcome.is_err() {
        // Undo what may be left; the connection is replaced anyway.
        let _ = connection.execute_batch("ROLLBACK");
    }
    outcome
}

fn run_units(
    connection: &Connection,
    jobs: impl Iterator<Item = Job>,
    answers: &mut Vec<Box<dyn Answer>>,
    touched: &mut Option<Vec<String>>,
) -> Result<(), String> {
    let control = |sql: &str| {
        control(connection, sql).map_err(|e| format!("the ledger's batch could not go on: {e}"))
    };
    for job in jobs {
        control("SAVEPOINT unit")?;
        let (succeeded, answer, pkeys) = job(connection);
        answers.push(answer);
        match (touched.as_mut(), pkeys) {
            (Some(all), Some(pkeys)) => all.extend(pkeys),
            _ => *touched = None,
        }
        if !succeeded {
            // Its own failure, whatever becomes of the batch.
            metrics::counter!(super::metrics::LEDGER_WRITE_ERRORS_TOTAL).increment(1);
            control("ROLLBACK TO unit")?;
        }
        control("RELEASE unit")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ledger_file(dir: &tempfile::TempDir) -> (Sqlite, PathBuf) {
        let path = dir.path().join("writer.sqlite3");
        std::fs::File::create(&path).unwrap();
        let sqlite = Sqlite::open(Some(path.clone()), Opening::CreateOrMigrate)
            .await
            .unwrap();
        sqlite
            .write(Touches::Nothing, |c| {
                Ok(c.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY)")?)
            })
            .await
            .unwrap();
        (sqlite, path)
    }

    fn insert(
        id: &'static str,
        then_fail: bool,
    ) -> impl FnOnce(&Connection) -> Result<(), LedgerError> + Send + 'static {
        move |connection| {
            connection
                .prepare_cached("INSERT INTO t (id) VALUES (?1)")?
                .execute([id])?;
            if then_fail {
                // A second statement that fails after the first succeeded.
                connection
                    .prepare_cached("INSERT INTO t (id) VALUES (?1)")?
                    .execute([id])?;
            }
            Ok(())
        }
    }

    async fn ids(sqlite: &Sqlite) -> Vec<String> {
        sqlite
            .read(|c| {
                let mut statement = c.prepare_cached("SELECT id FROM t ORDER BY id")?;
                let ids = statement
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(ids)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_failing_unit_undoes_only_its_own_work_in_a_shared_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, _) = ledger_file(&dir).await;
        // Queued together, so that they share batches.
        let (a, b, c) = tokio::join!(
            sqlite.write(Touches::Nothing, insert("a", false)),
            sqlite.write(Touches::Nothing, insert("b", true)),
            sqlite.write(Touches::Nothing, insert("c", false)),
        );
        assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
        assert!(b.is_err());
        assert_eq!(
            ids(&sqlite).await,
            ["a", "c"],
            "a failing unit is not a failed batch"
        );
        // The connection is still in a clean state: a later write commits.
        sqlite
            .write(Touches::Nothing, insert("d", false))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_panicking_unit_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, _) = ledger_file(&dir).await;
        let panics = |_: &Connection| -> Result<(), LedgerError> { panic!("a bug in a unit") };
        assert!(sqlite.write(Touches::Nothing, panics).await.is_err());
        sqlite
            .write(Touches::Nothing, insert("after", false))
            .await
            .unwrap();
        assert_eq!(ids(&sqlite).await, ["after"]);
    }

    #[tokio::test]
    async fn a_read_is_not_held_up_by_the_writers_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, _) = ledger_file(&dir).await;
        sqlite
            .write(Touches::Nothing, insert("a", false))
            .await
            .unwrap();
        let (entered, wait) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        // A unit that holds the batch's transaction open until told.
        let sqlite = Arc::new(sqlite);
        let writer = sqlite.clone();
        let held = tokio::spawn(async move {
            writer
                .write(Touches::Nothing, move |c| {
                    insert("b", false)(c)?;
                    entered.send(()).unwrap();
                    released.recv().unwrap();
                    Ok(())
                })
                .await
        });
        tokio::task::spawn_blocking(move || wait.recv().unwrap())
            .await
            .unwrap();
        // Meanwhile a read runs, on its own connection, and sees the last commit.
        assert_eq!(ids(&sqlite).await, ["a"]);
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        assert_eq!(ids(&sqlite).await, ["a", "b"]);
    }
}
