//! The store's logic, written once over a [`Dialect`]: the claim decision, fenced writes,
//! the heartbeat, reading rows. Each function runs on one connection, so the SQLite group
//! commit can run it inside its batch transaction and PostgreSQL on a pooled connection.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::dialect::{Arg, Dialect, sql};
use crate::registry::{Heartbeat, HeartbeatReply, WorkerInfo, WorkerRecord};
use crate::{Claim, ClaimToken, JobState, MAX_PARKED_MESSAGE, Parked, Record, StoreError};

/// Rows deleted per statement by `purge_older_than`, so that a large purge never holds the
/// SQLite write lock (or PostgreSQL row locks) for long.
pub(crate) const PURGE_BATCH: i64 = 5_000;

/// How often `claim` re-runs when the row changed between its two statements (deleted, or
/// its lease expired just then). Each retry is a fresh decision, so a small bound suffices.
const CLAIM_RETRIES: usize = 5;

/// A claim request, as the group commit queues it.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRequest {
    pub key: String,
    pub job_id: String,
    pub kind: String,
    pub owner: String,
    pub lease_ms: i64,
}

/// A duration as whole milliseconds for SQL, rounded up so a tiny lease is never zero, and
/// saturated far below any overflow of the database's time arithmetic (~100 years).
pub(crate) fn millis(d: Duration) -> i64 {
    const MAX: u128 = 100 * 365 * 24 * 3600 * 1000;
    let ms = d.as_nanos().div_ceil(1_000_000).min(MAX);
    ms as i64
}

/// Milliseconds since the Unix epoch (as stored/computed by the database) to `SystemTime`.
pub(crate) fn time_from_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

pub(crate) fn json_text(value: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    value.to_string()
}

fn parse_json(
    key: &str,
    column: &'static str,
    text: Option<String>,
) -> Result<Option<serde_json::Value>, StoreError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|source| StoreError::CorruptJson {
            key: key.to_owned(),
            column,
            source,
        })
    })
    .transpose()
}

pub(crate) fn lease_lost(token: &ClaimToken) -> StoreError {
    StoreError::LeaseLost {
        key: token.key.clone(),
    }
}

/// Refuses text the database cannot store. PostgreSQL rejects NUL in `text` (and SQLite
/// would cut it at the NUL in some functions), so this is a permanent error about the
/// input, raised before any statement; retrying it can never succeed.
pub(crate) fn check_text(what: &'static str, value: &str) -> Result<(), StoreError> {
    match value.find('\0') {
        None => Ok(()),
        Some(at) => Err(StoreError::InvalidInput {
            what,
            reason: format!("contains a NUL character (byte {at}), which the store cannot keep"),
        }),
    }
}

pub(crate) fn check_token(token: &ClaimToken) -> Result<(), StoreError> {
    check_text("idempotency key", &token.key)?;
    check_text("owner", &token.owner)
}

pub(crate) fn check_claim(req: &ClaimRequest) -> Result<(), StoreError> {
    check_text("idempotency key", &req.key)?;
    check_text("job id", &req.job_id)?;
    check_text("job kind", &req.kind)?;
    check_text("owner", &req.owner)
}

pub(crate) fn check_worker(w: &WorkerInfo) -> Result<(), StoreError> {
    check_text("worker id", &w.id)?;
    check_text("worker host", &w.host)?;
    check_text("worker version", &w.version)?;
    w.queues
        .iter()
        .try_for_each(|q| check_text("queue name", q))
}

/// Refuses a parked copy the store will not keep: a queue name it cannot store, or a
/// message over [`MAX_PARKED_MESSAGE`] (a row that large would stall every SQLite writer and
/// bloat the sweeper's reads). Permanent, like every [`StoreError::InvalidInput`].
pub(crate) fn check_parked(parked: &Parked) -> Result<(), StoreError> {
    check_text("parked queue name", &parked.queue)?;
    if parked.message.len() > MAX_PARKED_MESSAGE {
        return Err(StoreError::InvalidInput {
            what: "parked message",
            reason: format!(
                "is {} bytes, more than the {MAX_PARKED_MESSAGE} bytes the store keeps",
                parked.message.len()
            ),
        });
    }
    Ok(())
}

