//! Group commit for the SQLite backend's hot writes: claims, completions and heartbeats.
//!
//! With `synchronous = FULL` every SQLite commit waits for an fsync of the WAL, and
//! SQLite has one writer at a time, so a worker running a hundred keyed jobs at once
//! would pay two fsyncs per job, one after the other. Instead, those writes go to one
//! writer task: it takes every request waiting at that moment (up to [`MAX_BATCH`]),
//! runs them in order inside one write transaction, commits once, and only then answers
//! each caller. Durability is unchanged: no caller hears "claimed" or "completed" before
//! the fsync that makes it so. Under load one fsync serves many jobs; with a single job
//! in flight the batch is that job alone, and nothing waits for a timer.
//!
//! Each request runs inside its own savepoint. A request whose statement fails is rolled
//! back to its savepoint and gets that statement's own error; the rest of the batch goes
//! on and commits. Only when the transaction itself is lost (the savepoint cannot be
//! rolled back, or the commit fails) does every caller of the batch get an error, the
//! failing one its own and the others a transient "group commit failed" one (the same
//! request in another batch can succeed).
//!
//! The statements themselves are [`crate::body`]'s, the same as on PostgreSQL; this module
//! only decides when they commit.

use sqlx::{Connection, Pool};
use tokio::sync::{mpsc, oneshot};

use crate::body::{ClaimRequest, claim_on, complete_on, heartbeat_on};
use crate::dialect::{Dialect, sql};
use crate::registry::{Heartbeat, HeartbeatReply};
use crate::{Claim, ClaimToken, StoreError};

/// Most requests committed by one transaction.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before callers wait to enqueue theirs.
const QUEUE: usize = 4096;

/// What one caller asks the writer to do.
enum Work {
    Claim(ClaimRequest),
    Complete { token: ClaimToken, result: String },
    Heartbeat(Heartbeat),
}

impl Work {
    /// The store operation, as [`StoreError::Database`] names it.
    fn name(&self) -> &'static str {
        match self {
            Work::Claim(_) => "claim",
            Work::Complete { .. } => "complete",
            Work::Heartbeat(_) => "heartbeat",
        }
    }
}

/// What the writer answers, one variant per [`Work`].
enum Done {
    Claim(Claim),
    Completed,
    Heartbeat(HeartbeatReply),
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
    pub(crate) fn start<D: Dialect>(pool: Pool<D>) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(pool, rx));
        GroupCommit { tx }
    }

    pub(crate) async fn claim(&self, req: ClaimRequest) -> Result<Claim, StoreError> {
        match self.call(Work::Claim(req)).await? {
            Done::Claim(claim) => Ok(claim),
            _ => unreachable!("a claim is answered with a claim"),
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

    pub(crate) async fn heartbeat(&self, beat: Heartbeat) -> Result<HeartbeatReply, StoreError> {
        match self.call(Work::Heartbeat(beat)).await? {
            Done::Heartbeat(reply) => Ok(reply),
            _ => unreachable!("a heartbeat is answered with a heartbeat reply"),
        }
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

async fn writer<D: Dialect>(pool: Pool<D>, mut rx: mpsc::Receiver<Op>) {
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

/// Runs `work` on the batch's transaction. `Err` is a database error (the statement or
/// the connection failed); `Ok` holds this request's own answer, which may be an error
/// about its key alone (a lost lease, a row that cannot be read).
async fn run_one<D: Dialect>(
    conn: &mut D::Connection,
    work: &Work,
) -> Result<Result<Done, StoreError>, StoreError> {
    let answer = match work {
        Work::Claim(req) => claim_on::<D>(conn, req).await.map(Done::Claim),
        Work::Complete { token, result } => complete_on::<D>(conn, token, result)
            .await
            .map(|()| Done::Completed),
        Work::Heartbeat(beat) => heartbeat_on::<D>(conn, beat).await.map(Done::Heartbeat),
    };
    match answer {
        Err(e @ StoreError::Database { .. }) => Err(e),
        other => Ok(other),
    }
}

/// Runs `work` inside a savepoint. `Err` means the transaction cannot be trusted any
/// more; `Ok` is the caller's answer (its own statement's error included, rolled back).
async fn run_isolated<D: Dialect>(
    conn: &mut D::Connection,
    work: &Work,
) -> Result<Result<Done, StoreError>, StoreError> {
    let db = StoreError::db(work.name());
    D::execute(conn, sql("SAVEPOINT taskmill_op"), Vec::new())
        .await
        .map_err(db)?;
    match run_one::<D>(conn, work).await {
        Ok(answer) => {
            D::execute(conn, sql("RELEASE taskmill_op"), Vec::new())
                .await
                .map_err(db)?;
            Ok(answer)
        }
        Err(own) => {
            // Undo only this request; if even that fails, the whole batch is lost and
            // the failing request's own error is reported with it.
            if let Err(e) = D::execute(conn, sql("ROLLBACK TO taskmill_op"), Vec::new()).await {
                tracing::debug!(error = %e, "savepoint rollback failed");
                return Err(own);
            }
            D::execute(conn, sql("RELEASE taskmill_op"), Vec::new())
                .await
                .map_err(|_| batch_error(work.name(), "savepoint release"))?;
            tracing::warn!(error = %own, op = work.name(), "store request failed; rolled back alone");
            Ok(Err(own))
        }
    }
}

/// Runs and commits `batch` (emptied), then answers every caller in it.
async fn run_batch<D: Dialect>(pool: &Pool<D>, batch: &mut Vec<Op>) {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut tx = match conn.begin_with(D::BEGIN_WRITE).await {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let mut answers = Vec::with_capacity(batch.len());
    let mut failure = None;
    for op in batch.iter() {
        match run_isolated::<D>(&mut tx, &op.work).await {
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
