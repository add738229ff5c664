//! Channel records in Redis Streams.
//!
//! Keys of one channel share a hash tag, `{<session>:<io>}`, so every script
//! touches one slot. Stream entry ids are `<seq>-1`, so a range read by sequence
//! number is a plain XRANGE.
//!
//! | key | holds |
//! | --- | --- |
//! | `<p>:ch:{s:io}:s` | the stream; fields `b` body, `h` headers (JSON pairs), `t` ms |
//! | `<p>:ch:{s:io}:n` | next sequence number counter (INCR) |
//! | `<p>:ch:{s:io}:r` | numbers below this are leased from Postgres (see [`super::floor`]) |
//! | `<p>:ch:{s:io}:closed` | present once the session is closed: appends refused |
//! | `<p>:ch:{s:io}:w` | ids of waitpoints pending on the channel |
//! | `<p>:ch:{s:io}:p:<part>` | seq of an append with that `X-Part-Id` (dedupe window) |
//! | `<p>:ch:{s:io}:run` | the fence: `<run version> <run>`, the only run whose token may write |
//! | `<p>:ch:{s:io}:b` | bytes the channel holds (bodies plus headers JSON), for its quota |
//! | `<p>:boot-intents` | sorted set: `<env>:<session>` → newest `.in` seq no run is known to read yet |
//! | `<p>:seq-epoch` | a random value, gone when Redis loses its data (see [`super::floor`]) |
//!
//! The boot-intent set and the epoch are the keys outside a channel's slot
//! (the `.in` append script touches the set, a lease's install the epoch): fine
//! on one Redis node, which is what sessiond runs on; a Redis Cluster
//! deployment would need one of each per shard.

use redis::aio::ConnectionManager;
use redis::{Script, Value as RedisValue};
use sqlx::PgPool;
use uuid::Uuid;

use super::floor::{FloorError, Lease, SeqFloors};
use super::group_commit::Lanes;
use super::{ChannelKey, Record};

/// Appends a group of records in order; see the module docs for the keys.
///
/// KEYS: stream, counter, closed, waiters, fence, boot intents, reservation,
/// bytes held, then one part-id key per record (unused when the record has
/// none). ARGV: dedupe window (ms), notify channel, notify tag, boot-intent
/// member ('' for none), the channel's quota in bytes (0: none), then six per
/// record: body, headers JSON, has part id ('1'/'0'), announce inline
/// ('1'/'0'), writing run ('' when not written by a run), counted against the
/// quota ('1'/'0').
///
/// Returns `{timestamp, (outcome, seq) per record, waitpoint ids drained...}`
/// with outcome 0 written, 1 duplicate, 2 refused (closed), 3 refused (the
/// writing run was superseded), 4 refused (the channel's quota: the record
/// would take the bytes held past it). The quota is checked and the bytes
/// counted here, in the same atomic step as the write, so concurrent appends
/// cannot overshoot it together; the server's own control records (the close,
/// a hand-off) are counted but never refused, so a full channel can still be
/// closed and handed off. A record whose part id was seen within the
/// window is not written again and answers the seq it got then (a repeat
/// inside the group included), even after the close or a hand-off, so a retry
/// still gets its acknowledgement. The group's first new record completes the
/// channel's pending waitpoints.
///
/// When the group could pass the channel's reservation, or Redis has lost the
/// channel (counter or reservation missing), nothing is written and the reply
/// is `{-1, counter}`: the caller leases more numbers from Postgres and calls
/// again (see [`super::floor`]).
///
/// The fence (`<version> <run>`, set by the run manager when a run replaces
/// another) is checked here, in the same atomic step as the write: a run that
/// was handed off cannot land a record after the hand-off was acknowledged,
/// whatever any server's session cache still says.
///
/// With a boot-intent member (appends to `.in`), the member is added to the
/// boot-intent set with the newest seq written, in the same step as the
/// records: a record on `.in` is never stored without a durable note that a
/// run must read it (see [`ChannelStore::clear_boot_intent`]).
///
/// Each new record is announced on the notify channel, carrying the record
/// itself when asked (see [`Announcement`]) so other servers' feeds need no
/// read back; announcements go out after the records are stored, and Redis
/// sends them only once the write is as durable as the fsync setting makes it.
const APPEND: &str = r#"
local count = (#ARGV - 5) / 6
local counter, reserved = redis.call('GET', KEYS[2]), redis.call('GET', KEYS[7])
if not counter or not reserved or tonumber(counter) + count > tonumber(reserved) then
  return {-1, tonumber(counter or 0)}
end
local closed = redis.call('EXISTS', KEYS[3]) == 1
local fence = redis.call('GET', KEYS[5])
local fenced_run = fence and string.match(fence, '^%d+ (.+)$')
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local reply = {ts}
local last_seq = nil
local quota = tonumber(ARGV[5])
local held = tonumber(redis.call('GET', KEYS[8]) or '0')
local held_before = held
for i = 1, count do
  local a = 5 + (i - 1) * 6
  local body, headers, has_part, writer = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3] == '1', ARGV[a + 5]
  local size = #body + #headers
  local seen = has_part and redis.call('GET', KEYS[8 + i])
  if seen then
    table.insert(reply, 1)
    table.insert(reply, tonumber(seen))
  elseif closed then
    table.insert(reply, 2)
    table.insert(reply, 0)
  elseif writer ~= '' and fenced_run and fenced_run ~= writer then
    table.insert(reply, 3)
    table.insert(reply, 0)
  elseif ARGV[a + 6] == '1' and quota > 0 and held + size > quota then
    table.insert(reply, 4)
    table.insert(reply, 0)
  else
    local seq = redis.call('INCR', KEYS[2]) - 1
    redis.call('XADD', KEYS[1], seq .. '-1', 'b', body, 'h', headers, 't', ts)
    held = held + size
    if has_part then redis.call('SET', KEYS[8 + i], seq, 'PX', ARGV[1]) end
    table.insert(reply, 0)
    table.insert(reply, seq)
    last_seq = seq
    if ARGV[a + 4] == '1' then
      redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':' .. seq .. ':' .. ts .. '\n' .. headers .. '\n' .. body)
    else
      redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':' .. seq)
    end
  end
