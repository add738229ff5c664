//! SQL that owns `clickhouse_backfills`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::analytics::watermark::Table;
use crate::db::paging::Keyset;
use crate::db::StoreError;

/// Where a backfill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum BackfillStatus {
    Running,
    Completed,
    Canceled,
}

impl BackfillStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackfillStatus::Running => "running",
            BackfillStatus::Completed => "completed",
            BackfillStatus::Canceled => "canceled",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Backfill {
    pub id: Uuid,
    pub target: Table,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub chunk_size: i32,
    pub status: BackfillStatus,
    pub cursor_created_at: Option<DateTime<Utc>>,
    pub cursor_id: Option<Uuid>,
    pub chunks_done: i32,
    pub rows_copied: i64,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Backfill {
    pub fn cursor(&self) -> Option<(DateTime<Utc>, Uuid)> {
        self.cursor_created_at.zip(self.cursor_id)
    }

    /// A backfill of the whole table (no created_at range) vouches for
    /// everything committed before it started.
    pub fn is_full(&self) -> bool {
        self.created_from.is_none() && self.created_to.is_none()
    }
}

const COLUMNS: &str = "id, target, created_from, created_to, chunk_size, status, cursor_created_at, cursor_id, \
     chunks_done, rows_copied, started_at, updated_at, completed_at";

pub async fn insert(
    conn: &mut PgConnection,
    target: Table,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    chunk_size: i32,
) -> Result<Backfill, StoreError> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO clickhouse_backfills (id, target, created_from, created_to, chunk_size)
         VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(target)
    .bind(from)
    .bind(to)
    .bind(chunk_size)
    .fetch_one(conn)
    .await?)
}

pub async fn find(conn: impl sqlx::PgExecutor<'_>, id: Uuid) -> Result<Option<Backfill>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM clickhouse_backfills WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<Backfill>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM clickhouse_backfills ORDER BY started_at DESC LIMIT $1"))
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// A page of backfills, newest started first, at `at` (up to `limit` rows;
/// see [`Keyset`], here on `started_at`: a full backfill starts its two rows
/// in one transaction, so the id breaks the tie).
pub async fn page(pool: &PgPool, at: Keyset, limit: i64) -> Result<Vec<Backfill>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM clickhouse_backfills WHERE true"));
    let order = match at {
        Keyset::Newest => "DESC",
        Keyset::Older(t, id) => {
            b.push(" AND (started_at, id) < (").push_bind(t).push(", ").push_bind(id).push(")");
            "DESC"
        }
        Keyset::Newer(t, id) => {
            b.push(" AND (started_at, id) > (").push_bind(t).push(", ").push_bind(id).push(")");
            "ASC"
        }
    };
    b.push(format!(" ORDER BY started_at {order}, id {order} LIMIT ")).push_bind(limit.max(1));
    Ok(b.build_query_as().fetch_all(pool).await?)
}

/// Whether any backfill is still running (the start button warns of it).
pub async fn any_running(pool: &PgPool) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM clickhouse_backfills WHERE status = 'running')")
        .fetch_one(pool)
        .await?)
}

/// Records chunk number `chunk` as copied, moving the cursor. Conditional on
/// the chunk being the next one, so a chunk delivered twice moves nothing:
/// returns the updated row, or None if this chunk was already recorded.
pub async fn record_chunk(
    conn: &mut PgConnection,
    id: Uuid,
    chunk: i32,
    cursor: Option<(DateTime<Utc>, Uuid)>,
    rows: i64,
    finished: bool,
) -> Result<Option<Backfill>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE clickhouse_backfills SET
            cursor_created_at = coalesce($3, cursor_created_at), cursor_id = coalesce($4, cursor_id),
            chunks_done = chunks_done + 1, rows_copied = rows_copied + $5, updated_at = now(),
            status = CASE WHEN $6 THEN 'completed' ELSE status END,
            completed_at = CASE WHEN $6 THEN now() ELSE completed_at END
         WHERE id = $1 AND chunks_done = $2 AND status = 'running'
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(chunk)
    .bind(cursor.map(|c| c.0))
    .bind(cursor.map(|c| c.1))
    .bind(rows)
    .bind(finished)
    .fetch_optional(conn)
    .await?)
}

/// Whether a running backfill of `target` already covers [`from`, `to`] (a
/// full one covers everything).
pub async fn running_covers(
    pool: &PgPool,
    target: Table,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM clickhouse_backfills WHERE target = $1 AND status = 'running'
                          AND (created_from IS NULL OR created_from <= $2) AND (created_to IS NULL OR created_to >= $3))",
    )
    .bind(target)
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await?)
}

/// Jobs of running backfills' chunks that used every attempt (ClickHouse was
/// away for longer than their retries): replication retries them, since a
/// backfill that stops half way never finishes on its own.
pub async fn failed_chunk_jobs(pool: &PgPool) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT j.id FROM jobs j
         JOIN clickhouse_backfills b ON b.id = (j.payload->>'backfill_id')::uuid AND b.status = 'running'
         WHERE j.kind = 'backfill' AND j.status = 'failed'",
    )
    .fetch_all(pool)
    .await?)
}
