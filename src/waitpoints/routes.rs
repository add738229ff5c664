//! Waitpoint routes: create a wait on a session channel, and the worker's
//! long-poll for its completion.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::store::{self, NewWaitpoint, Waitpoint};
use crate::app::AppState;
use crate::auth::{Action, Auth};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{validate_path_id, ApiJson, PathId};
use crate::runs::store as run_store;
use crate::runs::RunStatus;
use crate::streams::routes::load_channel;
use crate::streams::{ChannelKey, Io};
use crate::validation::{check_len, check_tags, ValidationError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/runs/{run}/session-streams/wait", post(create))
        .route("/api/v1/runs/{run}/waitpoints/{waitpoint}", get(wait))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Tags {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    session: String,
    io: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default, rename = "idempotencyKeyTTL")]
    idempotency_key_ttl: Option<String>,
    #[serde(default)]
    tags: Option<Tags>,
    #[serde(default)]
    last_seq_num: Option<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateResponse {
    waitpoint_id: String,
    is_cached: bool,
}

/// Suspends the run on a session channel until a record after `lastSeqNum`
/// lands there (or the timeout). Data that already arrived completes it at once.
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    PathId(run_id): PathId,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<Json<CreateResponse>> {
    let io = Io::parse(&body.io).ok_or_else(|| ValidationError::new("io", "must be \"in\" or \"out\""))?;
    validate_path_id(&body.session).map_err(|_| ValidationError::new("session", "invalid session id"))?;
    if let Some(k) = &body.idempotency_key {
        check_len("idempotencyKey", k, 1, 2048)?;
    }
    let tags = match body.tags {
        None => Vec::new(),
        Some(Tags::One(t)) => vec![t],
        Some(Tags::Many(t)) => t,
    };
    check_tags("tags", &tags)?;
    let now = Utc::now();
    let timeout_at = body
        .timeout
        .as_deref()
        .map(|t| {
            super::parse_deadline(t, now)
                .ok_or_else(|| ValidationError::new("timeout", "must be a duration such as 30s or an ISO-8601 date"))
        })
        .transpose()?;
    let key_expires_at = super::idempotency_expiry(body.idempotency_key_ttl.as_deref(), now)
        .ok_or_else(|| ValidationError::new("idempotencyKeyTTL", "must be a duration such as 1h (at most 68 years)"))?;
    if body.last_seq_num.is_some_and(|n| n < -1) {
        return Err(ValidationError::new("lastSeqNum", "must be -1 or more").into());
    }

    if !auth.can_access_run(Action::Write, &run_id) {
        return Err(ApiError::Forbidden);
    }
    let session = load_channel(&state, &auth, &body.session, io, Action::Read).await?;
    if let Some(refusal) = session.write_refusal(now) {
        return Err(ApiError::BadRequest(refusal.into()));
    }
    let run = run_store::find(&state.db, auth.env.id, &run_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("Run not found".into()))?;
    if run.session_id != Some(session.id) {
        return Err(ValidationError::new("session", "the run does not belong to this session").into());
    }
    if run.superseded_by.is_some() || !matches!(run.status(), RunStatus::Executing | RunStatus::Waiting) {
        return Err(run_cannot_wait(run.status().as_str(), run.superseded_by.as_deref()));
    }
    let key = ChannelKey { session_id: session.id, io };
    // Without lastSeqNum only records after this moment count.
    let after_seq = match body.last_seq_num {
        Some(n) => n,
        None => state.channels.next_seq(key).await? as i64 - 1,
    };
    let created = store::create(
        &state.db,
        &NewWaitpoint {
            env_id: auth.env.id,
            run_id: run.id,
            session_id: session.id,
            io: io.as_str(),
            after_seq,
            idempotency_key: body.idempotency_key.as_deref(),
            idempotency_key_expires_at: body.idempotency_key.as_ref().map(|_| key_expires_at),
            tags: &tags,
            timeout_at,
        },
    )
    .await?;
    let (waitpoint, cached) = match created {
        store::Created::Waitpoint(w, cached) => (w, cached),
        store::Created::RunNotActive { status, superseded_by } => {
            return Err(run_cannot_wait(&status, superseded_by.as_deref()))
        }
    };
    if !cached {
        state.channels.register_waiter(key, waitpoint.id, super::pending_ttl_ms(timeout_at, now)).await?;
        // The race-check: a record that landed before the registration.
        if let Err(err) = super::check_arrived(&state, &waitpoint).await {
            tracing::warn!(waitpoint = %waitpoint.friendly_id, session = %session.friendly_id, %io, error = %err, "race-check failed");
        }
        // A close that sealed the channel after our session check completed
        // the waitpoints it found, maybe before this one existed: do it here.
        if state.channels.is_sealed(key).await? {
            let fresh = crate::sessions::store::find_by_id(&state.db, auth.env.id, session.id).await?;
            let reason = fresh.as_ref().and_then(|s| s.close_reason(Utc::now()));
            super::complete_with(&state, &waitpoint, &super::closed_output(reason.as_deref())).await?;
        }
    }
    Ok(Json(CreateResponse { waitpoint_id: waitpoint.friendly_id, is_cached: cached }))
}

/// 409 for a run that may not wait: replaced by another run, or not executing.
fn run_cannot_wait(status: &str, superseded_by: Option<&str>) -> ApiError {
    match superseded_by {
        Some(by) => ApiError::superseded(by),
        None => ApiError::Conflict(format!("Run is {status}")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    #[serde(default)]
    wait_seconds: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WaitpointView {
    id: String,
    status: String,
    output: Option<Value>,
    tags: Vec<String>,
    timeout_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
}

impl From<Waitpoint> for WaitpointView {
    fn from(w: Waitpoint) -> Self {
        WaitpointView {
            id: w.friendly_id,
            status: w.status,
            output: w.output,
            tags: w.tags,
            timeout_at: w.timeout_at,
            created_at: w.created_at,
            completed_at: w.completed_at,
        }
    }
}

const MAX_WAIT_SECS: u64 = 60;

/// The worker's long-poll: answers as soon as the waitpoint completes or times
/// out, or with WAITING after `waitSeconds` (then poll again).
async fn wait(
    State(state): State<AppState>,
    auth: Auth,
    Path((run_id, waitpoint_id)): Path<(String, String)>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<WaitpointView>> {
    validate_path_id(&run_id)?;
    validate_path_id(&waitpoint_id)?;
    if !auth.can_access_run(Action::Read, &run_id) {
        return Err(ApiError::Forbidden);
    }
    let run = run_store::find(&state.db, auth.env.id, &run_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("Run not found".into()))?;
    let w = store::find(&state.db, auth.env.id, &waitpoint_id)
        .await?
        .filter(|w| w.run_id == run.id)
        .ok_or_else(|| ApiError::NotFound("Waitpoint not found".into()))?;
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(30).min(MAX_WAIT_SECS));
    Ok(Json(super::wait_for(&state, w, wait).await?.into()))
}
