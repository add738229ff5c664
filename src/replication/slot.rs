//! SQL for the publication and the logical slot replication reads through.
//! One of each per deployment (named by `REPLICATION_SLOT`), created if
//! missing. A slot is created at the WAL position of its creation: changes
//! committed before it never reach the stream, so a new slot (a first start,
//! or one lost and recreated) needs a full backfill.

use sqlx::PgPool;

use crate::db::StoreError;

/// Where a slot stands, as Postgres reports it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct SlotStatus {
    pub slot_name: String,
    pub active: bool,
    /// Text LSNs (`X/Y`); null until the slot has confirmed anything.
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost` (WAL it needs is gone).
    pub wal_status: Option<String>,
    /// Bytes of WAL the slot keeps from being recycled.
    pub retained_wal_bytes: Option<i64>,
    /// Bytes between the server's current WAL position and the slot's
    /// confirmed one: how far behind replication is.
    pub lag_bytes: Option<i64>,
}

/// Makes sure the publication (of this schema's `sessions` and `task_runs`)
/// and the slot exist. Returns whether the slot was created now.
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
    let slot: Option<String> = sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?
        .flatten();
    if slot.is_some() {
        return Ok(false);
    }
    match sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')").bind(name).execute(pool).await {
        Ok(_) => Ok(true),
        // Another process created it between our check and now.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The slot's status, or None if it does not exist.
pub async fn status(pool: &PgPool, name: &str) -> Result<Option<SlotStatus>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT slot_name::text, active, confirmed_flush_lsn::text, restart_lsn::text, wal_status,
                (pg_current_wal_lsn() - restart_lsn)::bigint AS retained_wal_bytes,
                (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?)
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
