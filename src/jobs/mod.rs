//! Durable background jobs: every session transition runs as one.
//!
//! Postgres is the ledger: a job row is written in the transaction of the state
//! change that causes it (an outbox), every attempt is logged with its error, and
//! the final status stays there for operators. Redis (apalis) is the transport:
//! the relay pushes a small envelope naming the row, and a worker runs it.
//!
//! - [`store`]: SQL for `jobs` and `job_attempts`.
//! - [`queue`]: the apalis queues (one per [`Lane`]): push with a wake-up,
//!   and the poll strategy.
//! - [`handlers`]: what each job does.
//! - [`runtime`]: the apalis workers, cron schedules, and the outbox relay loop.
//! - [`schedule`]: the cron schedules operators edit in `jobs/schedules.toml`.

pub mod handlers;
pub mod queue;
pub mod runtime;
pub mod schedule;
pub mod store;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::StoreError;
use queue::JobQueue;

/// Attempts a job gets before it is left failed.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// A job and its arguments, as stored in `jobs.payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Job {
    TriggerRun {
        run_id: Uuid,
    },
    CancelRun {
        run_id: Uuid,
    },
    RunSweep,
    SessionExpirySweep,
    /// Waitpoints drained from a channel's pending set by the append of `seq_num`.
    DrainWaitpoints {
        session_id: Uuid,
        io: crate::streams::Io,
        seq_num: u64,
        waitpoint_ids: Vec<Uuid>,
    },
    /// After a session closes (or expires): wake, refuse writes, expire, complete waits.
    CloseChannels {
        session_id: Uuid,
        reason: Option<String>,
        notify_in: bool,
    },
    WaitpointTimeoutSweep,
    /// After a run replaced another: fence the channels to the new run, and
    /// write the hand-off's control record (see `sessions::run_manager`).
    RunHandoff(crate::sessions::run_manager::HandoffStep),
    /// Boots a run for `.in` records no run is known to read (an append whose
    /// follow-up never ran: a crash between storing the record and the boot).
    InputBootSweep,
    /// Copies chunk number `chunk` of a ClickHouse backfill (see `analytics::backfill`).
    Backfill {
        backfill_id: Uuid,
        chunk: i32,
    },
    /// Writes one replication batch to ClickHouse (see `replication::flush`).
    ReplicationFlush {
        flush_id: Uuid,
    },
    /// Compares ClickHouse with Postgres and repairs the months that differ
    /// (see `replication::reconcile`).
    ReplicationReconcile,
    /// A test seam: fails its first `fail_first` attempts on purpose, then
    /// succeeds. It checks the job pipeline (attempts, backoff, the failed
    /// state) and the dashboard's retry end to end, without breaking
    /// anything real (`sessiond jobs probe`).
    Probe {
        fail_first: u32,
    },
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::TriggerRun { .. } => "trigger-run",
            Job::CancelRun { .. } => "cancel-run",
            Job::RunSweep => "run-sweep",
            Job::SessionExpirySweep => "session-expiry-sweep",
            Job::DrainWaitpoints { .. } => "waitpoint-drain",
            Job::CloseChannels { .. } => "close-channels",
            Job::WaitpointTimeoutSweep => "waitpoint-timeout-sweep",
            Job::RunHandoff(_) => "run-handoff",
            Job::InputBootSweep => "input-boot-sweep",
            Job::Backfill { .. } => "backfill",
            Job::ReplicationFlush { .. } => "replication-flush",
            Job::ReplicationReconcile => "replication-reconcile",
            Job::Probe { .. } => "probe",
        }
    }

    /// Every kind, as stored in `jobs.kind`: what the dashboard's kind filter offers.
    pub const KINDS: [&'static str; 13] = [
        "trigger-run",
        "cancel-run",
        "run-handoff",
        "run-sweep",
        "session-expiry-sweep",
        "waitpoint-drain",
        "close-channels",
        "waitpoint-timeout-sweep",
        "input-boot-sweep",
        "backfill",
        "replication-flush",
        "replication-reconcile",
        "probe",
    ];

    /// The job a cron schedule of this name enqueues.
    pub fn for_schedule(name: &str) -> Option<Job> {
        match name {
            "run-sweep" => Some(Job::RunSweep),
            "session-expiry-sweep" => Some(Job::SessionExpirySweep),
            "waitpoint-timeout-sweep" => Some(Job::WaitpointTimeoutSweep),
            "input-boot-sweep" => Some(Job::InputBootSweep),
            "replication-reconcile" => Some(Job::ReplicationReconcile),
            _ => None,
        }
    }
}

