//! One consumer per slot across server processes: a Redis lease says who
//! holds the slot, a fencing token in Postgres says whose writes count.
//!
//! The Redis lease is the fast path. The holder renews every third of the
//! lease's time and counts itself the holder only until two thirds have
//! passed since its last renewal; after that it stops consuming. A waiter
//! takes a free lease at once, and takes a held one over when Postgres shows
//! the slot streaming to nobody (inactive, or its walsender gone) at two
//! polls [`Waiter::IDLE_FOR`] apart: a holder killed outright is replaced in
//! little more than a second instead of a whole lease.
//!
//! Correctness does not rest on Redis (which can lose the lease, or grant it
//! twice around a takeover): every acquisition takes the next token from the
//! slot's `replication_state.fence`, and recording a batch, pruning flushed
//! ones and confirming the slot lock that row and are refused to a lower
//! token ([`superseded`]). A holder paused past its lease (a stopped process)
//! comes back to refused writes and stops; a FLUSHALL never lowers the token.

use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use sqlx::{PgConnection, PgPool};

use crate::db::StoreError;

/// Renews the lease if it is still ours (same value).
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

/// Replaces the lease's value if it still is the one expected: a takeover
/// from the holder seen idle, and an acquirer naming its new token.
const SWAP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

/// How long a fenced write's transaction may sit idle before Postgres ends
/// it: far longer than a live writer pauses between its statements, and no
/// longer than a takeover from a stopped holder waits for its lease anyway.
pub const STALLED_WRITE: Duration = Duration::from_secs(3);

