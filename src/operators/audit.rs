//! SQL that owns `audit_log`: one row per operator action, written with the
//! action's own statements in one transaction, so an action and its record
//! stand or fall together.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::db::StoreError;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: Uuid,
    pub operator_id: Uuid,
    pub operator_email: String,
    pub action: String,
    pub target: String,
    pub detail: Value,
    pub created_at: DateTime<Utc>,
}

pub async fn record(
    conn: impl PgExecutor<'_>,
    operator: Uuid,
    action: &str,
    target: &str,
    detail: Value,
) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO audit_log (id, operator_id, action, target, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(operator)
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(id)
}

/// A page of the log, newest first, after the `(created_at, id)` cursor.
pub async fn page(
    pool: &PgPool,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<AuditEntry>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT a.id, a.operator_id, o.email AS operator_email, a.action, a.target, a.detail, a.created_at
         FROM audit_log a JOIN operators o ON o.id = a.operator_id
         WHERE ($1::timestamptz IS NULL OR (a.created_at, a.id) < ($1, $2))
         ORDER BY a.created_at DESC, a.id DESC LIMIT $3",
    )
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
