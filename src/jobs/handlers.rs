//! What each job does. Every handler is idempotent: state changes are
//! conditional updates, and queue pushes tolerate duplicates (a popped run that
//! is no longer QUEUED is dropped at claim time).

use sqlx::PgPool;

use super::{Job, Jobs};
use crate::analytics::backfill;
use crate::analytics::ClickHouse;
use crate::runs::queue::RunQueue;
use crate::runs::store as run_store;
use crate::runs::RunStatus;
use crate::sessions::run_manager::{self, RunManager};
use crate::streams::effects::Appender;
use crate::streams::store::ChannelStore;
use crate::waitpoints::Waitpoints;

/// What a job run did, for the attempt log.
pub type Outcome = anyhow::Result<String>;

/// What the jobs use, handed to the job workers as their data.
#[derive(Clone)]
pub struct JobContext {
    pub db: PgPool,
    pub run_queue: RunQueue,
    pub channels: ChannelStore,
    pub runs: RunManager,
    pub waitpoints: Waitpoints,
    pub appender: Appender,
    pub jobs: Jobs,
    pub analytics: ClickHouse,
    /// This process's replication slot while replication is on (reconciliation
    /// only means something then), and the list's overlay margin, which the
    /// reconciliation's cutoff leaves to changes still on their way.
    pub replication_slot: Option<String>,
    pub overlay_margin: std::time::Duration,
    /// A run this long without a heartbeat is crashed; the run sweep re-pushes
    /// queued runs popped at least this long ago (and 5 s at least).
    pub heartbeat_timeout_ms: u64,
}

/// Runs `job`; `attempt` is this attempt's number, from 1 (it keeps counting
/// across retries).
pub async fn execute(ctx: &JobContext, job: &Job, attempt: u32) -> Outcome {
    match job {
        Job::TriggerRun { run_id } => match run_store::mark_enqueued(&ctx.db, *run_id).await? {
            Some(due) => {
                ctx.run_queue.push(due.runtime_environment_id, &due.task_identifier, due.id).await?;
                Ok(format!("queued run {run_id}"))
            }
            None => Ok(format!("run {run_id} is no longer queued")),
        },
        Job::CancelRun { run_id } => {
            let canceled = run_store::cancel(&ctx.db, *run_id).await?;
            Ok(if canceled { format!("canceled run {run_id}") } else { format!("run {run_id} already final") })
        }
        Job::RunSweep => run_sweep(ctx).await,
        Job::SessionExpirySweep => session_expiry_sweep(ctx).await,
        Job::DrainWaitpoints { session_id, io, seq_num, waitpoint_ids } => {
            let n = ctx.waitpoints.drain(*session_id, *io, *seq_num, waitpoint_ids).await?;
            Ok(format!("{n} waitpoints completed with record {seq_num}"))
        }
        Job::CloseChannels { session_id, reason, notify_in } => {
            ctx.waitpoints.close_channels(*session_id, reason.as_deref(), *notify_in).await?;
            Ok(format!("channels of session {session_id} closed"))
        }
        Job::WaitpointTimeoutSweep => Ok(format!("{} waitpoints timed out", ctx.waitpoints.time_out_due().await?)),
        Job::RunHandoff(step) => {
            run_manager::apply_handoff(&ctx.channels, step).await?;
            Ok(format!("channels of session {} fenced to run {}", step.session_id, step.run))
        }
        Job::Backfill { backfill_id, chunk } => {
            let faults = backfill::Faults::default();
            Ok(backfill::run_chunk(&ctx.db, &ctx.analytics, &ctx.jobs, *backfill_id, *chunk, faults).await?)
        }
        Job::ReplicationFlush { flush_id } => {
            Ok(crate::replication::flush::execute(&ctx.db, &ctx.analytics, *flush_id).await?)
        }
        Job::ReplicationReconcile => {
            let Some(slot) = &ctx.replication_slot else {
                return Ok("replication is off; nothing to reconcile".into());
            };
            let summary =
                crate::replication::reconcile::run(&ctx.db, &ctx.analytics, &ctx.jobs, ctx.overlay_margin).await?;
            crate::replication::health::record_reconcile(&ctx.db, slot, &summary).await?;
            Ok(summary)
        }
        Job::InputBootSweep => {
            let (booted, checked) = ctx.appender.boot_unread_input().await?;
            Ok(format!("{booted} runs booted for unread input ({checked} sessions checked)"))
        }
        Job::Probe { fail_first } => probe(*fail_first, attempt),
    }
}