fn token_args(token: &ClaimToken) -> Vec<Arg> {
    vec![
        token.key.as_str().into(),
        token.owner.as_str().into(),
        token.fencing.into(),
    ]
}

/// The claim decision for one key. A [`StoreError::Database`] means the connection or the
/// transaction failed; any other error is about this key's row alone.
pub(crate) async fn claim_on<D: Dialect>(
    conn: &mut D::Connection,
    req: &ClaimRequest,
) -> Result<Claim, StoreError> {
    let db = StoreError::db("claim");
    for _ in 0..CLAIM_RETRIES {
        // One statement decides: insert a fresh claim, or take over a claimed row whose
        // lease expired or whose owner is known dead, bumping the epoch. A row that is not
        // taken over is left untouched and RETURNING yields nothing.
        let args = vec![
            req.key.as_str().into(),
            req.job_id.as_str().into(),
            req.kind.as_str().into(),
            req.owner.as_str().into(),
            req.lease_ms.into(),
        ];
        let rows = D::fetch_all(conn, sql(D::CLAIM), args).await.map_err(db)?;
        if let Some(row) = rows.first() {
            let fencing = D::int(row, "attempts").map_err(db)?;
            tracing::debug!(key = %req.key, owner = %req.owner, fencing, "claim acquired");
            return Ok(Claim::Acquired(ClaimToken {
                key: req.key.clone(),
                owner: req.owner.clone(),
                fencing,
            }));
        }
        let rows = D::fetch_all(conn, sql(D::INSPECT), vec![req.key.as_str().into()])
            .await
            .map_err(db)?;
        let Some(row) = rows.first() else {
            continue; // deleted in between (forget/purge): try to insert again
        };
        let owner = D::text(row, "owner").map_err(db)?;
        let expires_in_ms = D::int(row, "expires_in_ms").map_err(db)?;
        let key = req.key.as_str();
        match JobState::parse(key, &D::text(row, "state").map_err(db)?)? {
            JobState::Completed => {
                let result = parse_json(key, "result", D::opt_text(row, "result").map_err(db)?)?;
                return Ok(Claim::AlreadyCompleted { result });
            }
            JobState::Failed => {
                let error = parse_json(key, "error", D::opt_text(row, "error").map_err(db)?)?;
                let error = error.unwrap_or(serde_json::Value::Null);
                return Ok(Claim::AlreadyFailed { error });
            }
            JobState::Claimed if expires_in_ms > 0 => {
                return Ok(Claim::HeldElsewhere {
                    owner,
                    expires_in: Duration::from_millis(expires_in_ms as u64),
                });
            }
            JobState::Claimed => {
                tracing::trace!(key, holder = %owner, "lease expired between statements; claiming again");
            }
        }
    }
    // The row kept changing under us; let the caller retry later like any held key.
    Ok(Claim::HeldElsewhere {
        owner: String::new(),
        expires_in: Duration::ZERO,
    })
}

/// Runs one fenced write; 0 rows changed means the lease was lost.
pub(crate) async fn fenced_on<D: Dialect>(
    conn: &mut D::Connection,
    op: &'static str,
    statement: &'static str,
    token: &ClaimToken,
    extra: Vec<Arg>,
) -> Result<(), StoreError> {
    let mut args = token_args(token);
    args.extend(extra);
    let n = D::execute(conn, sql(statement), args)
        .await
        .map_err(StoreError::db(op))?;
    if n == 1 {
        tracing::debug!(key = %token.key, fencing = token.fencing, op, "store write");
        Ok(())
    } else {
        Err(lease_lost(token))
    }
}

/// Marks the token's claim completed with `result_json`.
pub(crate) async fn complete_on<D: Dialect>(
    conn: &mut D::Connection,
    token: &ClaimToken,
    result_json: &str,
) -> Result<(), StoreError> {
    let result = Arg::Text(result_json.to_owned());
    fenced_on::<D>(conn, "complete", D::COMPLETE, token, vec![result]).await
}

