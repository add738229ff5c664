//! Rotating an environment's secret key, the one way: the dashboard and the
//! command line both go through [`rotate`], which replaces the key and writes
//! the audit row of whoever asked in one transaction.

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::keys::{self, MasterKey};
use super::store;
use super::SecretKey;
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("no environment {0}")]
    NotFound(Uuid),
    /// The key is no longer the one the caller saw (a resubmitted form).
    #[error("the key was rotated since it was read")]
    Stale,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replaces environment `env`'s key by `by`. With `expect_hint`, only if the
/// current key still has that hint (the row is locked from the check to the
/// commit, so a resubmitted form cannot rotate twice). The old key stops
/// working once the auth caches expire; the new one is returned once, here.
pub async fn rotate(
    db: &PgPool,
    master: &MasterKey,
    by: &Actor,
    env: Uuid,
    expect_hint: Option<&str>,
) -> Result<SecretKey, RotateError> {
    let mut tx = crate::db::begin(db).await.map_err(StoreError::from)?;
    let hint = store::lock_key_hint(&mut tx, env).await?.ok_or(RotateError::NotFound(env))?;
    if expect_hint.is_some_and(|expected| expected != hint) {
        return Err(RotateError::Stale);
    }
    let key = store::rotate_key_in(&mut tx, master, env).await?.ok_or(RotateError::NotFound(env))?;
    let detail = json!({ "hint": keys::hint(&key) });
    audit::record(&mut *tx, by, AuditAction::EnvironmentRotateKey, &format!("environment:{env}"), detail).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(key)
}
