//! The jobs pages: the job ledger by kind, status and error text, one job
//! with every attempt, and the operator's hands on it: retry one, the
//! selected, or everything a filter matches (after a preview), and cancel a
//! pending job. Each action commits with its audit row, and the jobs it put
//! back in line are relayed to the queue only after that commit.

use super::error::Form;
use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::auth::{csrf_token, Signed};
use super::error::{DashboardError, PageResult};
use super::pages::{iso, pretty, render, Frame, PAGE_SIZE};
use crate::audit::Actor;
use crate::jobs::actions;
use crate::jobs::store::{self, AttemptStatus, JobFilter, JobRow, JobStatus, PageAt};
use crate::jobs::{JobKind, Jobs};

/// Longest search text accepted (an error message fragment, not a document).
const MAX_SEARCH: usize = 200;
/// Most jobs one "retry selected" takes (a page holds far fewer).
const MAX_SELECTED: usize = 500;

/// The list's filters, as the URL and every form carry them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct JobFilters {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    q: String,
}

impl JobFilters {
    fn parse(&self) -> PageResult<JobFilter> {
        let kind = match self.kind.trim() {
            "" => None,
            k => Some(
                k.parse::<JobKind>().map_err(|_| DashboardError::BadRequest(format!("There is no job kind {k:?}")))?,
            ),
        };
        let status = match self.status.trim() {
            "" => None,
            s => Some(JobStatus::parse(s).ok_or_else(|| {
                DashboardError::BadRequest(format!("status must be one of {}", status_names().join(", ")))
            })?),
        };
        let q = self.q.trim();
        if q.chars().count() > MAX_SEARCH {
            return Err(DashboardError::BadRequest(format!("Search for at most {MAX_SEARCH} characters")));
        }
        Ok(JobFilter { kind, status, search: (!q.is_empty()).then(|| q.to_string()) })
    }

    /// The filters as a query string (no leading `?`), then `extra`.
    fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [("kind", &self.kind), ("status", &self.status), ("q", &self.q)] {
            if !value.trim().is_empty() {
                q.append_pair(name, value.trim());
            }
        }
        for (name, value) in extra {
            q.append_pair(name, value);
        }
        q.finish()
    }

    /// The filters as a query string, for the links to a job.
    fn query_string(&self) -> String {
        self.query(&[])
    }

    fn list_url(&self, extra: &[(&str, &str)]) -> String {
        format!("/dashboard/jobs?{}", self.query(extra))
    }

    fn job_url(&self, id: Uuid, extra: &[(&str, &str)]) -> String {
        format!("/dashboard/jobs/{id}?{}", self.query(extra))
    }

    /// The filters in a few words, for the audit log's target.
    fn summary(&self) -> String {
        let q = self.query_string();
        if q.is_empty() {
            "all".into()
        } else {
            q
        }
    }
}

fn status_names() -> Vec<&'static str> {
    JobStatus::ALL.iter().map(|s| s.as_str()).collect()
}

fn parse_id(id: &str) -> PageResult<Uuid> {
    Uuid::parse_str(id).map_err(|_| DashboardError::BadRequest(format!("{id:?} is not a job id")))
}

/// One option of a filter's select.
pub struct Choice {
    pub value: &'static str,
    pub selected: bool,
}

fn choices(values: impl IntoIterator<Item = &'static str>, current: &str) -> Vec<Choice> {
    values.into_iter().map(|value| Choice { value, selected: value == current.trim() }).collect()
}

pub struct JobView {
    pub id: String,
    pub kind: String,
    pub status: &'static str,
    pub attempts: String,
    pub last_error: String,
    pub run_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub relayed_at: Option<String>,
    pub finished_at: Option<String>,
    pub retryable: bool,
    pub pending: bool,
}

