//! SQL that owns `sessions` and `session_runs`. Every query is scoped to one
//! environment.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::model::Session;
use super::validate::{NewSession, Patch, SessionPatch};
use crate::db::paging::Keyset;
use crate::db::StoreError;
use crate::ids::{self, SESSION_PREFIX};
use crate::jobs::{self, NewJob};
use crate::runs::jobs::TriggerRun;
use crate::runs::store::{self as run_store, NewRun, RunOwner};
use crate::runs::TriggerReason;
use crate::tenancy::Environment;
use crate::waitpoints::jobs::CloseChannels;

/// Session columns, qualified by the alias `s`, plus the current run's friendly id
/// from `task_runs r`. Used by every read so each returns the same shape.
pub const SESSION_SELECT: &str = "s.id, s.friendly_id, s.external_id, s.type, s.task_identifier, s.trigger_config, \
     s.tags, s.metadata, s.organization_id, s.project_id, s.runtime_environment_id, s.environment_type, \
     s.current_run_id, s.current_run_version, r.friendly_id AS current_run_friendly_id, s.closed_at, \
     s.closed_reason, s.expires_at, s.created_at, s.updated_at, s.channels_closed_at, now() AS read_at";

/// Wraps a data-modifying statement `sql` (which must `RETURNING *`) so the
/// result comes back as a full [`Session`].
fn returning_session(sql: &str) -> String {
    format!("WITH s AS ({sql}) SELECT {SESSION_SELECT} FROM s LEFT JOIN task_runs r ON r.id = s.current_run_id")
}

#[derive(Debug)]
pub enum CreateOutcome {
    /// A new session with its first run, and the job that triggers that run.
    Created(Session, NewJob),
    /// A live session already had this external id; its trigger config was refreshed.
    Cached(Session),
    /// A closed session holds this external id; nothing was changed.
    Closed,
    /// An expired (not closed) session holds this external id; nothing was changed.
    Expired,
    /// The expiry asked for is not ahead of Postgres' clock: a session born
    /// expired could never be written to, and its external id would be taken
    /// for good. Judged here, not by the process's clock, since the expiry
    /// sweep and every write check use Postgres' (see `crate::clock`).
    ExpiryPast,
}

/// Creates a session, its first QUEUED run, the run claim and the audit row in one
/// transaction. Idempotent on (environment, external id) through one atomic
/// upsert: whether the row is new is read from the upsert's result, never from a
/// separate pre-read that a concurrent create could race.
pub async fn create(pool: &PgPool, env: &Environment, new: &NewSession) -> Result<CreateOutcome, StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let outcome = create_in(&mut tx, env, new).await?;
    tx.commit().await?;
    Ok(match outcome {
        // Re-read in a fresh statement: when the upsert waited on a concurrent
        // first create, its snapshot predates that create's run, so the joined
        // run id may be missing.
        CreateOutcome::Cached(session) => {
            let fresh = find_by_id(pool, env.id, session.id).await?;
            CreateOutcome::Cached(fresh.unwrap_or(session))
        }
        other => other,
    })
}

