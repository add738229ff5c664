//! Handing queued runs to workers: the dequeue long-poll.
//!
//! A dequeue pops run ids from the Redis queues, then claims them in Postgres
//! with a conditional update (`QUEUED → EXECUTING`), so one run never reaches
//! two workers. With nothing queued it waits on the queue's wake-up signal,
//! which every push publishes, so an idle long-poll answers within
//! milliseconds without holding a Redis connection; a slower fallback poll
//! covers a lost signal.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::queue::RunQueue;
use super::store::{self, Run};
use crate::db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("run queue: {0}")]
    Queue(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a worker asks for.
pub struct DequeueRequest<'a> {
    pub env_id: Uuid,
    pub tasks: &'a [String],
    pub max_runs: usize,
    pub wait: Duration,
    pub worker_id: Option<&'a str>,
    /// The worker's key for this logical dequeue, the same on every retry of
    /// it: a repeat is answered with the runs the first try claimed.
    pub key: Option<&'a str>,
}

/// Dispatches queued runs to workers, with what it uses: the database, the
/// run queues, the heartbeat deadline a claimed run starts with.
#[derive(Clone)]
pub struct Dispatcher {
    db: PgPool,
    queue: RunQueue,
    heartbeat_timeout_ms: u64,
    fallback_poll: Duration,
    /// A draining process answers its long polls at once (empty).
    drain: crate::shutdown::Drain,
}

impl Dispatcher {
    pub fn new(db: PgPool, queue: RunQueue, heartbeat_timeout_ms: u64, fallback_poll: Duration) -> Self {
        Dispatcher { db, queue, heartbeat_timeout_ms, fallback_poll, drain: Default::default() }
    }

    /// The dispatcher of a process that drains with `drain`.
    pub fn with_drain(self, drain: crate::shutdown::Drain) -> Self {
        Dispatcher { drain, ..self }
    }

    pub fn heartbeat_timeout_ms(&self) -> u64 {
        self.heartbeat_timeout_ms
    }

    /// Long-polls for up to `max_runs` runs of the given tasks: the runs claimed
    /// for this worker, or none once `wait` passes.
    ///
    /// With a key that already claimed runs still EXECUTING for this worker,
    /// answers those again and pops nothing: the first answer was lost (the
    /// server died or the connection was cut after the claim), and popping new
    /// runs would leave those claimed by nobody who knows it, to crash at
    /// their heartbeat deadline.
    pub async fn dequeue(&self, req: DequeueRequest<'_>) -> Result<Vec<Run>, DispatchError> {
        if let Some(key) = req.key {
            let again =
                store::reclaim(&self.db, req.env_id, key, req.worker_id, self.heartbeat_timeout_ms as i64).await?;
            if !again.is_empty() {
                return Ok(again);
            }
        }
        let keys: Vec<String> = req.tasks.iter().map(|t| self.queue.key(req.env_id, t)).collect();
        let deadline = tokio::time::Instant::now() + req.wait;
        let timeout_ms = self.heartbeat_timeout_ms as i64;
        let mut wake = self.queue.subscribe();
        loop {
            wake.borrow_and_update();
            let ids = self.queue.pop(&keys, req.max_runs).await?;
            if !ids.is_empty() {
                let runs =
                    store::claim_for_execution(&self.db, req.env_id, &ids, timeout_ms, req.worker_id, req.key).await?;
                if !runs.is_empty() {
                    return Ok(runs);
                }
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || self.drain.is_draining() {
                return Ok(Vec::new());
            }
            let nap = (deadline - now).min(self.fallback_poll);
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep(nap) => {}
                _ = self.drain.started() => {}
            }
        }
    }
}