impl JobView {
    fn of(j: &JobRow) -> Self {
        JobView {
            id: j.id.to_string(),
            kind: j.kind.clone(),
            status: j.status.as_str(),
            attempts: format!("{} of {}", j.attempts, j.max_attempts),
            last_error: j.last_error.clone().unwrap_or_default(),
            run_at: iso(&j.run_at),
            created_at: iso(&j.created_at),
            updated_at: iso(&j.updated_at),
            relayed_at: j.relayed_at.as_ref().map(iso),
            finished_at: j.finished_at.as_ref().map(iso),
            retryable: j.status.retryable(),
            pending: j.status == JobStatus::Pending,
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/jobs.html")]
struct JobsPage {
    frame: Frame,
    f: JobFilters,
    kinds: Vec<Choice>,
    statuses: Vec<Choice>,
    rows: Vec<JobView>,
    /// Whether any row can be selected for a retry.
    selectable: bool,
    older: Option<String>,
    newer: Option<String>,
    notice: Option<String>,
}

/// Cursors and the outcome of an action, beside the filters in the URL.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Paging {
    #[serde(default)]
    after: String,
    #[serde(default)]
    before: String,
    #[serde(default)]
    retried: String,
}

impl Paging {
    fn at(&self) -> PageResult<PageAt> {
        let cursor = |c: &str| {
            Uuid::parse_str(c).map_err(|_| DashboardError::BadRequest("The page cursor is not a job id".into()))
        };
        Ok(match (self.after.trim(), self.before.trim()) {
            ("", "") => PageAt::Newest,
            (after, "") => PageAt::Older(cursor(after)?),
            ("", before) => PageAt::Newer(cursor(before)?),
            _ => return Err(DashboardError::BadRequest("Page with after or before, not both".into())),
        })
    }
}

fn retried_notice(n: u64) -> String {
    match n {
        0 => "No job was retried: none matched any more.".into(),
        1 => "1 job queued again.".into(),
        n => format!("{n} jobs queued again."),
    }
}

pub async fn list(
    State(db): State<PgPool>,
    signed: Signed,
    Query(f): Query<JobFilters>,
    Query(paging): Query<Paging>,
) -> PageResult<Response> {
    let filter = f.parse()?;
    let page = store::page(&db, &filter, paging.at()?, PAGE_SIZE).await?;
    let rows: Vec<JobView> = page.jobs.iter().map(JobView::of).collect();
    render(JobsPage {
        frame: Frame::new(&signed, "jobs"),
        kinds: choices(JobKind::ALL.iter().map(|k| k.as_str()), &f.kind),
        statuses: choices(status_names(), &f.status),
        selectable: signed.can_act() && rows.iter().any(|r| r.retryable),
        rows,
        older: page.older.map(|id| f.list_url(&[("after", &id.to_string())])),
        newer: page.newer.map(|id| f.list_url(&[("before", &id.to_string())])),
        notice: paging.retried.parse().ok().map(retried_notice),
        f,
    })
}

pub struct AttemptView {
    pub number: i32,
    pub status: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub took: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "dashboard/job.html")]
struct JobPage {
    frame: Frame,
    j: JobView,
    payload: String,
    attempts: Vec<AttemptView>,
    back: String,
    /// The filters, for the action forms to carry back.
    f: JobFilters,
    notice: Option<&'static str>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct Done {
    #[serde(default)]
    done: String,
}

/// What an abandoned attempt's row says in place of an error.
const ABANDONED_NOTE: &str = "Abandoned: its process stopped before it ended; closed when a later attempt started.";

/// How long an attempt took, to the millisecond.
fn took(from: DateTime<Utc>, to: Option<DateTime<Utc>>) -> String {
    to.map(|to| format!("{:.3} s", (to - from).num_milliseconds() as f64 / 1000.0)).unwrap_or_default()
}

pub async fn job(
    State(db): State<PgPool>,
    signed: Signed,
    Path(id): Path<String>,
    Query(f): Query<JobFilters>,
    Query(done): Query<Done>,
) -> PageResult<Response> {
    let id = parse_id(&id)?;
    let row = store::find(&db, id).await?.ok_or_else(|| DashboardError::NotFound(format!("No job {id}")))?;
    let attempts = store::attempts(&db, id)
        .await?
        .into_iter()
        .map(|a| {
            // An abandoned attempt's end is when a later one closed it, not
            // when its work stopped: no duration is shown for it.
            let abandoned = a.status == AttemptStatus::Abandoned;
            AttemptView {
                number: a.attempt,
                status: a.status.to_string(),
                started_at: iso(&a.started_at),
                finished_at: a.finished_at.as_ref().map(iso),
                took: if abandoned { String::new() } else { took(a.started_at, a.finished_at) },
                error: match a.error {
                    Some(e) => e,
                    None if abandoned => ABANDONED_NOTE.into(),
                    None => String::new(),
                },
            }
        })
        .collect();
    let notice = match done.done.as_str() {
        "retry" => Some("Queued again with a fresh budget of attempts."),
        "cancel" => Some("Canceled: this job will not start."),
        _ => None,
    };
    render(JobPage {
        frame: Frame::new(&signed, "jobs"),
        payload: pretty(&row.payload),
        j: JobView::of(&row),
        attempts,
        back: f.list_url(&[]),
        f,
        notice,
    })
}

/// An action's form: the CSRF token, and the filters to return to.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ActionForm {
    csrf: Option<String>,
    #[serde(flatten)]
    filters: JobFilters,
}