/// Whether the token still holds its claim (and, on PostgreSQL, locks the row).
pub(crate) async fn hold_on<D: Dialect>(
    conn: &mut D::Connection,
    token: &ClaimToken,
) -> Result<(), StoreError> {
    let rows = D::fetch_all(conn, sql(D::HOLD), token_args(token))
        .await
        .map_err(StoreError::db("begin_completion"))?;
    if rows.is_empty() {
        Err(lease_lost(token))
    } else {
        Ok(())
    }
}

/// Upserts the worker's row and extends every token's lease in one statement; the tokens
/// not extended are lost.
pub(crate) async fn heartbeat_on<D: Dialect>(
    conn: &mut D::Connection,
    beat: &Heartbeat,
) -> Result<HeartbeatReply, StoreError> {
    let db = StoreError::db("heartbeat");
    let w = &beat.worker;
    let tokens: Vec<serde_json::Value> = beat
        .tokens
        .iter()
        .map(|t| serde_json::json!({ "key": t.key, "owner": t.owner, "fencing": t.fencing }))
        .collect();
    let count = |n: u64| Arg::Int(i64::try_from(n).unwrap_or(i64::MAX));
    let args = vec![
        w.id.as_str().into(),
        w.host.as_str().into(),
        w.version.as_str().into(),
        json_text(&serde_json::json!(w.queues)).into(),
        i64::from(w.concurrency).into(),
        i64::from(w.pool_size).into(),
        w.started_at_ms.into(),
        count(w.in_flight),
        count(w.jobs_done),
        millis(beat.dead_after).into(),
        json_text(&serde_json::Value::Array(tokens)).into(),
        millis(beat.lease).into(),
    ];
    let rows = D::fetch_all(conn, sql(D::HEARTBEAT), args)
        .await
        .map_err(db)?;
    let extended = rows
        .iter()
        .map(|row| D::text(row, "key"))
        .collect::<Result<HashSet<String>, _>>()
        .map_err(db)?;
    let lost: Vec<String> = beat
        .tokens
        .iter()
        .filter(|t| !extended.contains(&t.key))
        .map(|t| t.key.clone())
        .collect();
    tracing::debug!(worker = %w.id, extended = extended.len(), lost = lost.len(), "heartbeat");
    Ok(HeartbeatReply { lost })
}

