//! The schedules page: each cron sweep the server loaded, when it fires next,
//! and its newest jobs in the ledger (each linked to its job page).

use std::collections::HashMap;

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use chrono::Utc;
use sqlx::PgPool;

use super::auth::Signed;
use super::error::PageResult;
use super::pages::{iso, render, Frame};
use super::OpsSettings;
use crate::jobs::store as job_store;
use crate::jobs::JobKind;

/// Jobs shown per schedule: enough to see a pattern of failures.
const LAST_RUNS: i64 = 5;

pub struct LastRun {
    pub id: String,
    pub status: &'static str,
    pub at: String,
    pub error: String,
}

pub struct ScheduleRow {
    pub name: String,
    pub kind: &'static str,
    pub cron: String,
    pub comment: String,
    pub next: Option<String>,
    pub runs: Vec<LastRun>,
}

#[derive(Template)]
#[template(path = "dashboard/schedules.html")]
struct SchedulesPage {
    frame: Frame,
    source: String,
    runs_jobs: bool,
    rows: Vec<ScheduleRow>,
}

pub async fn list(State(db): State<PgPool>, State(ops): State<OpsSettings>, signed: Signed) -> PageResult<Response> {
    // What the server loaded at start (and so what its cron ticks), not the
    // file as it is now.
    let schedules = &ops.schedules;
    let kinds: Vec<JobKind> = schedules.iter().map(|s| s.kind).collect();
    let mut by_kind: HashMap<String, Vec<LastRun>> = HashMap::new();
    for j in job_store::newest_of_kinds(&db, &kinds, LAST_RUNS).await? {
        by_kind.entry(j.kind.clone()).or_default().push(LastRun {
            id: j.id.to_string(),
            status: j.status.as_str(),
            at: iso(&j.finished_at.unwrap_or(j.created_at)),
            error: j.last_error.clone().unwrap_or_default(),
        });
    }
    let rows = schedules
        .iter()
        .map(|s| ScheduleRow {
            kind: s.kind.as_str(),
            cron: s.cron.to_string(),
            next: s.cron.upcoming(Utc).next().as_ref().map(iso),
            runs: by_kind.remove(s.kind.as_str()).unwrap_or_default(),
            comment: s.comment.clone(),
            name: s.name.clone(),
        })
        .collect();
    render(SchedulesPage {
        frame: Frame::new(&signed, "schedules"),
        source: ops
            .schedules_file
            .as_deref()
            .map_or_else(|| "jobs/schedules.toml (built in)".to_string(), str::to_string),
        runs_jobs: ops.run_jobs,
        rows,
    })
}
