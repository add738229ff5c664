//! The runs pages: an environment's runs (filters and keyset cursors in the
//! URL), one run in full, and its cancel, audited with the cancel's job.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};

use sqlx::PgPool;

use super::auth::{Authorized, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{env_choices, iso, pick_env, pretty, render, EnvChoice, Frame, PAGE_SIZE};
use super::paging;
use crate::audit::Actor;

use crate::jobs::store as job_store;

use crate::runs::cancel::RunCanceller;
use crate::runs::store::{self as run_store, Run, RunFilter};
use crate::runs::RunStatus;
use crate::sessions::store as session_store;
use crate::tenancy::store as tenancy_store;
use crate::waitpoints::store as waitpoint_store;

/// The run page's cursors: the page of its waitpoints shown (a run waits a
/// few times per turn, so a long-lived one has many).
#[derive(Debug, Default, serde::Deserialize)]
pub struct RunPageQuery {
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct RunFilters {
    #[serde(default)]
    env: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    task: String,
    /// A session's friendly (or external) id.
    #[serde(default)]
    session: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
}

impl RunFilters {
    fn status(&self) -> PageResult<Option<RunStatus>> {
        if self.status.is_empty() {
            return Ok(None);
        }
        RunStatus::parse(&self.status).map(Some).ok_or_else(|| {
            let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
            DashboardError::BadRequest(format!("status must be one of {}", all.join(", ")))
        })
    }

    /// This page's URL with a cursor replaced: the pager's links.
    fn with_cursor(&self, after: Option<&Run>, before: Option<&Run>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in
            [("env", &self.env), ("status", &self.status), ("task", &self.task), ("session", &self.session)]
        {
            if !value.is_empty() {
                q.append_pair(name, value);
            }
        }
        if let Some(r) = after {
            q.append_pair("after", &paging::encode(&r.created_at, r.id));
        }
        if let Some(r) = before {
            q.append_pair("before", &paging::encode(&r.created_at, r.id));
        }
        format!("/dashboard/runs?{}", q.finish())
    }
}

pub struct RunRow {
    pub id: String,
    pub status: &'static str,
    pub task: String,
    pub session: String,
    pub attempts: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

impl RunRow {
    fn of(r: &Run) -> Self {
        RunRow {
            id: r.friendly_id.clone(),
            status: r.status.as_str(),
            task: r.task_identifier.clone(),
            session: r.session_friendly_id.clone().unwrap_or_default(),
            attempts: format!("{} of {}", r.attempt_number, r.max_attempts),
            created_at: iso(&r.created_at),
            started_at: r.started_at.as_ref().map(iso),
            completed_at: r.completed_at.as_ref().map(iso),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/runs.html")]
struct RunsPage {
    frame: Frame,
    envs: Vec<EnvChoice>,
    statuses: Vec<&'static str>,
    f: RunFilters,
    rows: Vec<RunRow>,
    next: Option<String>,
    previous: Option<String>,
}

pub async fn list(State(db): State<PgPool>, signed: Signed, Query(mut f): Query<RunFilters>) -> PageResult<Response> {
    let at = paging::keyset(&f.after, &f.before)?;
    let status = f.status()?;
    let envs = tenancy_store::list(&db).await?;
    let scope = pick_env(&envs, &f.env)?;
    if let Some(scope) = &scope {
        f.env = scope.environment_id.to_string();
    }
    let mut rows = Vec::new();
    let (mut next, mut previous) = (None, None);
    if let Some(scope) = scope {
        // None for an unknown session: it matches no run.
        let session = match f.session.trim() {
            "" => Some(None),
            key => session_store::find(&db, scope.environment_id, key).await?.map(|s| Some(s.id)),
        };
        if let Some(session_id) = session {
            let task = Some(f.task.trim().to_string()).filter(|t| !t.is_empty());
            let filter = RunFilter { status, task, session_id };
            let page = run_store::page(&db, scope.environment_id, &filter, at, PAGE_SIZE as i64 + 1).await?;
            let (page, older, newer) = at.arrange(page, PAGE_SIZE);
            next = page.last().filter(|_| older).map(|r| f.with_cursor(Some(r), None));
            previous = page.first().filter(|_| newer).map(|r| f.with_cursor(None, Some(r)));
            rows = page.iter().map(RunRow::of).collect();
        }
    }
    render(RunsPage {
        frame: Frame::new(&signed, "runs"),
        envs: env_choices(&envs, &f.env),
        statuses: RunStatus::ALL.iter().map(|s| s.as_str()).collect(),
        f,
        rows,
        next,
        previous,
    })
}

pub struct WaitpointRow {
    pub id: String,
    pub status: &'static str,
    pub channel: &'static str,
    pub after_seq: i64,
    pub created_at: String,
    pub timeout_at: Option<String>,
    pub completed_at: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/run.html")]
struct RunPage {
    frame: Frame,
    r: RunRow,
    environment: String,
    reason: &'static str,
    worker: String,
    heartbeat_deadline: Option<String>,
    alive: bool,
    /// Its trigger-run job failed for good: QUEUED, yet never queued.
    stuck: Option<String>,
    available_at: String,
    cancel_requested_at: Option<String>,
    superseded_by: String,
    payload: String,
    output: String,
    error: String,
    /// One page of its waitpoints, newest first, with the links to the
    /// older and newer pages.
    waitpoints: Vec<WaitpointRow>,
    waitpoints_older: Option<String>,
    waitpoints_newer: Option<String>,
    cancelable: bool,
}

/// The run an operator asked for, by friendly id, in any environment.
async fn find_run(db: &PgPool, id: &str) -> PageResult<Run> {
    run_store::find_for_operator(db, id).await?.ok_or_else(|| DashboardError::NotFound(format!("No run {id}")))
}

pub async fn show(
    State(db): State<PgPool>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<RunPageQuery>,
) -> PageResult<Response> {
    let at = paging::keyset(&q.after, &q.before)?;
    let r = find_run(&db, &id).await?;
    let reason = match r.session_id {
        Some(session) => session_store::trigger_reasons(&db, &[session], &[r.id]).await?.first().map(|(_, why)| *why),
        None => None,
    };
    let page = waitpoint_store::page_for_run(&db, r.id, at, PAGE_SIZE as i64).await?;
    let (page, older, newer) = at.arrange(page, PAGE_SIZE);
    let (waitpoints_older, waitpoints_newer) = paging::links(
        &page,
        older,
        newer,
        |w| (w.created_at, w.id),
        |query| format!("/dashboard/runs/{}?{query}#waitpoints", r.friendly_id),
    );
    let waitpoints = page
        .into_iter()
        .map(|w| WaitpointRow {
            id: w.friendly_id,
            status: w.status.as_str(),
            channel: w.io.as_str(),
            after_seq: w.after_seq,
            created_at: iso(&w.created_at),
            timeout_at: w.timeout_at.as_ref().map(iso),
            completed_at: w.completed_at.as_ref().map(iso),
        })
        .collect();
    let trigger_failed = match r.status {
        RunStatus::Queued => job_store::failed_triggers(&db, &[r.id]).await?.into_iter().next(),
        _ => None,
    };
    let json_or_empty = |v: &Option<serde_json::Value>| v.as_ref().map(pretty).unwrap_or_default();
    render(RunPage {
        frame: Frame::new(&signed, "runs"),
        environment: r.runtime_environment_id.to_string(),
        reason: reason.map_or("", |why| why.as_str()),
        worker: r.worker_id.clone().unwrap_or_default(),
        heartbeat_deadline: r.heartbeat_deadline.as_ref().map(iso),
        alive: r.serving(trigger_failed.is_some()),
        stuck: trigger_failed.map(|f| f.last_error.unwrap_or_default()),
        available_at: iso(&r.available_at),
        cancel_requested_at: r.cancel_requested_at.as_ref().map(iso),
        superseded_by: r.superseded_by.clone().unwrap_or_default(),
        payload: pretty(&r.payload),
        output: json_or_empty(&r.output),
        error: json_or_empty(&r.error),
        waitpoints,
        waitpoints_older,
        waitpoints_newer,
        cancelable: !r.status.is_final(),
        r: RunRow::of(&r),
    })
}

/// Cancels a run as an operator, as the API does (one [`RunCanceller`]): the
/// cancel's durable job and the audit row commit together; the job is
/// relayed after the commit.
pub async fn cancel(
    State(db): State<PgPool>,
    State(canceller): State<RunCanceller>,
    Path(id): Path<String>,
    Authorized(signed): Authorized,
) -> PageResult<Response> {
    let r = find_run(&db, &id).await?;
    if r.status.is_final() {
        return Err(DashboardError::BadRequest(format!("{id} is {}: a finished run cannot be canceled", r.status)));
    }
    canceller.cancel(&Actor::Operator(signed.operator.id), r.id, &id).await?;
    tracing::info!(operator = %signed.operator.email, run = %id, "operator canceled a run");
    Ok(Redirect::to(&format!("/dashboard/runs/{id}")).into_response())
}
