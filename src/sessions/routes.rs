//! Control-plane handlers. Each reads as its list of hops: authenticate, validate,
//! resolve and authorize, call the store, shape the answer.

use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::handler::Handler;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use std::sync::Arc;

use sqlx::PgPool;

use super::access;
use super::close::SessionCloser;
use super::list::{EnvScope, ListQuery, SessionListRepository};

/// Names the store that served a list (`clickhouse` or `postgres`), so tests
/// and operators can tell a degraded answer.
pub const LIST_SOURCE_HEADER: &str = "x-sessiond-list-source";
use super::model::{Session, SessionItem};
use super::run_manager::{Ensured, RunManager};
use super::store::{self, CreateOutcome, UpdateError};
use super::validate::{self, CloseSessionBody, CreateSessionBody, EndAndContinueBody, UpdateSessionBody};
use crate::app::AppState;
use crate::auth::{jwt, Action, Auth};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, PathId};
use crate::jobs::Jobs;
use crate::limits::{Limits, RouteClass};

/// Create's body limit, as upstream's: only metadata grows, and 32 KB is plenty
/// (the other routes keep `MAX_BODY_BYTES`).
pub const CREATE_MAX_BODY_BYTES: usize = 32 * 1024;
/// Update's body limit, the same as create's: what a PATCH writes (tags,
/// metadata, externalId) is served in every list page that shows the
/// session, so a browser's token must not grow it past what create allows.
pub const UPDATE_MAX_BODY_BYTES: usize = CREATE_MAX_BODY_BYTES;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sessions", post(create).layer(DefaultBodyLimit::max(CREATE_MAX_BODY_BYTES)).get(list))
        .route(
            "/api/v1/sessions/{session}",
            get(retrieve).patch(update.layer(DefaultBodyLimit::max(UPDATE_MAX_BODY_BYTES))),
        )
        .route("/api/v1/sessions/{session}/close", post(close))
        .route("/api/v1/sessions/{session}/end-and-continue", post(end_and_continue))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreatedSession {
    #[serde(flatten)]
    session: SessionItem,
    run_id: String,
    public_access_token: String,
    is_cached: bool,
}

async fn create(
    State(db): State<PgPool>,
    State(jobs): State<Jobs>,
    State(runs): State<RunManager>,
    auth: Auth,
    limits: Limits,
    ApiJson(body): ApiJson<CreateSessionBody>,
) -> ApiResult<(StatusCode, Json<CreatedSession>)> {
    auth.require_secret_key()?;
    limits.admit(&auth, RouteClass::Create).await?;
    let new = validate::create(body)?;
    let (mut session, status, is_cached) = match store::create(&db, &auth.env, &new).await? {
        CreateOutcome::Created(s, job) => {
            jobs.relay(&[job]).await;
            (s, StatusCode::CREATED, false)
        }
        CreateOutcome::Cached(s) => (s, StatusCode::OK, true),
        CreateOutcome::Closed => {
            return Err(ApiError::Conflict(
                "A closed session already uses this externalId; closing is final, use a new externalId".into(),
            ))
        }
        CreateOutcome::ExpiryPast => {
            return Err(crate::validation::ValidationError::new("expiresAt", "must be in the future").into())
        }
        CreateOutcome::Expired => {
            return Err(ApiError::Conflict(
                "An expired session already uses this externalId; expiry is final, use a new externalId".into(),
            ))
        }
    };
    if is_cached {
        // A cached session whose run has ended gets a continuation, so the
        // caller always leaves with a live run.
        let ensured = runs.ensure_run(auth.env.id, session.id).await?;
        if let Ensured::Triggered(_) = ensured {
            session = store::find_by_id(&db, auth.env.id, session.id)
                .await?
                .ok_or_else(|| ApiError::NotFound("Session not found".into()))?;
        }
    }
    let run_id = session
        .current_run_friendly_id
        .clone()
        .ok_or_else(|| anyhow::anyhow!("session {} has no current run", session.friendly_id))?;
    // Scoped to the friendly id, which never changes hands: a token for this
    // session never opens another that later takes its external id.
    let token = jwt::mint_session_token(auth.env.id, &auth.env.secret_key, &session.friendly_id);
    Ok((status, Json(CreatedSession { session: session.to_item(), run_id, public_access_token: token, is_cached })))
}

