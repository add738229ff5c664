//! SQL that owns `jobs` (the outbox and job ledger) and `job_attempts`.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::{Job, JobKind, Lane, NewJob, Payload, PayloadError};
use crate::db::StoreError;

/// Where a job stands: `pending` (queued, or waiting for a retry), `running`,
/// then `succeeded` or, once its attempts are spent, `failed`. An operator can
/// cancel a pending job (`canceled`: it never starts); a failed or canceled
/// job can be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Pending, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether an operator may run the job again.
    pub fn retryable(self) -> bool {
        matches!(self, JobStatus::Failed | JobStatus::Canceled)
    }
}

/// How one attempt of a job went (`job_attempts.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum AttemptStatus {
    Running,
    Succeeded,
    Failed,
    /// Still `running` when a later attempt of its job started: its process
    /// died (or lost its queue) before it could end it. An attempt that does
    /// end after all (a duplicate delivery running beside the later one)
    /// records how it went over this.
    Abandoned,
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttemptStatus::Running => "running",
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Failed => "failed",
            AttemptStatus::Abandoned => "abandoned",
        })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub kind: String,
    pub payload: serde_json::Value,
    pub status: JobStatus,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub relayed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The job's version, bumped by every retry (see [`mark_relayed`]).
    pub generation: i32,
    /// The apalis task of the last push stamped on this version.
    pub task_id: Option<String>,
}

impl JobRow {
    /// The job this row holds; an error if its kind is unknown to this build
    /// or its payload is not an object.
    pub fn job(&self) -> Result<Job, PayloadError> {
        Job::stored(&self.kind, &self.payload)
    }
}

const JOB_COLUMNS: &str =
    "id, kind, payload, status, attempts, max_attempts, last_error, run_at, relayed_at, created_at, \
     updated_at, finished_at, generation, task_id";

/// The version every job is written at; a retry bumps it.
pub const FIRST_GENERATION: i32 = 0;

/// One version of a job to put on the queue: its id, its kind (which picks
/// the lane) and the generation read before the push.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Queued {
    pub id: Uuid,
    pub kind: String,
    pub generation: i32,
}

impl Queued {
    /// The queue its kind runs on.
    pub fn lane(&self) -> Lane {
        Lane::of_stored(&self.kind)
    }
}

/// A push that happened: the version it carried and the apalis task it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub id: Uuid,
    pub generation: i32,
    pub task: String,
}

