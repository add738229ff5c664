//! The sessions' jobs: `run-handoff` (fence the channels to the run that
//! replaced another) and the `session-expiry-sweep`; and how the run sweep's
//! crashed runs are replaced ([`CrashedRuns`] for the run manager).

use sqlx::PgPool;
use uuid::Uuid;

use super::run_manager::{apply_handoff, HandoffStep, RunManager};
use super::store;
use crate::jobs::runtime::Outcome;
use crate::jobs::{JobKind, Payload};
use crate::runs::jobs::CrashedRuns;
use crate::runs::store::SweptRun;
use crate::streams::store::ChannelStore;
use crate::waitpoints::Waitpoints;

/// The `run-handoff` job carries the step the claim could not finish.
impl Payload for HandoffStep {
    fn kind(&self) -> JobKind {
        JobKind::RunHandoff
    }
}

pub async fn run_handoff(channels: &ChannelStore, step: &HandoffStep) -> Outcome {
    apply_handoff(channels, step).await?;
    Ok(format!("channels of session {} fenced to run {}", step.session_id, step.run))
}

/// Sessions past `expires_at` get no new runs; this cancels the runs they still
/// have, and closes their channels. Conditional updates make a second pass (or
/// a second server) a no-op.
pub async fn expiry_sweep(db: &PgPool, waitpoints: &Waitpoints) -> Outcome {
    let expired = store::expired_with_live_runs(db, 500).await?;
    let mut canceled = 0;
    for run_id in &expired {
        if crate::runs::store::cancel(db, *run_id).await? {
            canceled += 1;
        }
    }
    // Channels of expired sessions stop taking writes and expire after retention.
    let expired_sessions = store::expired_with_open_channels(db, 200).await?;
    for session_id in &expired_sessions {
        waitpoints.close_channels(*session_id, Some("expired"), false).await?;
    }
    Ok(format!("{canceled} runs of expired sessions canceled, {} channels closed", expired_sessions.len()))
}

/// A run that died mid-turn leaves its message unanswered, and no client
/// sends it again: a continuation answers it (it resumes after the last
/// answered `.in` record). A failure here leaves the session to the failed
/// hand-offs page rather than failing the sweep.
impl CrashedRuns for RunManager {
    async fn replace_crashed(&self, r: &SweptRun, session: Uuid) {
        match self.has_unanswered_input(session).await {
            Ok(true) => {
                if let Err(err) = self.ensure_run(r.runtime_environment_id, session).await {
                    tracing::warn!(run = %r.friendly_id, %err, "could not replace a crashed run");
                }
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(run = %r.friendly_id, %err, "could not read the crashed run's session input"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Job;

    #[test]
    fn a_handoff_is_stored_as_before() {
        let session_id = Uuid::now_v7();
        let step = HandoffStep { session_id, version: 2, run: "run_1".into(), control: None };
        let job = Job::new(&step).unwrap();
        assert_eq!(
            job.to_stored(),
            serde_json::json!({ "kind": "run-handoff", "session_id": session_id, "version": 2, "run": "run_1", "control": null })
        );
        assert_eq!(job.payload::<HandoffStep>().unwrap(), step);
    }
}
