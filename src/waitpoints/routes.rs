//! Waitpoint routes: create a wait on a session channel, and the worker's
//! long-poll for its completion.

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use sqlx::PgPool;

use super::store::{self, Waitpoint, WaitpointStatus};
use super::{WaitRequest, Waitpoints};
use crate::app::AppState;
use crate::auth::{Action, Auth};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{validate_path_id, ApiJson, ApiPath, ApiQuery, PathId};
use crate::runs::store as run_store;
use crate::sessions::access::ChannelAccess;
use crate::streams::permits::{Holder, StreamPermits};
use crate::streams::Io;
use crate::validation::{check_len, check_tags, ValidationError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/runs/{run}/session-streams/wait", post(create))
        .route("/api/v1/runs/{run}/waitpoints/{waitpoint}", get(wait))
}

/// A waitpoint's `tags`: one tag or a list of them, as the SDK sends either.
#[derive(Debug)]
enum Tags {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Tags {
    /// By hand rather than `untagged`, whose refusal names the Rust type.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(tag) => Ok(Tags::One(tag)),
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(tag) => Ok(tag),
                    _ => Err(D::Error::custom("must be a string or an array of strings")),
                })
                .collect::<Result<_, _>>()
                .map(Tags::Many),
            _ => Err(D::Error::custom("must be a string or an array of strings")),
        }
    }
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
    State(sessions): State<ChannelAccess>,
    State(waitpoints): State<Waitpoints>,
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
    let timeout = body
        .timeout
        .as_deref()
        .map(|t| {
            super::parse_deadline(t)
                .ok_or_else(|| ValidationError::new("timeout", "must be a duration such as 30s or an ISO-8601 date"))
        })
        .transpose()?;
    let key_ttl_secs = super::idempotency_ttl_secs(body.idempotency_key_ttl.as_deref())
        .ok_or_else(|| ValidationError::new("idempotencyKeyTTL", "must be a duration such as 1h (at most 68 years)"))?;
    if body.last_seq_num.is_some_and(|n| n < -1) {
        return Err(ValidationError::new("lastSeqNum", "must be -1 or more").into());
    }

    if !auth.can_access_run(Action::Write, &run_id) {
        return Err(ApiError::Forbidden);
    }
    let session = sessions.load(&auth, &body.session, io, Action::Read).await?;
    let request = WaitRequest {
        run: &run_id,
        session: &session,
        io,
        last_seq_num: body.last_seq_num,
        idempotency_key: body.idempotency_key.as_deref(),
        idempotency_key_ttl_secs: key_ttl_secs,
        tags: &tags,
        timeout,
    };
    let (waitpoint, cached) = waitpoints.create(auth.env.id, request).await?;
    Ok(Json(CreateResponse { waitpoint_id: waitpoint.friendly_id, is_cached: cached }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    /// How long this poll may wait, 0 or more: 30 when absent, and a larger
    /// value is taken as [`MAX_WAIT_SECS`] (clamped, not refused, so a worker
    /// asking for longer still gets a well-formed answer, just sooner).
    #[serde(default)]
    wait_seconds: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WaitpointView {
    id: String,
    status: WaitpointStatus,
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

/// The longest one waitpoint poll waits (`waitSeconds` above it is clamped):
/// short enough that proxies do not cut the request, and the worker polls again.
const MAX_WAIT_SECS: u64 = 60;

/// The worker's long-poll: answers as soon as the waitpoint completes or times
/// out, or with WAITING after `waitSeconds` (then poll again).
///
/// A poll that may wait holds a connection like an SSE subscription does, so
/// it takes a place among the long-lived requests (its token's, its
/// environment's and the server's, not its session's: a session's
/// subscribers must not lock out its run); over a cap it answers 429 with
/// `Retry-After`, which the worker library waits out.
async fn wait(
    State(db): State<PgPool>,
    State(waitpoints): State<Waitpoints>,
    State(permits): State<StreamPermits>,
    headers: HeaderMap,
    auth: Auth,
    ApiPath((run_id, waitpoint_id)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Json<WaitpointView>> {
    validate_path_id(&run_id)?;
    validate_path_id(&waitpoint_id)?;
    if !auth.can_access_run(Action::Read, &run_id) {
        return Err(ApiError::Forbidden);
    }
    let run =
        run_store::find(&db, auth.env.id, &run_id).await?.ok_or_else(|| ApiError::NotFound("Run not found".into()))?;
    let w = store::find(&db, auth.env.id, &waitpoint_id)
        .await?
        .filter(|w| w.run_id == run.id)
        .ok_or_else(|| ApiError::NotFound("Waitpoint not found".into()))?;
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(30).min(MAX_WAIT_SECS));
    // A poll answered at once (no wait, or the waitpoint already ended) holds nothing.
    let _permit = if wait.is_zero() || w.status != WaitpointStatus::Waiting {
        None
    } else {
        Some(permits.acquire(Holder::of(&auth, &headers)).map_err(ApiError::TooManyStreams)?)
    };
    Ok(Json(waitpoints.wait_for(w, wait).await?.into()))
}
