//! SQL that owns `task_runs`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{session_payload, Continuation, Outcome, RunSettings, RunStatus, TriggerReason};
use crate::db::paging::Keyset;
use crate::db::StoreError;
use crate::ids;

/// A run about to be inserted, built from a session's trigger config.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub friendly_id: String,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub task_identifier: String,
    pub session_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub queue: Option<String>,
    pub machine: Option<String>,
    pub tags: Vec<String>,
    pub max_attempts: i32,
    pub max_duration_secs: Option<i32>,
    pub ttl_secs: Option<i32>,
    pub lock_to_version: Option<String>,
}

/// Scoping and identity of the session a run is for.
pub struct RunOwner<'a> {
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub session_id: Uuid,
    pub session_friendly_id: &'a str,
    pub task_identifier: &'a str,
}

impl NewRun {
    pub fn for_session(owner: RunOwner<'_>, settings: &RunSettings, continuation: Option<&Continuation>) -> Self {
        NewRun {
            id: Uuid::now_v7(),
            friendly_id: ids::new_run_id(),
            organization_id: owner.organization_id,
            project_id: owner.project_id,
            runtime_environment_id: owner.runtime_environment_id,
            task_identifier: owner.task_identifier.to_string(),
            session_id: Some(owner.session_id),
            payload: session_payload(
                &settings.base_payload,
                owner.session_friendly_id,
                settings.idle_timeout_secs,
                continuation,
            ),
            queue: settings.queue.clone(),
            machine: settings.machine.clone(),
            tags: settings.tags.clone(),
            max_attempts: settings.max_attempts,
            max_duration_secs: settings.max_duration_secs,
            ttl_secs: settings.ttl_secs,
            lock_to_version: settings.lock_to_version.clone(),
        }
    }
}

pub async fn insert(conn: &mut PgConnection, run: &NewRun) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO task_runs (id, friendly_id, organization_id, project_id, runtime_environment_id,
            task_identifier, session_id, payload, queue, machine, tags, max_attempts, max_duration_secs,
            ttl_secs, lock_to_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(run.id)
    .bind(&run.friendly_id)
    .bind(run.organization_id)
    .bind(run.project_id)
    .bind(run.runtime_environment_id)
    .bind(&run.task_identifier)
    .bind(run.session_id)
    .bind(&run.payload)
    .bind(&run.queue)
    .bind(&run.machine)
    .bind(&run.tags)
    .bind(run.max_attempts)
    .bind(run.max_duration_secs)
    .bind(run.ttl_secs)
    .bind(&run.lock_to_version)
    .execute(conn)
    .await?;
    Ok(())
}

/// A run row, with its session's friendly id joined in.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Run {
    pub id: Uuid,
    pub friendly_id: String,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub task_identifier: String,
    pub session_id: Option<Uuid>,
    pub session_friendly_id: Option<String>,
    pub payload: serde_json::Value,
    pub status: RunStatus,
    pub attempt_number: i32,
    pub max_attempts: i32,
    pub max_duration_secs: Option<i32>,
    pub ttl_secs: Option<i32>,
    pub heartbeat_deadline: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub available_at: DateTime<Utc>,
    pub output: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The run that replaced this one (a hand-off), if any.
    pub superseded_by: Option<String>,
    /// The worker that claimed the run last (as it named itself on dequeue).
    pub worker_id: Option<String>,
    /// Postgres' clock when the row was read. The heartbeat deadline is
    /// written by Postgres' `now()`, so whether it has passed is judged by
    /// the same clock ([`Run::alive`]), never by a process's own, which may
    /// be off by more than the heartbeat timeout.
    pub read_at: DateTime<Utc>,
}

impl Run {
    /// Alive when the row was read, by Postgres' clock (see `read_at`).
    pub fn alive(&self) -> bool {
        super::is_alive(self.status, self.heartbeat_deadline, self.read_at)
    }

