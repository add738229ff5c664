//! Replication batches on their way to ClickHouse (`replication_flushes`),
//! and the `replication-flush` job that writes one.
//!
//! At-least-once: a batch is written to Postgres together with its job before
//! the slot may move past it; the job may run more than once (ReplacingMergeTree
//! absorbs the replay); the slot's confirmed position only moves to the end of
//! the highest batch below which every batch is flushed.
//!
//! What the consumer writes here carries its lease's fencing token and is
//! refused to a superseded holder in the same transaction
//! ([`lease::superseded`]): a holder that lost the slot can neither record a
//! batch nor move the slot's confirmed position.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::analytics::overview;
use crate::analytics::rows::{RunRow, SessionRow};
use crate::analytics::watermark::{self, Table};
use crate::analytics::{AnalyticsError, ClickHouse};
use crate::db::StoreError;
use crate::jobs::{self, JobKind, Jobs, Payload};
use crate::replication::decode::Change;
use crate::replication::lease;

/// Complete transactions collected for one flush.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Batch {
    pub sessions: Vec<SessionRow>,
    pub runs: Vec<RunRow>,
    /// Commit LSN of the first transaction.
    pub start_lsn: Option<u64>,
    /// End LSN and commit time of the last complete transaction.
    pub end_lsn: u64,
    pub commit_time: Option<DateTime<Utc>>,
}

impl Batch {
    pub fn push(&mut self, change: Change) {
        match change {
            Change::Session(row) => self.sessions.push(row),
            Change::Run(row) => self.runs.push(row),
        }
    }

    pub fn rows(&self) -> usize {
        self.sessions.len() + self.runs.len()
    }

    /// Appends the batch that followed this one in the stream, so both go out
    /// in one flush covering both LSN ranges.
    pub fn append(&mut self, next: Batch) {
        self.sessions.extend(next.sessions);
        self.runs.extend(next.runs);
        self.start_lsn = self.start_lsn.or(next.start_lsn);
        self.end_lsn = self.end_lsn.max(next.end_lsn);
        self.commit_time = next.commit_time.or(self.commit_time);
    }

    /// Records a transaction as complete (its rows were pushed before).
    pub fn commit(&mut self, commit_lsn: u64, end_lsn: u64, at: DateTime<Utc>) {
        self.start_lsn.get_or_insert(commit_lsn);
        self.end_lsn = end_lsn;
        self.commit_time = Some(at);
    }
}

/// An LSN as Postgres writes it (`X/Y`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Where a batch stands (`replication_flushes.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum FlushStatus {
    /// Recorded with its job; not yet in ClickHouse.
    Pending,
    /// In ClickHouse; pruned once the slot confirms past it.
    Flushed,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error("replication batch {0} is unreadable: {1}")]
    Corrupt(Uuid, String),
    /// The writer's lease was taken over: it must stop consuming.
    #[error("replication token {token} superseded by {current}")]
    Superseded { token: u64, current: u64 },
}

/// Locks the slot's fence for the transaction, refusing a superseded `token`.
async fn hold_fence(conn: &mut sqlx::PgConnection, slot: &str, token: u64) -> Result<(), FlushError> {
    match lease::superseded(conn, slot, token).await? {
        Some(current) => Err(FlushError::Superseded { token, current }),
        None => Ok(()),
    }
}

/// The `replication-flush` job: writes batch `flush_id` to ClickHouse (run
/// by `replication::jobs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicationFlush {
    pub flush_id: Uuid,
}

impl Payload for ReplicationFlush {
    fn kind(&self) -> JobKind {
        JobKind::ReplicationFlush
    }
}

