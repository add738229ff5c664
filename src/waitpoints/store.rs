//! SQL that owns `waitpoints`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::paging::Keyset;
use crate::db::{JsonDoc, StoreError};
use crate::runs::store as run_store;
use crate::runs::RunStatus;
use crate::streams::Io;

/// Lifecycle of a waitpoint: WAITING until a record, its timeout, its
/// session's close or its run's replacement ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WaitpointStatus {
    Waiting,
    Completed,
    TimedOut,
    /// Its run was superseded (a hand-off) while it waited.
    Canceled,
}

impl WaitpointStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitpointStatus::Waiting => "WAITING",
            WaitpointStatus::Completed => "COMPLETED",
            WaitpointStatus::TimedOut => "TIMED_OUT",
            WaitpointStatus::Canceled => "CANCELED",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Waitpoint {
    pub id: Uuid,
    pub friendly_id: String,
    pub runtime_environment_id: Uuid,
    pub run_id: Uuid,
    pub session_id: Uuid,
    pub io: Io,
    pub status: WaitpointStatus,
    pub after_seq: i64,
    pub idempotency_key: Option<String>,
    pub idempotency_key_expires_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub timeout_at: Option<DateTime<Utc>>,
    pub output: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Postgres' `now()` when the row was read: what `timeout_at` and
    /// `idempotency_key_expires_at` are compared with, never this process's
    /// clock (see `crate::clock`).
    pub read_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, friendly_id, runtime_environment_id, run_id, session_id, io, status, after_seq, \
    idempotency_key, idempotency_key_expires_at, tags, timeout_at, output, created_at, completed_at, now() AS read_at";

pub struct NewWaitpoint<'a> {
    pub env_id: Uuid,
    pub run_id: Uuid,
    pub session_id: Uuid,
    pub io: Io,
    pub after_seq: i64,
    pub idempotency_key: Option<&'a str>,
    /// How long the key holds, from the insert by Postgres' clock.
    pub idempotency_key_ttl_secs: Option<i64>,
    pub tags: &'a [String],
    pub timeout: Option<crate::waitpoints::Deadline>,
    /// Most WAITING waitpoints the run may have, this one included.
    pub max_pending: i64,
}

/// What [`create`] did.
#[derive(Debug)]
// Returned once per wait and never stored: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Created {
    /// A new waitpoint (`false`) or the live one holding the idempotency key (`true`).
    Waitpoint(Waitpoint, bool),
    /// The run cannot wait: it is not executing, or another run replaced it.
    RunNotActive { status: RunStatus, superseded_by: Option<String> },
    /// The run already has its most WAITING waitpoints.
    TooManyPending,
}

/// Creates a waitpoint and suspends its run (EXECUTING → WAITING), or returns
/// the live waitpoint holding the same idempotency key. An expired key is
/// released for the new waitpoint.
///
/// The run's row is locked first: a hand-off that supersedes the run takes the
/// same lock, so either it sees this waitpoint (and cancels it) or this sees
/// the run superseded, never a wait left pending on a replaced run. The same
/// lock makes the run's pending count exact: concurrent creates for one run
/// take turns, so none can pass `max_pending` together. A key already held
/// answers its waitpoint even at the quota (it adds nothing).
pub async fn create(pool: &PgPool, new: &NewWaitpoint<'_>) -> Result<Created, StoreError> {
    for _ in 0..2 {
        let mut tx = crate::db::begin(pool).await?;
        let (status, superseded_by) = run_store::lock_for_wait(&mut tx, new.run_id).await?;
        if superseded_by.is_some() || !matches!(status, RunStatus::Executing | RunStatus::Waiting) {
            return Ok(Created::RunNotActive { status, superseded_by });
        }
        if let Some(key) = new.idempotency_key {
            let existing: Option<Waitpoint> = sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM waitpoints WHERE runtime_environment_id = $1 AND idempotency_key = $2 FOR UPDATE"
            ))
            .bind(new.env_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(w) = existing {
                if w.idempotency_key_expires_at.is_none_or(|e| e > w.read_at) {
                    tx.commit().await?;
                    return Ok(Created::Waitpoint(w, true));
                }
                sqlx::query("UPDATE waitpoints SET idempotency_key = NULL WHERE id = $1")
                    .bind(w.id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Counts at most `max_pending` rows, on the run's partial index of
        // WAITING waitpoints.
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM waitpoints WHERE run_id = $1 AND status = 'WAITING' LIMIT $2) p",
        )
        .bind(new.run_id)
        .bind(new.max_pending.max(0))
        .fetch_one(&mut *tx)
        .await?;
        if pending >= new.max_pending {
            return Ok(Created::TooManyPending);
        }
        let inserted: Result<Waitpoint, sqlx::Error> = sqlx::query_as(&format!(
            "INSERT INTO waitpoints (id, friendly_id, runtime_environment_id, run_id, session_id, io, after_seq,
                 idempotency_key, idempotency_key_expires_at, tags, timeout_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + $9::bigint * interval '1 second', $10,
                 COALESCE($11::timestamptz, now() + $12::bigint * interval '1 second'))
             RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(crate::ids::new_waitpoint_id())
        .bind(new.env_id)
        .bind(new.run_id)
        .bind(new.session_id)
        .bind(new.io)
        .bind(new.after_seq)
        .bind(new.idempotency_key)
        .bind(new.idempotency_key_ttl_secs)
        .bind(new.tags)
        .bind(new.timeout.and_then(|t| t.absolute()))
        .bind(new.timeout.and_then(|t| t.relative_secs()))
        .fetch_one(&mut *tx)
        .await;
        match inserted.map_err(StoreError::from) {
            Ok(w) => {
                run_store::suspend(&mut tx, new.run_id).await?;
                tx.commit().await?;
                return Ok(Created::Waitpoint(w, false));
            }
            // A concurrent call took the key first: loop once to read theirs.
            Err(StoreError::UniqueViolation(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Corrupt("idempotency key contention".into()))
}

pub async fn find(pool: &PgPool, env_id: Uuid, friendly_id: &str) -> Result<Option<Waitpoint>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM waitpoints WHERE runtime_environment_id = $1 AND friendly_id = $2"
    ))
    .bind(env_id)
    .bind(friendly_id)
    .fetch_optional(pool)
    .await?)
}

