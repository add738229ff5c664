//! The run engine's jobs: `trigger-run` (put a run on its queue),
//! `cancel-run`, and the `run-sweep` (crashes, time limits, lost pops).
//! Every handler is idempotent: state changes are conditional updates, and
//! queue pushes tolerate duplicates (a popped run that is no longer QUEUED is
//! dropped at claim time).

use std::future::Future;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::queue::RunQueue;
use super::store::{self, SweptRun};
use super::RunStatus;
use crate::jobs::runtime::Outcome;
use crate::jobs::{JobKind, Payload};

/// Puts run `run_id` on its queue, once it is committed QUEUED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRun {
    pub run_id: Uuid,
}

impl Payload for TriggerRun {
    fn kind(&self) -> JobKind {
        JobKind::TriggerRun
    }
}

/// Cancels run `run_id` unless it is final by then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRun {
    pub run_id: Uuid,
}

impl Payload for CancelRun {
    fn kind(&self) -> JobKind {
        JobKind::CancelRun
    }
}

pub async fn trigger_run(db: &PgPool, queue: &RunQueue, job: &TriggerRun) -> Outcome {
    let run_id = job.run_id;
    match store::mark_enqueued(db, run_id).await? {
        Some(due) => {
            queue.push(due.runtime_environment_id, &due.task_identifier, due.id).await?;
            Ok(format!("queued run {run_id}"))
        }
        None => Ok(format!("run {run_id} is no longer queued")),
    }
}

pub async fn cancel_run(db: &PgPool, job: &CancelRun) -> Outcome {
    let run_id = job.run_id;
    let canceled = store::cancel(db, run_id).await?;
    Ok(if canceled { format!("canceled run {run_id}") } else { format!("run {run_id} already final") })
}

/// What the run sweep does with a crashed run that served a session: the
/// session's run manager replaces it, and runs know nothing of sessions.
pub trait CrashedRuns: Sync {
    fn replace_crashed(&self, run: &SweptRun, session: Uuid) -> impl Future<Output = ()> + Send;
}

/// Crash detection (missed heartbeats), maxDuration, queued-run ttl, and
/// re-pushing due QUEUED runs (retries whose delay passed, lost pops). A run
/// this long without a heartbeat is crashed; due runs popped at least this
/// long ago (and 5 s at least) are pushed again.
pub async fn run_sweep(
    db: &PgPool,
    queue: &RunQueue,
    heartbeat_timeout_ms: u64,
    crashed: &impl CrashedRuns,
) -> Outcome {
    let swept = store::sweep(db).await?;
    for r in &swept {
        tracing::info!(run = %r.friendly_id, status = %r.status, "run swept");
        if let (RunStatus::Crashed, Some(session)) = (r.status, r.session_id) {
            crashed.replace_crashed(r, session).await;
        }
    }
    let stale_ms = (heartbeat_timeout_ms as i64).max(5_000);
    let due = store::take_due(db, stale_ms, 500).await?;
    for run in &due {
        queue.push(run.runtime_environment_id, &run.task_identifier, run.id).await?;
    }
    Ok(format!("{} runs finalised, {} pushed", swept.len(), due.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Job;

    #[test]
    fn run_jobs_are_stored_as_before() {
        let run_id = Uuid::now_v7();
        let job = Job::new(&TriggerRun { run_id }).unwrap();
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "trigger-run", "run_id": run_id }));
        assert_eq!(job.kind(), JobKind::TriggerRun);
        assert_eq!(job.payload::<TriggerRun>().unwrap(), TriggerRun { run_id });
        assert_eq!(Job::new(&CancelRun { run_id }).unwrap().kind(), JobKind::CancelRun);
    }
}