/// Writes the batch and its job in one transaction, then relays the job,
/// unless `token` was superseded. Returns the batch's id.
pub async fn record(pool: &PgPool, jobs: &Jobs, slot: &str, token: u64, batch: &Batch) -> Result<Uuid, FlushError> {
    let (Some(start), Some(at)) = (batch.start_lsn, batch.commit_time) else {
        return Err(FlushError::Corrupt(Uuid::nil(), "a batch without a complete transaction".into()));
    };
    let id = Uuid::now_v7();
    let rows = serde_json::to_value(batch).map_err(|e| FlushError::Corrupt(id, e.to_string()))?;
    let mut tx = crate::db::begin(pool).await.map_err(StoreError::from)?;
    hold_fence(&mut tx, slot, token).await?;
    let job = jobs::store::insert(&mut *tx, &ReplicationFlush { flush_id: id }, jobs::DEFAULT_MAX_ATTEMPTS).await?;
    sqlx::query(
        "INSERT INTO replication_flushes (id, slot, start_lsn, end_lsn, commit_time, row_count, rows, job_id, fence)
         VALUES ($1, $2, $3::text::pg_lsn, $4::text::pg_lsn, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(slot)
    .bind(lsn_text(start))
    .bind(lsn_text(batch.end_lsn))
    .bind(at)
    .bind(batch.rows() as i32)
    .bind(rows)
    .bind(job.id())
    .bind(token as i64)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    jobs.relay(&[job]).await;
    Ok(id)
}

/// The `replication-flush` job: writes the batch's rows to ClickHouse and
/// marks it flushed.
pub async fn execute(pool: &PgPool, ch: &ClickHouse, id: Uuid) -> Result<String, FlushError> {
    let found: Option<(serde_json::Value, FlushStatus, String)> =
        sqlx::query_as("SELECT rows, status, slot FROM replication_flushes WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::from)?;
    let Some((rows, status, slot)) = found else {
        return Ok(format!("replication batch {id} is gone (confirmed and pruned)"));
    };
    if status == FlushStatus::Flushed {
        return Ok(format!("replication batch {id} already flushed"));
    }
    let batch: Batch = serde_json::from_value(rows).map_err(|e| FlushError::Corrupt(id, e.to_string()))?;
    // The two tables at once: a flush's time is mostly these round trips.
    let (sessions, runs) =
        tokio::join!(ch.insert_rows("sessions_v1", &batch.sessions), ch.insert_rows("task_runs_v1", &batch.runs));
    sessions?;
    runs?;
    // Marked flushed, and the slot's health notes the flush and its lag
    // (Postgres's clock on both ends: commit to visible).
    let lag_ms: Option<Option<i64>> = sqlx::query_scalar(
        "WITH f AS (
             UPDATE replication_flushes SET status = 'flushed', flushed_at = now() WHERE id = $1
             RETURNING slot, commit_time)
         INSERT INTO replication_state (slot, last_flush_at, last_flush_lag_ms)
         SELECT slot, now(), greatest(0, (extract(epoch FROM now() - commit_time) * 1000)::bigint) FROM f
         ON CONFLICT (slot) DO UPDATE
             SET last_flush_at = excluded.last_flush_at, last_flush_lag_ms = excluded.last_flush_lag_ms
         RETURNING last_flush_lag_ms",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)?;
    // The same figure joins the lag history the overview charts (none if the
    // batch was pruned meanwhile). The flush is done either way: a lost
    // sample costs a point of a chart, not a replay.
    if let Some(lag_ms) = lag_ms.flatten() {
        let lag = u64::try_from(lag_ms).unwrap_or(0);
        if let Err(err) = overview::record_lag(ch, &slot, crate::clock::now(), lag, batch.rows()).await {
            tracing::warn!(error = %err, flush = %id, "replication lag sample not recorded");
        }
    }
    Ok(format!("replication batch {id}: {} sessions, {} runs written", batch.sessions.len(), batch.runs.len()))
}

/// The end LSN and commit time of the highest flushed batch below which no
/// batch is pending: how far the slot may confirm. Prunes the batches up to
/// it. Refused to a superseded `token`, so a holder learns it lost the slot
/// within one confirmer tick.
pub async fn confirmable(pool: &PgPool, slot: &str, token: u64) -> Result<Option<(u64, DateTime<Utc>)>, FlushError> {
    let mut tx = crate::db::begin(pool).await.map_err(StoreError::from)?;
    hold_fence(&mut tx, slot, token).await?;
    let found: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT f.end_lsn::text, f.commit_time FROM replication_flushes f
         WHERE f.slot = $1 AND f.status = 'flushed'
           AND NOT EXISTS (SELECT 1 FROM replication_flushes p
                           WHERE p.slot = $1 AND p.status = 'pending' AND p.end_lsn <= f.end_lsn)
         ORDER BY f.end_lsn DESC LIMIT 1",
    )
    .bind(slot)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    let Some((lsn, at)) = found else { return Ok(None) };
    sqlx::query(
        "DELETE FROM replication_flushes WHERE slot = $1 AND status = 'flushed' AND end_lsn <= $2::text::pg_lsn",
    )
    .bind(slot)
    .bind(&lsn)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    let lsn = crate::analytics::rows::parse_lsn(&lsn).ok_or_else(|| StoreError::Corrupt(format!("LSN {lsn}")))?;
    Ok(Some((lsn, at)))
}

/// Notes that the holder of `token` confirms the slot up to `lsn`, before it
/// tells the slot; refused to a superseded token. The recorded position
/// never goes back (a new holder starts behind what its predecessor saw).
pub async fn confirm(pool: &PgPool, slot: &str, token: u64, lsn: u64) -> Result<(), FlushError> {
    // One statement: its row lock is the one a takeover's new token waits for.
    let confirmed: Option<i64> = sqlx::query_scalar(
        "UPDATE replication_state
         SET confirmed_lsn = greatest(confirmed_lsn, $2::text::pg_lsn), confirmed_fence = $3
         WHERE slot = $1 AND fence <= $3 RETURNING fence",
    )
    .bind(slot)
    .bind(lsn_text(lsn))
    .bind(token as i64)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)?;
    if confirmed.is_some() {
        return Ok(());
    }
    let current: Option<i64> = sqlx::query_scalar("SELECT fence FROM replication_state WHERE slot = $1")
        .bind(slot)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::from)?;
    Err(FlushError::Superseded { token, current: current.unwrap_or(0) as u64 })
}

