//! The failed-handoffs page (see `sessions::failed_handoffs`) and its retry,
//! which goes through the run manager.
//!
//! Each page examines at most [`EXAMINE`] open sessions (a Redis read each,
//! at worst) and links on from the last one it examined, so a page is never
//! unbounded work; it may list fewer rows than fit, or none, with more to
//! examine behind the link.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use sqlx::PgPool;

use super::auth::{Authorized, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{env_label, find_session, iso, render, run_manager_error, Frame, PAGE_SIZE};
use super::paging;
use crate::audit::Actor;
use crate::sessions::failed_handoffs::{self, FailedHandoff, FailedHandoffError};
use crate::sessions::run_manager::{Ensured, RunManager, RunManagerError};
use crate::sessions::SessionStatus;
use crate::tenancy::store as tenancy_store;

/// Open sessions one page examines at most.
pub const EXAMINE: usize = 200;

impl From<FailedHandoffError> for DashboardError {
    fn from(err: FailedHandoffError) -> Self {
        DashboardError::Internal(err.into())
    }
}

pub struct HandoffRow {
    pub session: String,
    pub environment: String,
    pub reason: &'static str,
    pub run: String,
    pub run_status: &'static str,
    pub error: String,
    pub since: String,
}

#[derive(Template)]
#[template(path = "dashboard/handoffs.html")]
struct HandoffsPage {
    frame: Frame,
    rows: Vec<HandoffRow>,
    examined: usize,
    /// Not the first page: a link back to the newest sessions.
    continued: bool,
    next: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct HandoffQuery {
    #[serde(default)]
    after: String,
}

pub async fn list(
    State(db): State<PgPool>,
    State(runs): State<RunManager>,
    signed: Signed,
    Query(q): Query<HandoffQuery>,
) -> PageResult<Response> {
    let after = paging::decode("after", &q.after)?;
    let scan = failed_handoffs::scan(&db, &runs, after, EXAMINE, PAGE_SIZE).await?;
    let labels: HashMap<_, _> = tenancy_store::list(&db).await?.iter().map(|e| (e.id, env_label(e))).collect();
    let row = |h: &FailedHandoff| HandoffRow {
        session: h.session.friendly_id.clone(),
        environment: labels.get(&h.session.runtime_environment_id).cloned().unwrap_or_default(),
        reason: h.reason.as_str(),
        run: h.run.as_ref().map(|r| r.friendly_id.clone()).unwrap_or_default(),
        run_status: h.run.as_ref().map_or("", |r| r.status.as_str()),
        error: h.last_error.clone().unwrap_or_default(),
        since: iso(&h.since),
    };
    render(HandoffsPage {
        frame: Frame::new(&signed, "handoffs"),
        rows: scan.found.iter().map(row).collect(),
        examined: scan.examined,
        continued: after.is_some(),
        next: scan.next.map(|(at, id)| format!("/dashboard/handoffs?after={}", paging::encode(&at, id))),
    })
}

/// Retries one failed handoff through the run manager, which never makes a
/// second live run and audits the retry in its claim's transaction. A
/// session no longer failed (a run serves it now) is left alone.
pub async fn retry(
    State(db): State<PgPool>,
    State(runs): State<RunManager>,
    Path(id): Path<String>,
    Authorized(signed): Authorized,
) -> PageResult<Response> {
    let s = find_session(&db, &id).await?;
    if s.status_now() != SessionStatus::Active {
        return Err(run_manager_error(&id, RunManagerError::Closed));
    }
    let Some(failed) = failed_handoffs::diagnose(&db, &runs, &s).await? else {
        tracing::info!(operator = %signed.operator.email, session = %id, "handoff retry: nothing to retry");
        return Ok(Redirect::to("/dashboard/handoffs").into_response());
    };
    let retried = runs
        .retry_handoff(s.runtime_environment_id, s.id, &Actor::Operator(signed.operator.id), failed.reason)
        .await
        .map_err(|err| run_manager_error(&id, err))?;
    match retried {
        Ensured::Triggered(run) => {
            tracing::info!(operator = %signed.operator.email, session = %id, %run, "operator retried a handoff")
        }
        Ensured::Alive(run) => {
            tracing::info!(operator = %signed.operator.email, session = %id, %run, "handoff retry: a run serves it")
        }
    }
    Ok(Redirect::to("/dashboard/handoffs").into_response())
}
