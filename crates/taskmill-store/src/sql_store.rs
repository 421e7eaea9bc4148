//! [`SqlStore`]: the one implementation of [`IdempotencyStore`], for either backend.
//!
//! Every operation checks its text arguments, then runs [`crate::body`] on a pooled
//! connection, except the hot writes (claim, complete, heartbeat), which go through the
//! group commit where the backend has one (SQLite).

use std::time::Duration;

use sqlx::Database;
use sqlx::pool::{Pool, PoolConnection};

use crate::body::{
    self, ClaimRequest, check_claim, check_parked, check_text, check_token, check_worker,
};
use crate::dialect::{Arg, Dialect, sql};
use crate::group_commit::GroupCommit;
use crate::registry::{Heartbeat, HeartbeatReply, WorkerRecord};
use crate::{Claim, ClaimToken, CompletionTx, IdempotencyStore, Parked, Record, StoreError};

/// The store on one backend: [`SqliteStore`](crate::SqliteStore) (`SqlStore<sqlx::Sqlite>`)
/// or [`PgStore`](crate::PgStore) (`SqlStore<sqlx::Postgres>`). Cheap to clone.
#[derive(Debug)]
pub struct SqlStore<DB: Database> {
    pool: Pool<DB>,
    /// Claims, completions and heartbeats committed in groups (SQLite only).
    batch: Option<GroupCommit>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            batch: self.batch.clone(),
        }
    }
}

impl<DB: Database> SqlStore<DB> {
    pub(crate) fn new(pool: Pool<DB>, batch: Option<GroupCommit>) -> Self {
        SqlStore { pool, batch }
    }

    /// The connection pool, for handler code that writes to the same database outside a
    /// completion (and for tests).
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    pub(crate) async fn conn(&self, op: &'static str) -> Result<PoolConnection<DB>, StoreError> {
        self.pool.acquire().await.map_err(StoreError::db(op))
    }
}

/// Records a completion through the group commit if there is one.
pub(crate) async fn group_complete<D: Dialect>(
    store: &SqlStore<D>,
    token: &ClaimToken,
    result_json: String,
) -> Result<(), StoreError> {
    check_token(token)?;
    match &store.batch {
        Some(batch) => batch.complete(token, result_json).await,
        None => {
            let mut conn = store.conn("complete").await?;
            body::complete_on::<D>(&mut conn, token, &result_json).await
        }
    }
}

/// Runs one fenced write on a pooled connection.
async fn fenced<D: Dialect>(
    store: &SqlStore<D>,
    op: &'static str,
    statement: &'static str,
    token: &ClaimToken,
    extra: Vec<Arg>,
) -> Result<(), StoreError> {
    check_token(token)?;
    let mut conn = store.conn(op).await?;
    body::fenced_on::<D>(&mut conn, op, statement, token, extra).await
}

impl<D: Dialect> IdempotencyStore for SqlStore<D> {
    async fn claim(
        &self,
        key: &str,
        job_id: &str,
        kind: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let req = ClaimRequest {
            key: key.to_owned(),
            job_id: job_id.to_owned(),
            kind: kind.to_owned(),
            owner: owner.to_owned(),
            lease_ms: body::millis(lease),
        };
        check_claim(&req)?;
        match &self.batch {
            Some(batch) => batch.claim(req).await,
            None => body::claim_on::<D>(&mut *self.conn("claim").await?, &req).await,
        }
    }

    async fn complete(
        &self,
        token: &ClaimToken,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        group_complete(self, token, body::json_text(result)).await
    }

    async fn begin_completion(&self, token: &ClaimToken) -> Result<CompletionTx, StoreError> {
        check_token(token)?;
        D::begin_completion(self, token).await
    }

    async fn fail(&self, token: &ClaimToken, error: &serde_json::Value) -> Result<(), StoreError> {
        let error = Arg::Text(body::json_text(error));
        fenced(self, "fail", D::FAIL, token, vec![error]).await
    }

    async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        fenced(self, "release", D::RELEASE, token, Vec::new()).await
    }

    async fn extend_lease(&self, token: &ClaimToken, lease: Duration) -> Result<(), StoreError> {
        let lease = Arg::Int(body::millis(lease));
        fenced(self, "extend_lease", D::EXTEND, token, vec![lease]).await
    }

    async fn park(&self, token: &ClaimToken, parked: &Parked) -> Result<(), StoreError> {
        check_parked(parked)?;
        // A plain pooled write, not the group commit: parked messages can be megabytes, and
        // only long jobs park, so there is little to batch.
        let args = vec![
            parked.queue.as_str().into(),
            Arg::Bytes(parked.message.clone()),
        ];
        fenced(self, "park", D::PARK, token, args).await
    }

    async fn take_orphans(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<(ClaimToken, Parked)>, StoreError> {
        check_text("owner", owner)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn("take_orphans").await?;
        body::take_orphans_on::<D>(&mut conn, owner, body::millis(lease), limit).await
    }

    async fn heartbeat(&self, beat: &Heartbeat) -> Result<HeartbeatReply, StoreError> {
        check_worker(&beat.worker)?;
        beat.tokens.iter().try_for_each(check_token)?;
        match &self.batch {
            Some(batch) => batch.heartbeat(beat.clone()).await,
            None => body::heartbeat_on::<D>(&mut *self.conn("heartbeat").await?, beat).await,
        }
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<(), StoreError> {
        check_text("worker id", worker_id)?;
        body::deregister_on::<D>(&mut *self.conn("deregister_worker").await?, worker_id).await
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        body::workers_on::<D>(&mut *self.conn("workers").await?).await
    }

    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        check_text("idempotency key", key)?;
        body::get_on::<D>(&mut *self.conn("get").await?, key).await
    }

    async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        check_text("idempotency key", key)?;
        body::forget_on::<D>(&mut *self.conn("forget").await?, key).await
    }

    async fn purge_older_than(&self, retention: Duration) -> Result<u64, StoreError> {
        body::purge_on::<D>(&mut *self.conn("purge").await?, retention).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        D::execute(&mut *self.conn("ping").await?, sql("SELECT 1"), Vec::new())
            .await
            .map_err(StoreError::db("ping"))?;
        Ok(())
    }
}