/// Why the job queue could not be checked or restored after a loss.
#[derive(Debug, thiserror::Error)]
pub enum QueueLoss {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0:#}")]
    Push(anyhow::Error),
}

/// Which queue (and worker) carries a job. Copies into ClickHouse have a
/// lane of their own: at 500 creates/s the run engine's lane takes 500
/// trigger-run jobs a second, and a replication flush queued behind them
/// waited seconds (measured: 7.5 s on average) before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Engine,
    Analytics,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Engine, Lane::Analytics];

    /// The lane of a job of this kind (`jobs.kind`).
    pub fn of_kind(kind: &str) -> Lane {
        match kind {
            "backfill" | "replication-flush" | "replication-reconcile" => Lane::Analytics,
            _ => Lane::Engine,
        }
    }
}

impl Job {
    pub fn lane(&self) -> Lane {
        Lane::of_kind(self.kind())
    }
}

/// Writes, relays and retries jobs.
///
/// Every push is stamped on the job's row afterwards (`relayed_at`, and the
/// task it made), and only on the version of the job it carried
/// ([`store::mark_relayed`]): a retry between a push and its stamp makes a new
/// version that stays unrelayed until a push of its own is stamped.
#[derive(Clone)]
pub struct Jobs {
    pool: PgPool,
    engine: JobQueue,
    analytics: JobQueue,
    /// Pushes made by the hot paths, stamped in batches (one UPDATE for many
    /// creates instead of one commit each).
    relayed: tokio::sync::mpsc::UnboundedSender<store::Pushed>,
}

/// Most pushes stamped by one UPDATE.
const MARK_BATCH: usize = 1_000;

/// Most pending jobs one sweep asks Redis about.
const SWEEP_BATCH: i64 = 500;

/// How long a pending job must have been left alone (and relayed) before the
/// sweep checks that the queue holds its task: a push in flight has stamped by
/// then, and a job just put back in line is the relay's.
pub const SWEEP_QUIET_SECS: i64 = 10;