end
if held ~= held_before then redis.call('SET', KEYS[8], string.format('%.0f', held)) end
if last_seq then
  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[6], 'GT', last_seq, ARGV[4]) end
  local waiters = redis.call('SMEMBERS', KEYS[4])
  if #waiters > 0 then
    redis.call('DEL', KEYS[4])
    for _, w in ipairs(waiters) do table.insert(reply, w) end
  end
end
return reply
"#;

/// Installs a lease of sequence numbers (see [`super::floor`]). KEYS: counter,
/// reservation, epoch; ARGV: epoch the lease was asked under, from, upto.
/// Refused (-1) when the epoch is gone: Redis lost its data since, and the
/// lease may be older than numbers acknowledged in between. A channel Redis
/// still has only gets its reservation raised; a lost one restarts its
/// counter at the lease (never below what is left of its keys). Returns the
/// counter.
const INSTALL_LEASE: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local counter, reserved = redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])
local from, upto = tonumber(ARGV[2]), tonumber(ARGV[3])
if counter and reserved then
  if upto > tonumber(reserved) then redis.call('SET', KEYS[2], ARGV[3]) end
  return tonumber(counter)
end
from = math.max(from, tonumber(counter or 0), tonumber(reserved or 0))
upto = math.max(upto, tonumber(reserved or 0))
redis.call('SET', KEYS[1], string.format('%.0f', from))
redis.call('SET', KEYS[2], string.format('%.0f', upto))
return from
"#;

/// Reads the epoch, first writing ARGV[1] when there is none (Redis is new or
/// lost its data).
const EPOCH: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// Moves a channel's fence to a newer run: `SET` only when ARGV[1] (the
/// session's run version) is above the stored one, so a late retry of an
/// older hand-off never moves the fence back. ARGV[2] is the run.
const SET_FENCE: &str = r#"
local current = redis.call('GET', KEYS[1])
local version = current and tonumber(string.match(current, '^(%d+) '))
if version and version >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
return 1
"#;

/// Drops a boot intent once a run is known to read the records it covers:
/// only when its score (the newest `.in` seq noted) is at most ARGV[2], so an
/// intent a later append raised stays for that append's own follow-up.
const CLEAR_BOOT_INTENT: &str = r#"
local seq = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seq and tonumber(seq) <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"#;

/// Registers a pending waitpoint. The set's TTL only ever grows: a shorter-lived
/// waiter must not evict a longer-lived one.
const REGISTER_WAITER: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
local current = redis.call('PTTL', KEYS[1])
if current < 0 or ttl > current then redis.call('PEXPIRE', KEYS[1], ttl) end
return redis.call('PTTL', KEYS[1])
"#;