fn lease_key(prefix: &str, slot: &str) -> String {
    format!("{prefix}:replication:{slot}:lease")
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The fencing token of whoever holds the lease on `slot` now, if anyone
/// (None too while an acquirer is between winning the lease and taking its
/// token).
pub async fn holder(redis: &ConnectionManager, prefix: &str, slot: &str) -> redis::RedisResult<Option<u64>> {
    let mut conn = redis.clone();
    let value: Option<String> = redis::cmd("GET").arg(lease_key(prefix, slot)).query_async(&mut conn).await?;
    Ok(value.and_then(|v| v.parse().ok()))
}

/// Takes the slot's next fencing token. From here on, every holder with a
/// lower one is refused.
///
/// The row is locked `FOR UPDATE`, the one lock that waits for the writers'
/// `FOR KEY SHARE` ([`superseded`]): writers never wait for each other, nor
/// for a flush noting itself in the same row, only for a takeover.
pub async fn next_fence(pool: &PgPool, slot: &str) -> Result<u64, StoreError> {
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query("INSERT INTO replication_state (slot) VALUES ($1) ON CONFLICT (slot) DO NOTHING")
        .bind(slot)
        .execute(&mut *tx)
        .await?;
    let token: i64 = sqlx::query_scalar(
        "WITH held AS (SELECT slot FROM replication_state WHERE slot = $1 FOR UPDATE)
         UPDATE replication_state r SET fence = r.fence + 1 FROM held WHERE r.slot = held.slot
         RETURNING r.fence",
    )
    .bind(slot)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(token as u64)
}

/// Inside a writer's transaction: the slot's current token if `token` is
/// lower (or the slot has none), else None. The row stays locked (`FOR KEY
/// SHARE`) until the transaction ends, so a takeover's [`next_fence`] waits
/// for the write, and a write that waited for a takeover sees the new token:
/// the two never interleave.
///
/// A writer paused mid-transaction (a stopped process) would hold that lock,
/// and every takeover with it, until it came back: Postgres ends such a
/// transaction once it has sat idle for [`STALLED_WRITE`], and the write is
/// lost with it, as a superseded write should be.
pub async fn superseded(conn: &mut PgConnection, slot: &str, token: u64) -> Result<Option<u64>, StoreError> {
    let current: Option<(i64, String)> = sqlx::query_as(
        "SELECT fence, set_config('idle_in_transaction_session_timeout', $2, true)
         FROM replication_state WHERE slot = $1 FOR KEY SHARE",
    )
    .bind(slot)
    .bind(format!("{}ms", STALLED_WRITE.as_millis()))
    .fetch_optional(conn)
    .await?;
    let current = current.map(|(fence, _)| fence);
    let current = current.unwrap_or(0) as u64;
    Ok((current == 0 || current > token).then_some(current))
}

/// Whether the slot exists and streams to nobody: not active, or active for
/// a backend that is gone.
async fn slot_idle(pool: &PgPool, slot: &str) -> Result<bool, StoreError> {
    let idle: Option<bool> = sqlx::query_scalar(
        "SELECT NOT active OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.active_pid)
         FROM pg_replication_slots s WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    Ok(idle.unwrap_or(false))
}

pub struct Lease {
    redis: ConnectionManager,
    key: String,
    slot: String,
    /// What the lease holds in Redis while it is ours: the token, as text.
    value: String,
    /// The slot's fencing token this holder took: names its term.
    pub token: u64,
    ttl: Duration,
    renewed_at: Instant,
}

impl Lease {
    /// Takes the lease on `slot` if nobody holds it.
    pub async fn try_acquire(
        db: &PgPool,
        redis: &ConnectionManager,
        prefix: &str,
        slot: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let mut conn = redis.clone();
        let key = lease_key(prefix, slot);
        let claim = claim_value();
        let taken_at = Instant::now();
        let won: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&claim)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if won.is_none() {
            return Ok(None);
        }
        Self::take_token(db, redis, key, slot, &claim, ttl, taken_at).await
    }

    /// Takes the lease from the holder whose value is `seen`, if it still is.
    async fn take_over(
        db: &PgPool,
        redis: &ConnectionManager,
        prefix: &str,
        slot: &str,
        seen: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let key = lease_key(prefix, slot);
        let claim = claim_value();
        let taken_at = Instant::now();
        if !swap(redis, &key, seen, &claim, ttl).await? {
            return Ok(None);
        }
        Self::take_token(db, redis, key, slot, &claim, ttl, taken_at).await
    }

    /// With the lease won under `claim`: takes the next token, then names it
    /// in the lease (unless someone took the lease over meanwhile).
    async fn take_token(
        db: &PgPool,
        redis: &ConnectionManager,
        key: String,
        slot: &str,
        claim: &str,
        ttl: Duration,
        taken_at: Instant,
    ) -> Result<Option<Lease>, LeaseError> {
        let token = match next_fence(db, slot).await {
            Ok(token) => token,
            Err(err) => {
                release(redis, &key, claim).await;
                return Err(err.into());
            }
        };
        let value = token.to_string();
        if !swap(redis, &key, claim, &value, ttl).await? {
            return Ok(None);
        }
        // Counted from before the lease was won: the holder stops early, never late.
        Ok(Some(Lease { redis: redis.clone(), key, slot: slot.to_string(), value, token, ttl, renewed_at: taken_at }))
    }

    /// Extends the lease; false if it is no longer ours.
    pub async fn renew(&mut self) -> redis::RedisResult<bool> {
        let started = Instant::now();
        let mut conn = self.redis.clone();
        let renewed: i64 = redis::Script::new(RENEW)
            .key(&self.key)
            .arg(&self.value)
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

    /// Ends the stream of a superseded holder that still has the slot (one
    /// paused past its lease keeps its connection, and Postgres streams a
    /// slot to one connection only), if this lease's token is still the
    /// newest. Waits up to 2 s for it to go. Returns how many were ended.
    pub async fn evict_superseded(&self, db: &PgPool) -> Result<u64, StoreError> {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(s.active_pid, 2000))
             FROM pg_replication_slots s JOIN replication_state r ON r.slot = s.slot_name
             WHERE s.slot_name = $1 AND s.active AND r.fence = $2",
        )
        .bind(&self.slot)
        .bind(self.token as i64)
        .fetch_one(db)
        .await?;
        Ok(ended as u64)
    }

    pub async fn release(self) {
        release(&self.redis, &self.key, &self.value).await;
    }
}