    /// Alive and able to serve its session, when the row was read: a QUEUED
    /// run whose trigger-run job failed for good (`trigger_failed`) counts as
    /// stuck, not alive, as nothing pushed it to a worker.
    pub fn serving(&self, trigger_failed: bool) -> bool {
        self.alive() && !(self.status == RunStatus::Queued && trigger_failed)
    }
}

const RUN_COLUMNS: &str = "t.id, t.friendly_id, t.organization_id, t.project_id, t.runtime_environment_id, \
    t.task_identifier, t.session_id, (SELECT friendly_id FROM sessions WHERE id = t.session_id) AS session_friendly_id, \
    t.payload, t.status, t.attempt_number, t.max_attempts, t.max_duration_secs, t.ttl_secs, t.heartbeat_deadline, \
    t.cancel_requested_at, t.available_at, t.output, t.error, t.created_at, t.updated_at, t.started_at, t.completed_at, \
    t.superseded_by, t.worker_id, now() AS read_at";

/// Wraps a `task_runs` UPDATE ... RETURNING * so rows come back as [`Run`]s.
fn returning_runs(sql: &str) -> String {
    format!("WITH t AS ({sql}) SELECT {RUN_COLUMNS} FROM t")
}

pub async fn find(pool: &PgPool, env_id: Uuid, friendly_id: &str) -> Result<Option<Run>, StoreError> {
    let sql =
        format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE t.runtime_environment_id = $1 AND t.friendly_id = $2");
    Ok(sqlx::query_as(&sql).bind(env_id).bind(friendly_id).fetch_optional(pool).await?)
}

/// A run by friendly id in any environment: for operators, who see them all.
pub async fn find_for_operator(pool: &PgPool, friendly_id: &str) -> Result<Option<Run>, StoreError> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE t.friendly_id = $1");
    Ok(sqlx::query_as(&sql).bind(friendly_id).fetch_optional(pool).await?)
}

/// Runs by id, in no particular order.
pub async fn find_many(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Run>, StoreError> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE t.id = ANY($1)");
    Ok(sqlx::query_as(&sql).bind(ids).fetch_all(pool).await?)
}

/// Which of an environment's runs a list shows.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub task: Option<String>,
    pub session_id: Option<Uuid>,
}

/// A page of an environment's runs, newest first, at `at` (up to `limit`
/// rows; see [`Keyset`]). Walks `task_runs_env_created_idx`, or
/// `task_runs_session_idx` for one session's runs.
pub async fn page(
    pool: &PgPool,
    env_id: Uuid,
    filter: &RunFilter,
    at: Keyset,
    limit: i64,
) -> Result<Vec<Run>, StoreError> {
    let mut b =
        sqlx::QueryBuilder::new(format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE t.runtime_environment_id = "));
    b.push_bind(env_id);
    if let Some(status) = filter.status {
        b.push(" AND t.status = ").push_bind(status);
    }
    if let Some(task) = &filter.task {
        b.push(" AND t.task_identifier = ").push_bind(task.clone());
    }
    if let Some(session) = filter.session_id {
        b.push(" AND t.session_id = ").push_bind(session);
    }
    at.push(&mut b, "t", limit);
    Ok(b.build_query_as().fetch_all(pool).await?)
}

/// The newest `limit` runs a session triggered, newest first, with why each was
/// triggered (`session_runs.reason`). A session that exits idle gets a run per
/// conversation burst, so the whole history is for the paged runs list.
pub async fn for_session(pool: &PgPool, session_id: Uuid, limit: i64) -> Result<Vec<(Run, TriggerReason)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        run: Run,
        reason: TriggerReason,
    }
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS}, sr.reason FROM session_runs sr JOIN task_runs t ON t.id = sr.run_id
         WHERE sr.session_id = $1 ORDER BY sr.created_at DESC, sr.id DESC LIMIT $2"
    ))
    .bind(session_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.run, r.reason)).collect())
}

pub async fn find_by_id(conn: impl sqlx::PgExecutor<'_>, id: Uuid) -> Result<Option<Run>, StoreError> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE t.id = $1");
    Ok(sqlx::query_as(&sql).bind(id).fetch_optional(conn).await?)
}