impl Jobs {
    /// Must be called inside a Tokio runtime: starts the relayed-marks batcher.
    pub fn new(pool: PgPool, engine: JobQueue, analytics: JobQueue) -> Self {
        let (relayed, mut marks) = tokio::sync::mpsc::unbounded_channel::<store::Pushed>();
        let batch_pool = pool.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MARK_BATCH);
            while marks.recv_many(&mut batch, MARK_BATCH).await > 0 {
                // A lost mark only means the relay loop pushes the job once more,
                // and running a job twice is safe.
                if let Err(err) = store::mark_relayed(&batch_pool, &batch).await {
                    tracing::warn!(%err, "could not mark jobs relayed");
                }
                batch.clear();
            }
        });
        Jobs { pool, engine, analytics, relayed }
    }

    pub fn queue(&self, lane: Lane) -> &JobQueue {
        match lane {
            Lane::Engine => &self.engine,
            Lane::Analytics => &self.analytics,
        }
    }

    /// Pushes one version of a job onto `lane`'s queue.
    async fn push_one(&self, lane: Lane, id: Uuid, generation: i32) -> anyhow::Result<store::Pushed> {
        let task = self.queue(lane).push(id).await?;
        Ok(store::Pushed { id, generation, task })
    }

    /// Pushes versions of jobs (lane, id, generation); returns the pushes
    /// made. A failed push is only logged: the row stays unrelayed and the
    /// relay loop pushes it again.
    async fn push(&self, versions: Vec<(Lane, Uuid, i32)>) -> Vec<store::Pushed> {
        let mut pushed = Vec::with_capacity(versions.len());
        for (lane, id, generation) in versions {
            match self.push_one(lane, id, generation).await {
                Ok(p) => pushed.push(p),
                Err(err) => tracing::warn!(job = %id, %err, "job relay failed; will retry"),
            }
        }
        pushed
    }

    /// Rows of `lane` just written: at their first generation.
    fn fresh(lane: Lane, ids: &[Uuid]) -> Vec<(Lane, Uuid, i32)> {
        ids.iter().map(|id| (lane, *id, store::FIRST_GENERATION)).collect()
    }

    /// Relays run-engine job rows just committed (the hot path): pushed now,
    /// stamped in the background. The rows must be fresh inserts (at
    /// [`store::FIRST_GENERATION`]); a retried job goes through
    /// [`Jobs::relay_kinds`] or [`Jobs::retry`].
    pub async fn relay(&self, ids: &[Uuid]) {
        self.relay_in(Lane::Engine, ids).await
    }

    /// Relays job rows of `lane` just committed, as [`Jobs::relay`].
    pub async fn relay_in(&self, lane: Lane, ids: &[Uuid]) {
        for pushed in self.push(Self::fresh(lane, ids)).await {
            let _ = self.relayed.send(pushed);
        }
    }

    /// Relays rows just written and stamps them before returning (for callers
    /// that may exit right after).
    pub async fn relay_now(&self, lane: Lane, ids: &[Uuid]) -> Result<(), StoreError> {
        let pushed = self.push(Self::fresh(lane, ids)).await;
        store::mark_relayed(&self.pool, &pushed).await
    }

    /// Pushes versions read from the ledger and stamps them before returning.
    async fn relay_versions(&self, jobs: &[store::Queued]) -> Result<(), StoreError> {
        let pushed = self.push(jobs.iter().map(|j| (Lane::of_kind(&j.kind), j.id, j.generation)).collect()).await;
        store::mark_relayed(&self.pool, &pushed).await
    }

    /// Relays committed rows of any lanes, given with their kinds (a retry of
    /// many jobs), and stamps them before returning. Each job's generation is
    /// read before its push; jobs no longer pending are not pushed.
    pub async fn relay_kinds(&self, jobs: &[(Uuid, String)]) -> Result<(), StoreError> {
        let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| *id).collect();
        let versions = store::pending_versions(&self.pool, &ids).await?;
        self.relay_versions(&versions).await
    }

    /// Writes a job on its own (no surrounding state change) and relays it.
    pub async fn submit(&self, job: &Job) -> Result<Uuid, StoreError> {
        self.submit_with_attempts(job, DEFAULT_MAX_ATTEMPTS).await
    }

    /// [`Jobs::submit`] with its own attempt budget (at most
    /// [`DEFAULT_MAX_ATTEMPTS`]: the worker's retry policy redelivers a job
    /// that many times per push).
    pub async fn submit_with_attempts(&self, job: &Job, max_attempts: i32) -> Result<Uuid, StoreError> {
        let id = store::insert(&self.pool, job, max_attempts).await?;
        self.relay_now(job.lane(), &[id]).await?;
        Ok(id)
    }

    /// Runs a failed or canceled job again with a fresh attempt budget. None if
    /// the job does not exist or is neither failed nor canceled. Should the
    /// caller stop between the reset and the push, the new version is left
    /// unrelayed, and the relay loop pushes it.
    pub async fn retry(&self, id: Uuid) -> Result<Option<store::JobRow>, StoreError> {
        let row = store::reset_for_retry(&self.pool, id).await?;
        if let Some(row) = &row {
            let version = store::Queued { id, kind: row.kind.clone(), generation: row.generation };
            self.relay_versions(&[version]).await?;
        }
        Ok(row)
    }

    /// Puts every unfinished job back on the queue if Redis lost it (its
    /// marker is gone: Redis restarted without its data, or was flushed), then
    /// restores the marker. Returns how many jobs were pushed, or None if the
    /// queue was intact.
    ///
    /// The ledger's `relayed_at` cannot tell which jobs were lost, so every
    /// pending or running job is pushed, relayed or not. A job pushed again
    /// that is still on the queue (pushed after the loss, or running now) runs
    /// twice, which every job tolerates; one that succeeded meanwhile is
    /// skipped by its attempt. Each page is stamped after its push, on the
    /// versions read before it: a job retried in between (it failed while
    /// the page was on its way) keeps its own, empty, stamp. The marker is
    /// written last: a server that dies half way leaves it missing, and the
    /// next check starts over. One marker (on the engine's queue) stands for
    /// both lanes: they live in one Redis.
    pub async fn recover_lost_queue(&self) -> Result<Option<usize>, QueueLoss> {
        if self.engine.intact().await? {
            return Ok(None);
        }
        let mut after = None;
        let mut pushed = 0;
        loop {
            let jobs = store::unfinished(&self.pool, after, 500).await?;
            let Some(last) = jobs.last() else { break };
            after = Some(last.id);
            let page = self.push_page(&jobs).await?;
            store::mark_relayed(&self.pool, &page).await?;
            pushed += page.len();
        }
        self.engine.mark_intact().await?;
        Ok(Some(pushed))
    }

    /// The lost-queue recovery's push of one page of versions (stopping at
    /// the first failure); the recovery stamps what it returns. Public as a
    /// seam: a test runs a retry between the two halves.
    pub async fn push_page(&self, jobs: &[store::Queued]) -> Result<Vec<store::Pushed>, QueueLoss> {
        let mut pushed = Vec::with_capacity(jobs.len());
        for job in jobs {
            let lane = Lane::of_kind(&job.kind);
            pushed.push(self.push_one(lane, job.id, job.generation).await.map_err(QueueLoss::Push)?);
        }
        Ok(pushed)
    }

    /// Relays rows older than `grace_ms` that are still not on the queue.
    pub async fn relay_pending(&self, grace_ms: i64) -> Result<usize, StoreError> {
        let jobs = store::unrelayed(&self.pool, grace_ms, 500).await?;
        if !jobs.is_empty() {
            self.relay_versions(&jobs).await?;
        }
        Ok(jobs.len())
    }

    /// Pushes again pending jobs after `after` (id order) whose stamped task
    /// the queue no longer holds, and which no attempt is running: a push
    /// whose copy was dropped (delivered while its job could not run), or
    /// lost with Redis' data behind a queue marker written back. Nothing else
    /// would ever send them. A pending job with no attempt left is ended
    /// `failed` instead ([`store::fail_spent`]). Returns how many were pushed
    /// and where the next sweep goes on (None: from the start).
    pub async fn sweep_unheld(&self, after: Option<Uuid>) -> Result<(usize, Option<Uuid>), QueueLoss> {
        let spent = store::fail_spent(&self.pool, SWEEP_QUIET_SECS).await?;
        if spent > 0 {
            tracing::warn!(jobs = spent, "pending jobs with every attempt spent were left failed");
        }
        let candidates = store::unheld_candidates(&self.pool, after, SWEEP_QUIET_SECS, SWEEP_BATCH).await?;
        let next = if (candidates.len() as i64) < SWEEP_BATCH { None } else { candidates.last().map(|c| c.id) };
        let mut lost = Vec::new();
        for lane in Lane::ALL {
            let of_lane: Vec<&store::Stamped> = candidates.iter().filter(|c| Lane::of_kind(&c.kind) == lane).collect();
            let tasks: Vec<String> = of_lane.iter().filter_map(|c| c.task_id.clone()).collect();
            let unheld = self.queue(lane).unheld(&tasks).await?;
            lost.extend(
                of_lane
                    .into_iter()
                    .filter(|c| c.task_id.as_ref().is_none_or(|t| unheld.contains(t)))
                    .map(store::Stamped::queued),
            );
        }
        for job in &lost {
            tracing::warn!(job = %job.id, kind = %job.kind, "a pending job's task is gone from the queue; pushing it again");
        }
        self.relay_versions(&lost).await?;
        Ok((lost.len(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_serialise_with_their_kind() {
        let id = Uuid::now_v7();
        let v = serde_json::to_value(Job::TriggerRun { run_id: id }).unwrap();
        assert_eq!(v["kind"], "trigger-run");
        assert_eq!(serde_json::from_value::<Job>(v).unwrap(), Job::TriggerRun { run_id: id });
        assert_eq!(Job::for_schedule("run-sweep"), Some(Job::RunSweep));
        assert_eq!(Job::for_schedule("nope"), None);
    }

    #[test]
    fn every_kind_is_listed_and_probes_run_on_the_engine_lane() {
        let probe = Job::Probe { fail_first: 2 };
        assert_eq!(serde_json::to_value(&probe).unwrap(), serde_json::json!({ "kind": "probe", "fail_first": 2 }));
        assert_eq!(probe.lane(), Lane::Engine);
        let id = Uuid::now_v7();
        let every = [
            Job::TriggerRun { run_id: id },
            Job::CancelRun { run_id: id },
            Job::RunSweep,
            Job::SessionExpirySweep,
            Job::DrainWaitpoints { session_id: id, io: crate::streams::Io::In, seq_num: 1, waitpoint_ids: vec![] },
            Job::CloseChannels { session_id: id, reason: None, notify_in: false },
            Job::WaitpointTimeoutSweep,
            Job::RunHandoff(crate::sessions::run_manager::HandoffStep {
                session_id: id,
                version: 1,
                run: "run_1".into(),
                control: None,
            }),
            Job::InputBootSweep,
            Job::Backfill { backfill_id: id, chunk: 0 },
            Job::ReplicationFlush { flush_id: id },
            Job::ReplicationReconcile,
            probe,
        ];
        let mut kinds: Vec<&str> = every.iter().map(Job::kind).collect();
        kinds.sort_unstable();
        let mut listed = Job::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed, "Job::KINDS lists every kind once");
    }
}
