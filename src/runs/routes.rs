//! The worker protocol: how task workers receive runs and report on them.
//! See docs/api.md, "Worker protocol".

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use sqlx::PgPool;

use super::cancel::RunCanceller;
use super::dispatch::{DequeueRequest, Dispatcher};
use super::store::{self, Run, Transition};
use super::{DequeuedRun, RunStatus, RunTimings, MAX_DEQUEUE_RUNS};
use crate::app::AppState;
use crate::auth::{jwt, Action, Auth};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, DataJson, PathId};
use crate::streams::permits::{Holder, StreamPermits};
use crate::validation::{check_len, ValidationError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/worker/dequeue", post(dequeue))
        .route("/api/v1/runs/{run}", get(retrieve))
        .route("/api/v1/runs/{run}/heartbeat", post(heartbeat))
        .route("/api/v1/runs/{run}/complete", post(complete))
        .route("/api/v1/runs/{run}/fail", post(fail))
        .route("/api/v2/runs/{run}/cancel", post(cancel))
}

/// A run as operators and workers see it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    pub id: String,
    pub status: RunStatus,
    pub task_identifier: String,
    pub session_id: Option<String>,
    pub payload: Value,
    pub attempt_number: i32,
    pub max_attempts: i32,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl From<&Run> for RunView {
    fn from(r: &Run) -> Self {
        RunView {
            id: r.friendly_id.clone(),
            status: r.status,
            task_identifier: r.task_identifier.clone(),
            session_id: r.session_friendly_id.clone(),
            payload: r.payload.clone(),
            attempt_number: r.attempt_number,
            max_attempts: r.max_attempts,
            output: r.output.clone(),
            error: r.error.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DequeueBody {
    tasks: Vec<String>,
    #[serde(default)]
    max_runs: Option<usize>,
    /// How long to wait for work, 0 or more: 10 when absent, and a larger
    /// value is taken as [`MAX_DEQUEUE_WAIT_SECS`] (clamped, not refused: the
    /// answer is then simply an empty list sooner, and the worker polls again).
    #[serde(default)]
    wait_seconds: Option<u64>,
    /// The worker's name for itself, kept on the runs it claims (1 to
    /// [`MAX_WORKER_ID_CHARS`] characters: it is stored and shown per run).
    #[serde(default)]
    worker_id: Option<String>,
    /// The worker's key for this logical dequeue, sent again on each retry of
    /// it; a repeat gets the runs the first try claimed (see `Dispatcher::dequeue`).
    #[serde(default)]
    request_id: Option<String>,
}

#[derive(Serialize)]
struct DequeueResponse {
    runs: Vec<DequeuedRun>,
}

/// The longest one dequeue waits (`waitSeconds` above it is clamped).
const MAX_DEQUEUE_WAIT_SECS: u64 = 30;
/// The longest `workerId`: every claimed run stores it.
pub const MAX_WORKER_ID_CHARS: usize = 128;

/// Long-polls for up to `maxRuns` runs of the given tasks. Pops from the Redis
/// queues, then claims in Postgres; waits on the queue wake signal (with a
/// periodic re-check) until work arrives or the wait ends.
async fn dequeue(
    State(dispatcher): State<Dispatcher>,
    State(permits): State<StreamPermits>,
    auth: Auth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<DequeueBody>,
) -> ApiResult<Json<DequeueResponse>> {
    auth.require_secret_key()?;
    if body.tasks.is_empty() || body.tasks.len() > 20 {
        return Err(ValidationError::new("tasks", "give 1 to 20 task identifiers").into());
    }
    for (i, t) in body.tasks.iter().enumerate() {
        check_len(&format!("tasks[{i}]"), t, 1, 128)?;
    }
    let max = body.max_runs.unwrap_or(1);
    if !(1..=MAX_DEQUEUE_RUNS).contains(&max) {
        return Err(ValidationError::new("maxRuns", format!("must be from 1 to {MAX_DEQUEUE_RUNS}")).into());
    }
    if let Some(key) = &body.request_id {
        check_len("requestId", key, 1, 128)?;
    }
    if let Some(worker) = &body.worker_id {
        check_len("workerId", worker, 1, MAX_WORKER_ID_CHARS)?;
    }
    let wait = Duration::from_secs(body.wait_seconds.unwrap_or(10).min(MAX_DEQUEUE_WAIT_SECS));
    // A long-poll holds its connection like a subscription does: it takes a
    // place among the long-lived requests (the environment's and the
    // server's; a secret key has no token cap), so workers cannot use up the
    // connections kept for short requests. Over a cap: 429 with
    // `Retry-After`, which the worker library waits out.
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(permits.acquire(Holder::of(&auth, &headers)).map_err(ApiError::TooManyStreams)?)
    };
    let request = DequeueRequest {
        env_id: auth.env.id,
        tasks: &body.tasks,
        max_runs: max,
        wait,
        worker_id: body.worker_id.as_deref(),
        key: body.request_id.as_deref(),
    };
    let runs = dispatcher.dequeue(request).await?;
    let timeout = dispatcher.heartbeat_timeout_ms();
    Ok(Json(DequeueResponse { runs: runs.iter().map(|r| dequeued(timeout, &auth, r)).collect() }))
}

fn dequeued(timeout: u64, auth: &Auth, r: &Run) -> DequeuedRun {
    DequeuedRun {
        id: r.friendly_id.clone(),
        task_identifier: r.task_identifier.clone(),
        session_id: r.session_friendly_id.clone(),
        payload: r.payload.clone(),
        attempt_number: r.attempt_number,
        max_attempts: r.max_attempts,
        max_duration_secs: r.max_duration_secs,
        token: jwt::mint_run_token(auth.env.id, &auth.env.secret_key, &r.friendly_id, r.session_friendly_id.as_deref()),
        heartbeat_interval_ms: (timeout / 3).max(1),
        heartbeat_timeout_ms: timeout,
    }
}

fn authorize_run(auth: &Auth, action: Action, run: &str) -> ApiResult<()> {
    if auth.can_access_run(action, run) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("Run not found".into())
}

async fn retrieve(State(db): State<PgPool>, auth: Auth, PathId(run): PathId) -> ApiResult<Json<RunView>> {
    authorize_run(&auth, Action::Read, &run)?;
    let run = store::find(&db, auth.env.id, &run).await?.ok_or_else(not_found)?;
    Ok(Json(RunView::from(&run)))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatResponse {
    ok: bool,
    status: RunStatus,
    /// Stop working on this run (canceled, timed out, or otherwise final).
    cancel: bool,
}

async fn heartbeat(
    State(db): State<PgPool>,
    State(timings): State<RunTimings>,
    auth: Auth,
    PathId(run): PathId,
) -> ApiResult<Json<HeartbeatResponse>> {
    authorize_run(&auth, Action::Write, &run)?;
    let timeout = timings.heartbeat_timeout_ms as i64;
    match store::heartbeat(&db, auth.env.id, &run, timeout).await? {
        Transition::Done(r) => Ok(Json(HeartbeatResponse { ok: true, status: r.status, cancel: false })),
        Transition::Refused(r) => Ok(Json(HeartbeatResponse { ok: false, status: r.status, cancel: true })),
        Transition::NotFound => Err(not_found()),
    }
}

fn transition_result(t: Transition) -> ApiResult<Json<RunView>> {
    match t {
        Transition::Done(r) => Ok(Json(RunView::from(&r))),
        Transition::Refused(Run { superseded_by: Some(by), .. }) => Err(ApiError::superseded(&by)),
        Transition::Refused(r) => Err(ApiError::Conflict(format!("Run is {}", r.status))),
        Transition::NotFound => Err(not_found()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompleteBody {
    #[serde(default)]
    output: Option<Value>,
    /// The attempt being reported (the run's current one when absent): a
    /// repeat for the same attempt answers as the first did.
    #[serde(default)]
    attempt_number: Option<i32>,
}

async fn complete(
    State(db): State<PgPool>,
    auth: Auth,
    PathId(run): PathId,
    DataJson(body): DataJson<CompleteBody>,
) -> ApiResult<Json<RunView>> {
    authorize_run(&auth, Action::Write, &run)?;
    transition_result(store::complete(&db, auth.env.id, &run, body.attempt_number, body.output.as_ref()).await?)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailBody {
    error: Value,
    #[serde(default = "yes")]
    retryable: bool,
    /// As for complete.
    #[serde(default)]
    attempt_number: Option<i32>,
}

fn yes() -> bool {
    true
}

/// Records a failed attempt. While attempts remain the run goes back to QUEUED
/// after an exponential, jittered delay and the due-runs sweep pushes it again.
async fn fail(
    State(db): State<PgPool>,
    State(timings): State<RunTimings>,
    auth: Auth,
    PathId(run): PathId,
    DataJson(body): DataJson<FailBody>,
) -> ApiResult<Json<RunView>> {
    authorize_run(&auth, Action::Write, &run)?;
    let current = store::find(&db, auth.env.id, &run).await?.ok_or_else(not_found)?;
    let delay = super::retry_delay_ms(current.attempt_number, timings.retry_base_ms, timings.retry_max_ms);
    let failed = store::fail(&db, auth.env.id, &run, body.attempt_number, &body.error, body.retryable, delay as i64);
    transition_result(failed.await?)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CancelResponse {
    id: String,
    job_id: Uuid,
}

/// Cancels a run through the durable cancel-run job; the worker learns from its
/// next heartbeat.
async fn cancel(
    State(db): State<PgPool>,
    State(canceller): State<RunCanceller>,
    auth: Auth,
    PathId(run): PathId,
) -> ApiResult<Json<CancelResponse>> {
    authorize_run(&auth, Action::Write, &run)?;
    let found = store::find(&db, auth.env.id, &run).await?.ok_or_else(not_found)?;
    let job_id = canceller.cancel(&auth.actor(), found.id, &found.friendly_id).await?;
    Ok(Json(CancelResponse { id: found.friendly_id, job_id }))
}
