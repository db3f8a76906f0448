//! Group commit: every write to the ledger is a unit of work run by [`Writer::write`], inside a
//! transaction the writer owns. A unit never begins or commits one itself.
//!
//! On a SQLite file one task owns the writer connection. It takes every unit queued at the
//! moment, opens one transaction (`BEGIN IMMEDIATE`: the write lock is taken at once, so no
//! statement of the batch can meet another writer's snapshot), runs each unit between a
//! `SAVEPOINT` and its `RELEASE` (or `ROLLBACK TO` when the unit fails, so that only its own work
//! is undone), commits once (one fsync with `synchronous=FULL`), and only then answers each
//! caller. An idle writer finds one unit and commits it at once, so low load waits for nothing;
//! under load a commit carries many units, and fsyncs stop being the bound.
//!
//! The writer issues those statements itself and checks each: if a savepoint cannot be rolled
//! back or released, or the commit fails, SQLite may have ended the transaction on its own (disk
//! full, I/O error), so nothing of the batch is trusted: it is rolled back, every caller is told
//! the write failed, and the connection is closed and replaced. Nobody is answered `Ok` before
//! the commit holding their write has succeeded.
//!
//! On PostgreSQL (and SQLite in memory, which has no disk to batch for) each unit runs in a
//! transaction of its own on the pool: PostgreSQL groups concurrent commits into one WAL flush
//! itself (`BENCHMARKS.md`).

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool, Connection, Executor};
use tokio::sync::{mpsc, oneshot};

use super::LedgerError;

/// Units waiting for the writer, at most: beyond, callers wait for room (back-pressure).
const QUEUE: usize = 4_096;

/// Units in one commit, at most: a bound on how long the first of them waits.
const MAX_BATCH: usize = 256;

/// A unit of work, run on a connection inside a transaction it must not end.
pub(super) type Unit<T> =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, LedgerError>> + Send>;

/// What the writer does with a queued unit: runs it, and hands back whether it succeeded and
/// what answers its caller once the batch's fate is known.
type Job =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, (bool, Box<dyn Answer>)> + Send>;

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

/// How writes reach the database.
#[derive(Clone)]
pub(super) struct Writer(Way);

#[derive(Clone)]
enum Way {
    /// SQLite: the queue of the task owning the writer connection.
    Batched(mpsc::Sender<Job>),
    /// PostgreSQL (or SQLite in memory): the pool; each unit in its own transaction.
    Pooled(AnyPool),
}

impl Writer {
    /// A writer batching units on the one connection of `pool` (SQLite). The task ends when
    /// every `Writer` is dropped.
    pub(super) fn batched(pool: AnyPool) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, receiver));
        Self(Way::Batched(sender))
    }

    /// A writer running each unit in a transaction of its own on `pool`.
    pub(super) fn pooled(pool: AnyPool) -> Self {
        Self(Way::Pooled(pool))
    }

    /// Runs `unit` durably: `Ok` only once the transaction holding it has committed.
    pub(super) async fn write<T: Send + 'static>(&self, unit: Unit<T>) -> Result<T, LedgerError> {
        match &self.0 {
            Way::Pooled(pool) => {
                let started = std::time::Instant::now();
                let written = async {
                    let mut transaction = pool.begin().await?;
                    let value = unit(&mut transaction).await?;
                    transaction.commit().await?;
                    Ok(value)
                }
                .await;
                observe_commit(started, 1, written.is_ok());
                written
            }
            Way::Batched(queue) => {
                let (to, from) = oneshot::channel();
                let job: Job = Box::new(move |connection| {
                    Box::pin(async move {
                        // A panicking unit fails alone, like any failing unit.
                        let result = std::panic::AssertUnwindSafe(unit(connection))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                Err(LedgerError::Commit("the write panicked".into()))
                            });
                        let succeeded = result.is_ok();
                        let answer: Box<dyn Answer> = Box::new(Pending { result, to });
                        (succeeded, answer)
                    })
                });
                queue.send(job).await.map_err(|_| {
                    LedgerError::Commit("the ledger's writer is not running".into())
                })?;
                // Dropped unanswered only if the writer task itself ended.
                from.await.map_err(|_| {
                    LedgerError::Commit("the ledger's writer stopped before answering".into())
                })?
            }
        }
    }
}

