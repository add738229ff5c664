//! The apalis queue that carries jobs. Each task is an envelope naming a job row;
//! the row (in Postgres) holds the job itself.
//!
//! apalis-redis has no blocking fetch and no notification on push, so a worker
//! only fetches when polled. The relay publishes a wake-up after each push and
//! workers poll on that signal, with a slow interval as the fallback.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy, TaskBuilder, TaskId, TaskSink, TaskSinkError};
use apalis_redis::{Config as QueueConfig, RedisStorage};
use futures::{Stream, StreamExt};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use ulid::Ulid;
use uuid::Uuid;

/// The task apalis carries: the id of a row in `jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub id: Uuid,
}

#[derive(Clone)]
pub struct JobQueue {
    storage: RedisStorage<JobEnvelope>,
    /// apalis' key names for this queue, which [`JobQueue::unheld`] reads.
    config: QueueConfig,
    redis: ConnectionManager,
    name: String,
    wake: watch::Sender<u64>,
}

impl JobQueue {
    /// The queue of `lane`: `<prefix>:jobs` for the run engine, and
    /// `<prefix>:jobs:analytics` for copies into ClickHouse.
    pub fn new(redis: ConnectionManager, prefix: &str, lane: super::Lane) -> Self {
        let name = match lane {
            super::Lane::Engine => format!("{prefix}:jobs"),
            super::Lane::Analytics => format!("{prefix}:jobs:analytics"),
        };
        let config = QueueConfig::default()
            .queue(&name)
            // The heartbeat is also apalis' own fallback wake-up, and a dead
            // worker's tasks are recovered after heartbeat × missed.
            .heartbeat_interval(Duration::from_secs(5))
            .missed_heartbeats(3);
        let storage = RedisStorage::new(redis.clone()).with_config(config.clone());
        let (wake, _) = watch::channel(0);
        JobQueue { storage, config, redis, name, wake }
    }

    pub fn storage(&self) -> RedisStorage<JobEnvelope> {
        self.storage.clone()
    }

    fn wake_channel(&self) -> String {
        format!("{}:wake", self.name)
    }

    fn marker_key(&self) -> String {
        format!("{}:intact", self.name)
    }

    /// Whether Redis still holds the queue's marker. The marker is written once
    /// every unfinished job of the ledger is on the queue, and is lost with the
    /// queue itself when Redis restarts without its data (or is flushed).
    pub async fn intact(&self) -> redis::RedisResult<bool> {
        let mut conn = self.redis.clone();
        redis::cmd("EXISTS").arg(self.marker_key()).query_async(&mut conn).await
    }

    pub async fn mark_intact(&self) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("SET").arg(self.marker_key()).arg(1).query_async(&mut conn).await
    }

    /// Pushes an envelope for job `id` and wakes the workers. Returns the
    /// apalis task id, which the relayed stamp records.
    pub async fn push(&self, id: Uuid) -> anyhow::Result<String> {
        let task_id = Ulid::generate();
        let task = TaskBuilder::new(JobEnvelope { id }).task_id(TaskId::from_ulid(task_id)).build();
        // Keeps a Redis error as the cause, so an outage is told from a bug.
        self.storage.clone().push_task(task).await.map_err(|e| match e {
            TaskSinkError::PushError(apalis_redis::Error::Database(err)) => {
                anyhow::Error::new(err).context(format!("push job {id}"))
            }
            other => anyhow::anyhow!("push job {id}: {other}"),
        })?;
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("PUBLISH").arg(self.wake_channel()).arg(1).query_async(&mut conn).await?;
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(task_id.to_string())
    }

    /// Those of `tasks` the queue no longer holds. apalis-redis keeps a task
    /// it still owes a worker in one of three places: the scheduled set (every
    /// push lands there, due at once; a retry too), the active list (moved
    /// there by a fetch on its way to a worker), or the inflight set of
    /// the worker that fetched it (running, or waiting out a retry's backoff
    /// in the worker; a dead worker's set is put back on the list by the
    /// others). A task in none of them is done, dead, or was lost with Redis'
    /// data. One script, so a task moving between them is never missed.
    pub async fn unheld(&self, tasks: &[String]) -> redis::RedisResult<Vec<String>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.redis.clone();
        let mut call = UNHELD_SCRIPT.prepare_invoke();
        call.key(self.config.active_jobs_list())
            .key(self.config.scheduled_jobs_set())
            .key(self.config.workers_set())
            .arg(self.config.inflight_jobs_set());
        for task in tasks {
            call.arg(task);
        }
        call.invoke_async(&mut conn).await
    }

    /// The poll strategy workers of this queue use.
    pub fn poll_strategy(&self, fallback: Duration) -> Wakeup {
        Wakeup { every: fallback, timer: None, signals: Box::pin(WatchStream::new(self.wake.subscribe()).map(|_| ())) }
    }

    /// Turns wake-up messages published by any server into local wake-ups.
    pub async fn listen(self, client: redis::Client) {
        let bump = || self.wake.send_modify(|n| *n = n.wrapping_add(1));
        crate::pubsub::follow(client, self.wake_channel(), "job queue", |_| bump(), || {}).await
    }
}

/// Returns the task ids of ARGV[2..] held nowhere (see [`JobQueue::unheld`]).
/// The active list is read into a set once, and only if a task is in neither
/// of the other two: a backlog makes it long.
static UNHELD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local workers = redis.call('zrange', KEYS[3], 0, -1)
local active = nil
local lost = {}
for i = 2, #ARGV do
    local task = ARGV[i]
    local held = redis.call('zscore', KEYS[2], task) ~= false
    if not held then
        for _, worker in ipairs(workers) do
            if redis.call('sismember', ARGV[1] .. ':' .. worker, task) == 1 then
                held = true
                break
            end
        end
    end
    if not held then
        if active == nil then
            active = {}
            for _, queued in ipairs(redis.call('lrange', KEYS[1], 0, -1)) do
                active[queued] = true
            end
        end
        held = active[task] == true
    end
    if not held then
        table.insert(lost, task)
    end
end
return lost
",
    )
});

/// Polls when a wake-up arrives, and every `every` regardless.
///
/// The timer is re-armed and polled in a loop until it is pending, so a waker
/// is always registered: a timer replaced without being polled would leave the
/// worker asleep until apalis' own heartbeat.
pub struct Wakeup {
    every: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    signals: Pin<Box<dyn Stream<Item = ()> + Send>>,
}

impl PollStrategy for Wakeup {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _snapshot: &PollSnapshot) -> Poll<Option<()>> {
        use std::future::Future;
        let mut due = false;
        loop {
            let every = self.every;
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if timer.as_mut().poll(cx).is_ready() {
                due = true;
                self.timer = None;
            } else {
                break;
            }
        }
        while let Poll::Ready(Some(())) = self.signals.as_mut().poll_next(cx) {
            due = true;
        }
        if due {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}
