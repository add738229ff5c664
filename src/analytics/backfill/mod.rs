//! Backfill: copies the rows Postgres already holds into ClickHouse, in
//! chunks walked by a keyset on (created_at, id).
//!
//! Each chunk is one durable `backfill` job. A chunk reads the WAL position,
//! then its rows, writes them to ClickHouse versioned with that position, and
//! in one Postgres transaction moves the backfill's cursor and writes the job
//! of the next chunk (an outbox). So a killed backfill resumes at the chunk it
//! was in: the cursor and the next job are either both there or neither. A
//! chunk that ran but was not recorded is copied again, which ReplacingMergeTree
//! absorbs. A live change made after a chunk read its WAL position commits
//! later in the WAL, so it carries a higher version and wins over the copy.

pub mod store;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::rows::{RunRow, SessionRow};
use super::watermark::{self, Table};
use super::{AnalyticsError, ClickHouse};
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::jobs::{self, JobKind, Jobs, NewJob, Payload};
use crate::runs::store as run_store;
use crate::sessions::store as session_store;
pub use store::{Backfill, BackfillStatus};

/// The `backfill` job: copies chunk number `chunk` of backfill `backfill_id`
/// (run by `analytics::jobs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackfillChunk {
    pub backfill_id: Uuid,
    pub chunk: i32,
}

impl Payload for BackfillChunk {
    fn kind(&self) -> JobKind {
        JobKind::Backfill
    }
}

/// Rows per chunk unless the operator asks otherwise.
pub const DEFAULT_CHUNK_SIZE: i32 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error("stopped before recording the chunk (injected fault)")]
    Injected,
}

/// What to copy.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub tables: Vec<Table>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub chunk_size: i32,
}

/// Faults a test can inject into a chunk (`test-faults` builds; elsewhere
/// this holds nothing and injects nothing).
#[cfg(feature = "test-faults")]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Die after writing to ClickHouse, before recording the chunk: as a
    /// process killed mid-chunk.
    pub stop_before_commit: bool,
    /// Wait here twice after the chunk's SELECT, before its write (a test
    /// commits a live change in between).
    pub pause_after_read: Option<std::sync::Arc<tokio::sync::Barrier>>,
}

/// No faults: a release build cannot inject any.
#[cfg(not(feature = "test-faults"))]
#[derive(Debug, Clone, Default)]
pub struct Faults;

impl Faults {
    fn stop_before_commit(&self) -> bool {
        #[cfg(feature = "test-faults")]
        return self.stop_before_commit;
        #[cfg(not(feature = "test-faults"))]
        false
    }

    async fn pause(&self) {
        #[cfg(feature = "test-faults")]
        if let Some(barrier) = &self.pause_after_read {
            barrier.wait().await;
            barrier.wait().await;
        }
    }
}

/// Writes one backfill per table and the jobs of their first chunks, in one
/// transaction; returns them and the jobs (not yet relayed).
pub async fn create(pool: &PgPool, req: &BackfillRequest) -> Result<(Vec<Backfill>, Vec<NewJob>), StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let created = create_in(&mut tx, req).await?;
    tx.commit().await?;
    Ok(created)
}

/// [`create`] inside the caller's transaction, so what the caller writes
/// with it (an operator's audit row) commits or rolls back together.
pub async fn create_in(
    conn: &mut PgConnection,
    req: &BackfillRequest,
) -> Result<(Vec<Backfill>, Vec<NewJob>), StoreError> {
    let mut backfills = Vec::new();
    let mut job_ids = Vec::new();
    for table in &req.tables {
        let b = store::insert(conn, *table, req.from, req.to, req.chunk_size.max(1)).await?;
        let job = BackfillChunk { backfill_id: b.id, chunk: 0 };
        job_ids.push(jobs::store::insert(&mut *conn, &job, jobs::DEFAULT_MAX_ATTEMPTS).await?);
        backfills.push(b);
    }
    Ok((backfills, job_ids))
}

/// Creates the backfills and queues their first chunks (the server's own
/// backfills: a healed slot, a reconciliation; see [`start_by`] for one
/// someone asked for).
pub async fn start(pool: &PgPool, jobs: &Jobs, req: &BackfillRequest) -> Result<Vec<Backfill>, StoreError> {
    let (backfills, job_ids) = create(pool, req).await?;
    queue(jobs, &job_ids).await?;
    Ok(backfills)
}

/// Starts backfills because `by` asked (an operator on the dashboard, the
/// command line): the backfills, their first chunks' jobs and the audit row
/// commit together, then the jobs are queued. A failed push after the commit
/// is only logged: the relay of unrelayed jobs pushes them later.
pub async fn start_by(
    pool: &PgPool,
    jobs: &Jobs,
    by: &Actor,
    req: &BackfillRequest,
) -> Result<Vec<Backfill>, StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let (backfills, queued) = create_in(&mut tx, req).await?;
    let ids: Vec<String> = backfills.iter().map(|b| b.id.to_string()).collect();
    let detail = serde_json::json!({ "backfills": ids, "jobs": queued });
    audit::record(&mut *tx, by, AuditAction::ClickhouseBackfill, "clickhouse", detail).await?;
    tx.commit().await?;
    if let Err(err) = queue(jobs, &queued).await {
        tracing::warn!(%err, "backfill jobs committed but not pushed yet; the relay will");
    }
    Ok(backfills)
}

