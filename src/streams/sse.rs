//! Server-sent events in the v2 format the official client parses:
//!
//! ```text
//! id: <last seq_num in the batch>
//! event: batch
//! data: {"records":[{"seq_num":N,"body":"...","headers":[["k","v"]],"timestamp":ms}]}
//! ```
//!
//! A subscriber first drains the backlog from Redis, then follows the channel's
//! feed. Its state lives in the response body stream itself, so a client that
//! disconnects drops everything at once: the stream, its feed subscription and,
//! for the last subscriber, the feed.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::time::{Instant, Sleep};

use super::hub::{Feed, Hub};
use super::store::{ChannelError, ChannelStore};
use super::{ChannelKey, Record};

/// Records per SSE batch when draining a backlog.
pub const BACKLOG_BATCH: usize = 500;

/// A record already serialised for the wire. The feed encodes each live record
/// once, and every subscriber reuses it: as is (the frame of that one record,
/// shared, no copy) or as part of a larger frame when several are waiting.
#[derive(Debug)]
pub struct Encoded {
    pub seq_num: u64,
    pub json: Box<str>,
    pub frame: Bytes,
}

impl Encoded {
    pub fn new(r: &Record) -> Self {
        let json = serde_json::to_string(r).unwrap_or_default().into_boxed_str();
        let frame = frame_of(r.seq_num, std::iter::once(&*json));
        Encoded { seq_num: r.seq_num, json, frame }
    }
}

fn frame_of<'a>(last: u64, records: impl Iterator<Item = &'a str> + Clone) -> Bytes {
    let size: usize = records.clone().map(|r| r.len() + 1).sum();
    let mut out = String::with_capacity(size + 64);
    out.push_str("id: ");
    out.push_str(&last.to_string());
    out.push_str("\nevent: batch\ndata: {\"records\":[");
    for (i, r) in records.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r);
    }
    out.push_str("]}\n\n");
    Bytes::from(out)
}

/// One `event: batch` frame; its `id` is the last record's seq_num, so a
/// reconnect's `Last-Event-ID` resumes right after it.
pub fn encoded_frame(records: &[Arc<Encoded>]) -> Bytes {
    frame_of(records.last().map_or(0, |r| r.seq_num), records.iter().map(|r| &*r.json))
}

pub fn batch_frame(records: &[Record]) -> Bytes {
    let json: Vec<String> = records.iter().map(|r| serde_json::to_string(r).unwrap_or_default()).collect();
    frame_of(records.last().map_or(0, |r| r.seq_num), json.iter().map(String::as_str))
}

/// The frame a draining process ends its SSE responses with. An error, not a
/// clean end: the official client takes a clean end as final, and resumes
/// after an error with `Last-Event-ID` (through the load balancer, on another
/// process).
pub fn draining_frame() -> Bytes {
    Bytes::from_static(b"event: error\ndata: {\"error\":\"server shutting down; reconnect with Last-Event-ID\"}\n\n")
}

pub fn keepalive_frame() -> Bytes {
    Bytes::from_static(b": keep-alive\n\n")
}

/// The control record announcing that records `from..=to` can no longer be
/// delivered: trimmed, expired, or lost with Redis's data. It takes the
/// seq_num of the last missing record so a client's cursor moves past the gap.
pub fn gap_record(from: u64, to: u64) -> Record {
    Record {
        seq_num: to,
        body: String::new(),
        headers: vec![
            (super::CONTROL_HEADER.into(), "stream-gap".into()),
            ("gap-from".into(), from.to_string()),
            ("gap-to".into(), to.to_string()),
        ],
        timestamp: crate::clock::now().timestamp_millis(),
    }
}

/// The gap a read that resumes after `cursor` and finds `first` next reveals:
/// records trimmed, or numbers lost with Redis's data (see [`super::floor`]).
/// Only for a client that has a cursor; one reading from the start gets what
/// is there.
pub fn gap_before(cursor: Option<u64>, first: u64) -> Option<Record> {
    let from = cursor?.checked_add(1)?;
    (first > from).then(|| gap_record(from, first - 1))
}

