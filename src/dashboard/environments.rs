//! The environments page (ids, slugs, key hints, never keys) and the
//! operator's key rotation: the new key is shown once, on the response to
//! the POST (not in a URL, not in the audit row, never cached), and the old
//! one stops working once servers' key caches expire (`AUTH_CACHE_TTL_MS`).

use super::error::Form;
use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::auth::{csrf_token, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{env_label, iso, render, Frame};
use super::OpsSettings;
use crate::audit::{self, Actor, AuditAction};
use crate::auth::Authenticator;
use crate::db::StoreError;
use crate::tenancy::keys;
use crate::tenancy::store::{self as tenancy_store, EnvListing};

pub struct EnvRow {
    pub id: String,
    pub organization: String,
    pub project: String,
    pub env_type: String,
    pub key_hint: String,
    pub created_at: String,
    pub rotated_at: Option<String>,
}

impl EnvRow {
    fn of(e: &EnvListing) -> Self {
        EnvRow {
            id: e.id.to_string(),
            organization: e.organization.clone(),
            project: e.project.clone(),
            env_type: e.env_type.clone(),
            key_hint: e.api_key_hint.clone(),
            created_at: iso(&e.created_at),
            rotated_at: e.key_rotated_at.as_ref().map(iso),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/environments.html")]
struct EnvironmentsPage {
    frame: Frame,
    rows: Vec<EnvRow>,
    cache_secs: f64,
}

pub async fn list(State(db): State<PgPool>, State(ops): State<OpsSettings>, signed: Signed) -> PageResult<Response> {
    let rows = tenancy_store::list(&db).await?.iter().map(EnvRow::of).collect();
    render(EnvironmentsPage {
        frame: Frame::new(&signed, "environments"),
        rows,
        cache_secs: ops.auth_cache_ttl_ms as f64 / 1000.0,
    })
}

#[derive(Template)]
#[template(path = "dashboard/key_rotated.html")]
struct KeyRotatedPage {
    frame: Frame,
    label: String,
    env: String,
    key: String,
    cache_secs: f64,
}

#[derive(serde::Deserialize)]
pub struct RotateForm {
    csrf: Option<String>,
    /// The hint of the key the operator saw: a resubmitted form (a reload of
    /// the page that showed the new key) finds another key and rotates nothing.
    #[serde(default)]
    hint: String,
}

/// Rotates an environment's key as an operator: the new key and the audit
/// row (which names the key's hint, never the key) commit together.
pub async fn rotate_key(
    State(db): State<PgPool>,
    State(auth): State<Authenticator>,
    State(ops): State<OpsSettings>,
    Path(env): Path<String>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<RotateForm>,
) -> PageResult<Response> {
    signed.authorize_action(csrf_token(form.csrf.as_deref(), &headers))?;
    let id = Uuid::parse_str(&env).map_err(|_| DashboardError::BadRequest("Not an environment id".into()))?;
    let listing = tenancy_store::list(&db).await?;
    let e =
        listing.iter().find(|e| e.id == id).ok_or_else(|| DashboardError::NotFound(format!("No environment {id}")))?;
    let mut tx = crate::db::begin(&db).await.map_err(StoreError::from)?;
    if tenancy_store::lock_key_hint(&mut tx, id).await?.as_deref() != Some(form.hint.as_str()) {
        return Err(DashboardError::Conflict(
            "This key was rotated since the page was loaded (a resubmitted form?); nothing changed. \
             Open Environments again to rotate the current key."
                .into(),
        ));
    }
    let key = tenancy_store::rotate_key_in(&mut tx, auth.master_key(), id)
        .await?
        .ok_or_else(|| DashboardError::NotFound(format!("No environment {id}")))?;
    let hint = keys::hint(&key);
    audit::record(
        &mut *tx,
        &Actor::Operator(signed.operator.id),
        AuditAction::EnvironmentRotateKey,
        &format!("environment:{id}"),
        json!({ "hint": hint }),
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    tracing::info!(operator = %signed.operator.email, environment = %id, "operator rotated an environment's key");
    let mut resp = render(KeyRotatedPage {
        frame: Frame::new(&signed, "environments"),
        label: env_label(e),
        env: id.to_string(),
        key: key.expose().to_string(),
        cache_secs: ops.auth_cache_ttl_ms as f64 / 1000.0,
    })?;
    // The only copy: not in history, not in any cache.
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(resp)
}
