//! The environments page (ids, slugs, key hints, never keys) and the
//! operator's key rotation: the new key is shown once, on the response to
//! the POST (not in a URL, not in the audit row, never cached), and the old
//! one stops working once servers' key caches expire (`AUTH_CACHE_TTL_MS`).
//!
//! Also each environment's request-rate limits, class by class (the server's
//! default or the environment's own), which an operator may change: the new
//! limits and their audit row commit together.

use std::collections::HashMap;

use super::error::Form;
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use sqlx::PgPool;
use uuid::Uuid;

use super::auth::{csrf_token, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{env_label, iso, render, Frame};
use super::OpsSettings;
use crate::audit::Actor;
use crate::auth::Authenticator;
use crate::limits::overrides::{self, Effective};
use crate::limits::{store as limits_store, RateLimits, RouteClass};
use crate::tenancy::rotation::{self, RotateError};
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

/// One environment's limits, as the page shows (and edits) them.
pub struct LimitsRow {
    pub id: String,
    pub label: String,
    pub cells: Vec<LimitCell>,
}

pub struct LimitCell {
    pub class: &'static str,
    pub title: &'static str,
    /// Requests per second in force; 0: none.
    pub per_second: u32,
    pub overridden: bool,
    /// The server's default, shown beside an override and as the field's hint.
    pub default: u32,
}

impl LimitCell {
    fn of(e: Effective, default: u32) -> Self {
        LimitCell {
            class: e.class.as_str(),
            title: class_title(e.class),
            per_second: e.per_second,
            overridden: e.overridden,
            default,
        }
    }
}

/// The column heads: the API's names for the route classes.
fn class_title(class: RouteClass) -> &'static str {
    match class {
        RouteClass::Create => "Create",
        RouteClass::Append => "Append",
        RouteClass::Subscribe => "SSE connect",
        RouteClass::List => "List",
        RouteClass::Mint => "Token mint",
    }
}

#[derive(Template)]
#[template(path = "dashboard/environments.html")]
struct EnvironmentsPage {
    frame: Frame,
    rows: Vec<EnvRow>,
    cache_secs: f64,
    limits: Vec<LimitsRow>,
    columns: Vec<&'static str>,
    limits_on: bool,
    refresh_secs: u64,
    max_per_second: u32,
    notice: Option<String>,
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    /// The environment whose limits were just saved (the notice's subject).
    #[serde(default)]
    saved: Option<String>,
}

pub async fn list(
    State(db): State<PgPool>,
    State(ops): State<OpsSettings>,
    State(limits): State<RateLimits>,
    Query(query): Query<ListQuery>,
    signed: Signed,
) -> PageResult<Response> {
    let envs = tenancy_store::list(&db).await?;
    let mut own: HashMap<Uuid, HashMap<RouteClass, u32>> = HashMap::new();
    for o in limits_store::all(&db).await? {
        own.entry(o.environment_id).or_default().insert(o.class, o.per_second);
    }
    let settings = limits.settings();
    let limit_rows = envs
        .iter()
        .map(|e| LimitsRow {
            id: e.id.to_string(),
            label: env_label(e),
            cells: overrides::effective(&settings, own.get(&e.id).unwrap_or(&HashMap::new()))
                .into_iter()
                .map(|eff| LimitCell::of(eff, settings.per_env(eff.class)))
                .collect(),
        })
        .collect();
    let notice = query.saved.and_then(|id| envs.iter().find(|e| e.id.to_string() == id)).map(|e| {
        format!(
            "Rate limits of {} saved: this server applies them now, every other within {} s.",
            env_label(e),
            overrides::REFRESH.as_secs()
        )
    });
    render(EnvironmentsPage {
        frame: Frame::new(&signed, "environments"),
        rows: envs.iter().map(EnvRow::of).collect(),
        cache_secs: ops.auth_cache_ttl_ms as f64 / 1000.0,
        limits: limit_rows,
        columns: RouteClass::ALL.into_iter().map(class_title).collect(),
        limits_on: settings.enabled,
        refresh_secs: overrides::REFRESH.as_secs(),
        max_per_second: overrides::MAX_PER_SECOND,
        notice,
    })
}

/// Sets an environment's limits as an operator. The form has a field per
/// class it changes (a number, or blank or `default` for the server's
/// default); a bad field refuses the whole form. See [`overrides::set_by`].
pub async fn set_limits(
    State(db): State<PgPool>,
    State(limits): State<RateLimits>,
    Path(env): Path<String>,
    signed: Signed,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> PageResult<Response> {
    let csrf = fields.iter().find(|(name, _)| name == "csrf").map(|(_, v)| v.as_str());
    signed.authorize_action(csrf_token(csrf, &headers))?;
    let id = Uuid::parse_str(&env).map_err(|_| DashboardError::BadRequest("Not an environment id".into()))?;
    let changes = overrides::parse_changes(
        fields.iter().filter(|(name, _)| name != "csrf").map(|(n, v)| (n.as_str(), v.as_str())),
    )
    .map_err(|err| DashboardError::BadRequest(format!("Nothing changed: {err}.")))?;
    let by = Actor::Operator(signed.operator.id);
    if !overrides::set_by(&db, &limits, &by, id, changes).await? {
        return Err(DashboardError::NotFound(format!("No environment {id}")));
    }
    tracing::info!(operator = %signed.operator.email, environment = %id, "operator set an environment's rate limits");
    Ok(Redirect::to(&format!("/dashboard/environments?saved={id}#rate-limits")).into_response())
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
    let by = Actor::Operator(signed.operator.id);
    let key = match rotation::rotate(&db, auth.master_key(), &by, id, Some(form.hint.as_str())).await {
        Ok(key) => key,
        Err(RotateError::Stale) => {
            return Err(DashboardError::Conflict(
                "This key was rotated since the page was loaded (a resubmitted form?); nothing changed. \
                 Open Environments again to rotate the current key."
                    .into(),
            ))
        }
        Err(RotateError::NotFound(_)) => return Err(DashboardError::NotFound(format!("No environment {id}"))),
        Err(RotateError::Store(e)) => return Err(e.into()),
    };
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
