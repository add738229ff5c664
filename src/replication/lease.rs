//! One consumer per slot across server processes: a Redis lease with a
//! fencing token.
//!
//! The holder renews every third of the lease's time and counts itself the
//! holder only until two thirds have passed since its last renewal; after
//! that it stops consuming. Nobody else can take the lease before the whole
//! time has passed, so the old holder has stopped before a new one starts.
//! A crashed holder's lease simply expires. (Postgres adds its own guard: a
//! slot streams to one connection at a time.)

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// Renews the lease if it is still ours (same token).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Releases the lease if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

fn lease_key(prefix: &str, slot: &str) -> String {
    format!("{prefix}:replication:{slot}:lease")
}

/// The fencing token of whoever holds the lease on `slot` now, if anyone.
pub async fn holder(redis: &ConnectionManager, prefix: &str, slot: &str) -> redis::RedisResult<Option<u64>> {
    let mut conn = redis.clone();
    redis::cmd("GET").arg(lease_key(prefix, slot)).query_async(&mut conn).await
}

pub struct Lease {
    redis: ConnectionManager,
    key: String,
    /// Increases with every acquisition: names this holder's term.
    pub token: u64,
    ttl: Duration,
    renewed_at: Instant,
}

impl Lease {
    /// Takes the lease on `slot` if nobody holds it.
    pub async fn try_acquire(
        redis: &ConnectionManager,
        prefix: &str,
        slot: &str,
        ttl: Duration,
    ) -> redis::RedisResult<Option<Lease>> {
        let mut conn = redis.clone();
        let key = lease_key(prefix, slot);
        let token: u64 =
            redis::cmd("INCR").arg(format!("{prefix}:replication:{slot}:fence")).query_async(&mut conn).await?;
        let taken_at = Instant::now();
        let won: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        Ok(won.map(|_| Lease { redis: redis.clone(), key, token, ttl, renewed_at: taken_at }))
    }

    /// Extends the lease; false if it is no longer ours.
    pub async fn renew(&mut self) -> redis::RedisResult<bool> {
        let started = Instant::now();
        let mut conn = self.redis.clone();
        let renewed: i64 = redis::Script::new(RENEW)
            .key(&self.key)
            .arg(self.token)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if renewed == 1 {
            // The lease runs from when the renewal was sent, not answered.
            self.renewed_at = started;
        }
        Ok(renewed == 1)
    }

    /// Whether this process may still act as the holder.
    pub fn held(&self) -> bool {
        self.renewed_at.elapsed() < self.ttl * 2 / 3
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    pub async fn release(self) {
        let mut conn = self.redis.clone();
        let released: redis::RedisResult<i64> =
            redis::Script::new(RELEASE).key(&self.key).arg(self.token).invoke_async(&mut conn).await;
        if let Err(err) = released {
            tracing::warn!(%err, "could not release the replication lease; it expires on its own");
        }
    }
}