/// Pushes committed first-chunk jobs to their queue.
pub async fn queue(jobs: &Jobs, job_ids: &[NewJob]) -> Result<(), StoreError> {
    jobs.relay_now(job_ids).await
}

/// A backfill of every row of both tables, as `sessiond clickhouse backfill`
/// starts without flags.
pub fn full() -> BackfillRequest {
    BackfillRequest { tables: vec![Table::Sessions, Table::Runs], from: None, to: None, chunk_size: DEFAULT_CHUNK_SIZE }
}

/// Copies chunk number `chunk` of backfill `id` (the `backfill` job).
pub async fn run_chunk(
    pool: &PgPool,
    ch: &ClickHouse,
    jobs: &Jobs,
    id: Uuid,
    chunk: i32,
    faults: Faults,
) -> Result<String, BackfillError> {
    let Some(b) = store::find(pool, id).await? else {
        return Ok(format!("backfill {id} does not exist"));
    };
    if b.status != BackfillStatus::Running || b.chunks_done != chunk {
        // Delivered again after it was recorded, or the backfill is over.
        return Ok(format!("chunk {chunk} of backfill {id} already recorded"));
    }
    held(ch.database()).await;
    let limit = i64::from(b.chunk_size);
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    let version = session_store::current_wal_lsn(&mut conn).await?;
    let (copied, last) = match b.target {
        Table::Sessions => {
            let rows = session_store::export_chunk(&mut conn, b.cursor(), b.created_from, b.created_to, limit).await?;
            drop(conn);
            faults.pause().await;
            let last = rows.last().map(|s| (s.created_at, s.id));
            let copy: Vec<SessionRow> = rows.iter().map(|s| SessionRow::from_session(s, version)).collect();
            ch.insert_rows("sessions_v1", &copy).await?;
            (rows.len(), last)
        }
        Table::Runs => {
            let rows = run_store::export_chunk(&mut conn, b.cursor(), b.created_from, b.created_to, limit).await?;
            drop(conn);
            faults.pause().await;
            let last = rows.last().map(|r| (r.created_at, r.id));
            let copy: Vec<RunRow> = rows.iter().map(|r| RunRow::from_run(r, version)).collect();
            ch.insert_rows("task_runs_v1", &copy).await?;
            (rows.len(), last)
        }
    };
    let finished = (copied as i64) < limit;
    if finished && b.is_full() {
        // Every chunk read after `started_at`, so everything committed before
        // it is now in ClickHouse. Set before the chunk is recorded: if the
        // record fails, the claim is already true.
        watermark::advance(ch, b.target, b.started_at, version, watermark::Source::Backfill).await?;
    }
    if faults.stop_before_commit() {
        return Err(BackfillError::Injected);
    }
    let mut tx = crate::db::begin(pool).await.map_err(StoreError::from)?;
    let Some(recorded) = store::record_chunk(&mut tx, id, chunk, last, copied as i64, finished).await? else {
        return Ok(format!("chunk {chunk} of backfill {id} was recorded meanwhile"));
    };
    let next = if finished {
        None
    } else {
        let job = BackfillChunk { backfill_id: id, chunk: chunk + 1 };
        Some(jobs::store::insert(&mut *tx, &job, jobs::DEFAULT_MAX_ATTEMPTS).await?)
    };
    tx.commit().await.map_err(StoreError::from)?;
    if let Some(job) = next {
        jobs.relay(&[job]).await;
    }
    Ok(format!(
        "backfill {id} ({}): chunk {chunk} copied {copied} rows ({} in all){}",
        b.target.as_str(),
        recorded.rows_copied,
        if finished { ", finished" } else { "" }
    ))
}

/// Held chunks per ClickHouse database (see [`hold_chunks`]).
type Holds = std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>>>;

fn holds() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>>> {
    static HOLDS: std::sync::OnceLock<Holds> = std::sync::OnceLock::new();
    HOLDS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// A test seam: while the returned hold lives, every chunk of a backfill into
/// ClickHouse database `database` waits before it reads anything, so a test
/// keeps a backfill running (a healing slot's window) for as long as it needs,
/// however fast the machine. Keyed by database, so tests sharing the process
/// hold only their own backfills; a server never takes one.
pub fn hold_chunks(database: &str) -> ChunkHold {
    let (tx, rx) = tokio::sync::watch::channel(false);
    holds().insert(database.to_string(), rx);
    ChunkHold { database: database.to_string(), _release: tx }
}

/// Releases the held chunks when dropped.
pub struct ChunkHold {
    database: String,
    _release: tokio::sync::watch::Sender<bool>,
}

impl Drop for ChunkHold {
    fn drop(&mut self) {
        holds().remove(&self.database);
        // Dropping the sender wakes the waiting chunks.
    }
}

async fn held(database: &str) {
    let hold = holds().get(database).cloned();
    if let Some(mut hold) = hold {
        tracing::info!(database, "backfill chunk held by a test");
        // Ends with an error once the hold's sender is dropped: released.
        let _ = hold.changed().await;
    }
}
