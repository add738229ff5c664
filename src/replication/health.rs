//! Replication health as data: what the dashboard, metrics, `/readyz` and
//! `sessiond replication status` read. It joins what Postgres says of the
//! slot (lag, retained WAL against `max_slot_wal_keep_size`, `wal_status`,
//! confirmed position) with what the consumer and its flushes recorded
//! (`replication_state`, `replication_flushes`), the slot's generation and
//! whether its copy is complete, and who holds the lease.

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;

use super::lease;
use super::slot::{self, Generation, SlotStatus};
use crate::db::StoreError;

/// How close the slot's retained WAL is to the bound past which Postgres
/// invalidates the slot (and replication must be healed by a backfill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WalAlert {
    /// Below half the bound.
    Ok,
    /// At or above 50% of the bound.
    Warning,
    /// At or above 80% of the bound (or past it: `unreserved`).
    Critical,
    /// The slot was invalidated: its WAL is gone.
    Lost,
    /// No bound (`max_slot_wal_keep_size = -1`): a stopped consumer lets WAL
    /// grow until the disk is full.
    Unbounded,
}

impl WalAlert {
    pub fn as_str(self) -> &'static str {
        match self {
            WalAlert::Ok => "ok",
            WalAlert::Warning => "warning",
            WalAlert::Critical => "critical",
            WalAlert::Lost => "lost",
            WalAlert::Unbounded => "unbounded",
        }
    }

    /// The alert for `retained` bytes under `bound` (None: unlimited).
    pub fn assess(slot: Option<&SlotStatus>, bound: Option<i64>) -> WalAlert {
        if slot.is_some_and(SlotStatus::lost) {
            return WalAlert::Lost;
        }
        let Some(bound) = bound else { return WalAlert::Unbounded };
        let retained = slot.and_then(|s| s.retained_wal_bytes).unwrap_or(0);
        // In i128: a bound near i64::MAX must not overflow the products.
        let (retained, bound) = (i128::from(retained), i128::from(bound.max(1)));
        if retained * 5 >= bound * 4 {
            WalAlert::Critical
        } else if retained * 2 >= bound {
            WalAlert::Warning
        } else {
            WalAlert::Ok
        }
    }
}

/// The slot's retained WAL against its bound.
#[derive(Debug, Clone, Serialize)]
pub struct WalRetention {
    pub retained_bytes: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; None: unlimited.
    pub bound_bytes: Option<i64>,
    /// What may still be written before the slot is in danger (Postgres's
    /// `safe_wal_size`).
    pub safe_wal_size: Option<i64>,
    pub wal_status: Option<slot::WalStatus>,
    pub alert: WalAlert,
}

/// What `/readyz` shows of replication: cheap (two Postgres reads), no Redis.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationSummary {
    pub slot_name: String,
    pub slot_exists: bool,
    pub wal: WalRetention,
    /// The slot's copy is complete: lists may be served by ClickHouse.
    pub copy_complete: bool,
    pub generation: Option<i64>,
}

fn retention(slot: Option<&SlotStatus>, bound: Option<i64>) -> WalRetention {
    WalRetention {
        retained_bytes: slot.and_then(|s| s.retained_wal_bytes),
        bound_bytes: bound,
        safe_wal_size: slot.and_then(|s| s.safe_wal_size),
        wal_status: slot.and_then(|s| s.wal_status),
        alert: WalAlert::assess(slot, bound),
    }
}

/// What both the summary and the full health start from: the slot as
/// Postgres reports it, its WAL retention, and its copy's generation.
async fn slot_state(
    pool: &PgPool,
    slot_name: &str,
) -> Result<(Option<SlotStatus>, WalRetention, Option<Generation>), StoreError> {
    let slot = slot::status(pool, slot_name).await?;
    let wal = retention(slot.as_ref(), slot::wal_bound(pool).await?);
    let generation = slot::generation(pool, slot_name).await?;
    Ok((slot, wal, generation))
}

/// The slot's WAL retention and its copy's generation.
pub async fn summary(pool: &PgPool, slot_name: &str) -> Result<ReplicationSummary, StoreError> {
    let (slot, wal, generation) = slot_state(pool, slot_name).await?;
    Ok(ReplicationSummary {
        slot_name: slot_name.to_string(),
        slot_exists: slot.is_some(),
        wal,
        copy_complete: generation.as_ref().is_none_or(|g| g.incomplete.is_empty()),
        generation: generation.map(|g| g.generation),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicationHealth {
    pub slot_name: String,
    /// None: the slot does not exist (replication never started, or the slot
    /// was dropped and not yet recreated).
    pub slot: Option<SlotStatus>,
    /// Retained WAL against `max_slot_wal_keep_size`, with its alert.
    pub wal: WalRetention,
    /// The slot's generation (one per slot created) and which tables its
    /// backfill has yet to copy; None before replication first ran.
    pub generation: Option<Generation>,
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
    let (slot, wal, generation) = slot_state(pool, slot_name).await?;
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
        wal,
        generation,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(retained: Option<i64>, wal_status: slot::WalStatus) -> SlotStatus {
        SlotStatus {
            slot_name: "s".into(),
            active: true,
            confirmed_flush_lsn: None,
            restart_lsn: None,
            wal_status: Some(wal_status),
            retained_wal_bytes: retained,
            safe_wal_size: None,
            lag_bytes: None,
        }
    }

    #[test]
    fn alerts_at_half_and_four_fifths_of_the_bound() {
        let mb = 1 << 20;
        let at =
            |retained: i64| WalAlert::assess(Some(&slot(Some(retained), slot::WalStatus::Reserved)), Some(100 * mb));
        assert_eq!(at(0), WalAlert::Ok);
        assert_eq!(at(50 * mb - 1), WalAlert::Ok);
        assert_eq!(at(50 * mb), WalAlert::Warning);
        assert_eq!(at(80 * mb - 1), WalAlert::Warning);
        assert_eq!(at(80 * mb), WalAlert::Critical);
        assert_eq!(at(150 * mb), WalAlert::Critical);
        assert_eq!(WalAlert::assess(Some(&slot(Some(mb), slot::WalStatus::Reserved)), None), WalAlert::Unbounded);
        assert_eq!(WalAlert::assess(Some(&slot(None, slot::WalStatus::Lost)), Some(mb)), WalAlert::Lost);
        assert_eq!(WalAlert::assess(None, Some(mb)), WalAlert::Ok);
        assert_eq!(
            WalAlert::assess(Some(&slot(Some(i64::MAX), slot::WalStatus::Extended)), Some(i64::MAX)),
            WalAlert::Critical
        );
    }
}