/// The jobs of the slot's batches still waiting for ClickHouse.
pub async fn pending_jobs(pool: &PgPool, slot: &str) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar("SELECT job_id FROM replication_flushes WHERE slot = $1 AND status = 'pending'")
        .bind(slot)
        .fetch_all(pool)
        .await?)
}

/// Whether any batch of the slot still waits for ClickHouse.
pub async fn pending(pool: &PgPool, slot: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM replication_flushes WHERE slot = $1 AND status = 'pending'")
        .bind(slot)
        .fetch_one(pool)
        .await?)
}

/// Moves both tables' watermarks to `at`, but only for a table a full
/// backfill has vouched for: replication alone never saw what was committed
/// before its slot existed.
pub async fn advance_watermarks(ch: &ClickHouse, lsn: u64, at: DateTime<Utc>) -> Result<(), AnalyticsError> {
    for table in [Table::Sessions, Table::Runs] {
        if watermark::read(ch, table).await?.is_some_and(|mark| mark < at) {
            watermark::advance(ch, table, at, lsn, watermark::Source::Replication).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(start: u64, end: u64, secs: i64) -> Batch {
        let mut b = Batch::default();
        b.commit(start, end, DateTime::from_timestamp(secs, 0).unwrap());
        b
    }

    #[test]
    fn merged_batches_cover_both_ranges_and_end_at_the_later_commit() {
        let mut first = batch(100, 150, 10);
        first.commit(160, 200, DateTime::from_timestamp(11, 0).unwrap());
        first.append(batch(210, 300, 12));
        assert_eq!((first.start_lsn, first.end_lsn), (Some(100), 300));
        assert_eq!(first.commit_time, DateTime::from_timestamp(12, 0));
        // A batch closed with only an open transaction's rows keeps the range it had.
        let mut tail = batch(400, 450, 20);
        tail.append(Batch::default());
        assert_eq!((tail.start_lsn, tail.end_lsn, tail.commit_time), (Some(400), 450, DateTime::from_timestamp(20, 0)));
    }
}