pub struct Subscription {
    pub store: ChannelStore,
    pub key: ChannelKey,
    pub feed: Arc<Feed>,
    /// Last seq_num the client has; None = from the beginning.
    pub cursor: Option<u64>,
    /// Close once the backlog is drained (the channel is settled).
    pub settled: bool,
    /// Long-poll window: close cleanly after this long.
    pub window: Duration,
    pub keepalive: Duration,
    /// A gap to announce before anything else.
    pub gap: Option<Record>,
    /// The first backlog read, done before answering so that an unreachable
    /// Redis is a 503 rather than a stream that fails at once.
    pub first_read: Option<Vec<Record>>,
    /// The process's drain: the stream ends with [`draining_frame`] once it begins.
    pub drain: crate::shutdown::Drain,
}

/// Why a subscription could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// Following an id the channel never reached would silently skip the
    /// records that later get those numbers.
    #[error("Last-Event-ID {cursor} is past the end of the stream (next is {next})")]
    PastEnd { cursor: u64, next: u64 },
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// Where and how a subscriber wants to follow a channel.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeRequest {
    /// `Last-Event-ID`: the last seq_num the client has.
    pub last_event_id: Option<u64>,
    /// `X-Trigger-Stream-Start: latest` (without a `Last-Event-ID`): start at the tail.
    pub from_tail: bool,
    /// `X-Peek-Settled` on a channel that carries turns (`.out`): answer
    /// settled and close once the backlog is drained if the newest record ends
    /// a turn.
    pub peek_settled: bool,
    pub window: Duration,
    pub keepalive: Duration,
}

impl Subscription {
    /// Opens a subscription to `key`: resolves the cursor (a tail start, a gap
    /// in expired history, an id past the end) and the settled peek. It joins
    /// the channel's feed before reading anything, so nothing appended from
    /// here on is missed.
    pub async fn open(
        store: ChannelStore,
        hub: &Hub,
        key: ChannelKey,
        req: SubscribeRequest,
    ) -> Result<Subscription, SubscribeError> {
        let feed = hub.feed(key);
        let mut cursor = req.last_event_id;
        let mut next_seq = None;
        if cursor.is_none() && req.from_tail {
            let next = store.next_seq(key).await?;
            next_seq = Some(next);
            cursor = next.checked_sub(1);
        }
        let mut gap = None;
        if let Some(c) = cursor {
            let next = match next_seq {
                Some(n) => n,
                None => store.next_seq(key).await?,
            };
            if c >= next {
                return Err(SubscribeError::PastEnd { cursor: c, next });
            }
            gap = gap_before(Some(c), store.oldest_seq(key).await?);
        }
        let settled = req.peek_settled && store.last(key).await?.is_some_and(|r| r.is_turn_complete());
        // Fail now (503) rather than with a stream that fails at once if Redis
        // is away: when nothing above has read Redis, the stream's first read
        // happens here. (An empty one is redone by the stream once it listens
        // to the feed, so that nothing appended in between is missed.)
        let first_read = if cursor.is_none() && next_seq.is_none() && !req.peek_settled {
            Some(store.read_after(key, None, BACKLOG_BATCH).await?).filter(|r| !r.is_empty())
        } else {
            None
        };
        Ok(Subscription {
            store,
            key,
            feed,
            cursor,
            settled,
            window: req.window,
            keepalive: req.keepalive,
            gap,
            first_read,
            drain: hub.drain().clone(),
        })
    }
}

enum Phase {
    Backlog,
    Live,
    Done,
}

struct State {
    sub: Subscription,
    rx: broadcast::Receiver<Arc<Encoded>>,
    phase: Phase,
    /// Both timers live as long as the subscription: re-arming them for every
    /// frame would cost two timer-wheel updates per record per subscriber.
    deadline: Pin<Box<Sleep>>,
    keepalive: Pin<Box<Sleep>>,
    /// The backlog was re-read because the feed started past our cursor.
    rechecked: bool,
}

impl State {
    fn follows(&self, seq: u64) -> bool {
        match self.sub.cursor {
            Some(c) => seq == c + 1,
            None => seq == 0,
        }
    }

