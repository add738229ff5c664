//! Durable background jobs: every session transition runs as one.
//!
//! Postgres is the ledger: a job row is written in the transaction of the state
//! change that causes it (an outbox), every attempt is logged with its error, and
//! the final status stays there for operators. Redis (apalis) is the transport:
//! the relay pushes a small envelope naming the row, and a worker runs it.
//!
//! This module is a leaf: it knows the kinds ([`JobKind`]) but not what they
//! do. Each domain defines the payloads and handlers of its own kinds (e.g.
//! `runs::jobs`), and the dispatch table that maps a kind to its handler is
//! built at the composition root (`app::job_dispatch`).
//!
//! - [`kind`]: the kinds, as `jobs.kind` names them, and the [`Lane`] each runs on.
//! - [`store`]: SQL for `jobs` and `job_attempts`.
//! - [`queue`]: the apalis queues (one per [`Lane`]): push with a wake-up,
//!   and the poll strategy.
//! - [`runtime`]: the apalis workers, cron schedules, and the outbox relay loop,
//!   running jobs through a [`runtime::Handler`].
//! - [`schedule`]: the cron schedules operators edit in `jobs/schedules.toml`.
//! - [`probe`]: the job pipeline's own test seam.

pub mod actions;
pub mod kind;
#[cfg(feature = "test-faults")]
pub mod probe;
pub mod queue;
pub mod runtime;
pub mod schedule;
pub mod store;

use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::StoreError;
pub use kind::{JobKind, Lane, UnknownKind};
use queue::JobQueue;

/// Attempts a job gets before it is left failed.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// A job's arguments. The domain that runs a kind defines its payload: a
/// plain struct of ids and values, so that the ledger, the dashboard and a
/// server of another version all read it the same way. It serializes as a
/// JSON object with no `kind` field (the stored payload repeats the kind there).
pub trait Payload: Serialize {
    fn kind(&self) -> JobKind;
}

/// A job as the ledger holds it: its kind and its arguments. The runtime
/// hands this to its [`runtime::Handler`], which reads the arguments as the
/// payload of the kind ([`Job::payload`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    kind: JobKind,
    args: Map<String, Value>,
}

/// Why a job's arguments could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    UnknownKind(#[from] UnknownKind),
    #[error("{kind} job: its payload must be a JSON object")]
    NotAnObject { kind: JobKind },
    #[error("{kind} job: bad payload: {source}")]
    Json { kind: JobKind, source: serde_json::Error },
}

/// The key of `jobs.payload` that repeats the kind: rows have always carried
/// it, and a server of an earlier version reads the payload by it.
const KIND_FIELD: &str = "kind";

impl Job {
    /// A job that takes no arguments (a sweep).
    pub fn sweep(kind: JobKind) -> Job {
        Job { kind, args: Map::new() }
    }

    /// The job a payload describes.
    pub fn new(payload: &impl Payload) -> Result<Job, PayloadError> {
        let kind = payload.kind();
        match serde_json::to_value(payload).map_err(|source| PayloadError::Json { kind, source })? {
            Value::Object(args) => Ok(Job { kind, args }),
            _ => Err(PayloadError::NotAnObject { kind }),
        }
    }

    /// A job as stored: its `jobs.kind` and `jobs.payload`.
    pub fn stored(kind: &str, payload: &Value) -> Result<Job, PayloadError> {
        let kind: JobKind = kind.parse()?;
        let Value::Object(args) = payload else { return Err(PayloadError::NotAnObject { kind }) };
        let mut args = args.clone();
        args.remove(KIND_FIELD);
        Ok(Job { kind, args })
    }

    pub fn kind(&self) -> JobKind {
        self.kind
    }

    /// The arguments, read as `P` (the payload of this job's kind).
    pub fn payload<P: DeserializeOwned>(&self) -> Result<P, PayloadError> {
        serde_json::from_value(Value::Object(self.args.clone()))
            .map_err(|source| PayloadError::Json { kind: self.kind, source })
    }

    /// What `jobs.payload` holds: the arguments and the kind.
    pub fn to_stored(&self) -> Value {
        let mut stored = self.args.clone();
        stored.insert(KIND_FIELD.into(), self.kind.as_str().into());
        Value::Object(stored)
    }
}

impl Serialize for Job {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.args.serialize(serializer)
    }
}

impl Payload for Job {
    fn kind(&self) -> JobKind {
        self.kind
    }
}

/// A job row just written, in the caller's transaction: relay it
/// ([`Jobs::relay`]) once that commits. It carries the lane of its kind, so
/// the relay pushes it onto the queue its worker polls, whoever relays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewJob {
    id: Uuid,
    lane: Lane,
}

