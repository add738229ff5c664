//! SQL for the publication and the logical slot replication reads through,
//! and for the slot's generations. One publication and one slot per
//! deployment (named by `REPLICATION_SLOT`), created if missing. A slot is
//! created at the WAL position of its creation: changes committed before it
//! never reach the stream, so a new slot (a first start, or one lost and
//! recreated) starts a new generation whose copy is incomplete until a full
//! backfill that started after the slot has completed (see
//! [`copy_incomplete`]).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::analytics::watermark::Table;
use crate::db::StoreError;

/// `pg_replication_slots.wal_status`: whether the WAL the slot needs is
/// still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum WalStatus {
    /// Within `max_wal_size`.
    Reserved,
    /// Beyond `max_wal_size`, kept for the slot within its bound.
    Extended,
    /// Beyond `max_slot_wal_keep_size`: the next checkpoint may remove it.
    Unreserved,
    /// Removed: the slot can never stream again and must be recreated.
    Lost,
}

impl WalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WalStatus::Reserved => "reserved",
            WalStatus::Extended => "extended",
            WalStatus::Unreserved => "unreserved",
            WalStatus::Lost => "lost",
        }
    }
}

/// Where a slot stands, as Postgres reports it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct SlotStatus {
    pub slot_name: String,
    pub active: bool,
    /// Text LSNs (`X/Y`); null until the slot has confirmed anything.
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub wal_status: Option<WalStatus>,
    /// Bytes of WAL the slot keeps from being recycled (null once lost).
    pub retained_wal_bytes: Option<i64>,
    /// Bytes of WAL that may still be written before the slot is in danger
    /// of losing what it needs (`safe_wal_size`; null without a bound).
    pub safe_wal_size: Option<i64>,
    /// Bytes between the server's current WAL position and the slot's
    /// confirmed one: how far behind replication is.
    pub lag_bytes: Option<i64>,
}

impl SlotStatus {
    pub fn lost(&self) -> bool {
        self.wal_status == Some(WalStatus::Lost)
    }
}

/// Makes sure the publication (of this schema's `sessions` and `task_runs`)
/// and the slot exist. Returns whether the slot was created now.
///
/// A slot is created inside a new generation: the generation is begun (the
/// copy counts as incomplete) and committed before the slot exists, so no
/// flush of the new slot can move the watermark before a reader can see that
/// the copy is incomplete; and the slot's creation time is stamped after it
/// exists, so only a backfill that started later can complete the copy.
pub async fn ensure(pool: &PgPool, name: &str, schema: &str) -> Result<bool, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
        .bind(name)
        .fetch_one(pool)
        .await?;
    if !exists {
        // Identifiers cannot be bound; both are quoted (and the name checked
        // by the caller's configuration).
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {schema}.sessions, {schema}.task_runs
             WITH (publish = 'insert, update, delete, truncate')",
            quote(name),
            schema = quote(schema)
        );
        sqlx::query(&sql).execute(pool).await?;
    }
    let slot: Option<bool> = sqlx::query_scalar("SELECT true FROM pg_replication_slots WHERE slot_name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    if slot.is_some() {
        // A process that died between creating the slot and stamping it.
        stamp_created(pool, name, true).await?;
        return Ok(false);
    }
    begin_generation(pool, name).await?;
    // (Not in the generation's transaction: Postgres refuses to create a
    // logical slot in a transaction that has written.)
    let created =
        match sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')").bind(name).execute(pool).await {
            Ok(_) => true,
            // Another process created it between our check and now.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => false,
            Err(e) => return Err(e.into()),
        };
    stamp_created(pool, name, false).await?;
    Ok(created)
}

/// Starts a new generation of `slot`: from now on its copy is incomplete.
async fn begin_generation(pool: &PgPool, slot: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO replication_state (slot, slot_generation, generation_started_at) VALUES ($1, 1, now())
         ON CONFLICT (slot) DO UPDATE SET slot_generation = replication_state.slot_generation + 1,
             generation_started_at = now(), slot_created_at = NULL",
    )
    .bind(slot)
    .execute(pool)
    .await?;
    Ok(())
}

/// Notes that the current generation's slot exists (now, which is no earlier
/// than its creation). `only_if_missing`: leave a stamp already there.
async fn stamp_created(pool: &PgPool, slot: &str, only_if_missing: bool) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE replication_state SET slot_created_at = now()
         WHERE slot = $1 AND generation_started_at IS NOT NULL AND (NOT $2 OR slot_created_at IS NULL)",
    )
    .bind(slot)
    .bind(only_if_missing)
    .execute(pool)
    .await?;
    Ok(())
}