/// Writes a job into the outbox. Call inside the transaction of the state change
/// that causes it, so the job exists if and only if the change committed; then
/// relay what this returns (its id and lane).
pub async fn insert(conn: impl PgExecutor<'_>, job: &impl Payload, max_attempts: i32) -> Result<NewJob, StoreError> {
    let id = Uuid::now_v7();
    let job = Job::new(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query("INSERT INTO jobs (id, kind, payload, max_attempts) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(job.kind().as_str())
        .bind(job.to_stored())
        .bind(max_attempts)
        .execute(conn)
        .await?;
    Ok(NewJob { id, lane: job.kind().lane() })
}

pub async fn find(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(pool).await?)
}

/// The newest `per_kind` jobs of each of `kinds` (a schedule's last runs),
/// newest first within a kind (by id: uuid v7, creation order); one walk of
/// `jobs_kind_id_idx` per kind, which a sweep's thousands of jobs a day make
/// worth having instead of a sort.
pub async fn newest_of_kinds(pool: &PgPool, kinds: &[JobKind], per_kind: i64) -> Result<Vec<JobRow>, StoreError> {
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let columns = JOB_COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ");
    Ok(sqlx::query_as(&format!(
        "SELECT {columns} FROM unnest($1::text[]) k(kind)
         CROSS JOIN LATERAL (SELECT * FROM jobs WHERE jobs.kind = k.kind ORDER BY id DESC LIMIT $2) j
         ORDER BY j.kind, j.id DESC"
    ))
    .bind(kinds)
    .bind(per_kind)
    .fetch_all(pool)
    .await?)
}

/// Stamps pushes as relayed, each only where its job is still at the
/// generation the push carried: a retry in between (a new version, put back in
/// line unrelayed) keeps its own stamp empty, so the relay loop pushes it,
/// however late the older push's stamp lands. The stamp records the task, for
/// [`unheld_candidates`]; `relayed_at` keeps the version's first push.
pub async fn mark_relayed(pool: &PgPool, pushed: &[Pushed]) -> Result<(), StoreError> {
    if pushed.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = pushed.iter().map(|p| p.id).collect();
    let generations: Vec<i32> = pushed.iter().map(|p| p.generation).collect();
    let tasks: Vec<&str> = pushed.iter().map(|p| p.task.as_str()).collect();
    sqlx::query(
        "UPDATE jobs SET relayed_at = coalesce(jobs.relayed_at, now()), task_id = p.task
         FROM unnest($1::uuid[], $2::int[], $3::text[]) AS p(id, generation, task)
         WHERE jobs.id = p.id AND jobs.generation = p.generation",
    )
    .bind(ids)
    .bind(generations)
    .bind(tasks)
    .execute(pool)
    .await?;
    Ok(())
}

/// The current generation of those of `ids` still pending: read before a push
/// whose caller knows only the ids and kinds (a committed retry).
pub async fn pending_versions(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Queued>, StoreError> {
    Ok(sqlx::query_as("SELECT id, kind, generation FROM jobs WHERE id = ANY($1) AND status = 'pending'")
        .bind(ids)
        .fetch_all(pool)
        .await?)
}

/// Pending jobs written but not on the queue yet, older than `grace_ms`
/// (younger ones are still being relayed by the request that wrote them). A
/// canceled job is never pushed again.
pub async fn unrelayed(pool: &PgPool, grace_ms: i64, limit: i64) -> Result<Vec<Queued>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, kind, generation FROM jobs WHERE relayed_at IS NULL AND status = 'pending' AND created_at < now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY created_at LIMIT $2",
    )
    .bind(grace_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A pending job the sweep checks: the version and the task its stamp names.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Stamped {
    pub id: Uuid,
    pub kind: String,
    pub generation: i32,
    pub task_id: Option<String>,
}

impl Stamped {
    pub fn queued(&self) -> Queued {
        Queued { id: self.id, kind: self.kind.clone(), generation: self.generation }
    }
}

/// Pending jobs after `after` (id order) that carry a relayed stamp, have not
/// changed for `quiet_secs`, and have no attempt running: each should have a
/// task on the queue, which the sweep asks Redis. An attempt older than
/// [`ABANDONED_AFTER_SECS`] does not count as running.
pub async fn unheld_candidates(
    pool: &PgPool,
    after: Option<Uuid>,
    quiet_secs: i64,
    limit: i64,
) -> Result<Vec<Stamped>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT id, kind, generation, task_id FROM jobs j
         WHERE status = 'pending' AND attempts < max_attempts AND relayed_at IS NOT NULL AND ($1::uuid IS NULL OR id > $1)
           AND updated_at < now() - make_interval(secs => $2::float8)
           AND relayed_at < now() - make_interval(secs => $2::float8)
           AND NOT EXISTS (SELECT 1 FROM job_attempts a WHERE a.job_id = j.id AND a.status = 'running'
                           AND a.started_at > now() - make_interval(secs => {ABANDONED_AFTER_SECS}))
         ORDER BY id LIMIT $3"
    ))
    .bind(after)
    .bind(quiet_secs as f64)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Ends as `failed` the pending jobs with every attempt spent, quiet for