/// Marks a channel closed; its records (and any pending set, fence and byte
/// count) expire
/// after the retention period (ARGV[1]), its counter, reservation and closed
/// marker after ARGV[2] (longer): until then a resume from before the expired
/// history still gets its gap signal, and the marker still refuses appends.
const CLOSE: &str = r#"
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
for _, i in ipairs({1, 4, 5, 7}) do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
for _, i in ipairs({2, 6}) do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1
"#;

/// How many times an append or a read asks for a lease before giving up (a
/// lease is refused only when Redis lost its data meanwhile, or another
/// process's appends used it up first).
const LEASE_ROUNDS: usize = 5;

/// How much longer than its records a closed channel's counter and closed
/// marker are kept.
const CLOSED_MARKER_GRACE_MS: u64 = 30 * 24 * 3600 * 1000;

/// Records with bodies up to this size travel inside their append announcement;
/// bigger ones are announced by sequence number and read from the stream.
const MAX_INLINE_ANNOUNCEMENT: usize = 16 * 1024;

/// An append announcement, as published on the notify channel:
/// `<session>:<io>:<seq>` or, with the record inline,
/// `<session>:<io>:<seq>:<timestamp>\n<headers JSON>\n<body>`.
#[derive(Debug, PartialEq, Eq)]
pub struct Announcement {
    pub key: ChannelKey,
    pub seq_num: u64,
    pub record: Option<Record>,
}

impl Announcement {
    /// Just the channel, read cheaply off the front (most announcements are
    /// for channels nobody on this server follows).
    pub fn channel(payload: &str) -> Option<ChannelKey> {
        let mut parts = payload.splitn(3, ':');
        let session_id = Uuid::parse_str(parts.next()?).ok()?;
        let io = super::Io::parse(parts.next()?)?;
        Some(ChannelKey { session_id, io })
    }