pub async fn find_by_id(pool: &PgPool, id: Uuid) -> Result<Option<Waitpoint>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM waitpoints WHERE id = $1")).bind(id).fetch_optional(pool).await?)
}

/// Completes a waiting waitpoint with `output`. Conditional, so concurrent
/// completions (the drain job, the worker's wait, close) settle on one output.
/// Returns whether this call completed it.
pub async fn complete(pool: &PgPool, id: Uuid, output: &serde_json::Value) -> Result<bool, StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let run: Option<Uuid> = sqlx::query_scalar(
        "UPDATE waitpoints SET status = 'COMPLETED', output = $2, completed_at = now()
         WHERE id = $1 AND status = 'WAITING' RETURNING run_id",
    )
    .bind(id)
    .bind(JsonDoc(output))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(run) = run {
        run_store::resume_unless_waiting(&mut tx, run).await?;
    }
    tx.commit().await?;
    Ok(run.is_some())
}

/// Times out waitpoints past `timeout_at`; returns them (for Redis cleanup).
pub async fn time_out_due(pool: &PgPool) -> Result<Vec<Waitpoint>, StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    let timed_out: Vec<Waitpoint> = sqlx::query_as(&format!(
        "UPDATE waitpoints SET status = 'TIMED_OUT', completed_at = now()
         WHERE status = 'WAITING' AND timeout_at <= now() RETURNING {COLUMNS}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for w in &timed_out {
        run_store::resume_unless_waiting(&mut tx, w.run_id).await?;
    }
    tx.commit().await?;
    Ok(timed_out)
}

/// One page of the WAITING waitpoints on a session's channels, newest first
/// (see [`Keyset`]); reads one more than `size` so the caller
/// knows whether another page follows.
pub async fn waiting_page_for_session(
    pool: &PgPool,
    session_id: Uuid,
    at: Keyset,
    size: i64,
) -> Result<Vec<Waitpoint>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM waitpoints w WHERE w.session_id = "));
    b.push_bind(session_id).push(" AND w.status = 'WAITING'");
    at.push(&mut b, "w", size + 1);
    Ok(b.build_query_as().fetch_all(pool).await?)
}

/// How many WAITING waitpoints a session's channels have.
pub async fn count_waiting_for_session(pool: &PgPool, session_id: Uuid) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM waitpoints WHERE session_id = $1 AND status = 'WAITING'")
        .bind(session_id)
        .fetch_one(pool)
        .await?)
}

/// Waiting waitpoints on a session's channels, oldest first.
pub async fn waiting_for_session(pool: &PgPool, session_id: Uuid) -> Result<Vec<Waitpoint>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM waitpoints WHERE session_id = $1 AND status = 'WAITING' ORDER BY created_at"
    ))
    .bind(session_id)
    .fetch_all(pool)
    .await?)
}

/// One page of a run's waitpoints of every status, newest first (see
/// [`Keyset`]), on the run's creation index; reads one more than
/// `size` so the caller knows whether another page follows.
pub async fn page_for_run(pool: &PgPool, run_id: Uuid, at: Keyset, size: i64) -> Result<Vec<Waitpoint>, StoreError> {
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM waitpoints w WHERE w.run_id = "));
    b.push_bind(run_id);
    at.push(&mut b, "w", size + 1);
    Ok(b.build_query_as().fetch_all(pool).await?)
}

/// Cancels the waits a superseded run left pending, in the hand-off's
/// transaction: nothing will ever resume that run, so its waits must not
/// linger as WAITING (nor be completed by a later record).
pub async fn cancel_for_run(
    conn: &mut sqlx::PgConnection,
    run_id: Uuid,
    output: &serde_json::Value,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "UPDATE waitpoints SET status = 'CANCELED', output = $2, completed_at = now() WHERE run_id = $1 AND status = 'WAITING'",
    )
    .bind(run_id)
    .bind(JsonDoc(output))
    .execute(conn)
    .await?
    .rows_affected())
}
