//! SQL that owns `jobs` (the outbox and job ledger) and `job_attempts`.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use super::Job;
use crate::db::StoreError;

/// Where a job stands: `pending` (queued, or waiting for a retry), `running`,
/// then `succeeded` or, once its attempts are spent, `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// How one attempt of a job went (`job_attempts.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum AttemptStatus {
    Running,
    Succeeded,
    Failed,
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        })
    }
}

impl std::fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttemptStatus::Running => "running",
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Failed => "failed",
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
}

impl JobRow {
    pub fn job(&self) -> Result<Job, StoreError> {
        serde_json::from_value(self.payload.clone()).map_err(|e| StoreError::Corrupt(format!("job {}: {e}", self.id)))
    }
}

const JOB_COLUMNS: &str =
    "id, kind, payload, status, attempts, max_attempts, last_error, run_at, relayed_at, created_at, updated_at, finished_at";

/// Writes a job into the outbox. Call inside the transaction of the state change
/// that causes it, so the job exists if and only if the change committed.
pub async fn insert(conn: impl PgExecutor<'_>, job: &Job, max_attempts: i32) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    let payload = serde_json::to_value(job).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query("INSERT INTO jobs (id, kind, payload, max_attempts) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(job.kind())
        .bind(payload)
        .bind(max_attempts)
        .execute(conn)
        .await?;
    Ok(id)
}

pub async fn find(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(pool).await?)
}

pub async fn mark_relayed(pool: &PgPool, ids: &[Uuid]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE jobs SET relayed_at = now() WHERE id = ANY($1) AND relayed_at IS NULL")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Jobs written but not on the queue yet, older than `grace_ms` (younger ones are
/// still being relayed by the request that wrote them).
pub async fn unrelayed(pool: &PgPool, grace_ms: i64, limit: i64) -> Result<Vec<(Uuid, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, kind FROM jobs WHERE relayed_at IS NULL AND created_at < now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY created_at LIMIT $2",
    )
    .bind(grace_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Unfinished jobs (pending or running) after `after` in id order, which is
/// creation order (uuid v7): what a job queue that lost its data must carry
/// again.
pub async fn unfinished(pool: &PgPool, after: Option<Uuid>, limit: i64) -> Result<Vec<(Uuid, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, kind FROM jobs WHERE status IN ('pending', 'running') AND ($1::uuid IS NULL OR id > $1)
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
/// None if the job is gone, finished, or has spent its attempts.
///
/// A job can be delivered twice (the lost-queue recovery pushes every
/// unfinished job, including one waiting out its retry backoff), and each copy
/// retries on its own; the budget check here is what keeps the two copies
/// together to `max_attempts`. The one exception is a last attempt still
/// `running` after [`ABANDONED_AFTER_SECS`]: its process died, and the job runs
/// once more rather than stay `running` for ever. One statement, so the job
/// runtime's bookkeeping costs one round trip.
pub async fn begin_attempt(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "WITH j AS (
             UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = now()
             WHERE id = $1 AND (
                 (status IN ('pending', 'running') AND attempts < max_attempts)
                 OR (status = 'running' AND updated_at < now() - make_interval(secs => {ABANDONED_AFTER_SECS})))
             RETURNING {JOB_COLUMNS}),
         a AS (INSERT INTO job_attempts (job_id, attempt, status) SELECT id, attempts, 'running' FROM j)
         SELECT {JOB_COLUMNS} FROM j"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Ends an attempt. A failure leaves the job `pending` (it will be retried) until
/// `final_failure`, when it becomes `failed` and stays visible with its error.
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
         WHERE id = $1",
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

/// Puts a failed job back in line: a fresh retry budget, and not yet relayed.
pub async fn reset_for_retry(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'pending', relayed_at = NULL, max_attempts = attempts + $2,
            finished_at = NULL, updated_at = now()
         WHERE id = $1 AND status = 'failed' RETURNING {JOB_COLUMNS}"
    ))
    .bind(id)
    .bind(super::DEFAULT_MAX_ATTEMPTS)
    .fetch_optional(pool)
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
/// `jobs_failed_trigger_run_idx`.
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