/// Times a commit of `units` units of work; a failed one counts each unit as a write error
/// (each failed because the batch did).
fn observe_commit(started: std::time::Instant, units: usize, committed: bool) {
    use super::metrics as names;
    if committed {
        metrics::histogram!(names::LEDGER_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(names::LEDGER_COMMIT_BATCH_SIZE).record(units as f64);
    } else {
        metrics::counter!(names::LEDGER_WRITE_ERRORS_TOTAL).increment(units as u64);
    }
}

/// The writer task: batch, run, commit, answer; until every sender is gone.
async fn run(pool: AnyPool, mut queue: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let units = batch.len();
        let mut answers: Vec<Box<dyn Answer>> = Vec::with_capacity(units);
        let started = std::time::Instant::now();
        let committed = match pool.acquire().await {
            Err(e) => Err(format!(
                "the ledger's writer connection is unavailable: {e}"
            )),
            Ok(mut connection) => {
                let committed = run_batch(&mut connection, batch.drain(..), &mut answers).await;
                if committed.is_err() {
                    // Whatever state SQLite left the connection in, a new one starts clean.
                    let _ = connection.detach().close().await;
                }
                committed
            }
        };
        // Units never run (no connection) answer through their dropped senders.
        batch.clear();
        observe_commit(started, units, committed.is_ok());
        tracing::trace!(units, committed = committed.is_ok(), "ledger batch");
        for answer in answers {
            answer.answer(committed.as_ref().copied().map_err(String::as_str));
        }
    }
}

/// Runs a batch in one transaction, each unit in a savepoint of its own, and commits it. `Err`
/// when nothing of the batch may be trusted to be on disk.
async fn run_batch(
    connection: &mut AnyConnection,
    jobs: impl Iterator<Item = Job>,
    answers: &mut Vec<Box<dyn Answer>>,
) -> Result<(), String> {
    connection
        .execute("BEGIN IMMEDIATE")
        .await
        .map_err(|e| format!("the ledger's transaction could not begin: {e}"))?;
    let outcome = run_units(connection, jobs, answers).await;
    let outcome = match outcome {
        Ok(()) => connection
            .execute("COMMIT")
            .await
            .map(|_| ())
            .map_err(|e| format!("the ledger's commit failed: {e}")),
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        // Undo what may be left; the connection is replaced anyway.
        let _ = connection.execute("ROLLBACK").await;
    }
    outcome
}

async fn run_units(
    connection: &mut AnyConnection,
    jobs: impl Iterator<Item = Job>,
    answers: &mut Vec<Box<dyn Answer>>,
) -> Result<(), String> {
    let control = |e: sqlx::Error| format!("the ledger's batch could not go on: {e}");
    for job in jobs {
        connection
            .execute("SAVEPOINT unit")
            .await
            .map_err(control)?;
        let (succeeded, answer) = job(connection).await;
        answers.push(answer);
        if !succeeded {
            // Its own failure, whatever becomes of the batch.
            metrics::counter!(super::metrics::LEDGER_WRITE_ERRORS_TOTAL).increment(1);
            connection
                .execute("ROLLBACK TO unit")
                .await
                .map_err(control)?;
        }
        connection.execute("RELEASE unit").await.map_err(control)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn file_pool(dir: &tempfile::TempDir) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("writer.sqlite3").display()
        );
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    fn insert(id: &'static str, then_fail: bool) -> Unit<()> {
        Box::new(move |connection| {
            Box::pin(async move {
                sqlx::query("INSERT INTO t (id) VALUES ($1)")
                    .bind(id)
                    .execute(&mut *connection)
                    .await?;
                if then_fail {
                    // A second statement that fails after the first succeeded.
                    sqlx::query("INSERT INTO t (id) VALUES ($1)")
                        .bind(id)
                        .execute(&mut *connection)
                        .await?;
                }
                Ok(())
            })
        })
    }

    #[tokio::test]
    async fn a_failing_unit_undoes_only_its_own_work_in_a_shared_commit() {
        let dir = tempfile::tempdir().unwrap();
        let pool = file_pool(&dir).await;
        let writer = Writer::batched(pool.clone());
        // Queued together, so that they share batches.
        let (a, b, c) = tokio::join!(
            writer.write(insert("a", false)),
            writer.write(insert("b", true)),
            writer.write(insert("c", false)),
        );
        assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
        assert!(b.is_err());
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, ["a", "c"], "a failing unit is not a failed batch");
        // The connection is still in a clean state: a later write commits.
        writer.write(insert("d", false)).await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_unit_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pool = file_pool(&dir).await;
        let writer = Writer::batched(pool.clone());
        let panics: Unit<()> = Box::new(|_| Box::pin(async { panic!("a bug in a unit") }));
        assert!(writer.write(panics).await.is_err());
        writer.write(insert("after", false)).await.unwrap();
    }
}
