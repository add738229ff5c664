//! SQL that owns `operators` and `operator_sessions`.

use sqlx::PgPool;
use uuid::Uuid;

use super::{Operator, Role};
use crate::db::StoreError;

const OPERATOR_COLUMNS: &str = "id, email, role, created_at";

pub async fn insert(pool: &PgPool, email: &str, password_hash: &str, role: Role) -> Result<Operator, StoreError> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO operators (id, email, password_hash, role) VALUES ($1, $2, $3, $4) RETURNING {OPERATOR_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(email)
    .bind(password_hash)
    .bind(role)
    .fetch_one(pool)
    .await?)
}

/// The operator with this (normalised) email and its password hash.
pub async fn find_with_hash(pool: &PgPool, email: &str) -> Result<Option<(Operator, String)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        operator: Operator,
        password_hash: String,
    }
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {OPERATOR_COLUMNS}, password_hash FROM operators WHERE email = $1"))
            .bind(email)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|r| (r.operator, r.password_hash)))
}

/// Opens a signed-in session for `hours`, its expiry set by Postgres' clock
/// (the one [`session`] judges it by); also drops expired ones (sign-ins are
/// rare, so this keeps the table small without a sweep).
pub async fn open_session(pool: &PgPool, operator: Uuid, csrf_token: &str, hours: i64) -> Result<Uuid, StoreError> {
    let id = Uuid::new_v4();
    sqlx::query("DELETE FROM operator_sessions WHERE expires_at < now()").execute(pool).await?;
    sqlx::query("INSERT INTO operator_sessions (id, operator_id, csrf_token, expires_at) VALUES ($1, $2, $3, now() + $4::bigint * interval '1 hour')",
    )
        .bind(id)
        .bind(operator)
        .bind(csrf_token)
        .bind(hours)
        .execute(pool)
        .await?;
    Ok(id)
}

/// A live session's operator and CSRF token.
pub async fn session(pool: &PgPool, id: Uuid) -> Result<Option<(Operator, String)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        operator: Operator,
        csrf_token: String,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT o.id, o.email, o.role, o.created_at, s.csrf_token
         FROM operator_sessions s JOIN operators o ON o.id = s.operator_id
         WHERE s.id = $1 AND s.expires_at > now()",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.operator, r.csrf_token)))
}

pub async fn close_session(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM operator_sessions WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}
