//! Request-rate limits: per environment and route class (create, append, SSE
//! connect, list, token mint), and per public (browser) token, shared by every
//! process through Redis.
//!
//! The shared count is a sliding-window counter (the two-window estimate: this
//! second's count plus the previous second's, weighted by how much of it still
//! lies inside the sliding second), kept in Redis per (environment, class) or
//! per token. No request asks Redis anything: a process *leases* a slice of
//! the allowance (at most a tenth of the per-second limit) ahead of need, in a
//! background task, and requests spend that local budget in memory. So the
//! append path gains no Redis round trip, and no environment-wide key enters a
//! channel's script (whose keys must share one Redis Cluster hash slot); the
//! lease script's two keys share their own hash tag.
//!
//! Why not `governor`: its GCRA state lives in one process, and its cells
//! cannot be handed out in leases from a shared count; what is enforced across
//! processes here is the shared window, and the local state is only a budget.
//!
//! Slack: a process may spend up to one lease it holds plus one lease on credit
//! (while its first lease of a burst is in flight), so in any window the
//! processes together admit at most the limit plus two leases each.
//! If Redis is unreachable the lease is granted locally (fail open): the
//! requests themselves then succeed or fail on their own, never as 429.
//!
//! An environment's limits may be overridden per class (see [`overrides`]);
//! the limiter reads them from memory, like its budgets.

pub mod overrides;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::auth::{Auth, Principal};
use crate::config::Config;
use crate::http::error::ApiError;

/// The route classes limited per environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// `POST /api/v1/sessions`.
    Create,
    /// `POST /realtime/v1/sessions/{session}/{io}/append`.
    Append,
    /// Opening an SSE subscription to a channel.
    Subscribe,
    /// `GET /api/v1/sessions`.
    List,
    /// Minting a token: `POST /api/v1/auth/public-tokens`, and a channel's
    /// initialize (`PUT`), which mints a write token.
    Mint,
}

impl RouteClass {
    /// Every class, in the order the dashboard shows them.
    pub const ALL: [RouteClass; 5] =
        [RouteClass::Create, RouteClass::Append, RouteClass::Subscribe, RouteClass::List, RouteClass::Mint];

    pub fn parse(s: &str) -> Option<RouteClass> {
        RouteClass::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Create => "create",
            RouteClass::Append => "append",
            RouteClass::Subscribe => "subscribe",
            RouteClass::List => "list",
            RouteClass::Mint => "mint",
        }
    }
}

/// What a 429 reports: the limit passed and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Requests per second allowed in the scope that refused.
    pub limit: u32,
    /// When the refusing scope is expected to admit again (epoch ms).
    pub reset_ms: i64,
    pub scope: LimitScope,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Environment(RouteClass),
    PublicToken,
}

impl RateLimited {
    pub fn message(&self) -> String {
        match self.scope {
            LimitScope::Environment(class) => format!(
                "Rate limit reached: this environment may make {} {} requests per second; retry after x-ratelimit-reset",
                self.limit,
                class.as_str()
            ),
            LimitScope::PublicToken => format!(
                "Rate limit reached: this public token may make {} requests per second; retry after x-ratelimit-reset",
                self.limit
            ),
        }
    }

    /// The headers a 429 carries: `x-ratelimit-limit`, `x-ratelimit-remaining`
    /// (0), `x-ratelimit-reset` (epoch ms, read first by the official client)
    /// and `Retry-After` (whole seconds, at least 1).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let now = now_ms();
        let wait_secs = ((self.reset_ms - now).max(0) + 999) / 1000;
        for (name, value) in [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", "0".to_string()),
            ("x-ratelimit-reset", self.reset_ms.to_string()),
            ("retry-after", wait_secs.max(1).to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
    }
}

/// The limits in force (requests per second; 0: none).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub enabled: bool,
    pub create: u32,
    pub append: u32,
    pub subscribe: u32,
    pub list: u32,
    pub mint: u32,
    pub per_public_token: u32,
    /// The window the limits are counted over: a second (a test seam).
    pub window_ms: u32,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Settings {
            enabled: c.rate_limits_enabled,
            create: c.rate_limit_create_per_sec,
            append: c.rate_limit_append_per_sec,
            subscribe: c.rate_limit_subscribe_per_sec,
            list: c.rate_limit_list_per_sec,
            mint: c.rate_limit_mint_per_sec,
            per_public_token: c.rate_limit_public_token_per_sec,
            window_ms: c.rate_limit_window_ms().max(1),
        }
    }

    /// The configured limit of `class` (0: none), before any override.
    pub fn per_env(&self, class: RouteClass) -> u32 {
        match class {
            RouteClass::Create => self.create,
            RouteClass::Append => self.append,
            RouteClass::Subscribe => self.subscribe,
            RouteClass::List => self.list,
            RouteClass::Mint => self.mint,
        }
    }
}

