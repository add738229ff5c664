//! Replication health as data: what the dashboard, metrics and `sessiond
//! replication status` read. It joins what Postgres says of the slot (lag,
//! retained WAL, confirmed position) with what the consumer and its flushes
//! recorded (`replication_state`, `replication_flushes`) and who holds the
//! lease.

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;

use super::lease;
use super::slot::{self, SlotStatus};
use crate::db::StoreError;

#[derive(Debug, Clone, Serialize)]
pub struct ReplicationHealth {
    pub slot_name: String,
    /// None: the slot does not exist (replication never started, or the slot
    /// was dropped and not yet recreated).
    pub slot: Option<SlotStatus>,
    /// The fencing token of the current lease holder, if any process holds it.
    pub lease_token: Option<u64>,
    /// Batches recorded but not yet in ClickHouse, their rows, and the age of
    /// the oldest (what to alert on: it grows while ClickHouse is away).
    pub pending_flushes: i64,
    pub pending_rows: i64,
    pub oldest_pending_age_ms: Option<i64>,
    pub last_flush_at: Option<DateTime<Utc>>,
    /// From the commit of the newest flushed batch's last transaction to its
    /// rows being in ClickHouse.
    pub last_flush_lag_ms: Option<i64>,
    /// The newest failure of the consumer or of a flush attempt.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub reconciled_at: Option<DateTime<Utc>>,
    pub last_reconcile: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Recorded {
    pending_flushes: i64,
    pending_rows: i64,
    oldest_pending_age_ms: Option<i64>,
    last_flush_at: Option<DateTime<Utc>>,
    last_flush_lag_ms: Option<i64>,
    consumer_error: Option<String>,
    consumer_error_at: Option<DateTime<Utc>>,
    flush_error: Option<String>,
    flush_error_at: Option<DateTime<Utc>>,
    reconciled_at: Option<DateTime<Utc>>,
    last_reconcile: Option<String>,
}

/// The health of replication through `slot_name`.
pub async fn status(
    pool: &PgPool,
    redis: &ConnectionManager,
    redis_prefix: &str,
    slot_name: &str,
) -> Result<ReplicationHealth, HealthError> {
    let slot = slot::status(pool, slot_name).await?;
    let r: Recorded = sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM replication_flushes WHERE slot = $1 AND status = 'pending') AS pending_flushes,
             (SELECT coalesce(sum(row_count), 0)::bigint FROM replication_flushes
               WHERE slot = $1 AND status = 'pending') AS pending_rows,
             (SELECT (extract(epoch FROM now() - min(created_at)) * 1000)::bigint FROM replication_flushes
               WHERE slot = $1 AND status = 'pending') AS oldest_pending_age_ms,
             s.last_flush_at, s.last_flush_lag_ms,
             s.last_error AS consumer_error, s.last_error_at AS consumer_error_at,
             f.error AS flush_error, f.finished_at AS flush_error_at,
             s.reconciled_at, s.last_reconcile
         FROM (SELECT 1) one
         LEFT JOIN replication_state s ON s.slot = $1
         LEFT JOIN LATERAL (
             SELECT a.error, a.finished_at FROM replication_flushes rf
             JOIN job_attempts a ON a.job_id = rf.job_id AND a.status = 'failed'
             WHERE rf.slot = $1 AND rf.status = 'pending'
             ORDER BY a.finished_at DESC LIMIT 1) f ON true",
    )
    .bind(slot_name)
    .fetch_one(pool)
    .await
    .map_err(StoreError::from)?;
    // The newer of the consumer's error and a pending flush's failed attempt.
    let (last_error, last_error_at) = match (r.consumer_error_at, r.flush_error_at) {
        (Some(c), Some(f)) if f > c => (r.flush_error, Some(f)),
        (None, Some(f)) => (r.flush_error, Some(f)),
        _ => (r.consumer_error, r.consumer_error_at),
    };
    Ok(ReplicationHealth {
        slot_name: slot_name.to_string(),
        slot,
        lease_token: lease::holder(redis, redis_prefix, slot_name).await?,
        pending_flushes: r.pending_flushes,
        pending_rows: r.pending_rows,
        oldest_pending_age_ms: r.oldest_pending_age_ms,
        last_flush_at: r.last_flush_at,
        last_flush_lag_ms: r.last_flush_lag_ms,
        last_error,
        last_error_at,
        reconciled_at: r.reconciled_at,
        last_reconcile: r.last_reconcile,
    })
}

/// A batch recorded but not yet in ClickHouse, with its flush job's state:
/// a job with failed attempts is what an operator looks into.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingFlush {
    pub id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub commit_time: DateTime<Utc>,
    pub row_count: i32,
    pub job_id: uuid::Uuid,
    pub attempts: Option<i32>,
    pub last_error: Option<String>,
}

/// The oldest `limit` pending flushes of `slot` (the oldest holds the
/// watermark back), failing ones included.
pub async fn pending_flushes(pool: &PgPool, slot_name: &str, limit: i64) -> Result<Vec<PendingFlush>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT f.id, f.created_at, f.commit_time, f.row_count, f.job_id, j.attempts, j.last_error
         FROM replication_flushes f LEFT JOIN jobs j ON j.id = f.job_id
         WHERE f.slot = $1 AND f.status = 'pending'
         ORDER BY f.created_at, f.id LIMIT $2",
    )
    .bind(slot_name)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Notes the consumer's newest failure.
pub async fn record_error(pool: &PgPool, slot: &str, error: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO replication_state (slot, last_error, last_error_at) VALUES ($1, $2, now())
         ON CONFLICT (slot) DO UPDATE SET last_error = excluded.last_error, last_error_at = excluded.last_error_at",
    )
    .bind(slot)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Notes a reconciliation and what it found.
pub async fn record_reconcile(pool: &PgPool, slot: &str, summary: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO replication_state (slot, reconciled_at, last_reconcile) VALUES ($1, now(), $2)
         ON CONFLICT (slot) DO UPDATE
             SET reconciled_at = excluded.reconciled_at, last_reconcile = excluded.last_reconcile",
    )
    .bind(slot)
    .bind(summary)
    .execute(pool)
    .await?;
    Ok(())
}