/// Waits for the lease on one slot: takes it when free, or over from a
/// holder whose slot Postgres shows idle at two polls [`Waiter::IDLE_FOR`]
/// apart (and at any poll between).
pub struct Waiter {
    db: PgPool,
    redis: ConnectionManager,
    prefix: String,
    slot: String,
    ttl: Duration,
    /// The lease's value when the slot was first seen idle under it, and
    /// when; cleared by any poll that finds the slot streaming.
    idle_under: Option<(String, Instant)>,
}

impl Waiter {
    /// How often a waiter polls while the slot streams: a few cheap queries.
    pub const POLL: Duration = Duration::from_millis(250);
    /// How long the slot must stay idle under one holder before a waiter
    /// takes over: longer than a holder takes between two streams of its own
    /// (it reconnects within milliseconds), far shorter than a lease.
    pub const IDLE_FOR: Duration = Duration::from_secs(1);

    pub fn new(db: PgPool, redis: ConnectionManager, prefix: &str, slot: &str, ttl: Duration) -> Self {
        Waiter { db, redis, prefix: prefix.to_string(), slot: slot.to_string(), ttl, idle_under: None }
    }

    /// How long to wait before the next poll: [`Self::POLL`], or, once the
    /// slot was seen idle, until it has been for [`Self::IDLE_FOR`] (polls in
    /// between would only add their own latency to a takeover).
    pub fn next_poll_in(&self) -> Duration {
        match &self.idle_under {
            Some((_, since)) => Self::IDLE_FOR.saturating_sub(since.elapsed()).max(Duration::from_millis(10)),
            None => Self::POLL,
        }
    }

    /// One poll: the lease if it was free, or taken over now.
    pub async fn poll(&mut self) -> Result<Option<Lease>, LeaseError> {
        if let Some(lease) = Lease::try_acquire(&self.db, &self.redis, &self.prefix, &self.slot, self.ttl).await? {
            self.idle_under = None;
            return Ok(Some(lease));
        }
        let mut conn = self.redis.clone();
        let value: Option<String> =
            redis::cmd("GET").arg(lease_key(&self.prefix, &self.slot)).query_async(&mut conn).await?;
        let idle_under = match value {
            Some(value) if slot_idle(&self.db, &self.slot).await? => value,
            _ => {
                self.idle_under = None;
                return Ok(None);
            }
        };
        // Idle at both polls under the same holder: it is not streaming, and
        // not between two streams of its own.
        match &self.idle_under {
            Some((value, since)) if *value == idle_under && since.elapsed() >= Self::IDLE_FOR => {}
            Some((value, _)) if *value == idle_under => return Ok(None),
            _ => {
                tracing::debug!(slot = %self.slot, "replication slot idle under its lease holder");
                self.idle_under = Some((idle_under, Instant::now()));
                return Ok(None);
            }
        }
        self.idle_under = None;
        let lease = Lease::take_over(&self.db, &self.redis, &self.prefix, &self.slot, &idle_under, self.ttl).await?;
        if let Some(lease) = &lease {
            tracing::warn!(slot = %self.slot, token = lease.token, "replication slot idle under its lease holder; taken over");
        }
        Ok(lease)
    }
}

/// A value no other acquirer writes: the lease's holder-to-be until its token
/// is taken.
fn claim_value() -> String {
    format!("claim:{}", uuid::Uuid::new_v4().simple())
}

async fn swap(redis: &ConnectionManager, key: &str, from: &str, to: &str, ttl: Duration) -> redis::RedisResult<bool> {
    let mut conn = redis.clone();
    let swapped: i64 =
        redis::Script::new(SWAP).key(key).arg(from).arg(to).arg(ttl.as_millis() as u64).invoke_async(&mut conn).await?;
    Ok(swapped == 1)
}

async fn release(redis: &ConnectionManager, key: &str, value: &str) {
    let mut conn = redis.clone();
    let released: redis::RedisResult<i64> =
        redis::Script::new(RELEASE).key(key).arg(value).invoke_async(&mut conn).await;
    if let Err(err) = released {
        tracing::warn!(%err, "could not release the replication lease; it expires on its own");
    }
}
