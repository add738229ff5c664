//! The job dispatch table: which domain runs each [`JobKind`], with which of
//! the services built here.
//!
//! It lives at the composition root because it is the one place that knows
//! every domain: `jobs` stays a leaf (it stores, relays and retries jobs of
//! any kind, and hands each to a [`Handler`]), and each domain handles its
//! own kinds in its `jobs` module, taking only the services it uses. The
//! match is exhaustive, so a new kind does not build until it has a handler.

use std::time::Duration;

use sqlx::PgPool;

use super::AppState;
use crate::analytics::ClickHouse;
#[cfg(feature = "test-faults")]
use crate::jobs::probe;
use crate::jobs::runtime::{Handler, Outcome, Runtime};
use crate::jobs::{self, Job, JobKind, Jobs};
use crate::runs::queue::RunQueue;
use crate::sessions::run_manager::RunManager;
use crate::streams::effects::Appender;
use crate::streams::store::ChannelStore;
use crate::waitpoints::Waitpoints;
use crate::{analytics, replication, runs, sessions, streams, waitpoints};

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
    pub overlay_margin: Duration,
    /// A run this long without a heartbeat is crashed; the run sweep re-pushes
    /// queued runs popped at least this long ago (and 5 s at least).
    pub heartbeat_timeout_ms: u64,
}

/// Runs `job`; `attempt` is this attempt's number, from 1 (it keeps counting
/// across retries). A payload that does not read as its kind's is an error.
#[cfg_attr(not(feature = "test-faults"), allow(unused_variables))]
pub async fn execute(ctx: &JobContext, job: &Job, attempt: u32) -> Outcome {
    match job.kind() {
        JobKind::TriggerRun => runs::jobs::trigger_run(&ctx.db, &ctx.run_queue, &job.payload()?).await,
        JobKind::CancelRun => runs::jobs::cancel_run(&ctx.db, &job.payload()?).await,
        JobKind::RunSweep => runs::jobs::run_sweep(&ctx.db, &ctx.run_queue, ctx.heartbeat_timeout_ms, &ctx.runs).await,
        JobKind::RunHandoff => sessions::jobs::run_handoff(&ctx.channels, &job.payload()?).await,
        JobKind::SessionExpirySweep => {
            let expired = sessions::jobs::expiry_sweep(&ctx.db, &ctx.waitpoints).await?;
            // The job ledger is kept bounded on this sweep's schedule.
            let pruned = jobs::store::prune_succeeded(&ctx.db).await?;
            Ok(format!("{expired}, {pruned} old jobs pruned"))
        }
        JobKind::WaitpointDrain => waitpoints::jobs::drain(&ctx.waitpoints, &job.payload()?).await,
        JobKind::CloseChannels => waitpoints::jobs::close_channels(&ctx.waitpoints, &job.payload()?).await,
        JobKind::WaitpointTimeoutSweep => waitpoints::jobs::timeout_sweep(&ctx.waitpoints).await,
        JobKind::InputBootSweep => streams::jobs::input_boot_sweep(&ctx.appender).await,
        JobKind::Backfill => analytics::jobs::backfill_chunk(&ctx.db, &ctx.analytics, &ctx.jobs, &job.payload()?).await,
        JobKind::ReplicationFlush => replication::jobs::flush(&ctx.db, &ctx.analytics, &job.payload()?).await,
        JobKind::ReplicationReconcile => {
            let slot = ctx.replication_slot.as_deref();
            replication::jobs::reconcile(&ctx.db, &ctx.analytics, &ctx.jobs, slot, ctx.overlay_margin).await
        }
        #[cfg(feature = "test-faults")]
        JobKind::Probe => probe::run(&job.payload()?, attempt),
    }
}

impl Handler for JobContext {
    async fn execute(&self, job: &Job, attempt: u32) -> Outcome {
        execute(self, job, attempt).await
    }
}

impl AppState {
    /// What the background jobs use (also how tests drive a sweep or a drain
    /// directly instead of waiting for its tick).
    pub fn job_context(&self) -> JobContext {
        JobContext {
            db: self.db.clone(),
            run_queue: self.run_queue.clone(),
            channels: self.channels.clone(),
            runs: self.runs.clone(),
            waitpoints: self.waitpoints.clone(),
            appender: self.appender.clone(),
            jobs: self.jobs.clone(),
            analytics: self.analytics.clone(),
            replication_slot: self.config.replication_enabled.then(|| self.config.replication_slot_name()),
            overlay_margin: Duration::from_millis(self.config.list_overlay_margin_ms),
            heartbeat_timeout_ms: self.config.run_heartbeat_timeout_ms,
        }
    }

    /// The job runtime of this process: its workers run jobs through the
    /// table above, and its cron ticks the schedules read at start.
    pub fn job_runtime(&self) -> Runtime<JobContext> {
        Runtime {
            jobs: self.jobs.clone(),
            handler: self.job_context(),
            redis: self.redis.clone(),
            redis_client: self.redis_client.clone(),
            redis_prefix: self.config.redis_prefix.clone(),
            retry_base: Duration::from_millis(self.config.job_retry_base_ms),
            grace: Duration::from_millis(self.config.shutdown_grace_ms),
            schedules: self.schedules.to_vec(),
        }
    }
}
