//! Waitpoints on session channels: a run suspends until a record lands on a
//! channel, then resumes holding that record.
//!
//! A waitpoint completes with the first record after its `after_seq`. Three
//! paths can complete it, all with one conditional update, so they agree:
//! the append that drains the channel's pending set (the drain job), the
//! race-check at creation (data that arrived before the wait), and the worker's
//! own long-poll, which follows the channel feed. Timeouts and session close
//! end it too.

pub mod routes;
pub mod store;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::AppState;
use crate::streams::{ChannelKey, Io, Record};
use crate::validation::{duration, parse_duration_secs, timestamp_in_range};
use store::Waitpoint;

/// Pending-set TTL when a waitpoint has no timeout.
pub const DEFAULT_PENDING_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Idempotency keys live this long unless the caller says otherwise.
pub const DEFAULT_IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

/// A timeout as a duration (`30s`, `1h`) from `now`, or an absolute ISO-8601 time
/// (in the range of client timestamps). `None` for anything else.
pub fn parse_deadline(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Some(secs) = parse_duration_secs(value) {
        return duration(secs).and_then(|d| now.checked_add_signed(d));
    }
    DateTime::parse_from_rfc3339(value.trim()).ok().map(|d| d.with_timezone(&Utc)).filter(|t| timestamp_in_range(*t))
}

/// When an idempotency key given now stops holding: after `ttl` (a duration,
/// [`DEFAULT_IDEMPOTENCY_TTL_SECS`] when absent). `None` for a bad duration.
pub fn idempotency_expiry(ttl: Option<&str>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let secs = match ttl {
        Some(t) => parse_duration_secs(t)?,
        None => DEFAULT_IDEMPOTENCY_TTL_SECS,
    };
    duration(secs).and_then(|d| now.checked_add_signed(d))
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
    ChannelKey { session_id: w.session_id, io: Io::parse(&w.io).unwrap_or(Io::In) }
}

/// Completes `w` with `record` and takes it off the channel's pending set.
pub async fn complete_with(state: &AppState, w: &Waitpoint, output: &Value) -> anyhow::Result<bool> {
    let done = store::complete(&state.db, w.id, output).await?;
    state.channels.remove_waiter(channel_of(w), w.id).await?;
    Ok(done)
}

/// Completes `w` if a record after its `after_seq` already exists.
pub async fn check_arrived(state: &AppState, w: &Waitpoint) -> anyhow::Result<bool> {
    let after = u64::try_from(w.after_seq).ok();
    let records = state.channels.read_after(channel_of(w), after, 1).await?;
    match records.first() {
        Some(r) => complete_with(state, w, &record_output(r)).await,
        None => Ok(false),
    }
}