/// `quiet_secs` and with no attempt running: no delivery can start them
/// (see [`begin_attempt`]), so pushing them again would change nothing. Left
/// pending they would count as under way for good; failed, an operator (or,
/// for a flush, the replication consumer) retries them. It takes two copies
/// of a job and a process that died during the last attempt to get here.
/// Returns how many.
pub async fn fail_spent(pool: &PgPool, quiet_secs: i64) -> Result<u64, StoreError> {
    Ok(sqlx::query(&format!(
        "UPDATE jobs j SET status = 'failed', finished_at = now(), updated_at = now()
         WHERE status = 'pending' AND attempts >= max_attempts
           AND updated_at < now() - make_interval(secs => $1::float8)
           AND NOT EXISTS (SELECT 1 FROM job_attempts a WHERE a.job_id = j.id AND a.status = 'running'
                           AND a.started_at > now() - make_interval(secs => {ABANDONED_AFTER_SECS}))"
    ))
    .bind(quiet_secs as f64)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Unfinished jobs (pending or running; not canceled ones) after `after` in id
/// order, which is creation order (uuid v7): what a job queue that lost its
/// data must carry again.
pub async fn unfinished(pool: &PgPool, after: Option<Uuid>, limit: i64) -> Result<Vec<Queued>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, kind, generation FROM jobs WHERE status IN ('pending', 'running') AND ($1::uuid IS NULL OR id > $1)
         ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// How long an attempt may stay `running` before it counts as abandoned (far
/// longer than any job runs; a job's attempt is bounded by its own timeouts).
pub const ABANDONED_AFTER_SECS: i64 = 600;

/// Starts an attempt of an unfinished job: bumps the counter, logs the
/// attempt, and returns the row (its `attempts` is this attempt's number).
/// None if the job is gone, finished, canceled, or has spent its attempts: a
/// delivery of a canceled job does nothing.
///
/// A job can be delivered twice (the lost-queue recovery pushes every
/// unfinished job, including one waiting out its retry backoff), and each copy
/// retries on its own; the budget check here is what keeps the two copies
/// together to `max_attempts`. The one exception is a last attempt still
/// `running` after [`ABANDONED_AFTER_SECS`]: its process died, and the job runs
/// once more rather than stay `running` for ever.
///
/// Earlier attempts of the job still `running` are closed as
/// [`AttemptStatus::Abandoned`]: a process that died mid-attempt never ends
/// its own, and the ledger would show it running for good although the job
/// went on (and perhaps succeeded). One statement, so the job runtime's
/// bookkeeping costs one round trip.
pub async fn begin_attempt(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "WITH j AS (
             UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
             WHERE id = $1 AND (
                 (status IN ('pending', 'running') AND attempts < max_attempts)
                 OR (status = 'running' AND updated_at < now() - make_interval(secs => {ABANDONED_AFTER_SECS})))
             RETURNING {JOB_COLUMNS}),
         a AS (INSERT INTO job_attempts (job_id, attempt, status) SELECT id, attempts, 'running' FROM j),
         c AS (UPDATE job_attempts SET status = 'abandoned', finished_at = now()
               WHERE job_id = (SELECT id FROM j) AND status = 'running')
         SELECT {JOB_COLUMNS} FROM j"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Hands back attempt `attempt` of job `id`, cut off by a shutdown: the
/// attempt is logged `abandoned`, and the job, if that attempt was its latest
/// and it is still `running`, goes back to `pending` unrelayed, with one more
/// attempt in its budget (the cut-off one does not count against it). Returns
/// the job's kind if the job was handed back.
pub async fn hand_back_attempt(pool: &PgPool, id: Uuid, attempt: i32) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "WITH a AS (
             UPDATE job_attempts SET status = 'abandoned', error = 'handed back at shutdown', finished_at = now()
             WHERE job_id = $1 AND attempt = $2 AND status = 'running' RETURNING job_id)
         UPDATE jobs SET status = 'pending', max_attempts = max_attempts + 1, relayed_at = NULL, task_id = NULL,
             updated_at = now()
         WHERE id IN (SELECT job_id FROM a) AND attempts = $2 AND status = 'running'
         RETURNING kind",
    )
    .bind(id)
    .bind(attempt)
    .fetch_optional(pool)
    .await?)
}