/// What one shared count is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Env(Uuid, RouteClass),
    /// The first 16 bytes of the token's SHA-256: the token itself is never
    /// stored, in memory or in Redis.
    Token([u8; 16]),
}

impl Key {
    /// The hash tag both window keys share (one Redis Cluster slot).
    fn tag(&self) -> String {
        match self {
            Key::Env(env, class) => format!("e:{}:{}", env.simple(), class.as_str()),
            Key::Token(hash) => format!("t:{}", hex::encode(hash)),
        }
    }
}

/// A process's local share of one shared count.
#[derive(Debug, Default)]
struct Bucket {
    /// Leased requests not yet spent; negative while spending on credit.
    budget: i64,
    /// A lease request is in flight (one at a time per bucket).
    refilling: bool,
    /// The shared window had no room at the last lease: refuse until then.
    exhausted_until_ms: i64,
    last_used_ms: i64,
    /// The limit the budget was leased under (0: not yet spent from): an
    /// environment's override can change it between requests.
    limit: u32,
}

struct Buckets {
    map: HashMap<Key, Bucket>,
    /// The size at which idle buckets (public tokens come and go) are swept.
    sweep_at: usize,
}

const MIN_SWEEP_AT: usize = 4096;
/// A bucket unused this long is forgotten (its lease, if any, is abandoned).
const IDLE_MS: i64 = 60_000;

/// The handle routes use (cheap to clone).
#[derive(Clone)]
pub struct RateLimits(Arc<Inner>);

struct Inner {
    settings: Settings,
    redis: ConnectionManager,
    prefix: String,
    buckets: Mutex<Buckets>,
    /// Woken whenever a lease request ends.
    leased: Notify,
    script: redis::Script,
    /// How long a request with no budget waits for a lease in flight.
    lease_wait: Duration,
    /// Environments' overridden limits, in memory (see [`overrides`]).
    overrides: overrides::OverrideMap,
}

/// Grants up to `want` requests from the sliding window, if room is left;
/// else answers how long until one request's room opens (so a 429's
/// `x-ratelimit-reset` is when a retry passes, not a guess).
/// KEYS: this window's counter, the previous window's. ARGV: limit, want,
/// ms elapsed in this window, the window's length in ms.
/// Answers `{granted, wait_ms}`.
const LEASE_SCRIPT: &str = r#"
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local elapsed = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local room = limit - math.floor(prev * (window - elapsed) / window) - cur
if room > 0 then
  local grant = math.min(want, room)
  redis.call('INCRBY', KEYS[1], grant)
  redis.call('PEXPIRE', KEYS[1], 3 * window)
  return {grant, 0}
end
local wait
if cur >= limit then
  -- In the next window, once this one's weight falls below limit / cur.
  wait = (window - elapsed) + math.floor(window * (1 - limit / cur)) + 1
else
  -- In this window, once the previous one's weight falls below (limit - cur) / prev.
  wait = math.floor(window * (1 - (limit - cur) / prev)) - elapsed + 1
end
return {0, math.max(wait, 1)}
"#;

/// A lease: a tenth of the per-second limit, at least one request.
fn lease_size(limit: u32) -> i64 {
    (i64::from(limit) / 10).max(1)
}

/// How long a spent window takes to free a lease's worth (the sliding
/// window frees `limit` requests a window).
fn refill_period_ms(limit: u32, window_ms: u32) -> i64 {
    (i64::from(window_ms) * lease_size(limit) / i64::from(limit.max(1))).max(10)
}