    pub fn parse(payload: &str) -> Option<Announcement> {
        let (head, rest) = match payload.split_once('\n') {
            Some((head, rest)) => (head, Some(rest)),
            None => (payload, None),
        };
        let key = Self::channel(head)?;
        let mut parts = head.split(':').skip(2);
        let seq_num: u64 = parts.next()?.parse().ok()?;
        let record = match rest {
            None => None,
            Some(rest) => {
                let timestamp: i64 = parts.next()?.parse().ok()?;
                let (headers, body) = rest.split_once('\n')?;
                let headers = serde_json::from_str(headers).ok()?;
                Some(Record { seq_num, body: body.to_string(), headers, timestamp })
            }
        };
        Some(Announcement { key, seq_num, record })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    #[error("session is closed")]
    Closed,
    /// The writing run was replaced by another (a hand-off); it may not write.
    #[error("run was superseded by another run of the session")]
    Superseded,
    /// The record would take the channel past its quota of `limit` bytes.
    #[error("the channel is full: it holds at most {limit} bytes")]
    Full { limit: u64 },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt channel data: {0}")]
    Corrupt(String),
    /// The sequence floor in Postgres could not be read or raised.
    #[error("sequence floor: {0}")]
    Floor(#[from] FloorError),
    /// Every lease asked for was refused or used up by others first.
    #[error("no sequence numbers could be leased for the channel")]
    NoLease,
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq_num: u64,
    pub timestamp: i64,
    /// A retry of an append already stored (same `X-Part-Id`); nothing new written.
    pub duplicate: bool,
    /// Waitpoints that were pending on the channel, now drained.
    pub drained_waitpoints: Vec<Uuid>,
}

/// The dedupe id of a client's `X-Part-Id`. Clients and the server keep their
/// part ids apart, so no client id can stand in for a server-written record.
pub fn client_part(part_id: &str) -> String {
    format!("c:{part_id}")
}

/// The part id of the `session-closed` record the close appends to `.in`.
pub const SESSION_CLOSED_PART: &str = "s:session-closed";

/// The part id of a control record the server appends for a hand-off to `run`
/// (one per hand-off, so a retried job does not write it twice).
pub fn handoff_part(run: &str) -> String {
    format!("s:handoff:{run}")
}

/// Who appends a record, as far as the fence and the boot intent care.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    /// The run whose token wrote the record: refused once that run was
    /// superseded. None for clients, secret keys and the server itself.
    pub run: Option<String>,
    /// For `.in` appends: `<env>:<session>`, noted in the boot-intent set with
    /// the record (see [`APPEND`]).
    pub boot_intent: Option<String>,
    /// Refused when it would take the channel past its quota: every client's
    /// and run's record; never the server's own control records.
    pub counted: bool,
}

/// A record on its way into a channel, encoded for the append script.
#[derive(Debug)]
pub struct NewRecord {
    pub body: String,
    pub headers_json: String,
    pub part_id: Option<String>,
    pub writer_run: Option<String>,
    pub boot_intent: Option<String>,
    pub counted: bool,
}

/// Cheap to clone (every SSE subscriber holds one): the state is shared.
#[derive(Clone)]
pub struct ChannelStore(std::sync::Arc<StoreInner>);

pub struct StoreInner {
    redis: ConnectionManager,
    floors: SeqFloors,
    prefix: String,
    dedupe_window_ms: u64,
    /// Most bytes one channel holds (0: no bound); see [`APPEND`].
    max_channel_bytes: std::sync::atomic::AtomicU64,
    append: Script,
    install_lease: Script,
    epoch: Script,
    register: Script,
    close: Script,
    set_fence: Script,
    clear_boot_intent: Script,
    lanes: Lanes,
}

impl std::ops::Deref for ChannelStore {
    type Target = StoreInner;
    fn deref(&self) -> &StoreInner {
        &self.0
    }
}

impl ChannelStore {
    /// `db` holds the channels' sequence floors (see [`super::floor`]).
    pub fn new(redis: ConnectionManager, db: PgPool, prefix: &str, dedupe_window_ms: u64) -> Self {
        ChannelStore(std::sync::Arc::new(StoreInner {
            redis,
            floors: SeqFloors::new(db),
            prefix: prefix.to_string(),
            dedupe_window_ms,
            max_channel_bytes: std::sync::atomic::AtomicU64::new(0),
            append: Script::new(APPEND),
            install_lease: Script::new(INSTALL_LEASE),
            epoch: Script::new(EPOCH),
            register: Script::new(REGISTER_WAITER),
            close: Script::new(CLOSE),
            set_fence: Script::new(SET_FENCE),
            clear_boot_intent: Script::new(CLEAR_BOOT_INTENT),
            lanes: Lanes::default(),
        }))
    }