/// Ends an attempt. A failure leaves the job `pending` (it will be retried) until
/// `final_failure`, when it becomes `failed` and stays visible with its error.
/// Only a job still under way (`pending` or `running`) changes: with two
/// copies of a job running at once (see [`begin_attempt`]), a failure that
/// ends after the other copy's success leaves the job succeeded, and a job an
/// operator canceled meanwhile stays canceled. The attempt's own row always
/// says how it went.
pub async fn finish_attempt(
    pool: &PgPool,
    id: Uuid,
    attempt: i32,
    error: Option<&str>,
    final_failure: bool,
) -> Result<(), StoreError> {
    let attempt_status = if error.is_none() { AttemptStatus::Succeeded } else { AttemptStatus::Failed };
    let job_status = match (error, final_failure) {
        (None, _) => JobStatus::Succeeded,
        (Some(_), true) => JobStatus::Failed,
        (Some(_), false) => JobStatus::Pending,
    };
    sqlx::query(
        "WITH a AS (
             UPDATE job_attempts SET status = $3, error = $4, finished_at = now() WHERE job_id = $1 AND attempt = $2)
         UPDATE jobs SET status = $5, last_error = coalesce($4, last_error), updated_at = now(),
             finished_at = CASE WHEN $5 IN ('succeeded', 'failed') THEN now() ELSE NULL END
         WHERE id = $1 AND status IN ('pending', 'running')",
    )
    .bind(id)
    .bind(attempt)
    .bind(attempt_status)
    .bind(error)
    .bind(job_status)
    .execute(pool)
    .await?;
    Ok(())
}

/// Jobs that failed for good since `since`, per kind, most first: the
/// dashboard overview's failures chart. `jobs_status_idx` (status,
/// updated_at) serves it: a failed job's `updated_at` is its final failure.
pub async fn failures_by_kind(pool: &PgPool, since: DateTime<Utc>) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT kind, count(*) FROM jobs WHERE status = $1 AND updated_at >= $2
         GROUP BY kind ORDER BY count(*) DESC, kind",
    )
    .bind(JobStatus::Failed)
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// What a retry sets: back in line (`pending`, not yet relayed) as a new
/// version (see [`mark_relayed`]), with a fresh budget of attempts on top of
/// those spent, whose numbers keep counting.
fn retry_set() -> String {
    format!(
        "status = 'pending', relayed_at = NULL, task_id = NULL, generation = generation + 1, max_attempts = attempts + {}, finished_at = NULL, updated_at = now()",
        super::DEFAULT_MAX_ATTEMPTS
    )
}

/// Puts a failed or canceled job back in line (see [`retry_set`]); the caller
/// relays it once this commits. None if the job does not exist or is neither
/// failed nor canceled.
pub async fn reset_for_retry(conn: impl PgExecutor<'_>, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE jobs SET {} WHERE id = $1 AND status IN ('failed', 'canceled') RETURNING {JOB_COLUMNS}",
        retry_set()
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Retries those of `ids` that are failed or canceled; returns them with
/// their kinds (for the relay).
pub async fn retry_selected(conn: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<(Uuid, String)>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE jobs SET {} WHERE id = ANY($1) AND status IN ('failed', 'canceled') RETURNING id, kind",
        retry_set()
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

/// Cancels a job that has not started (`pending`: queued, or waiting out a
/// retry's backoff); a delivery of it then does nothing. Returns its kind;
/// None if the job is gone or not pending (running jobs finish their attempt;
/// finished ones stay as they ended).
pub async fn cancel_pending(conn: impl PgExecutor<'_>, id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET status = 'canceled', finished_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'pending' RETURNING kind",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Which jobs an operator is looking at: a kind, a status, and text searched
/// (case-insensitively) in the last error and in every attempt's error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub kind: Option<JobKind>,
    pub status: Option<JobStatus>,
    pub search: Option<String>,
}

impl JobFilter {
    /// The search as an ILIKE pattern: the text, its wildcards escaped.
    fn pattern(&self) -> Option<String> {
        self.search.as_deref().map(|q| {
            let escaped = q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        })
    }

    /// Whether a retry of everything this filter matches can touch any job
    /// (not when it asks for pending, running or succeeded ones).
    pub fn retries_anything(&self) -> bool {
        !self.retry_statuses().is_empty()
    }

    /// The statuses a retry of everything this filter matches touches: failed
    /// jobs, or the canceled ones when the filter asks for those.
    fn retry_statuses(&self) -> Vec<&'static str> {
        match self.status {
            None | Some(JobStatus::Failed) => vec![JobStatus::Failed.as_str()],
            Some(JobStatus::Canceled) => vec![JobStatus::Canceled.as_str()],
            Some(_) => Vec::new(),
        }
    }
}

/// The filter's conditions on `jobs`, over binds $1 (kind), $2 (status) and
/// $3 (the search pattern). The search reads every attempt's error (a job's
/// earlier attempts may have failed differently from its last); it has no
/// index, and runs over what the kind and status leave.
const FILTER_WHERE: &str = "($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR status = $2)
     AND ($3::text IS NULL OR last_error ILIKE $3
          OR EXISTS (SELECT 1 FROM job_attempts a WHERE a.job_id = jobs.id AND a.error ILIKE $3))";

/// Which page of a filtered list: the newest, the one older than a job, or
/// the one newer than a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAt {
    Newest,
    Older(Uuid),
    Newer(Uuid),
}