fn now_ms() -> i64 {
    crate::clock::now().timestamp_millis()
}

enum Take {
    Admit {
        refill: bool,
    },
    /// No budget: wait for the lease in flight (`refill`: start it).
    Wait {
        refill: bool,
    },
    Deny {
        reset_ms: i64,
    },
}

impl RateLimits {
    pub fn new(settings: Settings, redis: ConnectionManager, prefix: &str, lease_wait: Duration) -> Self {
        RateLimits(Arc::new(Inner {
            settings,
            redis,
            prefix: prefix.to_string(),
            buckets: Mutex::new(Buckets { map: HashMap::new(), sweep_at: MIN_SWEEP_AT }),
            leased: Notify::new(),
            script: redis::Script::new(LEASE_SCRIPT),
            lease_wait,
            overrides: overrides::OverrideMap::default(),
        }))
    }

    pub fn from_config(config: &Config, redis: ConnectionManager) -> Self {
        Self::new(
            Settings::from_config(config),
            redis,
            &config.redis_prefix,
            // Longer than a Redis reply may take, so a lease that fails (and
            // is then granted locally) answers its waiters before they give up.
            Duration::from_millis(config.redis_response_timeout_ms.max(100) + 250),
        )
    }

    /// Admits one request of `class` by `auth` (with `token`, the public
    /// token's hash), or answers why not. Only memory is touched unless the
    /// budget is spent and a lease is still on its way.
    async fn admit(&self, auth: &Auth, token: Option<[u8; 16]>, class: RouteClass) -> Result<(), RateLimited> {
        let s = &self.0.settings;
        if !s.enabled {
            return Ok(());
        }
        let env_limit = self.0.overrides.get(auth.env.id, class).unwrap_or_else(|| s.per_env(class));
        if env_limit > 0 {
            self.admit_key(Key::Env(auth.env.id, class), env_limit, LimitScope::Environment(class)).await?;
        }
        if let (Principal::PublicToken { .. }, Some(hash), limit @ 1..) = (&auth.principal, token, s.per_public_token) {
            self.admit_key(Key::Token(hash), limit, LimitScope::PublicToken).await?;
        }
        Ok(())
    }

    async fn admit_key(&self, key: Key, limit: u32, scope: LimitScope) -> Result<(), RateLimited> {
        // Once to take, once more after waiting for a lease in flight.
        for attempt in 0..2 {
            let now = now_ms();
            // Registered before the budget is looked at, so a lease that lands
            // in between still wakes this request.
            let leased = self.0.leased.notified();
            tokio::pin!(leased);
            leased.as_mut().enable();
            match self.take(&key, limit, now) {
                Take::Admit { refill } => {
                    if refill {
                        self.spawn_refill(key, limit);
                    }
                    return Ok(());
                }
                Take::Deny { reset_ms } => return Err(RateLimited { limit, reset_ms, scope }),
                Take::Wait { refill } => {
                    if refill {
                        self.spawn_refill(key.clone(), limit);
                    }
                    if attempt == 0 {
                        let _ = tokio::time::timeout(self.0.lease_wait, leased).await;
                    }
                }
            }
        }
        Err(RateLimited { limit, reset_ms: now_ms() + refill_period_ms(limit, self.0.settings.window_ms), scope })
    }

    /// Spends one request from `key`'s local budget (the hot path: one lock,
    /// one map look-up).
    fn take(&self, key: &Key, limit: u32, now: i64) -> Take {
        let lease = lease_size(limit);
        let mut buckets = self.0.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.map.contains_key(key) && buckets.map.len() >= buckets.sweep_at {
            buckets.map.retain(|_, b| b.refilling || now - b.last_used_ms < IDLE_MS);
            buckets.sweep_at = (buckets.map.len() * 2).max(MIN_SWEEP_AT);
        }
        let b = buckets.map.entry(key.clone()).or_default();
        b.last_used_ms = now;
        if b.limit != limit {
            // An override changed the limit: keep at most a lease of the new
            // one, and ask the shared window afresh rather than wait out a
            // refusal learned under the old one.
            if b.limit != 0 {
                b.budget = b.budget.min(lease);
                b.exhausted_until_ms = 0;
            }
            b.limit = limit;
        }
        let open = now >= b.exhausted_until_ms;
        if b.budget > 0 || (open && b.budget > -lease) {
            b.budget -= 1;
            // Ahead of need: the next lease is asked for at half a lease left.
            let refill = open && !b.refilling && b.budget <= lease / 2;
            b.refilling |= refill;
            Take::Admit { refill }
        } else if !open {
            Take::Deny { reset_ms: b.exhausted_until_ms }
        } else {
            let refill = !b.refilling;
            b.refilling = true;
            Take::Wait { refill }
        }
    }