/// [`create`] inside the caller's transaction, so a caller can commit its own
/// rows (an operator's audit row) with the session. The caller commits; a
/// `Cached` session is as the upsert saw it (re-read it after the commit, as
/// `create` does, for its current run).
pub async fn create_in(
    tx: &mut PgConnection,
    env: &Environment,
    new: &NewSession,
) -> Result<CreateOutcome, StoreError> {
    let session_id = Uuid::now_v7();
    let friendly_id = ids::new_session_id();
    let run = NewRun::for_session(
        RunOwner {
            organization_id: env.organization_id,
            project_id: env.project_id,
            runtime_environment_id: env.id,
            session_id,
            session_friendly_id: &friendly_id,
            task_identifier: &new.task_identifier,
        },
        &new.trigger_config.run_settings(),
        None,
    );
    let trigger_config = serde_json::to_value(&new.trigger_config).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if let Some(expires_at) = new.expires_at {
        let past: bool =
            sqlx::query_scalar("SELECT $1::timestamptz <= now()").bind(expires_at).fetch_one(&mut *tx).await?;
        if past {
            return Ok(CreateOutcome::ExpiryPast);
        }
    }

    // The new row claims its first run at insert (version 1). On a conflict with a
    // live row only the trigger config is refreshed; a closed or expired row is
    // left as is and no row comes back.
    let upsert = returning_session(
        "INSERT INTO sessions (id, friendly_id, external_id, type, task_identifier, trigger_config, tags, metadata,
             organization_id, project_id, runtime_environment_id, environment_type, expires_at,
             current_run_id, current_run_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 1)
         ON CONFLICT (runtime_environment_id, external_id) DO UPDATE
             SET trigger_config = EXCLUDED.trigger_config, updated_at = now()
             WHERE sessions.closed_at IS NULL AND (sessions.expires_at IS NULL OR sessions.expires_at > now())
         RETURNING *",
    );
    let row: Option<Session> = sqlx::query_as(&upsert)
        .bind(session_id)
        .bind(&friendly_id)
        .bind(&new.external_id)
        .bind(&new.kind)
        .bind(&new.task_identifier)
        .bind(&trigger_config)
        .bind(&new.tags)
        .bind(&new.metadata)
        .bind(env.organization_id)
        .bind(env.project_id)
        .bind(env.id)
        .bind(env.env_type.as_str())
        .bind(new.expires_at)
        .bind(run.id)
        .fetch_optional(&mut *tx)
        .await?;

    let Some(mut session) = row else {
        // The row the upsert refused is closed or, failing that, expired (as of
        // the upsert's clock, so no second reading of the time can disagree).
        let closed: Option<bool> = sqlx::query_scalar(
            "SELECT closed_at IS NOT NULL FROM sessions WHERE runtime_environment_id = $1 AND external_id = $2",
        )
        .bind(env.id)
        .bind(&new.external_id)
        .fetch_optional(&mut *tx)
        .await?;
        return Ok(if closed == Some(false) { CreateOutcome::Expired } else { CreateOutcome::Closed });
    };
    if session.id != session_id {
        return Ok(CreateOutcome::Cached(session));
    }
    run_store::insert(&mut *tx, &run).await?;
    insert_audit(&mut *tx, session.id, run.id, TriggerReason::Initial).await?;
    let job = jobs::store::insert(&mut *tx, &TriggerRun { run_id: run.id }, jobs::DEFAULT_MAX_ATTEMPTS).await?;
    session.current_run_friendly_id = Some(run.friendly_id);
    Ok(CreateOutcome::Created(session, job))
}

/// The compare-and-set every run claim is: points the session at `run_id` if it
/// is still at `version`, open, and (with `expect_current`) still on that run.
/// False when another claim (or a close) got there first.
pub async fn claim_run(
    conn: &mut PgConnection,
    session_id: Uuid,
    run_id: Uuid,
    version: i32,
    expect_current: Option<Uuid>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE sessions SET current_run_id = $2, current_run_version = current_run_version + 1, updated_at = now()
         WHERE id = $1 AND current_run_version = $3 AND closed_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())
           AND ($4::uuid IS NULL OR current_run_id = $4)",
    )
    .bind(session_id)
    .bind(run_id)
    .bind(version)
    .bind(expect_current)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that `session_id` triggered `run_id` and why.
pub async fn insert_audit(
    conn: &mut PgConnection,
    session_id: Uuid,
    run_id: Uuid,
    reason: TriggerReason,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO session_runs (id, session_id, run_id, reason) VALUES ($1, $2, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(session_id)
        .bind(run_id)
        .bind(reason)
        .execute(conn)
        .await?;
    Ok(())
}

/// Why each of `run_ids` was triggered, for runs of `session_ids` (walks
/// `session_runs_session_idx`): `(run id, reason)` pairs.
pub async fn trigger_reasons(
    pool: &PgPool,
    session_ids: &[Uuid],
    run_ids: &[Uuid],
) -> Result<Vec<(Uuid, TriggerReason)>, StoreError> {
    Ok(sqlx::query_as("SELECT run_id, reason FROM session_runs WHERE session_id = ANY($1) AND run_id = ANY($2)")
        .bind(session_ids)
        .bind(run_ids)
        .fetch_all(pool)
        .await?)
}

/// Finds a session by friendly id (`session_…`) or, otherwise, by external id.
pub async fn find(pool: &PgPool, env_id: Uuid, key: &str) -> Result<Option<Session>, StoreError> {
    let column = if key.starts_with(SESSION_PREFIX) { "friendly_id" } else { "external_id" };
    let sql = format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.runtime_environment_id = $1 AND s.{column} = $2"
    );
    Ok(sqlx::query_as(&sql).bind(env_id).bind(key).fetch_optional(pool).await?)
}

