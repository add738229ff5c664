//! The session as run manager: keep exactly one live run per open session.
//!
//! A claim is an optimistic compare-and-set on `current_run_version`, never a
//! lock held while triggering. The new run, its audit row and its trigger-run
//! job are written in the same transaction as the claim: a caller that loses
//! the race rolls all three back (its run is cancelled before anyone could see
//! it) and adopts the winner's run, read back from the primary.

use chrono::Utc;
use uuid::Uuid;

use super::model::Session;
use super::store;
use crate::app::AppState;
use crate::db::StoreError;
use crate::jobs::{self, Job};
use crate::runs::store::{self as run_store, NewRun, RunOwner};
use crate::runs::TriggerReason;
use crate::sessions::validate::TriggerConfig;

/// How many times a caller re-reads and retries after losing a claim race.
pub const MAX_CLAIM_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum RunManagerError {
    #[error("session is closed or expired")]
    Closed,
    #[error("session not found")]
    NotFound,
    #[error("could not claim a run after {0} attempts")]
    Contended(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `ensure_run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The current run is alive; nothing was triggered.
    Alive(String),
    /// A new run was triggered and claimed.
    Triggered(String),
}

impl Ensured {
    pub fn run_id(&self) -> &str {
        match self {
            Ensured::Alive(r) | Ensured::Triggered(r) => r,
        }
    }
}

fn is_open(s: &Session) -> bool {
    s.closed_at.is_none() && s.expires_at.is_none_or(|e| e > Utc::now())
}

async fn current_run_alive(state: &AppState, s: &Session) -> Result<Option<String>, StoreError> {
    let Some(run_id) = s.current_run_id else { return Ok(None) };
    let run = run_store::find_by_id(&state.db, run_id).await?;
    Ok(run.filter(|r| r.is_alive(Utc::now())).map(|r| r.friendly_id))
}

/// Triggers a run for `s` and claims it if `s` is still at `s.current_run_version`
/// (and, with `expect_current`, still points at that run). Returns the new run's
/// friendly id, or None when the claim lost.
async fn trigger_and_claim(
    state: &AppState,
    s: &Session,
    reason: TriggerReason,
    expect_current: Option<Uuid>,
    cancel_previous: bool,
) -> Result<Option<String>, StoreError> {
    let config: TriggerConfig =
        serde_json::from_value(s.trigger_config.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let run = NewRun::for_session(
        RunOwner {
            organization_id: s.organization_id,
            project_id: s.project_id,
            runtime_environment_id: s.runtime_environment_id,
            session_id: s.id,
            session_friendly_id: &s.friendly_id,
            task_identifier: &s.task_identifier,
        },
        &config,
        reason,
    );
    let mut tx = state.db.begin().await?;
    run_store::insert(&mut tx, &run).await?;
    let claimed = sqlx::query(
        "UPDATE sessions SET current_run_id = $2, current_run_version = current_run_version + 1, updated_at = now()
         WHERE id = $1 AND current_run_version = $3 AND closed_at IS NULL
           AND (expires_at IS NULL OR expires_at > now())
           AND ($4::uuid IS NULL OR current_run_id = $4)",
    )
    .bind(s.id)
    .bind(run.id)
    .bind(s.current_run_version)
    .bind(expect_current)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !claimed {
        tx.rollback().await?;
        return Ok(None);
    }
    store::insert_audit(&mut tx, s.id, run.id, reason).await?;
    let mut job_ids = vec![jobs::store::insert(&mut *tx, &Job::TriggerRun { run_id: run.id }, jobs::DEFAULT_MAX_ATTEMPTS).await?];
    if let (true, Some(previous)) = (cancel_previous, s.current_run_id) {
        job_ids.push(jobs::store::insert(&mut *tx, &Job::CancelRun { run_id: previous }, jobs::DEFAULT_MAX_ATTEMPTS).await?);
    }
    tx.commit().await?;
    state.jobs.relay(&job_ids).await;
    Ok(Some(run.friendly_id))
}

/// Makes sure the session has a live run, triggering a continuation if not.
pub async fn ensure_run(state: &AppState, env_id: Uuid, session_id: Uuid) -> Result<Ensured, RunManagerError> {
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        // Always the primary: a stale read would retry with an old version.
        let s = store::find_by_id(&state.db, env_id, session_id).await?.ok_or(RunManagerError::NotFound)?;
        if !is_open(&s) {
            return Err(RunManagerError::Closed);
        }
        if let Some(run) = current_run_alive(state, &s).await? {
            return Ok(Ensured::Alive(run));
        }
        if let Some(run) = trigger_and_claim(state, &s, TriggerReason::Continuation, None, false).await? {
            return Ok(Ensured::Triggered(run));
        }
    }
    Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
}

/// Result of a handoff request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub run_id: String,
    pub swapped: bool,
}

/// End-and-continue: the current run hands the session to a fresh run. Only the
/// current run may; anyone else (a stale or preempted run) gets `swapped: false`
/// and the run that holds the session now.
pub async fn hand_off(
    state: &AppState,
    env_id: Uuid,
    session_id: Uuid,
    calling_run: &str,
    reason: TriggerReason,
) -> Result<Handoff, RunManagerError> {
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let s = store::find_by_id(&state.db, env_id, session_id).await?.ok_or(RunManagerError::NotFound)?;
        if !is_open(&s) {
            return Err(RunManagerError::Closed);
        }
        let current = s.current_run_friendly_id.clone().unwrap_or_default();
        if current != calling_run {
            return Ok(Handoff { run_id: current, swapped: false });
        }
        if let Some(run) = trigger_and_claim(state, &s, reason, s.current_run_id, false).await? {
            return Ok(Handoff { run_id: run, swapped: true });
        }
    }
    Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
}

/// Operator action: start a fresh run now (reason manual), cancelling the
/// current one so the session still has exactly one live run.
pub async fn trigger_manual(state: &AppState, env_id: Uuid, session_id: Uuid) -> Result<String, RunManagerError> {
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let s = store::find_by_id(&state.db, env_id, session_id).await?.ok_or(RunManagerError::NotFound)?;
        if !is_open(&s) {
            return Err(RunManagerError::Closed);
        }
        if let Some(run) = trigger_and_claim(state, &s, TriggerReason::Manual, None, true).await? {
            return Ok(run);
        }
    }
    Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
}