/// The tables whose copy a full backfill of a table completes, as stored.
const TABLES: &str = "(VALUES ('sessions'), ('runs')) t(target)";

/// A table's copy is incomplete while its slot's generation has begun and no
/// full backfill of it that started at or after the slot's creation has
/// completed (before the slot is stamped, none can have).
const INCOMPLETE: &str = "s.generation_started_at IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM clickhouse_backfills b
        WHERE b.target = t.target AND b.status = 'completed' AND b.created_from IS NULL AND b.created_to IS NULL
          AND b.started_at >= s.slot_created_at)";

/// Whether `table`'s copy misses what some slot generation did not stream
/// (any slot of this schema: they share one copy). While it does, the
/// watermark vouches for nothing and the list answers from Postgres.
pub async fn copy_incomplete(pool: &PgPool, table: Table) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM replication_state s, {TABLES} WHERE t.target = $1 AND {INCOMPLETE})"
    ))
    .bind(table)
    .fetch_one(pool)
    .await?)
}

/// The current generation of `slot` and how far its copy is.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Generation {
    pub generation: i64,
    pub started_at: Option<DateTime<Utc>>,
    pub slot_created_at: Option<DateTime<Utc>>,
    /// Tables the generation's backfill has yet to complete: while `sessions`
    /// is among them, lists answer from Postgres.
    #[sqlx(skip)]
    pub incomplete: Vec<Table>,
}

/// The generation of `slot` (None: never recorded, e.g. replication never ran).
pub async fn generation(pool: &PgPool, slot: &str) -> Result<Option<Generation>, StoreError> {
    let found: Option<Generation> = sqlx::query_as(
        "SELECT slot_generation AS generation, generation_started_at AS started_at, slot_created_at
         FROM replication_state WHERE slot = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    let Some(mut generation) = found else { return Ok(None) };
    generation.incomplete = sqlx::query_scalar(&format!(
        "SELECT t.target FROM replication_state s, {TABLES} WHERE s.slot = $1 AND {INCOMPLETE} ORDER BY t.target DESC"
    ))
    .bind(slot)
    .fetch_all(pool)
    .await?;
    Ok(Some(generation))
}

/// Tables of `slot`'s current generation that are incomplete with no full
/// backfill running or done since the slot was created: the slot was created
/// but the process died before starting the backfill, or an operator canceled
/// it. The consumer starts one for them.
pub async fn backfill_needed(pool: &PgPool, slot: &str) -> Result<Vec<Table>, StoreError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT t.target FROM replication_state s, {TABLES}
         WHERE s.slot = $1 AND s.slot_created_at IS NOT NULL AND {INCOMPLETE}
           AND NOT EXISTS (SELECT 1 FROM clickhouse_backfills b
                           WHERE b.target = t.target AND b.status = 'running' AND b.created_from IS NULL
                             AND b.created_to IS NULL AND b.started_at >= s.slot_created_at)
         ORDER BY t.target DESC"
    ))
    .bind(slot)
    .fetch_all(pool)
    .await?)
}

/// The slot's status, or None if it does not exist.
pub async fn status(pool: &PgPool, name: &str) -> Result<Option<SlotStatus>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT slot_name::text, active, confirmed_flush_lsn::text, restart_lsn::text, wal_status, safe_wal_size,
                (pg_current_wal_lsn() - restart_lsn)::bigint AS retained_wal_bytes,
                (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

/// The server's `max_slot_wal_keep_size` in bytes: how much WAL a slot may
/// retain before Postgres invalidates it. None: unlimited (-1, the default),
/// when a stopped consumer lets WAL fill the disk.
pub async fn wal_bound(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    let bytes: i64 =
        sqlx::query_scalar("SELECT pg_size_bytes(current_setting('max_slot_wal_keep_size'))").fetch_one(pool).await?;
    Ok((bytes >= 0).then_some(bytes))
}

/// Drops a slot whose WAL is gone (`wal_status = lost`): it can never stream
/// again, and a new one must be created (and backfilled).
pub async fn drop_if_lost(pool: &PgPool, name: &str) -> Result<bool, StoreError> {
    let lost: Option<bool> = sqlx::query_scalar(
        "SELECT pg_drop_replication_slot(slot_name) IS NULL FROM pg_replication_slots
         WHERE slot_name = $1 AND wal_status = 'lost' AND NOT active",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(lost.is_some())
}

/// Drops the slot and the publication (tests, and operators retiring a
/// deployment).
pub async fn drop(pool: &PgPool, name: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    sqlx::query(&format!("DROP PUBLICATION IF EXISTS {}", quote(name))).execute(pool).await?;
    Ok(())
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