    fn spawn_refill(&self, key: Key, limit: u32) {
        let this = self.clone();
        tokio::spawn(async move { this.refill(key, limit).await });
    }

    /// Leases enough to bring `key`'s budget back to a full lease (repaying
    /// any credit spent), from the shared window.
    async fn refill(&self, key: Key, limit: u32) {
        let lease = lease_size(limit);
        let want = {
            let buckets = self.0.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let budget = buckets.map.get(&key).map_or(0, |b| b.budget);
            (lease - budget).clamp(1, lease)
        };
        let now = now_ms();
        let granted = self.lease(&key, limit, want, now).await;
        {
            let mut buckets = self.0.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let b = buckets.map.entry(key).or_default();
            b.refilling = false;
            match granted {
                // A short grant is spent; the next lease learns the wait.
                Ok((granted, _)) if granted > 0 => b.budget += granted,
                Ok((_, wait_ms)) => b.exhausted_until_ms = now + wait_ms.max(1),
                Err(err) => {
                    tracing::warn!(%err, "rate-limit lease failed; granted locally");
                    b.budget += want;
                }
            }
            // A lease asked for under a limit an override has since lowered
            // holds no more than a lease of the new one.
            if b.limit != 0 && b.limit != limit {
                b.budget = b.budget.min(lease_size(b.limit));
            }
        }
        self.0.leased.notify_waiters();
    }

    /// One round trip: the lease script on `key`'s two window counters.
    async fn lease(&self, key: &Key, limit: u32, want: i64, now: i64) -> redis::RedisResult<(i64, i64)> {
        let window_ms = i64::from(self.0.settings.window_ms);
        let window = now.div_euclid(window_ms);
        let base = format!("{}:rl:{{{}}}", self.0.prefix, key.tag());
        let mut redis = self.0.redis.clone();
        self.0
            .script
            .key(format!("{base}:{window}"))
            .key(format!("{base}:{}", window - 1))
            .arg(limit)
            .arg(want)
            .arg(now.rem_euclid(window_ms))
            .arg(window_ms)
            .invoke_async(&mut redis)
            .await
    }
}

/// The extractor a limited route takes: the limits handle and, for a public
/// token, its hash (secret keys are limited per environment only).
pub struct Limits {
    limits: RateLimits,
    token: Option<[u8; 16]>,
}

impl Limits {
    /// Admits one `class` request by `auth`, or answers 429 `rate_limited`.
    pub async fn admit(&self, auth: &Auth, class: RouteClass) -> Result<(), ApiError> {
        self.limits.admit(auth, self.token, class).await.map_err(ApiError::RateLimited)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Limits
where
    RateLimits: FromRef<S>,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let limits = RateLimits::from_ref(state);
        let token = if limits.0.settings.enabled && limits.0.settings.per_public_token > 0 {
            parts
                .headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
                .map(str::trim)
                .filter(|t| !t.is_empty() && !t.starts_with("tr_"))
                .map(|t| {
                    let digest = Sha256::digest(t.as_bytes());
                    let mut hash = [0u8; 16];
                    hash.copy_from_slice(&digest[..16]);
                    hash
                })
        } else {
            None
        };
        Ok(Limits { limits, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_a_tenth_of_the_limit_and_never_empty() {
        assert_eq!(lease_size(20_000), 2_000);
        assert_eq!(lease_size(5), 1);
        assert_eq!(lease_size(0), 1);
        assert_eq!(refill_period_ms(5, 1_000), 200);
        assert_eq!(refill_period_ms(1_000, 1_000), 100);
    }
}
