//! Failed handoffs: open sessions that no run serves while something waits
//! for one, listed for operators to retry (`RunManager::retry_handoff`).
//!
//! No run serves a session when it has no current run, or the current run is
//! not alive, or it is a QUEUED run whose trigger-run job spent its attempts
//! (nothing ever queued it; see `Run::serving`). Such a session is a failed
//! handoff when
//! - its current run replaced another (continuation, upgrade or manual) and
//!   that run's trigger-run job failed for good, or
//! - `.in` holds records past the last one a finished turn answered.
//!
//! The second needs a Redis read per session, so a scan examines a bounded
//! number of open sessions, newest first, and says where it stopped: the next
//! page continues from there. A page is never unbounded work, and may show
//! fewer rows than it could hold (even none) while more remain to examine.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::model::Session;
use super::run_manager::RunManager;
use super::store;
use crate::db::StoreError;
use crate::jobs::store::{self as job_store, FailedTrigger};
use crate::runs::store::{self as run_store, Run};
use crate::runs::TriggerReason;
use crate::streams::store::ChannelError;

/// Why a session is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffReason {
    Continuation,
    Upgrade,
    Manual,
    /// `.in` holds records no finished turn answered.
    UnansweredInput,
}

impl HandoffReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffReason::Continuation => "continuation",
            HandoffReason::Upgrade => "upgrade",
            HandoffReason::Manual => "manual",
            HandoffReason::UnansweredInput => "unanswered input",
        }
    }

    /// The hand-off a run's trigger reason names; a first run is none.
    fn of_trigger(reason: TriggerReason) -> Option<Self> {
        match reason {
            TriggerReason::Initial => None,
            TriggerReason::Continuation => Some(HandoffReason::Continuation),
            TriggerReason::Upgrade => Some(HandoffReason::Upgrade),
            TriggerReason::Manual => Some(HandoffReason::Manual),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FailedHandoffError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// A listed session, with what an operator needs to judge it.
#[derive(Debug, Clone)]
pub struct FailedHandoff {
    pub session: Session,
    pub reason: HandoffReason,
    /// The current run, stuck or ended, if the session has one.
    pub run: Option<Run>,
    /// The failed trigger-run job's last error.
    pub last_error: Option<String>,
    /// Since when: the failed job's end, else the run's, else the session's last change.
    pub since: DateTime<Utc>,
}

/// One page of a scan.
#[derive(Debug)]
pub struct Scan {
    pub found: Vec<FailedHandoff>,
    /// How many open sessions this page examined.
    pub examined: usize,
    /// Where the next page starts (the last session examined), if any remain.
    pub next: Option<(DateTime<Utc>, Uuid)>,
}

/// What the database says about the current runs of some sessions.
struct Facts {
    runs: HashMap<Uuid, Run>,
    reasons: HashMap<Uuid, TriggerReason>,
    failed: HashMap<Uuid, FailedTrigger>,
}

impl Facts {
    /// Three queries, however many sessions.
    async fn of(db: &sqlx::PgPool, sessions: &[Session]) -> Result<Facts, StoreError> {
        let session_ids: Vec<Uuid> = sessions.iter().map(|s| s.id).collect();
        let run_ids: Vec<Uuid> = sessions.iter().filter_map(|s| s.current_run_id).collect();
        let runs = run_store::find_many(db, &run_ids).await?;
        let reasons = store::trigger_reasons(db, &session_ids, &run_ids).await?;
        let failed = job_store::failed_triggers(db, &run_ids).await?;
        Ok(Facts {
            runs: runs.into_iter().map(|r| (r.id, r)).collect(),
            reasons: reasons.into_iter().collect(),
            failed: failed.into_iter().map(|f| (f.run_id, f)).collect(),
        })
    }
}

/// What the database alone tells about a session.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A run serves it.
    Served,
    /// Its hand-off's trigger-run job failed for good.
    Failed(HandoffReason),
    /// No run serves it: listed if `.in` holds unanswered records.
    CheckInput,
}

fn verdict(run: Option<&Run>, trigger_failed: bool, reason: Option<TriggerReason>) -> Verdict {
    if run.is_some_and(|r| r.serving(trigger_failed)) {
        return Verdict::Served;
    }
    match reason.and_then(HandoffReason::of_trigger) {
        Some(handoff) if trigger_failed => Verdict::Failed(handoff),
        _ => Verdict::CheckInput,
    }
}

async fn examine(runs: &RunManager, s: &Session, facts: &Facts) -> Result<Option<FailedHandoff>, FailedHandoffError> {
    let run = s.current_run_id.and_then(|id| facts.runs.get(&id));
    let failed = s.current_run_id.and_then(|id| facts.failed.get(&id));
    let reason = s.current_run_id.and_then(|id| facts.reasons.get(&id)).copied();
    let reason = match verdict(run, failed.is_some(), reason) {
        Verdict::Served => return Ok(None),
        Verdict::Failed(reason) => reason,
        Verdict::CheckInput if runs.has_unanswered_input(s.id).await? => HandoffReason::UnansweredInput,
        Verdict::CheckInput => return Ok(None),
    };
    let since = failed.and_then(|f| f.finished_at).or(run.and_then(|r| r.completed_at)).unwrap_or(s.updated_at);
    Ok(Some(FailedHandoff {
        session: s.clone(),
        reason,
        run: run.cloned(),
        last_error: failed.and_then(|f| f.last_error.clone()),
        since,
    }))
}

/// Examines up to `examine_at_most` open sessions older than `before` (newest first),
/// stopping early once `want` are found.
pub async fn scan(
    db: &sqlx::PgPool,
    runs: &RunManager,
    before: Option<(DateTime<Utc>, Uuid)>,
    examine_at_most: usize,
    want: usize,
) -> Result<Scan, FailedHandoffError> {
    // One more than examined, to know whether any remain.
    let mut sessions = store::open_page(db, before, examine_at_most as i64 + 1).await?;
    let more = sessions.len() > examine_at_most;
    sessions.truncate(examine_at_most);
    let facts = Facts::of(db, &sessions).await?;
    let mut found = Vec::new();
    let mut examined = 0;
    for s in &sessions {
        examined += 1;
        if let Some(f) = examine(runs, s, &facts).await? {
            found.push(f);
            if found.len() == want {
                break;
            }
        }
    }
    let more = more || examined < sessions.len();
    let next = sessions.get(examined.saturating_sub(1)).filter(|_| more).map(|s| (s.created_at, s.id));
    Ok(Scan { found, examined, next })
}

/// Whether one session is a failed handoff now, and why. None for a closed
/// or expired session too.
pub async fn diagnose(
    db: &sqlx::PgPool,
    runs: &RunManager,
    s: &Session,
) -> Result<Option<FailedHandoff>, FailedHandoffError> {
    if s.status_now() != super::SessionStatus::Active {
        return Ok(None);
    }
    let facts = Facts::of(db, std::slice::from_ref(s)).await?;
    examine(runs, s, &facts).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runs::RunStatus;
    use chrono::Duration;

    fn run(status: RunStatus, heartbeat_deadline: Option<DateTime<Utc>>) -> Run {
        let now = Utc::now();
        Run {
            id: Uuid::now_v7(),
            friendly_id: "run_x".into(),
            organization_id: Uuid::nil(),
            project_id: Uuid::nil(),
            runtime_environment_id: Uuid::nil(),
            task_identifier: "t".into(),
            session_id: None,
            session_friendly_id: None,
            payload: serde_json::json!({}),
            status,
            attempt_number: 0,
            max_attempts: 1,
            max_duration_secs: None,
            ttl_secs: None,
            heartbeat_deadline,
            cancel_requested_at: None,
            available_at: now,
            output: None,
            error: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
            superseded_by: None,
            worker_id: None,
            read_at: now,
        }
    }

    #[test]
    fn a_queued_run_whose_trigger_failed_serves_nobody() {
        let now = Utc::now();
        let queued = run(RunStatus::Queued, None);
        let manual = Some(TriggerReason::Manual);
        assert_eq!(verdict(Some(&queued), false, manual), Verdict::Served);
        assert_eq!(verdict(Some(&queued), true, manual), Verdict::Failed(HandoffReason::Manual));
        // A first run's failed trigger is no hand-off: only unanswered input lists it.
        assert_eq!(verdict(Some(&queued), true, Some(TriggerReason::Initial)), Verdict::CheckInput);
        let executing = run(RunStatus::Executing, Some(now + Duration::seconds(5)));
        assert_eq!(verdict(Some(&executing), true, manual), Verdict::Served, "a live run serves, whatever its job");
        let crashed = run(RunStatus::Crashed, None);
        assert_eq!(verdict(Some(&crashed), false, Some(TriggerReason::Upgrade)), Verdict::CheckInput);
        assert_eq!(verdict(None, false, None), Verdict::CheckInput);
    }
}