/// Relays jobs put back in line by a committed action. Should the push fail,
/// the rows stay unrelayed and the relay loop pushes them within seconds.
/// Why an action on job `id` changed nothing: it is gone, or in a state the
/// action does not apply to.
async fn refusal(db: &PgPool, id: Uuid, rule: &str) -> DashboardError {
    match store::find(db, id).await {
        Ok(Some(row)) => DashboardError::Conflict(format!("Job {id} is {}: {rule}", row.status)),
        Ok(None) => DashboardError::NotFound(format!("No job {id}")),
        Err(err) => err.into(),
    }
}

/// What an operator does to one job from its page.
#[derive(Debug, Clone, Copy)]
enum OneJob {
    Retry,
    Cancel,
}

impl OneJob {
    fn action(self) -> actions::OneJob {
        match self {
            OneJob::Retry => actions::OneJob::Retry,
            OneJob::Cancel => actions::OneJob::Cancel,
        }
    }

    /// Why the action changed nothing, after the job's status.
    fn rule(self) -> &'static str {
        match self {
            OneJob::Retry => "only a failed or canceled job can be retried",
            OneJob::Cancel => "only a pending job (not started yet) can be canceled",
        }
    }

    /// The job page's notice afterwards (`?done=`).
    fn done(self) -> &'static str {
        match self {
            OneJob::Retry => "retry",
            OneJob::Cancel => "cancel",
        }
    }
}

