//! The session as run manager: keep exactly one live run per open session.
//!
//! A claim is an optimistic compare-and-set on `current_run_version`, never a
//! lock held while triggering. The new run, its audit row and its trigger-run
//! job are written in the same transaction as the claim: a caller that loses
//! the race rolls all three back (its run is cancelled before anyone could see
//! it) and adopts the winner's run, read back from the primary.
//!
//! A run that replaces another (a continuation, an end-and-continue hand-off,
//! a manual trigger) fences the one it replaces, in the claim's transaction:
//! the old run is canceled (its heartbeat answers `cancel: true`), marked as
//! superseded (its complete/fail answer 409 saying so), and its pending waits
//! are canceled. After the commit, and before the caller is answered, the
//! channels' fence moves to the new run, so the old run's token can no longer
//! append to them (checked inside the append script), and an upgrade writes
//! its `upgrade-required` record to `.out`. A `run-handoff` job written in the
//! same transaction repeats that step if this process dies before it.

use serde_json::{json, Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::failed_handoffs::HandoffReason;
use super::model::Session;
use super::store;
use crate::audit::{self, Actor, AuditAction};
use crate::db::StoreError;
use crate::jobs::{self, Jobs};
use crate::runs::jobs::TriggerRun;
use crate::runs::store::{self as run_store, NewRun, RunOwner};
use crate::runs::{Continuation, RunStatus, TriggerReason};
use crate::sessions::validate::TriggerConfig;
use crate::streams::store::{handoff_part, ChannelError, ChannelStore};
use crate::streams::{ChannelKey, Io, CONTROL_HEADER};
use crate::waitpoints::store as waitpoint_store;

/// How many times a caller re-reads and retries after losing a claim race.
pub const MAX_CLAIM_ATTEMPTS: usize = 3;

/// How far back in `.out` a new run's resume point is looked for. A turn ends
/// every few records, so this only bounds the cost for a channel with none.
const RESUME_SCAN_RECORDS: usize = 5_000;

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
    /// The swap committed, but fencing the channels (or writing the upgrade
    /// record) failed; the `run-handoff` job finishes it.
    #[error("hand-off step failed: {0}")]
    Channel(#[from] ChannelError),
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

/// Open by Postgres' clock, the one that wrote `expires_at` (see `crate::clock`).
fn is_open(s: &Session) -> bool {
    s.status_now() == super::SessionStatus::Active
}

/// What a claimed hand-off still has to do outside Postgres (see the module
/// docs); the `run-handoff` job carries the same fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandoffStep {
    pub session_id: Uuid,
    /// The session's `current_run_version` once the new run holds it.
    pub version: i64,
    /// The new run's friendly id.
    pub run: String,
    /// A control record for `.out` (`upgrade-required` for an upgrade).
    pub control: Option<String>,
}

/// Moves both channels' fence to the new run and writes the hand-off's control
/// record. Idempotent: the fence never moves back, and the record has a part id
/// of its own.
pub async fn apply_handoff(channels: &ChannelStore, step: &HandoffStep) -> Result<(), ChannelError> {
    for io in [Io::In, Io::Out] {
        channels.set_fence(ChannelKey { session_id: step.session_id, io }, step.version, &step.run).await?;
    }
    if let Some(control) = &step.control {
        let headers = [(CONTROL_HEADER.to_string(), control.clone())];
        let key = ChannelKey { session_id: step.session_id, io: Io::Out };
        match channels.append(key, "", &headers, Some(&handoff_part(&step.run))).await {
            // A close since the swap: subscribers learn of that instead.
            Ok(_) | Err(ChannelError::Closed) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// An audited action that a claim carries out (a manual trigger, a handoff
/// retry). Its audit row is written in the claim's own transaction, so the
/// new run and its record stand or fall together; the row's detail names the
/// new run (`run`) and the run the claim canceled (`canceled`, null if none)
/// besides the action's own fields.
#[derive(Debug, Clone)]
pub struct AuditedClaim {
    pub actor: Actor,
    pub action: AuditAction,
    pub detail: Map<String, Value>,
}

/// Result of a handoff request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub run_id: String,
    pub swapped: bool,
}

/// The session as run manager (see the module docs), with what it uses: the
/// database, the job outbox, and the channel store (fences, resume points).
#[derive(Clone)]
pub struct RunManager {
    db: PgPool,
    jobs: Jobs,
    channels: ChannelStore,
}

impl RunManager {
    pub fn new(db: PgPool, jobs: Jobs, channels: ChannelStore) -> Self {
        RunManager { db, jobs, channels }
    }

    /// The session as it is now, if it is open. Always read from the primary:
    /// a stale read would retry a claim with an old version.
    async fn open_session(&self, env_id: Uuid, session_id: Uuid) -> Result<Session, RunManagerError> {
        let s = store::find_by_id(&self.db, env_id, session_id).await?.ok_or(RunManagerError::NotFound)?;
        if !is_open(&s) {
            return Err(RunManagerError::Closed);
        }
        Ok(s)
    }

    async fn current_run_alive(&self, s: &Session) -> Result<Option<String>, StoreError> {
        let Some(run_id) = s.current_run_id else { return Ok(None) };
        let run = run_store::find_by_id(&self.db, run_id).await?;
        Ok(run.filter(|r| r.alive()).map(|r| r.friendly_id))
    }

    /// The current run if it can serve the session: alive, and not a QUEUED
    /// run whose trigger-run job failed for good (see `Run::serving`).
    async fn current_run_serving(&self, s: &Session) -> Result<Option<String>, StoreError> {
        let Some(run_id) = s.current_run_id else { return Ok(None) };
        let Some(run) = run_store::find_by_id(&self.db, run_id).await? else { return Ok(None) };
        let failed =
            run.status == RunStatus::Queued && !jobs::store::failed_triggers(&self.db, &[run_id]).await?.is_empty();
        Ok(run.serving(failed).then_some(run.friendly_id))
    }

    /// The `.in` seq the newest finished turn answered (see `Continuation`).
    async fn last_answered(&self, session_id: Uuid) -> Result<Option<u64>, ChannelError> {
        self.channels.last_answered_seq(ChannelKey { session_id, io: Io::Out }, RESUME_SCAN_RECORDS).await
    }

    /// Does `.in` hold records past the last one a finished turn answered?
    /// Those are what a session with no live run is left waiting on. The
    /// newest record decides, not the channel's counter: after Redis lost its
    /// data the counter restarts at the channel's floor with no record under
    /// it, and a run booted for that gap would find nothing to read.
    pub async fn has_unanswered_input(&self, session_id: Uuid) -> Result<bool, ChannelError> {
        let Some(newest) = self.channels.last(ChannelKey { session_id, io: Io::In }).await? else {
            return Ok(false);
        };
        Ok(self.last_answered(session_id).await?.is_none_or(|answered| answered < newest.seq_num))
    }

    /// Triggers a run for `s` and claims it if `s` is still at `s.current_run_version`
    /// (and, with `expect_current`, still points at that run), fencing the run it
    /// replaces. Returns the new run's friendly id, or None when the claim lost.
    async fn trigger_and_claim(
        &self,
        s: &Session,
        reason: TriggerReason,
        expect_current: Option<Uuid>,
        audited: Option<&AuditedClaim>,
    ) -> Result<Option<String>, RunManagerError> {
        let config: TriggerConfig =
            serde_json::from_value(s.trigger_config.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let previous = s.current_run_id.zip(s.current_run_friendly_id.clone());
        let continuation = match &previous {
            Some((_, previous_run_id)) => Some(Continuation {
                previous_run_id: previous_run_id.clone(),
                resume_after_in_seq: self.last_answered(s.id).await?,
            }),
            None => None,
        };
        let run = NewRun::for_session(
            RunOwner {
                organization_id: s.organization_id,
                project_id: s.project_id,
                runtime_environment_id: s.runtime_environment_id,
                session_id: s.id,
                session_friendly_id: &s.friendly_id,
                task_identifier: &s.task_identifier,
            },
            &config.run_settings(),
            continuation.as_ref(),
        );
        let step = HandoffStep {
            session_id: s.id,
            version: i64::from(s.current_run_version) + 1,
            run: run.friendly_id.clone(),
            control: (reason == TriggerReason::Upgrade).then(|| "upgrade-required".to_string()),
        };
        let mut tx = crate::db::begin(&self.db).await.map_err(StoreError::from)?;
        run_store::insert(&mut tx, &run).await?;
        if !store::claim_run(&mut tx, s.id, run.id, s.current_run_version, expect_current).await? {
            tx.rollback().await.map_err(StoreError::from)?;
            return Ok(None);
        }
        store::insert_audit(&mut tx, s.id, run.id, reason).await?;
        let mut job_ids =
            vec![jobs::store::insert(&mut *tx, &TriggerRun { run_id: run.id }, jobs::DEFAULT_MAX_ATTEMPTS).await?];
        let mut canceled = None;
        if let Some((previous_id, previous_run)) = &previous {
            if run_store::supersede(&mut tx, *previous_id, &run.friendly_id).await? {
                canceled = Some(previous_run.clone());
            }
            let output = json!({"canceled": true, "reason": "superseded", "supersededBy": run.friendly_id});
            waitpoint_store::cancel_for_run(&mut tx, *previous_id, &output).await?;
        }
        if let Some(by) = audited {
            let mut detail = by.detail.clone();
            detail.insert("run".into(), json!(run.friendly_id));
            detail.insert("canceled".into(), json!(canceled));
            let target = format!("session:{}", s.friendly_id);
            audit::record(&mut *tx, &by.actor, by.action, &target, Value::Object(detail)).await?;
        }
        if previous.is_some() || step.control.is_some() {
            job_ids.push(jobs::store::insert(&mut *tx, &step, jobs::DEFAULT_MAX_ATTEMPTS).await?);
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.jobs.relay(&job_ids).await;
        if previous.is_some() || step.control.is_some() {
            // Not acknowledged until the old run is fenced off the channels.
            apply_handoff(&self.channels, &step).await?;
        }
        Ok(Some(run.friendly_id))
    }

    /// Makes sure the session has a live run, triggering a continuation if not.
    ///
    /// A caller that lost the claim to another adopts the winner's run, and
    /// moves the channels' fence to it before answering: the winner does so
    /// only after its commit, and a caller answered in between could see the
    /// replaced run still write (two boots of one `.in` append, the request's
    /// and the sweep's, race like this).
    pub async fn ensure_run(&self, env_id: Uuid, session_id: Uuid) -> Result<Ensured, RunManagerError> {
        let mut lost = false;
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let s = self.open_session(env_id, session_id).await?;
            if let Some(run) = self.current_run_alive(&s).await? {
                if lost {
                    let step = HandoffStep {
                        session_id: s.id,
                        version: i64::from(s.current_run_version),
                        run: run.clone(),
                        control: None,
                    };
                    apply_handoff(&self.channels, &step).await?;
                }
                return Ok(Ensured::Alive(run));
            }
            if let Some(run) = self.trigger_and_claim(&s, TriggerReason::Continuation, None, None).await? {
                return Ok(Ensured::Triggered(run));
            }
            lost = true;
        }
        Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
    }

    /// End-and-continue: the current run hands the session to a fresh run, which
    /// replaces (and fences) it. Only the current run may; anyone else (a stale or
    /// preempted run) gets `swapped: false` and the run that holds the session now.
    /// Who may call this at all is the route's rule (the run's own token or a
    /// secret key).
    pub async fn hand_off(
        &self,
        env_id: Uuid,
        session_id: Uuid,
        calling_run: &str,
        reason: TriggerReason,
    ) -> Result<Handoff, RunManagerError> {
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let s = self.open_session(env_id, session_id).await?;
            let current = s.current_run_friendly_id.clone().unwrap_or_default();
            if current != calling_run {
                return Ok(Handoff { run_id: current, swapped: false });
            }
            if let Some(run) = self.trigger_and_claim(&s, reason, s.current_run_id, None).await? {
                return Ok(Handoff { run_id: run, swapped: true });
            }
        }
        Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
    }

    /// Start a fresh run now (reason manual), for an operator on the dashboard
    /// or at the command line; the current one is replaced and fenced, so the
    /// session still has exactly one live run. Audited as `by`, in the claim's
    /// transaction.
    pub async fn trigger_manual(&self, env_id: Uuid, session_id: Uuid, by: &Actor) -> Result<String, RunManagerError> {
        let by = AuditedClaim { actor: by.clone(), action: AuditAction::SessionTrigger, detail: Map::new() };
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let s = self.open_session(env_id, session_id).await?;
            if let Some(run) = self.trigger_and_claim(&s, TriggerReason::Manual, None, Some(&by)).await? {
                return Ok(run);
            }
        }
        Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
    }

    /// Operator action: retries a failed handoff (see `failed_handoffs`),
    /// listed for `reason`. Like [`RunManager::ensure_run`] it only reports a
    /// run that can serve the session, so it never makes a second live run;
    /// otherwise it triggers a continuation, whose claim cancels a run stuck in
    /// QUEUED and writes the operator's audit row (`handoff.retry`), all in one
    /// transaction.
    pub async fn retry_handoff(
        &self,
        env_id: Uuid,
        session_id: Uuid,
        by: &Actor,
        reason: HandoffReason,
    ) -> Result<Ensured, RunManagerError> {
        let mut detail = Map::new();
        detail.insert("reason".into(), json!(reason.as_str()));
        let by = AuditedClaim { actor: by.clone(), action: AuditAction::HandoffRetry, detail };
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let s = self.open_session(env_id, session_id).await?;
            if let Some(run) = self.current_run_serving(&s).await? {
                return Ok(Ensured::Alive(run));
            }
            if let Some(run) = self.trigger_and_claim(&s, TriggerReason::Continuation, None, Some(&by)).await? {
                return Ok(Ensured::Triggered(run));
            }
        }
        Err(RunManagerError::Contended(MAX_CLAIM_ATTEMPTS))
    }
}