/// The probe job (a test seam): fails attempts 1 to `fail_first`, then succeeds.
fn probe(fail_first: u32, attempt: u32) -> Outcome {
    if attempt <= fail_first {
        anyhow::bail!("probe: failing attempt {attempt} of {fail_first} on purpose");
    }
    Ok(format!("probe: succeeded on attempt {attempt}, after {fail_first} failed on purpose"))
}

/// Crash detection (missed heartbeats), maxDuration, queued-run ttl, and
/// re-pushing due QUEUED runs (retries whose delay passed, lost pops).
async fn run_sweep(ctx: &JobContext) -> Outcome {
    let swept = run_store::sweep(&ctx.db).await?;
    for r in &swept {
        tracing::info!(run = %r.friendly_id, status = %r.status, "run swept");
        if let (RunStatus::Crashed, Some(session)) = (r.status, r.session_id) {
            replace_crashed(ctx, r, session).await;
        }
    }
    let stale_ms = (ctx.heartbeat_timeout_ms as i64).max(5_000);
    let due = run_store::take_due(&ctx.db, stale_ms, 500).await?;
    for run in &due {
        ctx.run_queue.push(run.runtime_environment_id, &run.task_identifier, run.id).await?;
    }
    Ok(format!("{} runs finalised, {} pushed", swept.len(), due.len()))
}

/// A run that died mid-turn leaves its message unanswered, and no client
/// sends it again: a continuation answers it (it resumes after the last
/// answered `.in` record). A failure here leaves the session to the failed
/// hand-offs page rather than failing the sweep.
async fn replace_crashed(ctx: &JobContext, r: &run_store::SweptRun, session: uuid::Uuid) {
    match ctx.runs.has_unanswered_input(session).await {
        Ok(true) => {
            if let Err(err) = ctx.runs.ensure_run(r.runtime_environment_id, session).await {
                tracing::warn!(run = %r.friendly_id, %err, "could not replace a crashed run");
            }
        }
        Ok(false) => {}
        Err(err) => tracing::warn!(run = %r.friendly_id, %err, "could not read the crashed run's session input"),
    }
}

/// Sessions past `expires_at` get no new runs; this cancels the runs they still
/// have. Conditional updates make a second pass (or a second server) a no-op.
async fn session_expiry_sweep(ctx: &JobContext) -> Outcome {
    let expired = crate::sessions::store::expired_with_live_runs(&ctx.db, 500).await?;
    let mut canceled = 0;
    for run_id in &expired {
        if run_store::cancel(&ctx.db, *run_id).await? {
            canceled += 1;
        }
    }
    // Channels of expired sessions stop taking writes and expire after retention.
    let expired_sessions = crate::sessions::store::expired_with_open_channels(&ctx.db, 200).await?;
    for session_id in &expired_sessions {
        ctx.waitpoints.close_channels(*session_id, Some("expired"), false).await?;
    }
    let pruned = super::store::prune_succeeded(&ctx.db).await?;
    Ok(format!(
        "{canceled} runs of expired sessions canceled, {} channels closed, {pruned} old jobs pruned",
        expired_sessions.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::probe;

    #[test]
    fn a_probe_fails_its_first_attempts_then_succeeds() {
        assert_eq!(probe(2, 1).unwrap_err().to_string(), "probe: failing attempt 1 of 2 on purpose");
        assert_eq!(probe(2, 2).unwrap_err().to_string(), "probe: failing attempt 2 of 2 on purpose");
        assert!(probe(2, 3).is_ok());
        assert!(probe(0, 1).is_ok());
    }
}
