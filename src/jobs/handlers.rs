//! What each job does. Every handler is idempotent: state changes are
//! conditional updates, and queue pushes tolerate duplicates (a popped run that
//! is no longer QUEUED is dropped at claim time).

use chrono::Utc;

use super::Job;
use crate::app::AppState;
use crate::runs::store as run_store;

/// What a job run did, for the attempt log.
pub type Outcome = anyhow::Result<String>;

pub async fn execute(state: &AppState, job: &Job) -> Outcome {
    match job {
        Job::TriggerRun { run_id } => match run_store::mark_enqueued(&state.db, *run_id).await? {
            Some(due) => {
                state.run_queue.push(due.runtime_environment_id, &due.task_identifier, due.id).await?;
                Ok(format!("queued run {run_id}"))
            }
            None => Ok(format!("run {run_id} is no longer queued")),
        },
        Job::CancelRun { run_id } => {
            let canceled = run_store::cancel(&state.db, *run_id).await?;
            Ok(if canceled { format!("canceled run {run_id}") } else { format!("run {run_id} already final") })
        }
        Job::RunSweep => run_sweep(state).await,
        Job::SessionExpirySweep => session_expiry_sweep(state).await,
        Job::DrainWaitpoints { session_id, io, seq_num, waitpoint_ids } => {
            let n = crate::waitpoints::drain(state, *session_id, *io, *seq_num, waitpoint_ids).await?;
            Ok(format!("{n} waitpoints completed with record {seq_num}"))
        }
        Job::CloseChannels { session_id, reason, notify_in } => {
            crate::waitpoints::close_channels(state, *session_id, reason.as_deref(), *notify_in).await?;
            Ok(format!("channels of session {session_id} closed"))
        }
        Job::WaitpointTimeoutSweep => {
            Ok(format!("{} waitpoints timed out", crate::waitpoints::time_out_due(state).await?))
        }
        Job::RunHandoff(step) => {
            crate::sessions::run_manager::apply_handoff(state, step).await?;
            Ok(format!("channels of session {} fenced to run {}", step.session_id, step.run))
        }
        Job::InputBootSweep => {
            let (booted, checked) = crate::streams::effects::boot_unread_input(state).await?;
            Ok(format!("{booted} runs booted for unread input ({checked} sessions checked)"))
        }
    }
}

/// Crash detection (missed heartbeats), maxDuration, queued-run ttl, and
/// re-pushing due QUEUED runs (retries whose delay passed, lost pops).
async fn run_sweep(state: &AppState) -> Outcome {
    let swept = run_store::sweep(&state.db).await?;
    for r in &swept {
        tracing::info!(run = %r.friendly_id, status = %r.status, "run swept");
    }
    let stale_ms = (state.config.run_heartbeat_timeout_ms as i64).max(5_000);
    let due = run_store::take_due(&state.db, stale_ms, 500).await?;
    for run in &due {
        state.run_queue.push(run.runtime_environment_id, &run.task_identifier, run.id).await?;
    }
    Ok(format!("{} runs finalised, {} pushed", swept.len(), due.len()))
}

/// Sessions past `expires_at` get no new runs; this cancels the runs they still
/// have. Conditional updates make a second pass (or a second server) a no-op.
async fn session_expiry_sweep(state: &AppState) -> Outcome {
    let expired = crate::sessions::store::expired_with_live_runs(&state.db, Utc::now(), 500).await?;
    let mut canceled = 0;
    for run_id in &expired {
        if run_store::cancel(&state.db, *run_id).await? {
            canceled += 1;
        }
    }
    // Channels of expired sessions stop taking writes and expire after retention.
    let expired_sessions = crate::sessions::store::expired_with_open_channels(&state.db, 200).await?;
    for session_id in &expired_sessions {
        crate::waitpoints::close_channels(state, *session_id, Some("expired"), false).await?;
    }
    // Keep the job ledger bounded: succeeded jobs are kept for a day.
    let pruned = sqlx::query("DELETE FROM jobs WHERE status = 'succeeded' AND finished_at < now() - interval '1 day'")
        .execute(&state.db)
        .await?
        .rows_affected();
    Ok(format!(
        "{canceled} runs of expired sessions canceled, {} channels closed, {pruned} old jobs pruned",
        expired_sessions.len()
    ))
}
