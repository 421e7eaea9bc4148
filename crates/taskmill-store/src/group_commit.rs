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
//! the whole batch back and every caller in it gets the error, as if its own statement
//! had failed; an answer about one key's row (a lost lease, a row that cannot be read)
//! goes to that caller alone and the batch goes on.

use sqlx::Connection;
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use crate::sqlite::{claim_on, mark_completed};
use crate::{Claim, ClaimToken, StoreError, lease_lost};

/// Most requests committed by one transaction.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before callers wait to enqueue theirs.
const QUEUE: usize = 4096;

enum Op {
    Claim {
        key: String,
        job_id: String,
        kind: String,
        owner: String,
        lease_ms: i64,
        reply: oneshot::Sender<Result<Claim, StoreError>>,
    },
    Complete {
        token: ClaimToken,
        result: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// An answer decided inside the transaction, sent only after it commits.
enum Answer {
    Claim(
        oneshot::Sender<Result<Claim, StoreError>>,
        Result<Claim, StoreError>,
    ),
    Complete(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Answer {
    fn send(self) {
        // A caller that stopped waiting (its job was cancelled) loses nothing: the
        // write is committed either way, as it would be without batching.
        match self {
            Answer::Claim(tx, r) => drop(tx.send(r)),
            Answer::Complete(tx, r) => drop(tx.send(r)),
        }
    }

    fn fail(self, op: &'static str, why: &str) {
        match self {
            Answer::Claim(tx, _) => drop(tx.send(Err(batch_error(op, why)))),
            Answer::Complete(tx, _) => drop(tx.send(Err(batch_error(op, why)))),
        }
    }
}

impl Op {
    fn fail(self, op: &'static str, why: &str) {
        match self {
            Op::Claim { reply, .. } => drop(reply.send(Err(batch_error(op, why)))),
            Op::Complete { reply, .. } => drop(reply.send(Err(batch_error(op, why)))),
        }
    }
}

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
        let (reply, answer) = oneshot::channel();
        let op = Op::Claim {
            key: key.to_owned(),
            job_id: job_id.to_owned(),
            kind: kind.to_owned(),
            owner: owner.to_owned(),
            lease_ms,
            reply,
        };
        self.submit(op, "claim").await?;
        answer
            .await
            .unwrap_or_else(|_| Err(batch_error("claim", "the store writer stopped")))
    }

    pub(crate) async fn complete(
        &self,
        token: &ClaimToken,
        result: String,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let op = Op::Complete {
            token: token.clone(),
            result,
            reply,
        };
        self.submit(op, "complete").await?;
        answer
            .await
            .unwrap_or_else(|_| Err(batch_error("complete", "the store writer stopped")))
    }

    async fn submit(&self, op: Op, name: &'static str) -> Result<(), StoreError> {
        self.tx
            .send(op)
            .await
            .map_err(|_| batch_error(name, "the store writer stopped"))
    }
}

async fn writer(pool: SqlitePool, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        run_batch(&pool, &mut batch).await;
    }
}

/// Runs and commits `batch` (emptied), then answers every caller in it.
async fn run_batch(pool: &SqlitePool, batch: &mut Vec<Op>) {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => {
            let why = e.to_string();
            batch.drain(..).for_each(|op| op.fail("claim", &why));
            return;
        }
    };
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            let why = e.to_string();
            batch.drain(..).for_each(|op| op.fail("claim", &why));
            return;
        }
    };
    let mut answers = Vec::with_capacity(batch.len());
    let mut failure: Option<(&'static str, String)> = None;
    let mut ops = batch.drain(..);
    for op in ops.by_ref() {
        match op {
            Op::Claim {
                key,
                job_id,
                kind,
                owner,
                lease_ms,
                reply,
            } => {
                let r = claim_on(&mut tx, &key, &job_id, &kind, &owner, lease_ms).await;
                if let Err(e @ StoreError::Database { .. }) = &r {
                    failure = Some(("claim", e.to_string()));
                }
                answers.push(Answer::Claim(reply, r));
            }
            Op::Complete {
                token,
                result,
                reply,
            } => {
                let r = match mark_completed(&mut *tx, &token, &result).await {
                    Ok(1) => Ok(()),
                    Ok(_) => Err(lease_lost(&token)),
                    Err(e) => {
                        failure = Some(("complete", e.to_string()));
                        Err(batch_error("complete", &e.to_string()))
                    }
                };
                answers.push(Answer::Complete(reply, r));
            }
        }
        if failure.is_some() {
            break;
        }
    }
    let outcome = match failure {
        None => tx.commit().await.map_err(|e| ("commit", e.to_string())),
        Some(f) => {
            let _ = tx.rollback().await;
            Err(f)
        }
    };
    match outcome {
        Ok(()) => answers.into_iter().for_each(Answer::send),
        Err((op, why)) => {
            tracing::warn!(op, error = %why, requests = answers.len(), "store group commit failed; rolled back");
            answers.into_iter().for_each(|a| a.fail(op, &why));
            ops.for_each(|o| o.fail(op, &why));
        }
    }
}