/// Finds a session by friendly id in any environment: for operators, who see
/// every environment (the API always scopes to the caller's).
pub async fn find_for_operator(pool: &PgPool, friendly_id: &str) -> Result<Option<Session>, StoreError> {
    let sql = format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.friendly_id = $1"
    );
    Ok(sqlx::query_as(&sql).bind(friendly_id).fetch_optional(pool).await?)
}

pub async fn find_by_id(pool: &PgPool, env_id: Uuid, id: Uuid) -> Result<Option<Session>, StoreError> {
    let sql = format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.runtime_environment_id = $1 AND s.id = $2"
    );
    Ok(sqlx::query_as(&sql).bind(env_id).bind(id).fetch_optional(pool).await?)
}

#[derive(Debug)]
pub enum UpdateError {
    /// Another session in the environment already uses the requested external id.
    ExternalIdTaken,
    Store(StoreError),
}

impl From<StoreError> for UpdateError {
    fn from(e: StoreError) -> Self {
        UpdateError::Store(e)
    }
}

/// Applies a patch; fields the patch leaves `Missing` keep their value.
pub async fn update(
    pool: &PgPool,
    env_id: Uuid,
    id: Uuid,
    patch: &SessionPatch,
) -> Result<Option<Session>, UpdateError> {
    let sql = returning_session(
        "UPDATE sessions SET
            tags = CASE WHEN $3 THEN $4 ELSE tags END,
            metadata = CASE WHEN $5 THEN $6 ELSE metadata END,
            external_id = CASE WHEN $7 THEN $8 ELSE external_id END,
            updated_at = now()
         WHERE runtime_environment_id = $1 AND id = $2
         RETURNING *",
    );
    let (set_meta, meta) = match &patch.metadata {
        Patch::Missing => (false, None),
        Patch::Null => (true, None),
        Patch::Value(v) => (true, Some(v)),
    };
    let (set_ext, ext) = match &patch.external_id {
        Patch::Missing => (false, None),
        Patch::Null => (true, None),
        Patch::Value(v) => (true, Some(v)),
    };
    let result = sqlx::query_as(&sql)
        .bind(env_id)
        .bind(id)
        .bind(patch.tags.is_some())
        .bind(patch.tags.as_deref().unwrap_or(&[]))
        .bind(set_meta)
        .bind(meta)
        .bind(set_ext)
        .bind(ext)
        .fetch_optional(pool)
        .await;
    match result.map_err(StoreError::from) {
        Ok(row) => Ok(row),
        Err(StoreError::UniqueViolation(c)) if c == "sessions_env_external_id_key" => Err(UpdateError::ExternalIdTaken),
        Err(e) => Err(e.into()),
    }
}

/// Closes an open session inside the caller's transaction (the close's audit
/// row commits in the same one; see `sessions::close`) and writes the job
/// that seals its channels. The conditional update only matches an open row,
/// so concurrent closes cannot overwrite the first `closed_at` and
/// `closed_reason`. None if the session is not open (or not there).
///
/// The job wakes a waiting run with a `session-closed` record on `.in`
/// unless `calling_run` (the run closing its own session) is the current run.
pub async fn close_in(
    tx: &mut sqlx::PgConnection,
    env_id: Uuid,
    id: Uuid,
    reason: Option<&str>,
    calling_run: Option<&str>,
) -> Result<Option<(Session, NewJob)>, StoreError> {
    let sql = returning_session(
        "UPDATE sessions SET closed_at = now(), closed_reason = $3, updated_at = now()
         WHERE runtime_environment_id = $1 AND id = $2 AND closed_at IS NULL
         RETURNING *",
    );
    let closed: Option<Session> =
        sqlx::query_as(&sql).bind(env_id).bind(id).bind(reason).fetch_optional(&mut *tx).await?;
    let Some(s) = closed else { return Ok(None) };
    let job =
        CloseChannels { session_id: s.id, reason: reason.map(String::from), notify_in: s.close_wakes_in(calling_run) };
    let job_id = jobs::store::insert(&mut *tx, &job, jobs::DEFAULT_MAX_ATTEMPTS).await?;
    Ok(Some((s, job_id)))
}

