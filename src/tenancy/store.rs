//! SQL for organizations, projects and environments.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::keys::{self, MasterKey};
use super::{EnvType, Environment, SecretKey};
use crate::db::StoreError;

#[derive(Debug, sqlx::FromRow)]
struct EnvRow {
    id: Uuid,
    organization_id: Uuid,
    project_id: Uuid,
    env_type: String,
    api_key_hash: Vec<u8>,
    api_key_sealed: Vec<u8>,
}

const ENV_COLUMNS: &str = "id, organization_id, project_id, env_type, api_key_hash, api_key_sealed";

fn open(master: &MasterKey, row: EnvRow) -> Result<Environment, StoreError> {
    let env_type = EnvType::parse(&row.env_type)
        .ok_or_else(|| StoreError::Corrupt(format!("environment {} has type {}", row.id, row.env_type)))?;
    let secret_key = master
        .unseal(row.id, &row.api_key_sealed)
        .map_err(|e| StoreError::Corrupt(format!("environment {}: {e}", row.id)))?;
    Ok(Environment {
        id: row.id,
        organization_id: row.organization_id,
        project_id: row.project_id,
        env_type,
        secret_key,
    })
}

/// Finds the environment whose secret key is `key`.
pub async fn find_by_key(pool: &PgPool, master: &MasterKey, key: &str) -> Result<Option<Environment>, StoreError> {
    let hash = keys::hash(key);
    let row: Option<EnvRow> =
        sqlx::query_as(&format!("SELECT {ENV_COLUMNS} FROM runtime_environments WHERE api_key_hash = $1"))
            .bind(&hash[..])
            .fetch_optional(pool)
            .await?;
    match row {
        // The index lookup already matched; the constant-time check keeps the
        // comparison itself free of early exits.
        Some(row) if keys::matches(key, &row.api_key_hash) => open(master, row).map(Some),
        _ => Ok(None),
    }
}

pub async fn find_by_id(pool: &PgPool, master: &MasterKey, id: Uuid) -> Result<Option<Environment>, StoreError> {
    let row: Option<EnvRow> = sqlx::query_as(&format!("SELECT {ENV_COLUMNS} FROM runtime_environments WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| open(master, r)).transpose()
}

/// Creates (or reuses) the organization and project by slug and creates the
/// environment with a fresh key. Returns the environment and its key, shown once.
pub async fn create_environment(
    pool: &PgPool,
    master: &MasterKey,
    org_slug: &str,
    project_slug: &str,
    env_type: EnvType,
) -> Result<(Environment, SecretKey), StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let org_id: Uuid = sqlx::query_scalar(
        "INSERT INTO organizations (id, slug, title) VALUES ($1, $2, $2)
         ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(org_slug)
    .fetch_one(&mut *tx)
    .await?;
    let project_id: Uuid = sqlx::query_scalar(
        "INSERT INTO projects (id, organization_id, slug, name) VALUES ($1, $2, $3, $3)
         ON CONFLICT (organization_id, slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(org_id)
    .bind(project_slug)
    .fetch_one(&mut *tx)
    .await?;
    let env_id = Uuid::now_v7();
    let key = keys::generate(env_type);
    sqlx::query(
        "INSERT INTO runtime_environments
           (id, organization_id, project_id, env_type, api_key_hash, api_key_sealed, api_key_hint)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(env_id)
    .bind(org_id)
    .bind(project_id)
    .bind(env_type.as_str())
    .bind(&keys::hash(key.expose())[..])
    .bind(master.seal(env_id, &key))
    .bind(keys::hint(&key))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let env = Environment { id: env_id, organization_id: org_id, project_id, env_type, secret_key: key.clone() };
    Ok((env, key))
}

/// The hint of an environment's current key, the row locked until the
/// caller's transaction ends (a rotation that must replace exactly the key
/// the operator saw).
pub async fn lock_key_hint(conn: &mut sqlx::PgConnection, env_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT api_key_hint FROM runtime_environments WHERE id = $1 FOR UPDATE")
        .bind(env_id)
        .fetch_optional(conn)
        .await?)
}

/// Replaces an environment's key on the caller's transaction (the rotation
/// commits with its audit row; see `tenancy::rotation`). Locks the row, so
/// two rotations at once end with the later key. None if there is no such
/// environment.
pub async fn rotate_key_in(
    conn: &mut sqlx::PgConnection,
    master: &MasterKey,
    env_id: Uuid,
) -> Result<Option<SecretKey>, StoreError> {
    let env_type: Option<String> =
        sqlx::query_scalar("SELECT env_type FROM runtime_environments WHERE id = $1 FOR UPDATE")
            .bind(env_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(env_type) = env_type.as_deref().and_then(EnvType::parse) else {
        return Ok(None);
    };
    let key = keys::generate(env_type);
    sqlx::query(
        "UPDATE runtime_environments
         SET api_key_hash = $2, api_key_sealed = $3, api_key_hint = $4, key_rotated_at = now()
         WHERE id = $1",
    )
    .bind(env_id)
    .bind(&keys::hash(key.expose())[..])
    .bind(master.seal(env_id, &key))
    .bind(keys::hint(&key))
    .execute(&mut *conn)
    .await?;
    Ok(Some(key))
}

#[derive(Debug, sqlx::FromRow)]
pub struct EnvListing {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub organization: String,
    pub project: String,
    pub env_type: String,
    pub api_key_hint: String,
    pub created_at: DateTime<Utc>,
    pub key_rotated_at: Option<DateTime<Utc>>,
}

pub async fn list(pool: &PgPool) -> Result<Vec<EnvListing>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT e.id, e.organization_id, e.project_id, o.slug AS organization, p.slug AS project, e.env_type,
                e.api_key_hint,
                e.created_at, e.key_rotated_at
         FROM runtime_environments e
         JOIN projects p ON p.id = e.project_id
         JOIN organizations o ON o.id = e.organization_id
         ORDER BY o.slug, p.slug, e.env_type",
    )
    .fetch_all(pool)
    .await?)
}

/// The environment for (org, project, type), with its key unsealed, if it exists.
pub async fn find_by_slugs(
    pool: &PgPool,
    master: &MasterKey,
    org_slug: &str,
    project_slug: &str,
    env_type: EnvType,
) -> Result<Option<Environment>, StoreError> {
    let row: Option<EnvRow> = sqlx::query_as(&format!(
        "SELECT {cols} FROM runtime_environments e
         WHERE e.env_type = $3 AND e.project_id = (
           SELECT p.id FROM projects p JOIN organizations o ON o.id = p.organization_id
           WHERE o.slug = $1 AND p.slug = $2)",
        cols = ENV_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ")
    ))
    .bind(org_slug)
    .bind(project_slug)
    .bind(env_type.as_str())
    .fetch_optional(pool)
    .await?;
    row.map(|r| open(master, r)).transpose()
}
