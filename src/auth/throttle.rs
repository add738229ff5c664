//! Failure throttles: how many failed credentials (dashboard passwords, API
//! bearer tokens) one client address may present, and how many failed
//! passwords one email has drawn.
//!
//! The state lives in Redis, so every process of a deployment counts the
//! same failures (an attacker spread over the processes behind a balancer
//! gets no more tries). Redis is asked on failures only: one script call
//! records the failure and answers the count and, once the budget is spent,
//! until when the key is blocked. That verdict is cached in-process, so an
//! attempt, failed or not, is checked against a local map alone and a
//! successful request never waits on Redis. (Another process learns of a
//! block at its own next failure from that address: at most one extra
//! failure per process per block.)
//!
//! The budget is a fixed window (N failures a minute), then a block whose
//! length doubles with each repeat up to a ceiling, forgotten after a quiet
//! period. GCRA crates such as `governor` keep state in-process and meter a
//! steady rate; what is wanted here is shared across processes and an
//! escalating penalty for failures only, so this is a small script of ours.
//!
//! If Redis is away, a failure is not recorded (logged): sign-in and the API
//! keep working, unthrottled, and the bounded verification pool
//! ([`crate::operators::Verifier`]) still caps what a flood costs.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

/// How many failures a key may have and what follows.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failures allowed in one window; the one that reaches it starts a block.
    pub limit: u32,
    pub window: Duration,
    /// The first block's length; each further block doubles it...
    pub first_block: Duration,
    /// ...up to this.
    pub max_block: Duration,
    /// A key with no failure (and no block) for this long starts over,
    /// its blocks' doubling forgotten.
    pub quiet: Duration,
}

impl Policy {
    /// Per client address: `limit` failures a minute, then 1 min, 2, 4, 8,
    /// 15 min; forgotten after 15 quiet minutes.
    pub fn per_address(limit: u32) -> Policy {
        Policy {
            limit: limit.max(1),
            window: Duration::from_secs(60),
            first_block: Duration::from_secs(60),
            max_block: Duration::from_secs(15 * 60),
            quiet: Duration::from_secs(15 * 60),
        }
    }

    /// Counting only, never blocking: how many failures a key had in the
    /// last `window` (the per-email slowdown reads this).
    pub fn count_only(window: Duration) -> Policy {
        Policy { limit: u32::MAX, window, first_block: Duration::ZERO, max_block: Duration::ZERO, quiet: window }
    }
}

/// What recording a failure answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Failures of the key in its current window (0 once a block started).
    pub count: u64,
    /// Set when the key is now blocked: how long for.
    pub blocked_for: Option<Duration>,
}

/// Records one failure: KEYS[1] the key's hash; ARGV now (ms), limit,
/// window, first block, max block, quiet (ms). Answers {count, blocked
/// until (ms, 0 when not blocked)}.
static FAIL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now, limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local first, max, quiet = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'n', 'w', 'level', 'until')
local n, w = tonumber(h[1]) or 0, tonumber(h[2]) or now
local level, untl = tonumber(h[3]) or 0, tonumber(h[4]) or 0
if untl > now then
  return {n, untl}
end
if now - w >= window then
  n, w = 0, now
end
n = n + 1
if n >= limit then
  untl = now + math.floor(math.min(first * 2 ^ math.min(level, 30), max))
  level, n, w = level + 1, 0, now
else
  untl = 0
end
redis.call('HSET', KEYS[1], 'n', n, 'w', w, 'level', level, 'until', untl)
redis.call('PEXPIRE', KEYS[1], math.max(untl, w + window) - now + quiet)
return {n, untl}
",
    )
});

/// Past this many blocked keys the local cache drops the expired ones (and,
/// if still full, starts over) rather than grow without bound.
const MAX_CACHED: usize = 10_000;

/// One throttle: a Redis key space (`{prefix}:throttle:{scope}:…`) under one
/// policy, and the blocks this process knows of.
#[derive(Clone)]
pub struct Throttle {
    inner: Arc<Inner>,
}

struct Inner {
    redis: ConnectionManager,
    prefix: String,
    policy: Policy,
    /// Key → blocked until (ms since the epoch, by [`crate::clock`]).
    blocked: Mutex<HashMap<String, i64>>,
}

fn now_ms() -> i64 {
    crate::clock::now().timestamp_millis()
}

impl Throttle {
    pub fn new(redis: ConnectionManager, redis_prefix: &str, scope: &str, policy: Policy) -> Throttle {
        Throttle {
            inner: Arc::new(Inner {
                redis,
                prefix: format!("{redis_prefix}:throttle:{scope}"),
                policy,
                blocked: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The key's Redis name. The subject is hashed: an email never sits in
    /// Redis in the clear, and no subject can shape the key.
    fn redis_key(&self, subject: &str) -> String {
        let digest = Sha256::digest(subject.as_bytes());
        format!("{}:{}", self.inner.prefix, hex::encode(&digest[..16]))
    }

    /// How much longer `subject` is blocked, as far as this process knows.
    /// No Redis call.
    pub fn blocked(&self, subject: &str) -> Option<Duration> {
        let now = now_ms();
        let mut blocked = self.inner.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(subject) {
            Some(&until) if until > now => Some(Duration::from_millis((until - now) as u64)),
            Some(_) => {
                blocked.remove(subject);
                None
            }
            None => None,
        }
    }

    /// Records a failure of `subject` (one Redis round trip) and remembers
    /// a block it started. Redis away: logged, nothing recorded.
    pub async fn fail(&self, subject: &str) -> Failure {
        let p = &self.inner.policy;
        let now = now_ms();
        let ms = |d: Duration| d.as_millis() as u64;
        let mut conn = self.inner.redis.clone();
        let answer: Result<(u64, i64), _> = FAIL
            .key(self.redis_key(subject))
            .arg(now)
            .arg(p.limit)
            .arg(ms(p.window))
            .arg(ms(p.first_block))
            .arg(ms(p.max_block))
            .arg(ms(p.quiet))
            .invoke_async(&mut conn)
            .await;
        match answer {
            Ok((count, until)) if until > now => {
                self.remember(subject, until, now);
                Failure { count, blocked_for: Some(Duration::from_millis((until - now) as u64)) }
            }
            Ok((count, _)) => Failure { count, blocked_for: None },
            Err(err) => {
                tracing::warn!(%err, "could not record a failed credential; not throttled");
                Failure { count: 0, blocked_for: None }
            }
        }
    }

    fn remember(&self, subject: &str, until: i64, now: i64) {
        let mut blocked = self.inner.blocked.lock().unwrap_or_else(|e| e.into_inner());
        if blocked.len() >= MAX_CACHED {
            blocked.retain(|_, u| *u > now);
            if blocked.len() >= MAX_CACHED {
                blocked.clear();
            }
        }
        blocked.insert(subject.to_string(), until);
    }
}

/// Whole seconds to wait, rounded up, for `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}
