//! The dashboard's pages and actions. Each handler authenticates (the
//! [`Signed`] extractor), validates, authorizes, calls the domain, and renders
//! a template; filters and cursors live in the URL, so a link shows what the
//! operator saw.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::assets::ASSET_VERSION;
use super::auth::{Authorized, Signed};
use super::error::{DashboardError, PageResult};
use super::paging;
use crate::audit::{self, Actor};
use crate::runs::store as run_store;
use crate::sessions::close::SessionCloser;
use crate::sessions::list::{Cursor, EnvScope, ListQuery, SessionListRepository};
use crate::sessions::model::Session;
use crate::sessions::run_manager::{RunManager, RunManagerError};
use crate::sessions::store as session_store;
use crate::tenancy::store::{self as tenancy_store, EnvListing};
use crate::waitpoints::store as waitpoint_store;

/// Rows per dashboard page.
pub(super) const PAGE_SIZE: usize = 25;

/// What every page's frame shows: who is signed in, their token for forms,
/// which page is current.
pub struct Frame {
    pub email: String,
    pub role: &'static str,
    pub can_act: bool,
    pub csrf: String,
    pub current: &'static str,
    pub v: &'static str,
}

impl Frame {
    pub(super) fn new(signed: &Signed, current: &'static str) -> Self {
        Frame {
            email: signed.operator.email.clone(),
            role: signed.operator.role.as_str(),
            can_act: signed.can_act(),
            csrf: signed.csrf.clone(),
            current,
            v: ASSET_VERSION,
        }
    }
}

pub(super) fn render(page: impl Template) -> PageResult<Response> {
    Ok(Html(page.render()?).into_response())
}

/// An RFC 3339 time for `<time datetime>` (dashboard.js shows it relative).
pub fn iso(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(super) fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// One environment in the switcher.
pub struct EnvChoice {
    pub id: String,
    pub label: String,
    pub selected: bool,
}

/// How an environment is named on the pages.
pub(super) fn env_label(e: &EnvListing) -> String {
    format!("{} / {} / {}", e.organization, e.project, e.env_type)
}

/// The switcher's choices, `selected` (an environment id) picked.
pub(super) fn env_choices(envs: &[EnvListing], selected: &str) -> Vec<EnvChoice> {
    envs.iter()
        .map(|e| EnvChoice { id: e.id.to_string(), label: env_label(e), selected: selected == e.id.to_string() })
        .collect()
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SessionFilters {
    #[serde(default)]
    env: String,
    #[serde(default)]
    status: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    task: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    external_id: String,
    /// Dates (YYYY-MM-DD, UTC): created on or after `from`, before the day after `to`.
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
}

impl SessionFilters {
    /// The same query the API's list takes, so the dashboard and the API share
    /// one parser, one set of rules and one repository.
    fn to_list_query(&self) -> PageResult<ListQuery> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("page[size]", &PAGE_SIZE.to_string());
        for (name, value) in [
            ("filter[status]", &self.status),
            ("filter[type]", &self.kind),
            ("filter[taskIdentifier]", &self.task),
            ("filter[tags]", &self.tag),
            ("filter[externalId]", &self.external_id),
            ("page[after]", &self.after),
            ("page[before]", &self.before),
        ] {
            if !value.trim().is_empty() {
                q.append_pair(name, value.trim());
            }
        }
        let day = |name: &str, value: &str, next: bool| -> PageResult<Option<String>> {
            if value.trim().is_empty() {
                return Ok(None);
            }
            let date = NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d")
                .map_err(|_| DashboardError::BadRequest(format!("{name} must be a date (YYYY-MM-DD)")))?;
            let date = if next { date.succ_opt().unwrap_or(date) } else { date };
            let ms = date.and_hms_opt(0, 0, 0).map(|d| d.and_utc().timestamp_millis() - i64::from(next));
            Ok(ms.map(|ms| ms.to_string()))
        };
        if let Some(ms) = day("from", &self.from, false)? {
            q.append_pair("filter[createdAt][from]", &ms);
        }
        if let Some(ms) = day("to", &self.to, true)? {
            q.append_pair("filter[createdAt][to]", &ms);
        }
        ListQuery::parse(&q.finish(), crate::clock::now()).map_err(|e| DashboardError::BadRequest(e.to_string()))
    }

    /// This page's URL with a cursor replaced: the pager's links.
    fn with_cursor(&self, after: Option<&Cursor>, before: Option<&Cursor>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("env", &self.env),
            ("status", &self.status),
            ("type", &self.kind),
            ("task", &self.task),
            ("tag", &self.tag),
            ("external_id", &self.external_id),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !value.is_empty() {
                q.append_pair(name, value);
            }
        }
        if let Some(c) = after {
            q.append_pair("after", &c.encode());
        }
        if let Some(c) = before {
            q.append_pair("before", &c.encode());
        }
        format!("/dashboard/sessions?{}", q.finish())
    }
}

