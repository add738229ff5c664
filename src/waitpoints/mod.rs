//! Waitpoints on session channels: a run suspends until a record lands on a
//! channel, then resumes holding that record.
//!
//! A waitpoint completes with the first record after its `after_seq`. Three
//! paths can complete it, all with one conditional update, so they agree:
//! the append that drains the channel's pending set (the drain job), the
//! race-check at creation (data that arrived before the wait), and the worker's
//! own long-poll, which follows the channel feed. Timeouts and session close
//! end it too. Their jobs (the drain, the close, the timeout sweep) are in
//! [`jobs`].

pub mod jobs;
pub mod routes;
pub mod store;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::StoreError;
use crate::runs::store as run_store;
use crate::runs::RunStatus;
use crate::sessions::store as sessions_store;
use crate::sessions::Session;
use crate::streams::hub::Hub;
use crate::streams::store::{ChannelError, ChannelStore, SESSION_CLOSED_PART};
use crate::streams::{ChannelKey, Io, Record, CONTROL_HEADER};
use crate::validation::{duration, parse_duration_secs, timestamp_in_range};
use store::{NewWaitpoint, Waitpoint, WaitpointStatus};

/// Pending-set TTL when a waitpoint has no timeout.
pub const DEFAULT_PENDING_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most WAITING waitpoints per run unless configured (`MAX_PENDING_WAITPOINTS_PER_RUN`).
pub const DEFAULT_MAX_PENDING_PER_RUN: i64 = 100;
/// Idempotency keys live this long unless the caller says otherwise.
pub const DEFAULT_IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

/// When a wait times out, as the caller said it: a duration from now, or an
/// absolute time. A duration is turned into a timestamp by Postgres at insert
/// (`now() + interval`), the clock its timeout sweep compares with, so a
/// process whose clock is off neither delays the timeout nor fires it early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// Seconds from the insert, by Postgres' clock.
    In(i64),
    At(DateTime<Utc>),
}

impl Deadline {
    /// The duration, if relative (bound for the SQL `now() + interval`).
    pub fn relative_secs(self) -> Option<i64> {
        match self {
            Deadline::In(secs) => Some(secs),
            Deadline::At(_) => None,
        }
    }

    /// The time, if absolute.
    pub fn absolute(self) -> Option<DateTime<Utc>> {
        match self {
            Deadline::In(_) => None,
            Deadline::At(t) => Some(t),
        }
    }
}

/// A timeout as a duration (`30s`, `1h`), or an absolute ISO-8601 time (in the
/// range of client timestamps). `None` for anything else.
pub fn parse_deadline(value: &str) -> Option<Deadline> {
    if let Some(secs) = parse_duration_secs(value) {
        return duration(secs).map(|_| Deadline::In(secs));
    }
    DateTime::parse_from_rfc3339(value.trim())
        .ok()
        .map(|d| d.with_timezone(&Utc))
        .filter(|t| timestamp_in_range(*t))
        .map(Deadline::At)
}

/// How long an idempotency key holds, in seconds: `ttl` (a duration),
/// [`DEFAULT_IDEMPOTENCY_TTL_SECS`] when absent; `None` for a bad duration.
/// Postgres turns it into the key's expiry at insert, like a [`Deadline::In`].
pub fn idempotency_ttl_secs(ttl: Option<&str>) -> Option<i64> {
    let secs = match ttl {
        Some(t) => parse_duration_secs(t)?,
        None => DEFAULT_IDEMPOTENCY_TTL_SECS,
    };
    duration(secs).map(|_| secs)
}

/// What a waitpoint ended by its session's close completes with.
pub fn closed_output(reason: Option<&str>) -> Value {
    json!({"sessionClosed": true, "reason": reason})
}

/// What a waitpoint completes with: the record.
pub fn record_output(r: &Record) -> Value {
    json!({"seqNum": r.seq_num, "body": r.body, "headers": r.headers, "timestamp": r.timestamp})
}

pub fn channel_of(w: &Waitpoint) -> ChannelKey {
    ChannelKey { session_id: w.session_id, io: w.io }
}