    /// A keep-alive comment, and the next one scheduled.
    fn keepalive_frame(&mut self) -> Bytes {
        let next = Instant::now() + self.sub.keepalive;
        self.keepalive.as_mut().reset(next);
        keepalive_frame()
    }

    fn already_sent(&self, seq: u64) -> bool {
        self.sub.cursor.is_some_and(|c| seq <= c)
    }

    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(gap) = self.sub.gap.take() {
            self.sub.cursor = Some(gap.seq_num);
            return Some(batch_frame(&[gap]));
        }
        loop {
            let step = match self.phase {
                Phase::Done => return None,
                // (`is_elapsed` only turns true once the timer has been polled.)
                Phase::Backlog if Instant::now() >= self.deadline.deadline() => {
                    self.phase = Phase::Done;
                    Step::Again
                }
                Phase::Backlog => self.backlog_step().await,
                Phase::Live => self.live_step().await,
            };
            match step {
                Step::Send(frame) => return Some(frame),
                Step::End => return None,
                Step::Again => {}
            }
        }
    }

    /// One read of the backlog from Redis: a frame of what it held, or the
    /// switch to live once the feed covers everything after our cursor.
    async fn backlog_step(&mut self) -> Step {
        let read = match self.sub.first_read.take() {
            Some(records) => Ok(records),
            None => self.sub.store.read_after(self.sub.key, self.sub.cursor, BACKLOG_BATCH).await,
        };
        match read {
            Ok(mut records) if !records.is_empty() => {
                // A live subscriber across a Redis loss: the numbers it
                // never got are signalled, in the same frame.
                if let Some(gap) = gap_before(self.sub.cursor, records[0].seq_num) {
                    records.insert(0, gap);
                }
                self.sub.cursor = records.last().map(|r| r.seq_num);
                Step::Send(batch_frame(&records))
            }
            Ok(_) if self.sub.settled => {
                self.phase = Phase::Done;
                Step::End
            }
            Ok(_) => {
                // Live only once the feed covers everything after our
                // cursor. A feed that started after our last read never
                // broadcast the records in between; they are in Redis by
                // now, so read once more (one retry: they may also have
                // expired meanwhile).
                let start = tokio::select! {
                    start = self.sub.feed.start() => start,
                    _ = &mut self.deadline => {
                        self.phase = Phase::Done;
                        return Step::End;
                    }
                    // Normally a millisecond; if Redis is slow, the
                    // client still hears from us.
                    _ = &mut self.keepalive => {
                        return Step::Send(self.keepalive_frame());
                    }
                };
                let resume = self.sub.cursor.map_or(0, |c| c + 1);
                if start > resume && !self.rechecked {
                    self.rechecked = true;
                } else {
                    self.phase = Phase::Live;
                }
                Step::Again
            }
            Err(err) => {
                tracing::warn!(%err, "stream read failed");
                self.phase = Phase::Done;
                Step::Send(Bytes::from("event: error\ndata: stream read failed\n\n"))
            }
        }
    }

    /// One wait on the feed: the next records in order as one frame, a
    /// keep-alive, or back to the backlog when the feed skipped or lagged.
    async fn live_step(&mut self) -> Step {
        // The window ends on time even while records keep coming.
        let received = tokio::select! {
            biased;
            _ = &mut self.deadline => {
                self.phase = Phase::Done;
                return Step::End;
            }
            r = self.rx.recv() => r,
            _ = &mut self.keepalive => {
                return Step::Send(self.keepalive_frame());
            }
        };
        let first = match received {
            Ok(r) => r,
            Err(RecvError::Lagged(_)) => {
                self.phase = Phase::Backlog;
                return Step::Again;
            }
            Err(RecvError::Closed) => {
                self.phase = Phase::Done;
                return Step::End;
            }
        };
        if self.already_sent(first.seq_num) {
            return Step::Again;
        }
        if !self.follows(first.seq_num) {
            // Something between our cursor and this record was not
            // broadcast to us (we joined mid-flight): read it from Redis.
            self.phase = Phase::Backlog;
            return Step::Again;
        }
        self.sub.cursor = Some(first.seq_num);
        Step::Send(self.coalesce(first))
    }

    /// `first` and whatever else is already buffered in order, as one frame;
    /// the usual single record goes out as its shared frame.
    fn coalesce(&mut self, first: Arc<Encoded>) -> Bytes {
        let mut batch: Vec<Arc<Encoded>> = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(r) if self.follows(r.seq_num) => {
                    self.sub.cursor = Some(r.seq_num);
                    if batch.is_empty() {
                        batch.push(first.clone());
                    }
                    batch.push(r);
                }
                Ok(r) if self.already_sent(r.seq_num) => {}
                Ok(_) | Err(TryRecvError::Lagged(_)) => {
                    self.phase = Phase::Backlog;
                    break;
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            first.frame.clone()
        } else {
            encoded_frame(&batch)
        }
    }
}