impl NewJob {
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }
}

/// Written down (in audit details, responses) as its id.
impl Serialize for NewJob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.id.serialize(serializer)
    }
}

impl std::fmt::Display for NewJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id.fmt(f)
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

    /// Rows just written, each on its lane: at their first generation.
    fn fresh(jobs: &[NewJob]) -> Vec<(Lane, Uuid, i32)> {
        jobs.iter().map(|job| (job.lane, job.id, store::FIRST_GENERATION)).collect()
    }

    /// Relays job rows just committed (the hot path): pushed now, stamped in
    /// the background. A retried job goes through [`Jobs::relay_kinds`] or
    /// [`Jobs::retry`] instead (its version is read before its push).
    pub async fn relay(&self, jobs: &[NewJob]) {
        for pushed in self.push(Self::fresh(jobs)).await {
            let _ = self.relayed.send(pushed);
        }
    }

    /// Relays rows just written and stamps them before returning (for callers
    /// that may exit right after).
    pub async fn relay_now(&self, jobs: &[NewJob]) -> Result<(), StoreError> {
        let pushed = self.push(Self::fresh(jobs)).await;
        store::mark_relayed(&self.pool, &pushed).await
    }

    /// Pushes versions read from the ledger and stamps them before returning.
    async fn relay_versions(&self, jobs: &[store::Queued]) -> Result<(), StoreError> {
        let pushed = self.push(jobs.iter().map(|j| (j.lane(), j.id, j.generation)).collect()).await;
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
    pub async fn submit(&self, job: &impl Payload) -> Result<Uuid, StoreError> {
        self.submit_with_attempts(job, DEFAULT_MAX_ATTEMPTS).await
    }

    /// [`Jobs::submit`] with its own attempt budget (at most
    /// [`DEFAULT_MAX_ATTEMPTS`]: the worker's retry policy redelivers a job
    /// that many times per push).
    pub async fn submit_with_attempts(&self, job: &impl Payload, max_attempts: i32) -> Result<Uuid, StoreError> {
        let new = store::insert(&self.pool, job, max_attempts).await?;
        self.relay_now(&[new]).await?;
        Ok(new.id)
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
            pushed.push(self.push_one(job.lane(), job.id, job.generation).await.map_err(QueueLoss::Push)?);
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
            let of_lane: Vec<&store::Stamped> =
                candidates.iter().filter(|c| Lane::of_stored(&c.kind) == lane).collect();
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

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Cancel {
        run_id: Uuid,
    }

    impl Payload for Cancel {
        fn kind(&self) -> JobKind {
            JobKind::CancelRun
        }
    }

    #[test]
    fn a_payload_is_stored_with_its_kind_and_read_back() {
        let run_id = Uuid::now_v7();
        let job = Job::new(&Cancel { run_id }).unwrap();
        let stored = job.to_stored();
        // The layout rows have always had (an older server decodes it).
        assert_eq!(stored, serde_json::json!({ "kind": "cancel-run", "run_id": run_id }));
        let back = Job::stored("cancel-run", &stored).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.kind(), JobKind::CancelRun);
        assert_eq!(back.payload::<Cancel>().unwrap(), Cancel { run_id });
    }

    #[test]
    fn a_sweep_is_stored_as_its_kind_alone() {
        let job = Job::sweep(JobKind::RunSweep);
        assert_eq!(job.to_stored(), serde_json::json!({ "kind": "run-sweep" }));
        assert_eq!(Job::stored("run-sweep", &job.to_stored()).unwrap(), job);
    }

    #[test]
    fn an_unknown_kind_or_a_bad_payload_is_an_error() {
        let payload = serde_json::json!({ "kind": "nope" });
        assert!(matches!(Job::stored("nope", &payload), Err(PayloadError::UnknownKind(_))));
        assert!(matches!(
            Job::stored("cancel-run", &serde_json::json!([1])),
            Err(PayloadError::NotAnObject { kind: JobKind::CancelRun })
        ));
        let job = Job::stored("cancel-run", &serde_json::json!({ "run_id": "not a uuid" })).unwrap();
        assert!(matches!(job.payload::<Cancel>(), Err(PayloadError::Json { kind: JobKind::CancelRun, .. })));
    }

    #[test]
    fn a_new_job_is_written_down_as_its_id() {
        let id = Uuid::now_v7();
        let job = NewJob { id, lane: Lane::Analytics };
        assert_eq!(serde_json::to_value(job).unwrap(), serde_json::json!(id));
        assert_eq!(job.to_string(), id.to_string());
    }
}