/// Hands popped run ids to a worker. Only runs still QUEUED, due and not
/// canceled move to EXECUTING; anything else popped (a duplicate queue entry,
/// a run canceled meanwhile) is dropped, so one run never reaches two workers.
/// Records the request's `dequeue_key` (NULL without one, which also clears a
/// key left by an earlier attempt), so a retry of the same request whose
/// answer was lost finds these runs again ([`reclaim`]).
pub async fn claim_for_execution(
    pool: &PgPool,
    env_id: Uuid,
    ids: &[Uuid],
    heartbeat_timeout_ms: i64,
    worker_id: Option<&str>,
    dequeue_key: Option<&str>,
) -> Result<Vec<Run>, StoreError> {
    let sql = returning_runs(
        "UPDATE task_runs SET status = 'EXECUTING', attempt_number = attempt_number + 1,
            heartbeat_deadline = now() + make_interval(secs => $3::float8 / 1000),
            started_at = coalesce(started_at, now()), worker_id = $4, dequeue_key = $5, updated_at = now()
         WHERE id = ANY($1) AND runtime_environment_id = $2 AND status = 'QUEUED'
           AND available_at <= now() AND cancel_requested_at IS NULL
         RETURNING *",
    );
    Ok(sqlx::query_as(&sql)
        .bind(ids)
        .bind(env_id)
        .bind(heartbeat_timeout_ms)
        .bind(worker_id)
        .bind(dequeue_key)
        .fetch_all(pool)
        .await?)
}

/// The runs an earlier dequeue with `dequeue_key` claimed for `worker_id` and
/// that are still EXECUTING that same attempt (every claim rewrites the key, so
/// a later attempt never matches): the repeat of a dequeue whose answer never
/// reached the worker. Their heartbeat deadline restarts, as the worker only
/// learns of them now. Walks `task_runs_dequeue_key_idx`.
pub async fn reclaim(
    pool: &PgPool,
    env_id: Uuid,
    dequeue_key: &str,
    worker_id: Option<&str>,
    heartbeat_timeout_ms: i64,
) -> Result<Vec<Run>, StoreError> {
    let sql = returning_runs(
        "UPDATE task_runs SET heartbeat_deadline = now() + make_interval(secs => $4::float8 / 1000),
            updated_at = now()
         WHERE runtime_environment_id = $1 AND dequeue_key = $2 AND status = 'EXECUTING'
           AND worker_id IS NOT DISTINCT FROM $3 AND cancel_requested_at IS NULL
         RETURNING *",
    );
    let mut runs: Vec<Run> = sqlx::query_as(&sql)
        .bind(env_id)
        .bind(dequeue_key)
        .bind(worker_id)
        .bind(heartbeat_timeout_ms)
        .fetch_all(pool)
        .await?;
    // RETURNING has no order of its own; answer repeats in a stable one.
    runs.sort_by_key(|r| r.id);
    Ok(runs)
}

/// Outcome of a transition requested by a worker.
#[derive(Debug)]
pub enum Transition {
    Done(Run),
    /// The run is not in a state that allows it (e.g. already final); its current state.
    Refused(Run),
    NotFound,
}

/// The transition's outcome: the updated row if the conditional update matched,
/// otherwise the run as it is (refused) or nothing (not found).
async fn settle(
    pool: &PgPool,
    env_id: Uuid,
    friendly_id: &str,
    updated: Option<Run>,
) -> Result<Transition, StoreError> {
    settle_report(pool, env_id, friendly_id, updated, None).await
}