/// What one step of a subscription decided.
enum Step {
    /// A frame to send.
    Send(Bytes),
    /// The stream ends.
    End,
    /// Nothing to send yet: step again (the phase may have changed).
    Again,
}

/// The body of an SSE response for `sub`.
pub fn stream(sub: Subscription) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let rx = sub.feed.subscribe();
    let sub_drain = sub.drain.started_owned();
    let now = Instant::now();
    let state = State {
        deadline: Box::pin(tokio::time::sleep_until(now + sub.window)),
        keepalive: Box::pin(tokio::time::sleep_until(now + sub.keepalive)),
        rx,
        sub,
        phase: Phase::Backlog,
        rechecked: false,
    };
    // Resolves when the process begins draining; one waiter for the stream's life.
    let draining = Box::pin(sub_drain);
    futures::stream::unfold((state, draining), |(mut state, mut draining)| async move {
        if matches!(state.phase, Phase::Done) {
            return None;
        }
        // Frames ready at once still go out first (what this process has);
        // then a draining process ends the stream with an error.
        let frame = tokio::select! {
            biased;
            frame = state.next_frame() => frame?,
            _ = &mut draining => {
                state.phase = Phase::Done;
                draining_frame()
            }
        };
        Some((Ok(frame), (state, draining)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_frames_carry_the_last_seq_as_id() {
        let r = |n| Record { seq_num: n, body: format!("b{n}"), headers: vec![("k".into(), "v".into())], timestamp: 5 };
        let f = String::from_utf8(batch_frame(&[r(3), r(4)]).to_vec()).unwrap();
        assert!(f.starts_with("id: 4\nevent: batch\ndata: "));
        assert!(f.ends_with("\n\n"));
        let data: serde_json::Value =
            serde_json::from_str(f.lines().nth(2).unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(
            data["records"][0],
            serde_json::json!({"seq_num": 3, "body": "b3", "headers": [["k", "v"]], "timestamp": 5})
        );
    }

    #[test]
    fn live_frames_match_backlog_frames() {
        let r = |n| Record { seq_num: n, body: format!("b{n}"), headers: vec![], timestamp: 7 };
        assert_eq!(Encoded::new(&r(5)).frame, batch_frame(&[r(5)]));
        let both = [Arc::new(Encoded::new(&r(5))), Arc::new(Encoded::new(&r(6)))];
        assert_eq!(encoded_frame(&both), batch_frame(&[r(5), r(6)]));
    }

    #[test]
    fn gap_records_name_the_missing_range() {
        let g = gap_record(2, 9);
        assert_eq!(g.seq_num, 9);
        assert_eq!(g.control(), Some("stream-gap"));
        assert_eq!(g.header("gap-from"), Some("2"));
    }

    #[test]
    fn gaps_are_signalled_only_for_skipped_numbers_after_a_cursor() {
        assert!(gap_before(Some(4), 5).is_none());
        assert!(gap_before(Some(4), 3).is_none());
        assert!(gap_before(None, 1_000).is_none());
        let g = gap_before(Some(57), 1_000).unwrap();
        assert_eq!((g.seq_num, g.header("gap-from"), g.header("gap-to")), (999, Some("58"), Some("999")));
        assert!(gap_before(Some(u64::MAX), 0).is_none());
    }
}
