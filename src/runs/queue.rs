//! Run queues in Redis: one list per (environment, task). A push also publishes
//! on a channel every server subscribes to, so long-polling workers anywhere
//! wake at once instead of each holding a blocking Redis connection.

use redis::aio::ConnectionManager;
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Clone)]
pub struct RunQueue {
    redis: ConnectionManager,
    prefix: String,
    /// Bumped whenever any queue may have gained work; waiters re-check.
    wake: watch::Sender<u64>,
}

impl RunQueue {
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        let (wake, _) = watch::channel(0);
        RunQueue { redis, prefix: prefix.to_string(), wake }
    }

    pub fn key(&self, env_id: Uuid, task: &str) -> String {
        format!("{}:runq:{}:{}", self.prefix, env_id.simple(), task)
    }

    fn channel(&self) -> String {
        format!("{}:runq-ready", self.prefix)
    }

    pub async fn push(&self, env_id: Uuid, task: &str, run_id: Uuid) -> redis::RedisResult<()> {
        let key = self.key(env_id, task);
        let mut conn = self.redis.clone();
        let _: () = redis::pipe()
            .rpush(&key, run_id.to_string())
            .ignore()
            .publish(self.channel(), &key)
            .ignore()
            .query_async(&mut conn)
            .await?;
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Pops up to `max` run ids from the first non-empty of `keys`.
    pub async fn pop(&self, keys: &[String], max: usize) -> redis::RedisResult<Vec<Uuid>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.redis.clone();
        let mut cmd = redis::cmd("LMPOP");
        cmd.arg(keys.len()).arg(keys).arg("LEFT").arg("COUNT").arg(max.max(1));
        let reply: Option<(String, Vec<String>)> = cmd.query_async(&mut conn).await?;
        Ok(reply.map(|(_, ids)| ids.iter().filter_map(|s| Uuid::parse_str(s).ok()).collect()).unwrap_or_default())
    }

    /// A receiver that changes whenever work may have arrived.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Listens for pushes made by other servers and wakes local waiters. Runs
    /// until the process ends, reconnecting after errors.
    pub async fn listen(self, client: redis::Client) {
        let bump = || self.wake.send_modify(|n| *n = n.wrapping_add(1));
        // Anything pushed while disconnected is found by the waiters' own
        // periodic re-check; wake them once after a lost connection too.
        crate::pubsub::follow(client, self.channel(), "run queue", |_| bump(), bump).await
    }
}