async fn retrieve(State(db): State<PgPool>, auth: Auth, PathId(key): PathId) -> ApiResult<Json<SessionItem>> {
    let session = access::load(&db, &auth, &key, Action::Read).await?;
    Ok(Json(session.to_item()))
}

async fn update(
    State(db): State<PgPool>,
    auth: Auth,
    PathId(key): PathId,
    ApiJson(body): ApiJson<UpdateSessionBody>,
) -> ApiResult<Json<SessionItem>> {
    let patch = validate::update(body)?;
    // An external id is the session's public name, which tokens may be scoped
    // to: renaming takes an owner, so a write token cannot squat a name.
    let action = if patch.changes_external_id() { Action::Admin } else { Action::Write };
    let session = access::load(&db, &auth, &key, action).await?;
    match store::update(&db, auth.env.id, session.id, &patch).await {
        Ok(Some(updated)) => Ok(Json(updated.to_item())),
        Ok(None) => Err(ApiError::NotFound("Session not found".into())),
        Err(UpdateError::ExternalIdTaken) => {
            Err(ApiError::Conflict("Another session in this environment already uses this externalId".into()))
        }
        Err(UpdateError::Store(e)) => Err(e.into()),
    }
}

async fn close(
    State(db): State<PgPool>,
    State(closer): State<SessionCloser>,
    auth: Auth,
    PathId(key): PathId,
    ApiJson(body): ApiJson<CloseSessionBody>,
) -> ApiResult<Json<SessionItem>> {
    let reason = validate::close_reason(&body)?;
    let session = access::load(&db, &auth, &key, Action::Write).await?;
    let by = auth.actor();
    let closed = closer.close(&by, auth.env.id, session.id, reason.as_deref(), body.calling_run_id.as_deref()).await?;
    Ok(Json(closed.to_item()))
}

#[derive(Serialize)]
struct Pagination {
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
}

#[derive(Serialize)]
struct ListResponse {
    data: Vec<SessionItem>,
    pagination: Pagination,
}

async fn list(
    State(sessions): State<Arc<dyn SessionListRepository>>,
    auth: Auth,
    limits: Limits,
    RawQuery(query): RawQuery,
) -> ApiResult<impl IntoResponse> {
    limits.admit(&auth, RouteClass::List).await?;
    let query = ListQuery::parse(query.as_deref().unwrap_or(""), crate::clock::now())?;
    if !auth.can_list_sessions(&query.task_identifiers) {
        return Err(ApiError::Forbidden);
    }
    let served = sessions.list(EnvScope::from(&*auth.env), &query).await?;
    let page = served.value;
    let body = Json(ListResponse {
        data: page.sessions.iter().map(Session::to_item).collect(),
        pagination: Pagination { next: page.next.map(|c| c.encode()), previous: page.previous.map(|c| c.encode()) },
    });
    Ok(([(LIST_SOURCE_HEADER, served.source.as_str())], body))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndAndContinueResponse {
    run_id: String,
    swapped: bool,
}

/// Called by the session's current run to hand off to a fresh run (an upgrade).
/// Agent-only: the caller is the run it names (that run's own token) or holds a
/// secret key; a client's session token may write to the session but never
/// replace its run.
async fn end_and_continue(
    State(db): State<PgPool>,
    State(runs): State<RunManager>,
    auth: Auth,
    PathId(key): PathId,
    ApiJson(body): ApiJson<EndAndContinueBody>,
) -> ApiResult<Json<EndAndContinueResponse>> {
    let reason = validate::end_and_continue(&body)?;
    if !auth.is_secret_key() && auth.acting_run() != Some(body.calling_run_id.as_str()) {
        return Err(ApiError::Forbidden);
    }
    let session = access::load(&db, &auth, &key, Action::Write).await?;
    let handoff = runs.hand_off(auth.env.id, session.id, &body.calling_run_id, reason).await?;
    Ok(Json(EndAndContinueResponse { run_id: handoff.run_id, swapped: handoff.swapped }))
}