/// One page of jobs, newest first, and the cursors next to it.
#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<JobRow>,
    /// The last job shown, if older ones match.
    pub older: Option<Uuid>,
    /// The first job shown, if newer ones match.
    pub newer: Option<Uuid>,
}

/// A keyset page (no OFFSET) of the jobs `filter` matches, newest first by id
/// (uuid v7: creation order), `size` jobs at most. One row more is read, to
/// know whether another page follows.
pub async fn page(pool: &PgPool, filter: &JobFilter, at: PageAt, size: usize) -> Result<JobPage, StoreError> {
    let (cursor, newer_side) = match at {
        PageAt::Newest => (None, false),
        PageAt::Older(id) => (Some(id), false),
        PageAt::Newer(id) => (Some(id), true),
    };
    let (compare, order) = if newer_side { (">", "ASC") } else { ("<", "DESC") };
    let mut jobs: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE {FILTER_WHERE} AND ($4::uuid IS NULL OR id {compare} $4)
         ORDER BY id {order} LIMIT $5"
    ))
    .bind(filter.kind.map(JobKind::as_str))
    .bind(filter.status)
    .bind(filter.pattern())
    .bind(cursor)
    .bind(size as i64 + 1)
    .fetch_all(pool)
    .await?;
    let more = jobs.len() > size;
    jobs.truncate(size);
    if newer_side {
        jobs.reverse();
    }
    let (older, newer) = match at {
        PageAt::Newest => (more.then(|| jobs.last().map(|j| j.id)).flatten(), None),
        PageAt::Older(_) => (more.then(|| jobs.last().map(|j| j.id)).flatten(), jobs.first().map(|j| j.id)),
        PageAt::Newer(_) => (jobs.last().map(|j| j.id), more.then(|| jobs.first().map(|j| j.id)).flatten()),
    };
    Ok(JobPage { jobs, older, newer })
}

/// What a preview of "retry everything `filter` matches" showed: how many
/// jobs, at what time, and the database snapshot it counted them in.
#[derive(Debug, Clone)]
pub struct MatchingPreview {
    pub count: i64,
    /// The database's clock at the preview.
    pub as_of: DateTime<Utc>,
    /// The preview's snapshot (`pg_snapshot` text): which transactions had
    /// committed when it counted. A failure is stamped when its statement
    /// starts but seen only once it commits, so the time alone cannot tell
    /// a failure the preview counted from one stamped just before it and
    /// committed after; the snapshot can.
    pub snapshot: String,
}

/// How many jobs a retry of everything `filter` matches would touch now, the
/// database's clock, and the snapshot they were counted in: the preview,
/// which the retry is then held to ([`retry_matching`]).
pub async fn count_matching(pool: &PgPool, filter: &JobFilter) -> Result<MatchingPreview, StoreError> {
    let (count, as_of, snapshot) = sqlx::query_as(&format!(
        "SELECT count(*), now(), pg_current_snapshot()::text FROM jobs WHERE {FILTER_WHERE} AND status = ANY($4::text[])"
    ))
    .bind(filter.kind.map(JobKind::as_str))
    .bind(filter.status)
    .bind(filter.pattern())
    .bind(filter.retry_statuses())
    .fetch_one(pool)
    .await?;
    Ok(MatchingPreview { count, as_of, snapshot })
}

/// How far, mod 2^32, a row's writer (`xmin`) is behind the preview
/// snapshot's `xmax` (`s.top`); see [`retry_matching`].
const BEHIND: &str = "((s.top % 4294967296 - jobs.xmin::text::bigint) % 4294967296 + 4294967296) % 4294967296";