/// How long a waitpoint's entry in the channel's pending set must last, from
/// `now` (the Postgres time its row was read at, the clock of `timeout_at`).
pub fn pending_ttl_ms(timeout_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> u64 {
    timeout_at
        .map(|t| u64::try_from((t - now).num_milliseconds()).unwrap_or(0).max(1).saturating_add(60_000))
        .unwrap_or(DEFAULT_PENDING_TTL_MS)
}

/// Why a wait could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The session takes no waits (closed or expired).
    #[error("{0}")]
    SessionClosed(&'static str),
    #[error("Run not found")]
    RunNotFound,
    /// A run waits on its own session's channels only.
    #[error("the run does not belong to this session")]
    RunNotInSession,
    /// Another run replaced this one (a hand-off).
    #[error("Run was superseded by {0}")]
    Superseded(String),
    /// The run is not executing (queued, or final).
    #[error("Run is {0}")]
    RunNotActive(RunStatus),
    /// The run already has this many WAITING waitpoints, its most.
    #[error("the run has {0} pending waitpoints, its most")]
    TooManyPending(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// A wait a run asks for, validated.
pub struct WaitRequest<'a> {
    /// The waiting run's friendly id.
    pub run: &'a str,
    pub session: &'a Session,
    pub io: Io,
    /// Complete with the first record after this seq; None: after the
    /// channel's tail now.
    pub last_seq_num: Option<i64>,
    pub idempotency_key: Option<&'a str>,
    /// How long the key holds (see [`idempotency_ttl_secs`]).
    pub idempotency_key_ttl_secs: i64,
    pub tags: &'a [String],
    pub timeout: Option<Deadline>,
}

/// Waitpoints on session channels (see the module docs), with what they use:
/// the database, the channel store (pending sets, records), the hub (the
/// long-poll follows the channel feed).
#[derive(Clone)]
pub struct Waitpoints {
    db: PgPool,
    channels: ChannelStore,
    hub: Hub,
    /// How long closed channels' records are kept.
    retention_ms: u64,
    /// The long-poll's re-check between feed wake-ups, for completions by
    /// other paths (timeouts, close, another server's drain).
    fallback_poll: Duration,
    /// Most WAITING waitpoints one run may have: a run token must not be able
    /// to fill the table (and the dashboard) with waits nothing will end.
    max_pending_per_run: i64,
}

impl Waitpoints {
    pub fn new(db: PgPool, channels: ChannelStore, hub: Hub, retention_ms: u64, fallback_poll: Duration) -> Self {
        Waitpoints { db, channels, hub, retention_ms, fallback_poll, max_pending_per_run: DEFAULT_MAX_PENDING_PER_RUN }
    }

    /// Bounds each run's WAITING waitpoints at `max` (`MAX_PENDING_WAITPOINTS_PER_RUN`).
    pub fn with_max_pending_per_run(mut self, max: i64) -> Self {
        self.max_pending_per_run = max;
        self
    }

    /// Suspends run `req.run` on a session channel until a record after
    /// `lastSeqNum` lands there (or the timeout). Data that already arrived
    /// completes it at once. Returns the waitpoint and whether it was cached
    /// (the same idempotency key).
    pub async fn create(&self, env_id: Uuid, req: WaitRequest<'_>) -> Result<(Waitpoint, bool), WaitError> {
        let session = req.session;
        if let Some(refusal) = session.write_refusal() {
            return Err(WaitError::SessionClosed(refusal));
        }
        let run = run_store::find(&self.db, env_id, req.run).await?.ok_or(WaitError::RunNotFound)?;
        if run.session_id != Some(session.id) {
            return Err(WaitError::RunNotInSession);
        }
        if let Some(by) = run.superseded_by {
            return Err(WaitError::Superseded(by));
        }
        if !matches!(run.status, RunStatus::Executing | RunStatus::Waiting) {
            return Err(WaitError::RunNotActive(run.status));
        }
        let key = ChannelKey { session_id: session.id, io: req.io };
        let after_seq = match req.last_seq_num {
            Some(n) => n,
            None => self.channels.next_seq(key).await? as i64 - 1,
        };
        let created = store::create(
            &self.db,
            &NewWaitpoint {
                env_id,
                run_id: run.id,
                session_id: session.id,
                io: req.io,
                after_seq,
                idempotency_key: req.idempotency_key,
                idempotency_key_ttl_secs: req.idempotency_key.map(|_| req.idempotency_key_ttl_secs),
                tags: req.tags,
                timeout: req.timeout,
                max_pending: self.max_pending_per_run,
            },
        )
        .await?;
        let (waitpoint, cached) = match created {
            store::Created::Waitpoint(w, cached) => (w, cached),
            store::Created::RunNotActive { superseded_by: Some(by), .. } => return Err(WaitError::Superseded(by)),
            store::Created::RunNotActive { status, superseded_by: None } => {
                return Err(WaitError::RunNotActive(status))
            }
            store::Created::TooManyPending => return Err(WaitError::TooManyPending(self.max_pending_per_run)),
        };
        if !cached {
            self.channels
                .register_waiter(key, waitpoint.id, pending_ttl_ms(waitpoint.timeout_at, waitpoint.read_at))
                .await?;
            // The race-check: a record that landed before the registration.
            if let Err(err) = self.check_arrived(&waitpoint).await {
                tracing::warn!(waitpoint = %waitpoint.friendly_id, session = %session.friendly_id, io = %req.io, error = %err, "race-check failed");
            }
            // A close that sealed the channel after our session check completed
            // the waitpoints it found, maybe before this one existed: do it here.
            if self.channels.is_sealed(key).await? {
                let fresh = sessions_store::find_by_id(&self.db, env_id, session.id).await?;
                let reason = fresh.as_ref().and_then(|s| s.close_reason());
                self.complete_with(&waitpoint, &closed_output(reason.as_deref())).await?;
            }
        }
        Ok((waitpoint, cached))
    }

    /// Completes `w` with `output` and takes it off the channel's pending set.
    pub async fn complete_with(&self, w: &Waitpoint, output: &Value) -> Result<bool, WaitError> {
        let done = store::complete(&self.db, w.id, output).await?;
        self.channels.remove_waiter(channel_of(w), w.id).await?;
        Ok(done)
    }

    /// Completes `w` if a record after its `after_seq` already exists.
    pub async fn check_arrived(&self, w: &Waitpoint) -> Result<bool, WaitError> {
        let after = u64::try_from(w.after_seq).ok();
        let records = self.channels.read_after(channel_of(w), after, 1).await?;
        match records.first() {
            Some(r) => self.complete_with(w, &record_output(r)).await,
            None => Ok(false),
        }
    }

    /// The drain job: waitpoints the append of record `seq_num` took off the
    /// channel's pending set. Each completes with the first record after its own
    /// `after_seq`, which is not always the appended one: an earlier record may
    /// have landed between the waitpoint's creation and its registration. One with
    /// no record after its `after_seq` yet (a `lastSeqNum` ahead of the append)
    /// goes back in the pending set for the next append.
    pub async fn drain(&self, session_id: Uuid, io: Io, seq_num: u64, ids: &[Uuid]) -> Result<usize, WaitError> {
        let key = ChannelKey { session_id, io };
        let mut completed = 0;
        for id in ids {
            let Some(w) = store::find_by_id(&self.db, *id).await? else { continue };
            if w.status != WaitpointStatus::Waiting {
                continue;
            }
            if self.check_arrived(&w).await? {
                completed += 1;
                continue;
            }
            tracing::debug!(waitpoint = %w.friendly_id, %io, seq_num, after_seq = w.after_seq, "drained waitpoint waits on");
            self.channels.register_waiter(key, w.id, pending_ttl_ms(w.timeout_at, w.read_at)).await?;
            // A record appended while it was out of the set has drained without it.
            if self.check_arrived(&w).await? {
                completed += 1;
            }
        }
        Ok(completed)
    }

    /// Long-polls until `w` is no longer waiting or `wait` passes; returns its latest state.
    pub async fn wait_for(&self, w: Waitpoint, wait: Duration) -> Result<Waitpoint, WaitError> {
        if w.status != WaitpointStatus::Waiting {
            return Ok(w);
        }
        let feed = self.hub.feed(channel_of(&w));
        let mut rx = feed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.check_arrived(&w).await?;
            let current = store::find_by_id(&self.db, w.id).await?.unwrap_or(w.clone());
            // A draining process answers WAITING at once; the worker polls again
            // (through the load balancer, on another process).
            let draining = self.hub.drain().is_draining();
            if current.status != WaitpointStatus::Waiting || tokio::time::Instant::now() >= deadline || draining {
                return Ok(current);
            }
            // Woken by the next record on the channel; the fallback poll catches
            // completions by other paths (timeouts, close, another server's drain).
            tokio::select! {
                _ = rx.recv() => {}
                _ = tokio::time::sleep(self.fallback_poll) => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.hub.drain().started() => {}
            }
        }
    }

    /// The timeout sweep: waitpoints past `timeout_at` end TIMED_OUT.
    pub async fn time_out_due(&self) -> Result<usize, WaitError> {
        let timed_out = store::time_out_due(&self.db).await?;
        for w in &timed_out {
            self.channels.remove_waiter(channel_of(w), w.id).await?;
        }
        Ok(timed_out.len())
    }

    /// After a session closes: wake a waiting run with a `session-closed` record on
    /// `.in` (unless the close came from that run), refuse further writes, let the
    /// data expire after the retention period, and complete what still waits.
    pub async fn close_channels(
        &self,
        session_id: Uuid,
        reason: Option<&str>,
        notify_in: bool,
    ) -> Result<(), WaitError> {
        if notify_in {
            let mut headers = vec![(CONTROL_HEADER.to_string(), crate::streams::SESSION_CLOSED.to_string())];
            if let Some(r) = reason {
                headers.push(("session-closed-reason".into(), r.to_string()));
            }
            let key = ChannelKey { session_id, io: Io::In };
            // A fixed part id (clients cannot use it): a retried job does not
            // append a second close record.
            match self.channels.append(key, "", &headers, Some(SESSION_CLOSED_PART)).await {
                Ok(appended) => {
                    if !appended.drained_waitpoints.is_empty() {
                        self.drain(session_id, Io::In, appended.seq_num, &appended.drained_waitpoints).await?;
                    }
                }
                Err(ChannelError::Closed) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for io in [Io::In, Io::Out] {
            self.channels.close(ChannelKey { session_id, io }, self.retention_ms).await?;
        }
        let output = closed_output(reason);
        for w in store::waiting_for_session(&self.db, session_id).await? {
            self.complete_with(&w, &output).await?;
        }
        sessions_store::mark_channels_closed(&self.db, session_id).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_from_durations_or_dates() {
        assert_eq!(parse_deadline("30s"), Some(Deadline::In(30)));
        assert_eq!(
            parse_deadline("2030-01-01T00:00:00Z").and_then(Deadline::absolute).map(|d| d.timestamp()),
            Some(1_893_456_000)
        );
        assert_eq!(parse_deadline("soon"), None);
    }

    #[test]
    fn out_of_range_deadlines_and_ttls_are_refused() {
        // Panicked in chrono (Duration::seconds out of bounds) before the bound.
        assert_eq!(parse_deadline("9223372036854775807"), None);
        assert_eq!(idempotency_ttl_secs(Some("9223372036854775807s")), None);
        assert_eq!(idempotency_ttl_secs(Some("15250284452w")), None);
        assert_eq!(parse_deadline("1969-12-31T23:59:59Z"), None);
        assert_eq!(idempotency_ttl_secs(None), Some(DEFAULT_IDEMPOTENCY_TTL_SECS));
    }

    mod props {
        use super::*;
        use crate::validation::{MAX_DURATION_SECS, MAX_TIMESTAMP_MILLIS};
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn deadlines_never_panic_and_stay_representable(input in ".{0,40}", secs in any::<i64>()) {
                let now = Utc::now();
                for text in [input.clone(), secs.to_string(), format!("{secs}s")] {
                    match parse_deadline(&text) {
                        Some(Deadline::At(t)) => {
                            prop_assert!(t.timestamp_millis() <= MAX_TIMESTAMP_MILLIS);
                            // The pending-set TTL derived from it cannot overflow either.
                            prop_assert!(pending_ttl_ms(Some(t), now) >= 60_001);
                        }
                        Some(Deadline::In(d)) => prop_assert!((0..=MAX_DURATION_SECS).contains(&d)),
                        None => {}
                    }
                    let _ = idempotency_ttl_secs(Some(&text));
                }
            }

            #[test]
            fn durations_in_range_are_taken_as_given(secs in any::<i64>()) {
                let expected = (0..=MAX_DURATION_SECS).contains(&secs).then_some(secs);
                prop_assert_eq!(parse_deadline(&format!("{secs}s")).and_then(Deadline::relative_secs), expected);
                prop_assert_eq!(idempotency_ttl_secs(Some(&secs.to_string())), expected);
            }

            #[test]
            fn absolute_deadlines_round_trip_in_range(ms in 0i64..=MAX_TIMESTAMP_MILLIS) {
                let t = crate::validation::timestamp_from_millis(ms).unwrap();
                let text = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                prop_assert_eq!(parse_deadline(&text), Some(Deadline::At(t)));
            }
        }
    }
}
