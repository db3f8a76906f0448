//! Group commit: every write to the ledger is a unit of work run by [`Writer::write`].
//!
//! On SQLite one task owns the one writer connection. It takes every unit queued at the
//! moment, runs each in a savepoint of its own inside one transaction, commits once (one fsync
//! with `synchronous=FULL`), and only then answers each. A unit that fails rolls back its own
//! savepoint and nothing else. An idle writer finds one unit and commits it at once, so low
//! load waits for nothing; under load a commit carries many units, and the disk's fsyncs stop
//! being the bound. Nobody is answered before the commit that holds their write is durable.
//!
//! On PostgreSQL each unit runs in a transaction of its own, on a pooled connection:
//! PostgreSQL groups concurrent commits into one WAL flush itself (`BENCHMARKS.md` has the
//! figures).
//!
//! A unit opens its "transaction" with `connection.begin()`: inside the batch that is a
//! savepoint (sqlx nests transactions as savepoints), on PostgreSQL a real transaction. So one
//! unit's code serves both.

use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::AnyConnection;
use sqlx::{Acquire, AnyPool};
use tokio::sync::{mpsc, oneshot};

use super::LedgerError;

/// Units waiting for the writer, at most: beyond, callers wait for room (back-pressure).
const QUEUE: usize = 4_096;

/// Units in one commit, at most: a bound on how long the first of them waits.
const MAX_BATCH: usize = 256;

/// A unit of work on a connection inside a transaction.
pub(super) type Unit<T> =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, LedgerError>> + Send>;

/// What the writer does with a queued unit: runs it, then hands back what answers its caller
/// once the batch's commit is known.
type Job = Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Box<dyn Answer>> + Send>;

/// Answers one caller, given the outcome of the commit.
trait Answer: Send {
    fn answer(self: Box<Self>, commit: Result<(), &str>);
}

struct Pending<T> {
    result: Result<T, LedgerError>,
    to: oneshot::Sender<Result<T, LedgerError>>,
}

impl<T: Send> Answer for Pending<T> {
    fn answer(self: Box<Self>, commit: Result<(), &str>) {
        let result = match commit {
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
    /// A writer owning `connection` (SQLite). The task ends when every `Writer` is dropped.
    pub(super) fn batched(connection: AnyConnection) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(run(connection, receiver));
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
                let mut connection = pool.acquire().await?;
                unit(&mut connection).await
            }
            Way::Batched(queue) => {
                let (to, from) = oneshot::channel();
                let job: Job = Box::new(move |connection| {
                    Box::pin(async move {
                        let result = unit(connection).await;
                        let answer: Box<dyn Answer> = Box::new(Pending { result, to });
                        answer
                    })
                });
                let unwritten =
                    |_| LedgerError::Commit("the ledger's writer is not running".into());
                queue.send(job).await.map_err(unwritten)?;
                // The job is dropped unanswered only when its batch could not even begin.
                from.await.map_err(|_| {
                    LedgerError::Commit("the ledger's transaction could not begin".into())
                })?
            }
        }
    }
}

/// The writer task: batch, run, commit, answer; until every sender is gone.
async fn run(mut connection: AnyConnection, mut queue: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let units = batch.len();
        let answers = run_batch(&mut connection, batch.drain(..)).await;
        let (answers, commit) = match answers {
            Ok((answers, commit)) => (answers, commit),
            Err((answers, reason)) => (answers, Err(reason)),
        };
        tracing::trace!(
            units,
            seconds = started.elapsed().as_secs_f64(),
            "ledger batch committed"
        );
        for answer in answers {
            answer.answer(commit.as_ref().copied().map_err(String::as_str));
        }
    }
}

type Answers = Vec<Box<dyn Answer>>;

/// Runs a batch in one transaction, each unit in a savepoint. The commit's outcome is given
/// back with the answers; `Err` when even the transaction could not be begun.
async fn run_batch(
    connection: &mut AnyConnection,
    jobs: impl Iterator<Item = Job>,
) -> Result<(Answers, Result<(), String>), (Answers, String)> {
    let mut answers: Answers = Vec::new();
    let mut transaction = match connection.begin().await {
        Ok(transaction) => transaction,
        Err(e) => {
            // Nothing is run: a unit on the bare connection would commit alone, unbatched. Its
            // caller is told the write failed (the job, dropped, drops its answer).
            drop(jobs.collect::<Vec<_>>());
            return Err((
                answers,
                format!("the ledger's transaction could not begin: {e}"),
            ));
        }
    };
    for job in jobs {
        // The unit's own `begin()` on the transaction is a savepoint: a failed unit rolls back
        // to it when the unit's transaction is dropped uncommitted.
        answers.push(job(&mut transaction).await);
    }
    let commit = transaction
        .commit()
        .await
        .map_err(|e| format!("the ledger's commit failed: {e}"));
    Ok((answers, commit))
}