pub struct SessionRow {
    pub id: String,
    pub status: &'static str,
    pub kind: String,
    pub task: String,
    pub external_id: String,
    pub tags: Vec<String>,
    pub current_run: String,
    pub created_at: String,
}

impl SessionRow {
    fn of(s: &Session) -> Self {
        SessionRow {
            id: s.friendly_id.clone(),
            status: s.status_now().as_str(),
            kind: s.kind.clone(),
            task: s.task_identifier.clone(),
            external_id: s.external_id.clone().unwrap_or_default(),
            tags: s.tags.clone(),
            current_run: s.current_run_friendly_id.clone().unwrap_or_default(),
            created_at: iso(&s.created_at),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/sessions.html")]
struct SessionsPage {
    frame: Frame,
    envs: Vec<EnvChoice>,
    f: SessionFilters,
    rows: Vec<SessionRow>,
    next: Option<String>,
    previous: Option<String>,
    source: &'static str,
    /// The list alone, for htmx's live refresh.
    fragment: bool,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct Fragment {
    #[serde(default)]
    fragment: Option<String>,
}

/// The environment the operator picked, else the first one.
pub(super) fn pick_env(envs: &[EnvListing], wanted: &str) -> PageResult<Option<EnvScope>> {
    let chosen = if wanted.is_empty() {
        envs.first()
    } else {
        let id =
            Uuid::parse_str(wanted).map_err(|_| DashboardError::BadRequest("env must be an environment id".into()))?;
        Some(envs.iter().find(|e| e.id == id).ok_or_else(|| DashboardError::NotFound("No such environment".into()))?)
    };
    Ok(chosen.map(|e| EnvScope { organization_id: e.organization_id, project_id: e.project_id, environment_id: e.id }))
}

pub async fn sessions(
    State(db): State<PgPool>,
    State(list): State<Arc<dyn SessionListRepository>>,
    signed: Signed,
    Query(mut f): Query<SessionFilters>,
    Query(fragment): Query<Fragment>,
) -> PageResult<Response> {
    let q = f.to_list_query()?;
    let envs = tenancy_store::list(&db).await?;
    let scope = pick_env(&envs, &f.env)?;
    if let Some(scope) = &scope {
        f.env = scope.environment_id.to_string();
    }
    let choices = env_choices(&envs, &f.env);
    let (rows, next, previous, source) = match scope {
        Some(scope) => {
            let served = list.list(scope, &q).await?;
            let page = served.value;
            let next = page.next.as_ref().map(|c| f.with_cursor(Some(c), None));
            let previous = page.previous.as_ref().map(|c| f.with_cursor(None, Some(c)));
            (page.sessions.iter().map(SessionRow::of).collect(), next, previous, served.source.as_str())
        }
        None => (Vec::new(), None, None, "postgres"),
    };
    render(SessionsPage {
        frame: Frame::new(&signed, "sessions"),
        envs: choices,
        f,
        rows,
        next,
        previous,
        source,
        fragment: fragment.fragment.is_some(),
    })
}

pub struct RunRow {
    pub id: String,
    pub status: &'static str,
    pub reason: &'static str,
    pub attempts: String,
    pub created_at: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "dashboard/session.html")]
struct SessionPage {
    frame: Frame,
    s: SessionRow,
    closed_reason: String,
    expires_at: Option<String>,
    closed_at: Option<String>,
    metadata: String,
    environment: String,
    runs: Vec<RunRow>,
    /// The runs list filtered to this session, when it has more runs than shown.
    all_runs: Option<String>,
    /// One page of the pending waitpoints (a run may have up to
    /// `MAX_PENDING_WAITPOINTS_PER_RUN`, a session several runs' worth), newest
    /// first, with the links to the older and newer pages.
    waiting: Vec<PendingWaitpoint>,
    waiting_total: i64,
    waiting_older: Option<String>,
    waiting_newer: Option<String>,
    open: bool,
}

/// The session page's cursors: the page of pending waitpoints shown.
#[derive(Debug, Default, serde::Deserialize)]
pub struct SessionPageQuery {
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
}

/// A WAITING waitpoint on one of the session's channels.
pub struct PendingWaitpoint {
    pub id: String,
    pub run: String,
    pub channel: &'static str,
    pub after_seq: i64,
    pub created_at: String,
    pub timeout_at: Option<String>,
}

/// The session an operator asked for, by friendly id, in any environment.
pub(super) async fn find_session(db: &PgPool, id: &str) -> PageResult<Session> {
    session_store::find_for_operator(db, id).await?.ok_or_else(|| DashboardError::NotFound(format!("No session {id}")))
}

pub async fn session(
    State(db): State<PgPool>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<SessionPageQuery>,
) -> PageResult<Response> {
    let at = paging::keyset(&q.after, &q.before)?;
    let s = find_session(&db, &id).await?;
    let mut runs = run_store::for_session(&db, s.id, PAGE_SIZE as i64 + 1).await?;
    // The newest page of runs, shown oldest first as a timeline; the rest are
    // one link away in the paged runs list.
    let all_runs = (runs.len() > PAGE_SIZE).then(|| {
        runs.truncate(PAGE_SIZE);
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("env", &s.runtime_environment_id.to_string()).append_pair("session", &s.friendly_id);
        format!("/dashboard/runs?{}", q.finish())
    });
    runs.reverse();
    let run_ids: HashMap<Uuid, String> = runs.iter().map(|(r, _)| (r.id, r.friendly_id.clone())).collect();
    let page = waitpoint_store::waiting_page_for_session(&db, s.id, at, PAGE_SIZE as i64).await?;
    let (page, older, newer) = at.arrange(page, PAGE_SIZE);
    let (waiting_older, waiting_newer) = paging::links(
        &page,
        older,
        newer,
        |w| (w.created_at, w.id),
        |query| format!("/dashboard/sessions/{}?{query}#waitpoints", s.friendly_id),
    );
    let waiting_total = waitpoint_store::count_waiting_for_session(&db, s.id).await?;
    let waiting = page
        .into_iter()
        .map(|w| PendingWaitpoint {
            id: w.friendly_id,
            run: run_ids.get(&w.run_id).cloned().unwrap_or_else(|| w.run_id.to_string()),
            channel: w.io.as_str(),
            after_seq: w.after_seq,
            created_at: iso(&w.created_at),
            timeout_at: w.timeout_at.as_ref().map(iso),
        })
        .collect();
    let runs = runs
        .into_iter()
        .map(|(r, reason)| RunRow {
            id: r.friendly_id,
            status: r.status.as_str(),
            reason: reason.as_str(),
            attempts: format!("{} of {}", r.attempt_number, r.max_attempts),
            created_at: iso(&r.created_at),
            error: r.error.as_ref().map(pretty).unwrap_or_default(),
        })
        .collect();
    render(SessionPage {
        frame: Frame::new(&signed, "sessions"),
        closed_reason: s.closed_reason.clone().unwrap_or_default(),
        expires_at: s.expires_at.as_ref().map(iso),
        closed_at: s.closed_at.as_ref().map(iso),
        metadata: s.metadata.as_ref().map(pretty).unwrap_or_default(),
        environment: s.runtime_environment_id.to_string(),
        open: s.closed_at.is_none(),
        s: SessionRow::of(&s),
        runs,
        all_runs,
        waiting,
        waiting_total,
        waiting_older,
        waiting_newer,
    })
}

/// Closes a session as an operator, exactly as the API does (audited in the
/// close's transaction, channels sealed before the answer, lookup cache
/// cleared): one [`SessionCloser`] for both.
pub async fn close_session(
    State(db): State<PgPool>,
    State(closer): State<SessionCloser>,
    Path(id): Path<String>,
    Authorized(signed): Authorized,
) -> PageResult<Response> {
    let s = find_session(&db, &id).await?;
    let by = Actor::Operator(signed.operator.id);
    closer.close(&by, s.runtime_environment_id, s.id, Some("closed by an operator"), None).await?;
    tracing::info!(operator = %signed.operator.email, session = %id, "operator closed a session");
    Ok(Redirect::to(&format!("/dashboard/sessions/{id}")).into_response())
}

/// Triggers a fresh run for a session (a manual trigger: it replaces the live
/// run, fenced like any hand-off), audited in the trigger's transaction.
pub async fn trigger_run(
    State(db): State<PgPool>,
    State(runs): State<RunManager>,
    Path(id): Path<String>,
    Authorized(signed): Authorized,
) -> PageResult<Response> {
    let s = find_session(&db, &id).await?;
    let run = runs
        .trigger_manual(s.runtime_environment_id, s.id, &Actor::Operator(signed.operator.id))
        .await
        .map_err(|err| run_manager_error(&id, err))?;
    tracing::info!(operator = %signed.operator.email, session = %id, %run, "operator triggered a run");
    Ok(Redirect::to(&format!("/dashboard/sessions/{id}")).into_response())
}

/// A run manager's refusal as a page: a closed session is the operator's
/// mistake (400), anything else the server's.
pub(super) fn run_manager_error(session: &str, err: RunManagerError) -> DashboardError {
    match err {
        RunManagerError::Closed => {
            DashboardError::BadRequest(format!("{session} is closed or expired; a closed session runs nothing"))
        }
        RunManagerError::NotFound => DashboardError::NotFound(format!("No session {session}")),
        err => DashboardError::Internal(err.into()),
    }
}

pub struct AuditRow {
    pub at: String,
    pub operator: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "dashboard/audit.html")]
struct AuditPage {
    frame: Frame,
    rows: Vec<AuditRow>,
    next: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    after: String,
}

pub async fn audit(State(db): State<PgPool>, signed: Signed, Query(q): Query<AuditQuery>) -> PageResult<Response> {
    let after = paging::decode("after", &q.after)?;
    let mut entries = audit::page(&db, after, PAGE_SIZE as i64 + 1).await?;
    let next = (entries.len() > PAGE_SIZE).then(|| {
        entries.truncate(PAGE_SIZE);
        entries.last().map(|e| format!("/dashboard/audit?after={}", paging::encode(&e.created_at, e.id)))
    });
    let rows = entries
        .into_iter()
        .map(|e| AuditRow {
            at: iso(&e.created_at),
            operator: e.actor,
            action: e.action,
            target: e.target,
            detail: if e.detail == json!({}) { String::new() } else { e.detail.to_string() },
        })
        .collect();
    render(AuditPage { frame: Frame::new(&signed, "audit"), rows, next: next.flatten() })
}