/// Up to `limit` open sessions (neither closed nor expired) of every
/// environment, newest first, older than `before` (walks
/// `sessions_open_created_idx`).
pub async fn open_page(
    pool: &PgPool,
    before: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Session>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.closed_at IS NULL AND (s.expires_at IS NULL OR s.expires_at > now())"
    ));
    let at = before.map_or(Keyset::Newest, |(t, id)| Keyset::Older(t, id));
    at.push(&mut b, "s", limit);
    Ok(b.build_query_as().fetch_all(pool).await?)
}

/// Current runs, not yet final, of sessions whose `expires_at` has passed.
pub async fn expired_with_live_runs(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, StoreError> {
    // Postgres' clock, like every other expiry query: a process whose clock
    // runs ahead must not cancel runs of sessions that have not expired.
    Ok(sqlx::query_scalar(
        "SELECT r.id FROM sessions s JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.expires_at <= now() AND s.closed_at IS NULL AND r.status IN ('QUEUED', 'EXECUTING', 'WAITING')
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Expired sessions whose channels still take writes.
pub async fn expired_with_open_channels(pool: &PgPool, limit: i64) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM sessions WHERE expires_at <= now() AND closed_at IS NULL AND channels_closed_at IS NULL LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Records that the session's channels are sealed (close, or expiry), so the
/// expiry sweep does it once and a retried close knows it may answer.
pub async fn mark_channels_closed(pool: &PgPool, session_id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE sessions SET channels_closed_at = now() WHERE id = $1 AND channels_closed_at IS NULL")
        .bind(session_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Where a copy of the table stands: the last (created_at, id) copied.
pub type ExportCursor = (chrono::DateTime<chrono::Utc>, Uuid);

/// Reads the next `limit` sessions of every environment in (created_at, id)
/// order after `after`, within an optional created_at range: one chunk of a
/// copy to ClickHouse. Walks `sessions_created_id_idx`.
pub async fn export_chunk(
    conn: &mut PgConnection,
    after: Option<ExportCursor>,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
    limit: i64,
) -> Result<Vec<Session>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id WHERE true"
    ));
    crate::db::paging::push_created_range(&mut b, "s", after, from, to);
    b.push(format!(" ORDER BY s.created_at, s.id LIMIT {}", limit.max(1)));
    Ok(b.build_query_as().fetch_all(conn).await?)
}

/// How many of an environment's sessions were created at or after `since`
/// (the dashboard overview's count while ClickHouse is away; an index range
/// of `sessions_env_created_idx`).
pub async fn count_created_since(
    pool: &PgPool,
    env_id: Uuid,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM sessions WHERE runtime_environment_id = $1 AND created_at >= $2")
        .bind(env_id)
        .bind(since)
        .fetch_one(pool)
        .await?)
}

/// Ids of an environment's sessions changed at or after `since`, at most
/// `limit` (the list's overlay; walks `sessions_env_updated_idx`).
pub async fn changed_since(
    pool: &PgPool,
    env_id: Uuid,
    since: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT id FROM sessions WHERE runtime_environment_id = $1 AND updated_at >= $2 LIMIT {}",
        limit.max(1)
    ))
    .bind(env_id)
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// Full rows of an environment's sessions by id, in no particular order.
pub async fn find_many(pool: &PgPool, env_id: Uuid, ids: &[Uuid]) -> Result<Vec<Session>, StoreError> {
    let sql = format!(
        "SELECT {SESSION_SELECT} FROM sessions s LEFT JOIN task_runs r ON r.id = s.current_run_id
         WHERE s.runtime_environment_id = $1 AND s.id = ANY($2)"
    );
    Ok(sqlx::query_as(&sql).bind(env_id).bind(ids).fetch_all(pool).await?)
}

/// The current WAL position as a number (the byte offset `X/Y` stands for):
/// what a backfill chunk reads before its SELECT, so a later live change
/// always carries a higher version.
pub async fn current_wal_lsn(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint").fetch_one(conn).await?;
    u64::try_from(lsn).map_err(|_| StoreError::Corrupt(format!("WAL position {lsn}")))
}