/// [`settle`] for a worker's report of `outcome` for `attempt`: a run whose
/// row shows that report already made is done (the repeat answers as the
/// first did), anything else refused.
async fn settle_report(
    pool: &PgPool,
    env_id: Uuid,
    friendly_id: &str,
    updated: Option<Run>,
    report: Option<(Outcome, Option<i32>)>,
) -> Result<Transition, StoreError> {
    if let Some(run) = updated {
        return Ok(Transition::Done(run));
    }
    Ok(match find(pool, env_id, friendly_id).await? {
        Some(run)
            if report.is_some_and(|(outcome, attempt)| {
                outcome.already_reported(run.status, run.attempt_number, attempt)
            }) =>
        {
            Transition::Done(run)
        }
        Some(run) => Transition::Refused(run),
        None => Transition::NotFound,
    })
}

/// Pushes the heartbeat deadline of a live run forward.
pub async fn heartbeat(
    pool: &PgPool,
    env_id: Uuid,
    friendly_id: &str,
    timeout_ms: i64,
) -> Result<Transition, StoreError> {
    let sql = returning_runs(
        "UPDATE task_runs SET heartbeat_deadline = now() + make_interval(secs => $3::float8 / 1000), updated_at = now()
         WHERE runtime_environment_id = $1 AND friendly_id = $2 AND status IN ('EXECUTING', 'WAITING')
         RETURNING *",
    );
    let updated = sqlx::query_as(&sql).bind(env_id).bind(friendly_id).bind(timeout_ms).fetch_optional(pool).await?;
    settle(pool, env_id, friendly_id, updated).await
}

/// Completes `attempt` of a live run (the current attempt when None). A
/// repeat for an attempt already completed is done, not refused.
pub async fn complete(
    pool: &PgPool,
    env_id: Uuid,
    friendly_id: &str,
    attempt: Option<i32>,
    output: Option<&serde_json::Value>,
) -> Result<Transition, StoreError> {
    let sql = returning_runs(
        "UPDATE task_runs SET status = 'COMPLETED', output = $3, completed_at = now(), heartbeat_deadline = NULL,
            updated_at = now()
         WHERE runtime_environment_id = $1 AND friendly_id = $2 AND status IN ('EXECUTING', 'WAITING')
           AND ($4::int4 IS NULL OR attempt_number = $4)
         RETURNING *",
    );
    let updated = sqlx::query_as(&sql)
        .bind(env_id)
        .bind(friendly_id)
        .bind(output.map(crate::db::JsonDoc))
        .bind(attempt)
        .fetch_optional(pool)
        .await?;
    settle_report(pool, env_id, friendly_id, updated, Some((Outcome::Completed, attempt))).await
}

/// Records a failed attempt (`attempt`, the current one when None): back to
/// QUEUED after `retry_delay_ms` while attempts remain and the failure is
/// retryable, FAILED otherwise. A repeat for an attempt already failed is
/// done, not refused, and never fails a later attempt.
pub async fn fail(
    pool: &PgPool,
    env_id: Uuid,
    friendly_id: &str,
    attempt: Option<i32>,
    error: &serde_json::Value,
    retryable: bool,
    retry_delay_ms: i64,
) -> Result<Transition, StoreError> {
    let sql = returning_runs(
        "UPDATE task_runs SET
            status = CASE WHEN $4 AND attempt_number < max_attempts THEN 'QUEUED' ELSE 'FAILED' END,
            available_at = CASE WHEN $4 AND attempt_number < max_attempts
                           THEN now() + make_interval(secs => $5::float8 / 1000) ELSE available_at END,
            completed_at = CASE WHEN $4 AND attempt_number < max_attempts THEN NULL ELSE now() END,
            enqueued_at = NULL, heartbeat_deadline = NULL, error = $3, updated_at = now()
         WHERE runtime_environment_id = $1 AND friendly_id = $2 AND status IN ('EXECUTING', 'WAITING')
           AND ($6::int4 IS NULL OR attempt_number = $6)
         RETURNING *",
    );
    let updated = sqlx::query_as(&sql)
        .bind(env_id)
        .bind(friendly_id)
        .bind(crate::db::JsonDoc(error))
        .bind(retryable)
        .bind(retry_delay_ms)
        .bind(attempt)
        .fetch_optional(pool)
        .await?;
    settle_report(pool, env_id, friendly_id, updated, Some((Outcome::Failed, attempt))).await
}