    /// Bounds every channel at `bytes` (0: no bound): bodies plus headers
    /// JSON, as stored, of the records written from now on.
    pub fn set_max_channel_bytes(&self, bytes: u64) {
        self.max_channel_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn base(&self, key: ChannelKey) -> String {
        format!("{}:ch:{{{}:{}}}", self.prefix, key.session_id.simple(), key.io)
    }

    pub fn stream_key(&self, key: ChannelKey) -> String {
        format!("{}:s", self.base(key))
    }

    fn counter_key(&self, key: ChannelKey) -> String {
        format!("{}:n", self.base(key))
    }

    fn reserved_key(&self, key: ChannelKey) -> String {
        format!("{}:r", self.base(key))
    }

    fn epoch_key(&self) -> String {
        format!("{}:seq-epoch", self.prefix)
    }

    fn closed_key(&self, key: ChannelKey) -> String {
        format!("{}:closed", self.base(key))
    }

    /// Remembers the seq of an append with this part id (dedupe window).
    fn part_key(&self, key: ChannelKey, part_id: &str) -> String {
        format!("{}:p:{part_id}", self.base(key))
    }

    pub fn waiters_key(&self, key: ChannelKey) -> String {
        format!("{}:w", self.base(key))
    }

    /// Bytes the channel holds, for its quota.
    fn bytes_key(&self, key: ChannelKey) -> String {
        format!("{}:b", self.base(key))
    }

    fn fence_key(&self, key: ChannelKey) -> String {
        format!("{}:run", self.base(key))
    }

    pub fn boot_intents_key(&self) -> String {
        format!("{}:boot-intents", self.prefix)
    }

    /// The pub/sub channel every append announces itself on.
    pub fn notify_channel(&self) -> String {
        format!("{}:ch-notify", self.prefix)
    }

    /// The notification payload prefix of a channel: `<session>:<io>`.
    pub fn notify_tag(key: ChannelKey) -> String {
        format!("{}:{}", key.session_id.simple(), key.io)
    }

    /// The group-commit lanes (their stats show how well appends group).
    pub fn lanes(&self) -> &Lanes {
        &self.lanes
    }

    /// The sequence floors (their write count shows what appends cost Postgres).
    pub fn floors(&self) -> &SeqFloors {
        &self.floors
    }

    /// Appends one record as the server (no run fence, no boot intent).
    pub async fn append(
        &self,
        key: ChannelKey,
        body: &str,
        headers: &[(String, String)],
        part_id: Option<&str>,
    ) -> Result<Appended, ChannelError> {
        self.append_as(key, body, headers, part_id, &Writer::default()).await
    }

    /// Appends one record for `writer`. Concurrent appends to the same channel
    /// are written together (see [`super::group_commit`]); each gets its own
    /// outcome.
    pub async fn append_as(
        &self,
        key: ChannelKey,
        body: &str,
        headers: &[(String, String)],
        part_id: Option<&str>,
        writer: &Writer,
    ) -> Result<Appended, ChannelError> {
        let headers_json = serde_json::to_string(headers).map_err(|e| ChannelError::Corrupt(e.to_string()))?;
        let record = NewRecord {
            body: body.to_string(),
            headers_json,
            part_id: part_id.map(String::from),
            writer_run: writer.run.clone(),
            boot_intent: writer.boot_intent.clone(),
            counted: writer.counted,
        };
        self.lanes.append(self, key, record).await
    }

    /// Writes `records` in order with one script call; one outcome per record.
    /// A boot intent is noted once for the group (every append to one `.in`
    /// channel names the same session).
    pub(super) async fn append_batch(
        &self,
        key: ChannelKey,
        records: &[NewRecord],
    ) -> Result<Vec<Result<Appended, ChannelError>>, ChannelError> {
        let boot_intent = records.iter().find_map(|r| r.boot_intent.as_deref());
        let mut invocation = self.append.prepare_invoke();
        invocation
            .key(self.stream_key(key))
            .key(self.counter_key(key))
            .key(self.closed_key(key))
            .key(self.waiters_key(key))
            .key(self.fence_key(key))
            .key(self.boot_intents_key())
            .key(self.reserved_key(key))
            .key(self.bytes_key(key));
        for record in records {
            invocation.key(self.part_key(key, record.part_id.as_deref().unwrap_or("-")));
        }
        invocation
            .arg(self.dedupe_window_ms)
            .arg(self.notify_channel())
            .arg(Self::notify_tag(key))
            .arg(boot_intent.unwrap_or(""))
            .arg(self.max_channel_bytes.load(std::sync::atomic::Ordering::Relaxed));
        for record in records {
            invocation
                .arg(&record.body)
                .arg(&record.headers_json)
                .arg(if record.part_id.is_some() { "1" } else { "0" })
                .arg(if record.body.len() <= MAX_INLINE_ANNOUNCEMENT { "1" } else { "0" })
                .arg(record.writer_run.as_deref().unwrap_or(""))
                .arg(if record.counted { "1" } else { "0" });
        }
        let mut conn = self.redis.clone();
        for _ in 0..LEASE_ROUNDS {
            let reply: Vec<RedisValue> = invocation.invoke_async(&mut conn).await?;
            match needs_lease(&reply)? {
                Some(next) => {
                    self.lease(key, next).await?;
                }
                None => {
                    let max_bytes = self.max_channel_bytes.load(std::sync::atomic::Ordering::Relaxed);
                    return parse_append_reply(&reply, records.len(), max_bytes);
                }
            }
        }
        Err(ChannelError::NoLease)
    }

    /// The epoch leases are asked under (written when Redis has none).
    async fn current_epoch(&self) -> Result<String, ChannelError> {
        let mut conn = self.redis.clone();
        let fresh = Uuid::new_v4().simple().to_string();
        Ok(self.epoch.key(self.epoch_key()).arg(fresh).invoke_async(&mut conn).await?)
    }

    /// Installs `lease` if Redis has not lost its data since `epoch` was read;
    /// returns the channel's counter then.
    async fn install(&self, key: ChannelKey, epoch: &str, lease: Lease) -> Result<Option<u64>, ChannelError> {
        let mut conn = self.redis.clone();
        let next: i64 = self
            .install_lease
            .key(self.counter_key(key))
            .key(self.reserved_key(key))
            .key(self.epoch_key())
            .arg(epoch)
            .arg(lease.from)
            .arg(lease.upto)
            .invoke_async(&mut conn)
            .await?;
        Ok(u64::try_from(next).ok())
    }

    /// Leases a block of numbers above `next` (the counter the append script
    /// saw) from Postgres and installs it.
    async fn lease(&self, key: ChannelKey, next: u64) -> Result<(), ChannelError> {
        let epoch = self.current_epoch().await?;
        let lease = self.floors.raise(key, next).await?;
        if self.install(key, &epoch, lease).await?.is_none() {
            tracing::warn!(channel = %Self::notify_tag(key), "redis lost its data while leasing sequence numbers");
        }
        Ok(())
    }

    /// The counter of a channel Redis has lost (or never had): its floor from
    /// Postgres, installed as the counter so the next append continues from it.
    /// A channel that never leased a number (no floor, no keys) is left alone.
    async fn restore(&self, key: ChannelKey, has_keys: bool) -> Result<u64, ChannelError> {
        for _ in 0..LEASE_ROUNDS {
            let epoch = self.current_epoch().await?;
            let floor = self.floors.floor(key).await?;
            if floor == 0 && !has_keys {
                return Ok(0);
            }
            if let Some(next) = self.install(key, &epoch, Lease::at(floor)).await? {
                return Ok(next);
            }
        }
        Err(ChannelError::NoLease)
    }

    /// Has the channel been closed (appends refused)?
    pub async fn is_sealed(&self, key: ChannelKey) -> Result<bool, ChannelError> {
        let mut conn = self.redis.clone();
        Ok(redis::cmd("EXISTS").arg(self.closed_key(key)).query_async(&mut conn).await?)
    }

    /// The seq an earlier append with `part_id` got, if it is still remembered.
    pub async fn part_seq(&self, key: ChannelKey, part_id: &str) -> Result<Option<u64>, ChannelError> {
        let mut conn = self.redis.clone();
        Ok(redis::cmd("GET").arg(self.part_key(key, part_id)).query_async(&mut conn).await?)
    }

    /// Up to `count` records after `after` (from the start when None), in order.
    pub async fn read_after(
        &self,
        key: ChannelKey,
        after: Option<u64>,
        count: usize,
    ) -> Result<Vec<Record>, ChannelError> {
        let start = match after {
            Some(a) => match a.checked_add(1) {
                Some(start) => format!("{start}-0"),
                None => return Ok(Vec::new()),
            },
            None => "-".to_string(),
        };
        let mut conn = self.redis.clone();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(self.stream_key(key))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await?;
        entries.into_iter().map(parse_entry).collect()
    }

    /// The newest record, if any.
    pub async fn last(&self, key: ChannelKey) -> Result<Option<Record>, ChannelError> {
        let mut conn = self.redis.clone();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(self.stream_key(key))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        entries.into_iter().next().map(parse_entry).transpose()
    }

    /// The sequence number the next append will get at the earliest. After
    /// Redis lost the channel, that is its floor from Postgres (see
    /// [`super::floor`]): above every number acknowledged before the loss.
    pub async fn next_seq(&self, key: ChannelKey) -> Result<u64, ChannelError> {
        let mut conn = self.redis.clone();
        let (next, reserved): (Option<u64>, Option<u64>) =
            redis::cmd("MGET").arg(self.counter_key(key)).arg(self.reserved_key(key)).query_async(&mut conn).await?;
        match (next, reserved) {
            (Some(next), Some(_)) => Ok(next),
            (next, reserved) => self.restore(key, next.is_some() || reserved.is_some()).await,
        }
    }

    /// The oldest sequence number still retained (= `next_seq` when none are).
    pub async fn oldest_seq(&self, key: ChannelKey) -> Result<u64, ChannelError> {
        let mut conn = self.redis.clone();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(self.stream_key(key))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await?;
        match entries.into_iter().next() {
            Some(e) => Ok(parse_entry(e)?.seq_num),
            None => self.next_seq(key).await,
        }
    }

    /// Adds a pending waitpoint to the channel's set, for at least `ttl_ms`.
    /// Returns the set's TTL after the call.
    pub async fn register_waiter(&self, key: ChannelKey, waitpoint: Uuid, ttl_ms: u64) -> Result<i64, ChannelError> {
        let mut conn = self.redis.clone();
        Ok(self
            .register
            .key(self.waiters_key(key))
            .arg(waitpoint.to_string())
            .arg(ttl_ms.max(1))
            .invoke_async(&mut conn)
            .await?)
    }

    /// Puts waitpoints an append drained but nobody will complete back into
    /// the pending set, for the next append to drain. Failures are logged:
    /// the worker's long-poll still completes them.
    pub async fn put_back_waiters(&self, key: ChannelKey, ids: &[Uuid]) {
        for id in ids {
            if let Err(err) = self.register_waiter(key, *id, crate::waitpoints::DEFAULT_PENDING_TTL_MS).await {
                tracing::error!(waitpoint = %id, %err, "could not put a drained waitpoint back");
            }
        }
    }

    /// Takes every pending waitpoint off the channel's set, atomically.
    pub async fn take_waiters(&self, key: ChannelKey) -> Result<Vec<Uuid>, ChannelError> {
        let mut conn = self.redis.clone();
        let (members, _): (Vec<String>, i64) = redis::pipe()
            .atomic()
            .cmd("SMEMBERS")
            .arg(self.waiters_key(key))
            .cmd("DEL")
            .arg(self.waiters_key(key))
            .query_async(&mut conn)
            .await?;
        Ok(members.iter().filter_map(|m| Uuid::parse_str(m).ok()).collect())
    }

    pub async fn remove_waiter(&self, key: ChannelKey, waitpoint: Uuid) -> Result<(), ChannelError> {
        let mut conn = self.redis.clone();
        let _: i64 =
            redis::cmd("SREM").arg(self.waiters_key(key)).arg(waitpoint.to_string()).query_async(&mut conn).await?;
        Ok(())
    }

    /// Refuses further appends and lets the channel's records expire after
    /// `retention_ms` (its counter and closed marker 30 days later).
    pub async fn close(&self, key: ChannelKey, retention_ms: u64) -> Result<(), ChannelError> {
        let mut conn = self.redis.clone();
        let _: i64 = self
            .close
            .key(self.stream_key(key))
            .key(self.counter_key(key))
            .key(self.closed_key(key))
            .key(self.waiters_key(key))
            .key(self.fence_key(key))
            .key(self.reserved_key(key))
            .key(self.bytes_key(key))
            .arg(retention_ms.max(1))
            .arg(retention_ms.max(1) + CLOSED_MARKER_GRACE_MS)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Lets only `run` (the session's run at `version`) write to the channel
    /// with a run token from now on. Idempotent; never moves back to an older
    /// version.
    pub async fn set_fence(&self, key: ChannelKey, version: i64, run: &str) -> Result<(), ChannelError> {
        let mut conn = self.redis.clone();
        let _: i64 = self.set_fence.key(self.fence_key(key)).arg(version).arg(run).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Drops the boot intent `member` if no record after `seq` raised it since.
    pub async fn clear_boot_intent(&self, member: &str, seq: u64) -> Result<(), ChannelError> {
        let mut conn = self.redis.clone();
        let _: i64 =
            self.clear_boot_intent.key(self.boot_intents_key()).arg(member).arg(seq).invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Up to `limit` boot intents: `(<env>:<session>, newest .in seq)`.
    pub async fn boot_intents(&self, limit: usize) -> Result<Vec<(String, u64)>, ChannelError> {
        let mut conn = self.redis.clone();
        Ok(redis::cmd("ZRANGE")
            .arg(self.boot_intents_key())
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?)
    }

    /// The `.in` seq the newest turn-complete record on `key` (a `.out`
    /// channel) says was answered, looking back at most `max_records` records.
    /// None when no turn ended yet, or the newest one names no seq.
    pub async fn last_answered_seq(&self, key: ChannelKey, max_records: usize) -> Result<Option<u64>, ChannelError> {
        const PAGE: usize = 200;
        let mut conn = self.redis.clone();
        let mut end = "+".to_string();
        let mut seen = 0;
        while seen < max_records {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(self.stream_key(key))
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            let count = entries.len();
            let mut oldest = None;
            for entry in entries {
                let record = parse_entry(entry)?;
                if record.is_turn_complete() {
                    return Ok(record.answered_in_seq());
                }
                oldest = Some(record.seq_num);
            }
            seen += count;
            match oldest.and_then(|s| s.checked_sub(1)) {
                Some(next) if count == PAGE => end = format!("{next}-1"),
                _ => break,
            }
        }
        Ok(None)
    }

    /// Keys of a channel with their TTL in ms (-1 none, -2 missing), for tests and operators.
    pub async fn ttls(&self, key: ChannelKey) -> Result<Vec<(String, i64)>, ChannelError> {
        let mut conn = self.redis.clone();
        let mut out = Vec::new();
        for k in [self.stream_key(key), self.counter_key(key), self.closed_key(key)] {
            let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(&mut conn).await?;
            out.push((k, ttl));
        }
        Ok(out)
    }
}

/// The counter the append script saw when it asked for a lease (`{-1, next}`).
fn needs_lease(reply: &[RedisValue]) -> Result<Option<u64>, ChannelError> {
    let int = |v: &RedisValue| redis::from_redis_value_ref::<i64>(v).map_err(|e| ChannelError::Corrupt(e.to_string()));
    match reply {
        [flag, next] if int(flag)? == -1 => Ok(Some(u64::try_from(int(next)?).unwrap_or(0))),
        _ => Ok(None),
    }
}

/// Decodes the append script's reply (see [`APPEND`]) for `count` records.
fn parse_append_reply(
    reply: &[RedisValue],
    count: usize,
    max_bytes: u64,
) -> Result<Vec<Result<Appended, ChannelError>>, ChannelError> {
    let int = |i: usize| -> Result<i64, ChannelError> {
        let v = reply.get(i).ok_or_else(|| ChannelError::Corrupt("short append reply".into()))?;
        redis::from_redis_value_ref::<i64>(v).map_err(|e| ChannelError::Corrupt(e.to_string()))
    };
    let timestamp = int(0)?;
    let mut drained: Vec<Uuid> = reply
        .get(1 + 2 * count..)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| redis::from_redis_value_ref::<String>(v).ok())
        .filter_map(|s| Uuid::parse_str(&s).ok())
        .collect();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let outcome = int(1 + 2 * i)?;
        let seq_num = u64::try_from(int(2 + 2 * i)?).map_err(|e| ChannelError::Corrupt(e.to_string()))?;
        out.push(match outcome {
            0 => {
                Ok(Appended { seq_num, timestamp, duplicate: false, drained_waitpoints: std::mem::take(&mut drained) })
            }
            1 => Ok(Appended { seq_num, timestamp: 0, duplicate: true, drained_waitpoints: Vec::new() }),
            3 => Err(ChannelError::Superseded),
            4 => Err(ChannelError::Full { limit: max_bytes }),
            _ => Err(ChannelError::Closed),
        });
    }
    Ok(out)
}

fn parse_entry((id, fields): (String, Vec<(String, String)>)) -> Result<Record, ChannelError> {
    let seq_num = id
        .split('-')
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ChannelError::Corrupt(format!("entry id {id}")))?;
    let mut record = Record { seq_num, body: String::new(), headers: Vec::new(), timestamp: 0 };
    for (k, v) in fields {
        match k.as_str() {
            "b" => record.body = v,
            "h" => record.headers = serde_json::from_str(&v).map_err(|e| ChannelError::Corrupt(e.to_string()))?,
            "t" => record.timestamp = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::Io;

    #[test]
    fn announcements_parse_in_both_forms() {
        let id = Uuid::now_v7();
        let bare = Announcement::parse(&format!("{}:in:42", id.simple())).unwrap();
        assert_eq!(bare, Announcement { key: ChannelKey { session_id: id, io: Io::In }, seq_num: 42, record: None });

        let full =
            Announcement::parse(&format!("{}:out:7:1700\n[[\"k\",\"v\"]]\nline one\nline two", id.simple())).unwrap();
        let record = full.record.unwrap();
        assert_eq!(full.seq_num, 7);
        assert_eq!(record.seq_num, 7);
        assert_eq!(record.timestamp, 1700);
        assert_eq!(record.headers, vec![("k".to_string(), "v".to_string())]);
        assert_eq!(record.body, "line one\nline two");

        assert_eq!(
            Announcement::channel(&format!("{}:out:7:1700\n[]\nx", id.simple())),
            Some(ChannelKey { session_id: id, io: Io::Out })
        );
        assert!(Announcement::parse("garbage").is_none());
        assert!(Announcement::parse(&format!("{}:sideways:1", id.simple())).is_none());
        assert!(Announcement::parse(&format!("{}:out:7:x\n[]\nbody", id.simple())).is_none());
    }
}
