//! The apalis queue that carries jobs. Each task is an envelope naming a job row;
//! the row (in Postgres) holds the job itself.
//!
//! apalis-redis has no blocking fetch and no notification on push, so a worker
//! only fetches when polled. The relay publishes a wake-up after each push and
//! workers poll on that signal, with a slow interval as the fallback.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy, TaskBuilder, TaskId, TaskSink};
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
        let storage = RedisStorage::new(redis.clone()).with_config(config);
        let (wake, _) = watch::channel(0);
        JobQueue { storage, redis, name, wake }
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

    /// Pushes an envelope for job `id` and wakes the workers.
    pub async fn push(&self, id: Uuid) -> anyhow::Result<()> {
        let task = TaskBuilder::new(JobEnvelope { id }).task_id(TaskId::from_ulid(Ulid::generate())).build();
        self.storage.clone().push_task(task).await.map_err(|e| anyhow::anyhow!("push job {id}: {e}"))?;
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("PUBLISH").arg(self.wake_channel()).arg(1).query_async(&mut conn).await?;
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
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