/// Takes over at most `limit` parked claims whose holder is gone, in one statement (which
/// is what keeps two sweepers from taking the same row: PostgreSQL skips rows another
/// sweeper has locked, SQLite runs one writer at a time).
pub(crate) async fn take_orphans_on<D: Dialect>(
    conn: &mut D::Connection,
    owner: &str,
    lease_ms: i64,
    limit: u32,
) -> Result<Vec<(ClaimToken, Parked)>, StoreError> {
    let db = StoreError::db("take_orphans");
    let args = vec![owner.into(), lease_ms.into(), i64::from(limit).into()];
    let rows = D::fetch_all(conn, sql(D::TAKE_ORPHANS), args)
        .await
        .map_err(db)?;
    let taken = rows
        .iter()
        .map(|row| {
            let token = ClaimToken {
                key: D::text(row, "key")?,
                owner: owner.to_owned(),
                fencing: D::int(row, "attempts")?,
            };
            let parked = Parked {
                queue: D::text(row, "parked_queue")?,
                message: D::bytes(row, "parked_message")?,
            };
            Ok((token, parked))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(db)?;
    for (token, parked) in &taken {
        tracing::info!(key = %token.key, fencing = token.fencing, queue = %parked.queue, "took over an orphaned parked job");
    }
    Ok(taken)
}

pub(crate) async fn deregister_on<D: Dialect>(
    conn: &mut D::Connection,
    worker_id: &str,
) -> Result<(), StoreError> {
    D::execute(conn, sql(D::DEREGISTER), vec![worker_id.into()])
        .await
        .map_err(StoreError::db("deregister_worker"))?;
    tracing::debug!(worker = worker_id, "worker deregistered");
    Ok(())
}

pub(crate) async fn workers_on<D: Dialect>(
    conn: &mut D::Connection,
) -> Result<Vec<WorkerRecord>, StoreError> {
    let db = StoreError::db("workers");
    let rows = D::fetch_all(conn, sql(D::WORKERS), Vec::new())
        .await
        .map_err(db)?;
    let count = |row: &D::Row, col: &str| -> Result<i64, StoreError> {
        D::int(row, col).map_err(StoreError::db("workers"))
    };
    rows.iter()
        .map(|row| {
            let id = D::text(row, "id").map_err(db)?;
            let queues = D::text(row, "queues").map_err(db)?;
            let queues = serde_json::from_str(&queues).map_err(|e| StoreError::Corrupt {
                key: id.clone(),
                detail: format!("worker queues are not a JSON list of names: {e}"),
            })?;
            Ok(WorkerRecord {
                worker: WorkerInfo {
                    host: D::text(row, "host").map_err(db)?,
                    version: D::text(row, "version").map_err(db)?,
                    queues,
                    concurrency: u32::try_from(count(row, "concurrency")?).unwrap_or(0),
                    pool_size: u32::try_from(count(row, "pool_size")?).unwrap_or(0),
                    started_at_ms: count(row, "started_at_ms")?,
                    in_flight: u64::try_from(count(row, "in_flight")?).unwrap_or(0),
                    jobs_done: u64::try_from(count(row, "jobs_done")?).unwrap_or(0),
                    id,
                },
                last_heartbeat: time_from_millis(count(row, "last_heartbeat")?),
                dead_after: Duration::from_millis(
                    u64::try_from(count(row, "dead_after_ms")?).unwrap_or(0),
                ),
                deregistered: count(row, "deregistered")? != 0,
                alive: count(row, "alive")? != 0,
            })
        })
        .collect()
}

pub(crate) async fn get_on<D: Dialect>(
    conn: &mut D::Connection,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    let db = StoreError::db("get");
    let rows = D::fetch_all(conn, sql(D::GET), vec![key.into()])
        .await
        .map_err(db)?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let key = D::text(row, "key").map_err(db)?;
    let ms = |col: &str| D::int(row, col).map(time_from_millis).map_err(db);
    let opt_ms = |col: &str| {
        D::opt_int(row, col)
            .map(|v| v.map(time_from_millis))
            .map_err(db)
    };
    Ok(Some(Record {
        state: JobState::parse(&key, &D::text(row, "state").map_err(db)?)?,
        owner: D::text(row, "owner").map_err(db)?,
        attempts: D::int(row, "attempts").map_err(db)?,
        lease_expires_at: opt_ms("lease_expires_at")?,
        result: parse_json(&key, "result", D::opt_text(row, "result").map_err(db)?)?,
        error: parse_json(&key, "error", D::opt_text(row, "error").map_err(db)?)?,
        job_id: D::text(row, "job_id").map_err(db)?,
        kind: D::text(row, "kind").map_err(db)?,
        created_at: ms("created_at")?,
        updated_at: ms("updated_at")?,
        completed_at: opt_ms("completed_at")?,
        key,
    }))
}

pub(crate) async fn forget_on<D: Dialect>(
    conn: &mut D::Connection,
    key: &str,
) -> Result<bool, StoreError> {
    let n = D::execute(conn, sql(D::FORGET), vec![key.into()])
        .await
        .map_err(StoreError::db("forget"))?;
    Ok(n > 0)
}

pub(crate) async fn purge_on<D: Dialect>(
    conn: &mut D::Connection,
    retention: Duration,
) -> Result<u64, StoreError> {
    let mut total = 0u64;
    loop {
        let args = vec![millis(retention).into(), PURGE_BATCH.into()];
        let n = D::execute(conn, sql(D::PURGE), args)
            .await
            .map_err(StoreError::db("purge"))?;
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    tracing::debug!(deleted = total, "purged finished keys");
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_rounds_up_and_saturates() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(200)), 200);
        assert_eq!(millis(Duration::MAX), 100 * 365 * 24 * 3600 * 1000);
    }

    #[test]
    fn times_round_trip() {
        let t = time_from_millis(1_700_000_000_123);
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_700_000_000_123)
        );
    }

    #[test]
    fn nul_is_a_permanent_input_error() {
        let err = check_text("idempotency key", "a\0b").unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("idempotency key"), "{err}");
        assert!(err.to_string().contains("NUL"), "{err}");
        check_text("owner", "plain").unwrap();
    }
}