/// Cancels a run that is not final yet. Idempotent: returns false when there was
/// nothing to cancel. The worker learns through its next heartbeat.
pub async fn cancel(conn: impl sqlx::PgExecutor<'_>, run_id: Uuid) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE task_runs SET status = 'CANCELED', cancel_requested_at = now(), completed_at = now(),
            heartbeat_deadline = NULL, updated_at = now()
         WHERE id = $1 AND status IN ('QUEUED', 'EXECUTING', 'WAITING')",
    )
    .bind(run_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Replaces `run_id` by `by` (a friendly id): cancels it if it is not final and
/// records who took over, in the caller's transaction (the claim's), so the
/// swap and the fence on the old run commit together. Returns whether it
/// canceled the run (it was not final yet), for the operator's audit row.
pub async fn supersede(conn: &mut PgConnection, run_id: Uuid, by: &str) -> Result<bool, StoreError> {
    let canceled: Option<bool> = sqlx::query_scalar(
        "WITH old AS (SELECT id AS old_id, status AS old_status FROM task_runs WHERE id = $1 FOR UPDATE)
         UPDATE task_runs SET superseded_by = $2, updated_at = now(),
            status = CASE WHEN status IN ('QUEUED', 'EXECUTING', 'WAITING') THEN 'CANCELED' ELSE status END,
            cancel_requested_at = CASE WHEN status IN ('QUEUED', 'EXECUTING', 'WAITING') THEN now() ELSE cancel_requested_at END,
            completed_at = coalesce(completed_at, now()), heartbeat_deadline = NULL
         FROM old WHERE id = old_id
         RETURNING old_status IN ('QUEUED', 'EXECUTING', 'WAITING')",
    )
    .bind(run_id)
    .bind(by)
    .fetch_optional(conn)
    .await?;
    Ok(canceled.unwrap_or(false))
}

/// Locks a run's row for a wait being created (see `waitpoints::store::create`)
/// and returns its status and who superseded it, if anyone.
pub async fn lock_for_wait(conn: &mut PgConnection, run_id: Uuid) -> Result<(RunStatus, Option<String>), StoreError> {
    Ok(sqlx::query_as("SELECT status, superseded_by FROM task_runs WHERE id = $1 FOR UPDATE")
        .bind(run_id)
        .fetch_one(conn)
        .await?)
}

/// A run that starts waiting: EXECUTING → WAITING.
pub async fn suspend(conn: &mut PgConnection, run_id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE task_runs SET status = 'WAITING', updated_at = now() WHERE id = $1 AND status = 'EXECUTING'")
        .bind(run_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// After one of its waits ended: the run goes back to EXECUTING unless it
/// still waits on another one.
pub async fn resume_unless_waiting(conn: &mut PgConnection, run_id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE task_runs SET status = 'EXECUTING', updated_at = now()
         WHERE id = $1 AND status = 'WAITING'
           AND NOT EXISTS (SELECT 1 FROM waitpoints WHERE run_id = $1 AND status = 'WAITING')",
    )
    .bind(run_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A run moved to a final state by a sweep.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SweptRun {
    pub id: Uuid,
    pub friendly_id: String,
    pub runtime_environment_id: Uuid,
    pub session_id: Option<Uuid>,
    pub status: RunStatus,
}

/// Final-state sweeps. Each is one conditional UPDATE, so running it twice, or
/// on two servers at once, moves every run at most once.
pub async fn sweep(pool: &PgPool) -> Result<Vec<SweptRun>, StoreError> {
    let crashed: Vec<SweptRun> = sqlx::query_as(
        "UPDATE task_runs SET status = 'CRASHED', completed_at = now(), updated_at = now(),
            error = jsonb_build_object('message', 'heartbeat deadline missed')
         WHERE status IN ('EXECUTING', 'WAITING') AND heartbeat_deadline < now()
         RETURNING id, friendly_id, runtime_environment_id, session_id, status",
    )
    .fetch_all(pool)
    .await?;
    let timed_out: Vec<SweptRun> = sqlx::query_as(
        "UPDATE task_runs SET status = 'TIMED_OUT', completed_at = now(), updated_at = now(), heartbeat_deadline = NULL,
            error = jsonb_build_object('message', 'maxDuration exceeded')
         WHERE status IN ('EXECUTING', 'WAITING') AND max_duration_secs IS NOT NULL
           AND started_at + make_interval(secs => max_duration_secs) < now()
         RETURNING id, friendly_id, runtime_environment_id, session_id, status",
    )
    .fetch_all(pool)
    .await?;
    let expired: Vec<SweptRun> = sqlx::query_as(
        "UPDATE task_runs SET status = 'EXPIRED', completed_at = now(), updated_at = now(),
            error = jsonb_build_object('message', 'ttl passed while queued')
         WHERE status = 'QUEUED' AND attempt_number = 0 AND ttl_secs IS NOT NULL
           AND created_at + make_interval(secs => ttl_secs) < now()
         RETURNING id, friendly_id, runtime_environment_id, session_id, status",
    )
    .fetch_all(pool)
    .await?;
    Ok(crashed.into_iter().chain(timed_out).chain(expired).collect())
}

/// A queued run due on its queue.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueRun {
    pub id: Uuid,
    pub runtime_environment_id: Uuid,
    pub task_identifier: String,
}

/// QUEUED runs that are due and not on their queue: never pushed, pushed before
/// a retry delay, or pushed long ago (a pop whose claim never happened, e.g. a
/// server that died in between). Marks them pushed; the caller pushes them.
pub async fn take_due(pool: &PgPool, stale_after_ms: i64, limit: i64) -> Result<Vec<DueRun>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE task_runs SET enqueued_at = now()
         WHERE id IN (
             SELECT id FROM task_runs
             WHERE status = 'QUEUED' AND available_at <= now()
               AND (enqueued_at IS NULL OR enqueued_at < available_at
                    OR enqueued_at < now() - make_interval(secs => $1::float8 / 1000))
             ORDER BY available_at LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id, runtime_environment_id, task_identifier",
    )
    .bind(stale_after_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Marks one run as pushed (the trigger path pushes right away).
pub async fn mark_enqueued(pool: &PgPool, run_id: Uuid) -> Result<Option<DueRun>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE task_runs SET enqueued_at = now() WHERE id = $1 AND status = 'QUEUED'
         RETURNING id, runtime_environment_id, task_identifier",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?)
}

/// Reads the next `limit` runs of every environment in (created_at, id) order
/// after `after`, within an optional created_at range: one chunk of a copy to
/// ClickHouse. Walks `task_runs_created_id_idx`.
pub async fn export_chunk(
    conn: &mut PgConnection,
    after: Option<(DateTime<Utc>, Uuid)>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Run>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {RUN_COLUMNS} FROM task_runs t WHERE true"));
    crate::db::paging::push_created_range(&mut b, "t", after, from, to);
    b.push(format!(" ORDER BY t.created_at, t.id LIMIT {}", limit.max(1)));
    Ok(b.build_query_as().fetch_all(conn).await?)
}

/// Up to `limit` distinct task identifiers an environment has run, in order:
/// a skip scan of `task_runs_env_task_status_idx` (one index probe per task),
/// so it stays cheap however many runs there are. The playground suggests them.
pub async fn task_identifiers(pool: &PgPool, env_id: Uuid, limit: i64) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE t(task) AS (
             SELECT min(task_identifier) FROM task_runs WHERE runtime_environment_id = $1
             UNION ALL
             SELECT (SELECT min(task_identifier) FROM task_runs
                     WHERE runtime_environment_id = $1 AND task_identifier > t.task)
             FROM t WHERE t.task IS NOT NULL
         )
         SELECT task FROM t WHERE task IS NOT NULL LIMIT $2",
    )
    .bind(env_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
