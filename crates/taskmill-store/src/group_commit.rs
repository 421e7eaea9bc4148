//! Group commit for the SQLite backend's two hot writes: claims and completions.
//!
//! With `synchronous = FULL` every SQLite commit waits for an fsync of the WAL, and
//! SQLite has one writer at a time, so a worker running a hundred keyed jobs at once
//! would pay two fsyncs per job, one after the other. Instead, those writes go to one
//! writer task: it takes every request waiting at that moment (up to [`MAX_BATCH`]),
//! runs them in order inside one `BEGIN IMMEDIATE` transaction, commits once, and only
//! then answers each caller. Durability is unchanged: no caller hears "claimed" or
//! "completed" before the fsync that makes it so. Under load one fsync serves many jobs;
//! with a single job in flight the batch is that job alone, and nothing waits for a
//! timer.
//!
//! A database error inside the batch (the connection or the transaction failed) rolls
//! the whole batch back: the caller whose statement failed gets that statement's own
//! error, every other caller a transient "group commit failed" error; an answer about
//! one key's row (a lost lease, a row that cannot be read) goes to that caller alone
//! and the batch goes on.

use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::sqlite::{claim_on, mark_completed};
use crate::{Claim, ClaimToken, StoreError, lease_lost};

/// Most requests committed by one transaction.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before callers wait to enqueue theirs.
const QUEUE: usize = 4096;

/// What one caller asks the writer to do.
enum Work {
    Claim {
        key: String,
        job_id: String,
        kind: String,
        owner: String,
        lease_ms: i64,
    },
    Complete {
        token: ClaimToken,
        result: String,
    },
}

impl Work {
    /// The store operation, as [`StoreError::Database`] names it.
    fn name(&self) -> &'static str {
        match self {
            Work::Claim { .. } => "claim",
            Work::Complete { .. } => "complete",
        }
    }
}

/// What the writer answers: the claim, or that the completion is recorded.
enum Done {
    Claim(Claim),
    Completed,
}

type Reply = oneshot::Sender<Result<Done, StoreError>>;

struct Op {
    work: Work,
    reply: Reply,
}

/// The error every caller of a batch that did not commit gets (transient: the
/// same request in another batch can succeed).
fn batch_error(op: &'static str, why: &str) -> StoreError {
    StoreError::Database {
        op,
        source: sqlx::Error::Protocol(format!("group commit failed: {why}")),
    }
}

/// The handle callers use; cheap to clone. The writer task ends when the last handle
/// is dropped.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    tx: mpsc::Sender<Op>,
}

impl GroupCommit {
    /// Starts the writer task on the current tokio runtime.
    pub(crate) fn start(pool: SqlitePool) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(pool, rx));
        GroupCommit { tx }
    }

    pub(crate) async fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Claim, StoreError> {
        let work = Work::Claim {
            key: key.to_owned(),
            job_id: job_id.to_owned(),
            kind: kind.to_owned(),
            owner: owner.to_owned(),
            lease_ms,
        };
        match self.call(work).await? {
            Done::Claim(claim) => Ok(claim),
            Done::Completed => unreachable!("a claim is answered with a claim"),
        }
    }

    pub(crate) async fn complete(
        &self,
        token: &ClaimToken,
        result: String,
    ) -> Result<(), StoreError> {
        let work = Work::Complete {
            token: token.clone(),
            result,
        };
        self.call(work).await.map(|_| ())
    }

    /// Queues `work` for the writer and waits for its answer, given after the
    /// commit.
    async fn call(&self, work: Work) -> Result<Done, StoreError> {
        const STOPPED: &str = "the store writer stopped";
        let name = work.name();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Op { work, reply })
            .await
            .map_err(|_| batch_error(name, STOPPED))?;
        answer
            .await
            .unwrap_or_else(|_| Err(batch_error(name, STOPPED)))
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        run_batch(&pool, &mut batch).await;
    }
}

/// Fails every request of `batch` (emptied) with `why`.
fn fail_all(batch: &mut Vec<Op>, why: &str) {
    for op in batch.drain(..) {
        let _ = op.reply.send(Err(batch_error(op.work.name(), why)));
    }
}

/// Runs `work` inside the batch's transaction. `Err` is a database error: the
/// transaction can no longer be trusted. `Ok` holds this request's own answer
/// (which may be an error about its key alone, such as a lost lease).
async fn run_one(
    tx: &mut SqliteConnection,
    work: &Work,
) -> Result<Result<Done, StoreError>, StoreError> {
    match work {
        Work::Claim {
            key,
            job_id,
            kind,
            owner,
            lease_ms,
        } => match claim_on(tx, key, job_id, kind, owner, *lease_ms).await {
            Err(e @ StoreError::Database { .. }) => Err(e),
            r => Ok(r.map(Done::Claim)),
        },
        Work::Complete { token, result } => match mark_completed(tx, token, result).await {
            Ok(1) => Ok(Ok(Done::Completed)),
            Ok(_) => Ok(Err(lease_lost(token))),
            Err(e) => Err(StoreError::db("complete")(e)),
        },
    }
}

/// Runs and commits `batch` (emptied), then answers every caller in it. When a
/// statement fails, its caller gets that statement's own error; the others in
/// the batch, rolled back with it, get a transient batch error.
async fn run_batch(pool: &SqlitePool, batch: &mut Vec<Op>) {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut answers = Vec::with_capacity(batch.len());
    let mut failure = None;
    for op in batch.iter() {
        match run_one(&mut tx, &op.work).await {
            Ok(answer) => answers.push(answer),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // (the failing statement's own error, the reason every other caller hears)
    let failed = match failure {
        None => match tx.commit().await {
            Ok(()) => None,
            Err(e) => Some((None, format!("commit: {e}"))),
        },
        Some(e) => {
            let _ = tx.rollback().await;
            let why = e.to_string();
            Some((Some(e), why))
        }
    };
    // A caller that stopped waiting (its job was cancelled) loses nothing: its
    // write is committed or rolled back with the batch either way.
    match failed {
        None => {
            for (op, answer) in batch.drain(..).zip(answers) {
                let _ = op.reply.send(answer);
            }
        }
        Some((mut own, why)) => {
            tracing::warn!(error = %why, requests = batch.len(), "store group commit failed; rolled back");
            // With a failed statement, it is the one after the last answer.
            let failed_at = answers.len();
            for (i, op) in batch.drain(..).enumerate() {
                let err = (i == failed_at)
                    .then(|| own.take())
                    .flatten()
                    .unwrap_or_else(|| batch_error(op.work.name(), &why));
                let _ = op.reply.send(Err(err));
            }
        }
    }
}