/// Retries every job `filter` matches whose failed (or, if the filter asks
/// for those, canceled) row the preview (at `as_of`, in snapshot `seen`)
/// saw, unchanged since: its row's writer had committed in the preview's
/// snapshot, and it had finished by the preview's time. A job that fails
/// after the preview, even one stamped before it whose failure committed
/// after, or one retried and failed again since, is left alone, so the
/// retry touches no more than what was shown.
/// Of two confirms at once, the second finds the rows rewritten by the
/// first (a new writer the snapshot never saw, and no longer failed) and
/// retries none of them again. Returns the jobs with their kinds, for the
/// relay once this commits.
///
/// A row's `xmin` is a 32-bit transaction id; `pg_visible_in_snapshot`
/// takes a 64-bit `xid8`. How far (mod 2^32) the writer is behind the
/// snapshot's `xmax` widens it: 0, or 2^31 and more, means a writer that got
/// its id at or after the preview (a transaction that stamped its failure
/// before the preview but wrote after it), never seen. A row untouched for
/// 2^31 transactions also reads as unseen: retry it by selection instead.
pub async fn retry_matching(
    conn: impl PgExecutor<'_>,
    filter: &JobFilter,
    as_of: DateTime<Utc>,
    seen: &str,
) -> Result<Vec<(Uuid, String)>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "WITH s AS (SELECT $6::pg_snapshot AS snap,
                           pg_snapshot_xmax($6::pg_snapshot)::text::bigint AS top)
         UPDATE jobs SET {} FROM s
         WHERE {FILTER_WHERE} AND status = ANY($4::text[]) AND finished_at <= $5
           AND {BEHIND} BETWEEN 1 AND 2147483647
           AND pg_visible_in_snapshot((s.top - {BEHIND})::text::xid8, s.snap)
         RETURNING id, kind",
        retry_set()
    ))
    .bind(filter.kind.map(JobKind::as_str))
    .bind(filter.status)
    .bind(filter.pattern())
    .bind(filter.retry_statuses())
    .bind(as_of)
    .bind(seen)
    .fetch_all(conn)
    .await?)
}

pub async fn list(pool: &PgPool, failed_only: bool, limit: i64) -> Result<Vec<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 = false OR status = 'failed')
         ORDER BY updated_at DESC LIMIT $2"
    ))
    .bind(failed_only)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub status: AttemptStatus,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn attempts(pool: &PgPool, id: Uuid) -> Result<Vec<AttemptRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT attempt, status, error, started_at, finished_at FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

/// Keeps the ledger bounded: succeeded jobs are kept for a day. Returns how
/// many were removed.
pub async fn prune_succeeded(pool: &PgPool) -> Result<u64, StoreError> {
    Ok(sqlx::query("DELETE FROM jobs WHERE status = 'succeeded' AND finished_at < now() - interval '1 day'")
        .execute(pool)
        .await?
        .rows_affected())
}

/// A `trigger-run` job that spent its attempts: its run was never queued.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FailedTrigger {
    pub run_id: Uuid,
    pub job_id: Uuid,
    pub last_error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The failed `trigger-run` jobs of `run_ids`, the newest per run (a run has
/// one: it is written with the run, and a retry reuses the row). Walks
/// `jobs_failed_trigger_run_idx`, a partial index on that kind: the kind is
/// spelled out in the SQL (as [`JobKind::TriggerRun`] names it), since the
/// planner matches the index's predicate only against a literal.
pub async fn failed_triggers(pool: &PgPool, run_ids: &[Uuid]) -> Result<Vec<FailedTrigger>, StoreError> {
    let keys: Vec<String> = run_ids.iter().map(Uuid::to_string).collect();
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (payload->>'run_id') (payload->>'run_id')::uuid AS run_id, id AS job_id, last_error,
                finished_at
         FROM jobs WHERE kind = 'trigger-run' AND status = 'failed' AND payload->>'run_id' = ANY($1)
         ORDER BY payload->>'run_id', created_at DESC",
    )
    .bind(keys)
    .fetch_all(pool)
    .await?)
}