/// How long a waitpoint's entry in the channel's pending set must last.
pub fn pending_ttl_ms(timeout_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> u64 {
    timeout_at
        .map(|t| u64::try_from((t - now).num_milliseconds()).unwrap_or(0).max(1).saturating_add(60_000))
        .unwrap_or(DEFAULT_PENDING_TTL_MS)
}

/// The drain job: waitpoints the append of record `seq_num` took off the
/// channel's pending set. Each completes with the first record after its own
/// `after_seq`, which is not always the appended one: an earlier record may
/// have landed between the waitpoint's creation and its registration. One with
/// no record after its `after_seq` yet (a `lastSeqNum` ahead of the append)
/// goes back in the pending set for the next append.
pub async fn drain(state: &AppState, session_id: Uuid, io: Io, seq_num: u64, ids: &[Uuid]) -> anyhow::Result<usize> {
    let key = ChannelKey { session_id, io };
    let mut completed = 0;
    for id in ids {
        let Some(w) = store::find_by_id(&state.db, *id).await? else { continue };
        if w.status != "WAITING" {
            continue;
        }
        if check_arrived(state, &w).await? {
            completed += 1;
            continue;
        }
        tracing::debug!(waitpoint = %w.friendly_id, %io, seq_num, after_seq = w.after_seq, "drained waitpoint waits on");
        state.channels.register_waiter(key, w.id, pending_ttl_ms(w.timeout_at, Utc::now())).await?;
        // A record appended while it was out of the set has drained without it.
        if check_arrived(state, &w).await? {
            completed += 1;
        }
    }
    Ok(completed)
}

/// Long-polls until `w` is no longer waiting or `wait` passes; returns its latest state.
pub async fn wait_for(state: &AppState, w: Waitpoint, wait: Duration) -> anyhow::Result<Waitpoint> {
    if w.status != "WAITING" {
        return Ok(w);
    }
    let key = channel_of(&w);
    let feed = state.hub.feed(key);
    let mut rx = feed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let recheck = Duration::from_millis(state.config.waitpoint_recheck_ms);
    loop {
        check_arrived(state, &w).await?;
        let current = store::find_by_id(&state.db, w.id).await?.unwrap_or(w.clone());
        if current.status != "WAITING" || tokio::time::Instant::now() >= deadline {
            return Ok(current);
        }
        // Woken by the next record on the channel; the tick catches completions
        // by other paths (timeouts, close, another server's drain).
        tokio::select! {
            _ = rx.recv() => {}
            _ = tokio::time::sleep(recheck) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// The timeout sweep: waitpoints past `timeout_at` end TIMED_OUT.
pub async fn time_out_due(state: &AppState) -> anyhow::Result<usize> {
    let timed_out = store::time_out_due(&state.db).await?;
    for w in &timed_out {
        state.channels.remove_waiter(channel_of(w), w.id).await?;
    }
    Ok(timed_out.len())
}

/// After a session closes: wake a waiting run with a `session-closed` record on
/// `.in` (unless the close came from that run), refuse further writes, let the
/// data expire after the retention period, and complete what still waits.
pub async fn close_channels(
    state: &AppState,
    session_id: Uuid,
    reason: Option<&str>,
    notify_in: bool,
) -> anyhow::Result<()> {
    let retention_ms = state.config.channel_retention_secs * 1000;
    if notify_in {
        let mut headers = vec![(crate::streams::CONTROL_HEADER.to_string(), "session-closed".to_string())];
        if let Some(r) = reason {
            headers.push(("session-closed-reason".into(), r.to_string()));
        }
        let key = ChannelKey { session_id, io: Io::In };
        // A fixed part id (clients cannot use it): a retried job does not
        // append a second close record.
        match state.channels.append(key, "", &headers, Some(crate::streams::store::SESSION_CLOSED_PART)).await {
            Ok(appended) => {
                if !appended.drained_waitpoints.is_empty() {
                    drain(state, session_id, Io::In, appended.seq_num, &appended.drained_waitpoints).await?;
                }
            }
            Err(crate::streams::store::ChannelError::Closed) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for io in [Io::In, Io::Out] {
        state.channels.close(ChannelKey { session_id, io }, retention_ms).await?;
    }
    let output = closed_output(reason);
    for w in store::waiting_for_session(&state.db, session_id).await? {
        complete_with(state, &w, &output).await?;
    }
    sqlx::query("UPDATE sessions SET channels_closed_at = now() WHERE id = $1 AND channels_closed_at IS NULL")
        .bind(session_id)
        .execute(&state.db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_from_durations_or_dates() {
        let now = Utc::now();
        assert_eq!(parse_deadline("30s", now), Some(now + chrono::Duration::seconds(30)));
        assert_eq!(parse_deadline("2030-01-01T00:00:00Z", now).map(|d| d.timestamp()), Some(1_893_456_000));
        assert_eq!(parse_deadline("soon", now), None);
    }

    #[test]
    fn out_of_range_deadlines_and_ttls_are_refused() {
        let now = Utc::now();
        // Panicked in chrono (Duration::seconds out of bounds) before the bound.
        assert_eq!(parse_deadline("9223372036854775807", now), None);
        assert_eq!(idempotency_expiry(Some("9223372036854775807s"), now), None);
        assert_eq!(idempotency_expiry(Some("15250284452w"), now), None);
        assert_eq!(parse_deadline("1969-12-31T23:59:59Z", now), None);
        assert_eq!(idempotency_expiry(None, now), Some(now + chrono::Duration::seconds(DEFAULT_IDEMPOTENCY_TTL_SECS)));
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
                    if let Some(t) = parse_deadline(&text, now) {
                        prop_assert!(t.timestamp_millis() <= MAX_TIMESTAMP_MILLIS);
                        // The pending-set TTL derived from it cannot overflow either.
                        prop_assert!(pending_ttl_ms(Some(t), now) >= 60_001);
                    }
                    let _ = idempotency_expiry(Some(&text), now);
                }
            }

            #[test]
            fn durations_in_range_are_exact_offsets(secs in any::<i64>()) {
                let now = Utc::now();
                let expected = (0..=MAX_DURATION_SECS).contains(&secs).then(|| now + chrono::Duration::seconds(secs));
                prop_assert_eq!(parse_deadline(&format!("{secs}s"), now), expected);
                prop_assert_eq!(idempotency_expiry(Some(&secs.to_string()), now), expected);
            }

            #[test]
            fn absolute_deadlines_round_trip_in_range(ms in 0i64..=MAX_TIMESTAMP_MILLIS) {
                let now = Utc::now();
                let t = crate::validation::timestamp_from_millis(ms).unwrap();
                let text = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                prop_assert_eq!(parse_deadline(&text, now), Some(t));
            }
        }
    }
}