/// Retries one failed or canceled job (`POST …/retry`), or cancels a
/// pending one (`POST …/cancel`): it will not start. The action and its
/// audit row commit in one transaction; a retried job is relayed once that
/// commits. Back to the job's page, filters kept.
pub async fn act(
    State(db): State<PgPool>,
    State(jobs): State<Jobs>,
    signed: Signed,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> PageResult<Response> {
    let what = match action.as_str() {
        "retry" => OneJob::Retry,
        "cancel" => OneJob::Cancel,
        _ => return Err(DashboardError::NotFound(format!("Jobs have no action {action:?}"))),
    };
    signed.authorize_action(csrf_token(form.csrf.as_deref(), &headers))?;
    let id = parse_id(&id)?;
    let Some(kind) = jobs.act_on(&Actor::Operator(signed.operator.id), id, what.action()).await? else {
        return Err(refusal(&db, id, what.rule()).await);
    };
    let action = what.done();
    tracing::info!(operator = %signed.operator.email, job = %id, %kind, %action, "operator acted on a job");
    Ok(Redirect::to(&form.filters.job_url(id, &[("done", what.done())])).into_response())
}

/// Retries the jobs ticked on the list (a form of repeated `ids` fields,
/// which is why it is read by hand). Those no longer failed or canceled are
/// left as they are.
pub async fn retry_selected(
    State(jobs): State<Jobs>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> PageResult<Response> {
    let mut csrf = None;
    let mut ids = Vec::new();
    let mut f = JobFilters::default();
    for (name, value) in form_urlencoded::parse(&body) {
        match name.as_ref() {
            "csrf" => csrf = Some(value.into_owned()),
            "ids" => ids.push(value.into_owned()),
            "kind" => f.kind = value.into_owned(),
            "status" => f.status = value.into_owned(),
            "q" => f.q = value.into_owned(),
            _ => {}
        }
    }
    signed.authorize_action(csrf_token(csrf.as_deref(), &headers))?;
    let ids = ids.iter().map(|id| parse_id(id)).collect::<PageResult<Vec<Uuid>>>()?;
    if ids.is_empty() {
        return Err(DashboardError::BadRequest("Tick the failed or canceled jobs to retry first".into()));
    }
    if ids.len() > MAX_SELECTED {
        return Err(DashboardError::BadRequest(format!("Retry at most {MAX_SELECTED} jobs at once")));
    }
    let retried = jobs.retry_selected_by(&Actor::Operator(signed.operator.id), &ids).await?;
    if retried.is_empty() {
        return Err(DashboardError::Conflict(
            "None of the selected jobs is failed or canceled any more; nothing was retried".into(),
        ));
    }
    tracing::info!(operator = %signed.operator.email, jobs = retried.len(), "operator retried selected jobs");
    Ok(Redirect::to(&f.list_url(&[("retried", &retried.len().to_string())])).into_response())
}

#[derive(Template)]
#[template(path = "dashboard/jobs_retry_confirm.html")]
struct ConfirmPage {
    frame: Frame,
    f: JobFilters,
    count: i64,
    /// "17 failed jobs of kind trigger-run matching 'timeout'".
    what: String,
    as_of: String,
    /// The preview's database snapshot, which the confirm is held to.
    seen: String,
    back: String,
    /// Set when the filter asks for jobs no retry applies to.
    unretryable: Option<&'static str>,
}

/// What a retry of everything `filter` matches touches, in words.
fn describe(count: i64, filter: &JobFilter) -> String {
    let status = if filter.status == Some(JobStatus::Canceled) { "canceled" } else { "failed" };
    let mut what = format!("{count} {status} {}", if count == 1 { "job" } else { "jobs" });
    if let Some(kind) = &filter.kind {
        what.push_str(&format!(" of kind {kind}"));
    }
    if let Some(q) = &filter.search {
        what.push_str(&format!(" matching \u{2018}{q}\u{2019}"));
    }
    what
}

/// The preview before retrying everything a filter matches: how many, and
/// a confirm button that carries the filter and the preview's time.
pub async fn retry_matching_preview(
    State(db): State<PgPool>,
    signed: Signed,
    Query(f): Query<JobFilters>,
) -> PageResult<Response> {
    if !signed.can_act() {
        return Err(DashboardError::Forbidden);
    }
    let filter = f.parse()?;
    let preview = store::count_matching(&db, &filter).await?;
    let unretryable = if filter.retries_anything() { None } else { filter.status.map(JobStatus::as_str) };
    render(ConfirmPage {
        frame: Frame::new(&signed, "jobs"),
        what: describe(preview.count, &filter),
        count: preview.count,
        as_of: preview.as_of.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        seen: preview.snapshot,
        back: f.list_url(&[]),
        unretryable,
        f,
    })
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct MatchingForm {
    csrf: Option<String>,
    #[serde(flatten)]
    filters: JobFilters,
    #[serde(default)]
    as_of: String,
    #[serde(default)]
    seen: String,
}

/// Whether `text` is a `pg_snapshot` as Postgres writes one (`xmin:xmax:`
/// then the in-progress ids, comma-separated, each in `xmin..xmax`), so a
/// tampered form is a 400, not a failed cast.
fn is_snapshot(text: &str) -> bool {
    let mut parts = text.split(':');
    let (Some(xmin), Some(xmax), Some(xip), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(xmin), Ok(xmax)) = (xmin.parse::<u64>(), xmax.parse::<u64>()) else {
        return false;
    };
    xmin <= xmax
        && xmax <= i64::MAX as u64
        && (xip.is_empty() || xip.split(',').all(|x| x.parse::<u64>().is_ok_and(|x| xmin <= x && x < xmax)))
}

/// Retries every job the filter matches whose failure the preview saw
/// (committed in its snapshot, unchanged since), audited with the filter and
/// the count. See [`store::retry_matching`] for a failure racing the preview
/// and for two confirms at once.
pub async fn retry_matching(
    State(jobs): State<Jobs>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<MatchingForm>,
) -> PageResult<Response> {
    signed.authorize_action(csrf_token(form.csrf.as_deref(), &headers))?;
    let f = form.filters;
    let filter = f.parse()?;
    let as_of = DateTime::parse_from_rfc3339(form.as_of.trim())
        .map_err(|_| DashboardError::BadRequest("The preview's time is missing; open the preview again".into()))?
        .with_timezone(&Utc);
    let seen = form.seen.trim();
    if !is_snapshot(seen) {
        return Err(DashboardError::BadRequest("The preview's snapshot is missing; open the preview again".into()));
    }
    let by = Actor::Operator(signed.operator.id);
    let retried = jobs.retry_matching_by(&by, &filter, &f.summary(), as_of, seen).await?;
    if !retried.is_empty() {
        tracing::info!(operator = %signed.operator.email, jobs = retried.len(), filter = %f.summary(), "operator retried matching jobs");
    }
    Ok(Redirect::to(&f.list_url(&[("retried", &retried.len().to_string())])).into_response())
}
