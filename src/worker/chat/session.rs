//! The turn loop of a chat agent's run: read `.in` in order, answer each
//! message in a turn that ends with `turn-complete`, let `stop` cut the turn
//! short, end the run on `close`, on the session's close, on cancel, or after
//! the idle timeout.
//!
//! One reader task follows `.in` for the whole run and hands records over in
//! order, so a `stop` is seen while a turn is still being written, and the wait
//! a turn interrupts carries on as the wait for the next message.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::chunk::KnownChunk;
use super::input::{ChatInput, MessagePayload, Trigger};
use super::turn::{complete_turn, PartIds, TurnWriter, CONTROL_HEADER, SESSION_CLOSED};
use crate::worker::channels::{Record, SessionChannels};

/// One message to answer.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The `.in` seq of the message record.
    pub in_seq: u64,
    pub payload: MessagePayload,
}

/// An agent speaking the chat protocol: it answers one message at a time.
#[async_trait]
pub trait ChatAgent: Send + Sync + 'static {
    /// Writes the answer to `turn` (typically `start`, parts, `finish`). The
    /// future is dropped at once when the user stops the turn; the loop then
    /// ends the turn itself.
    async fn respond(&self, turn: &Turn, out: &mut TurnWriter<'_>) -> anyhow::Result<()>;
}

/// Why a run's loop ended (the run's output says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// No input for the idle timeout.
    Idle,
    /// The client sent `close`.
    Closed,
    /// The session was closed.
    SessionClosed,
    /// The server canceled the run, or the worker is shutting down.
    Canceled,
}

impl Exit {
    pub fn as_str(self) -> &'static str {
        match self {
            Exit::Idle => "idle",
            Exit::Closed => "closed",
            Exit::SessionClosed => "session-closed",
            Exit::Canceled => "canceled",
        }
    }
}

/// How a run's loop ended, and how many turns it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Exit,
    pub turns: u64,
}

impl Outcome {
    pub fn to_output(self) -> Value {
        json!({ "exit": self.exit.as_str(), "turns": self.turns })
    }
}

/// Where and how long a run serves its session.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// The last `.in` seq already answered (read after it); None from the start.
    pub resume_after: Option<u64>,
    pub idle: Duration,
}

/// Cancels the reader task when the loop ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Incoming = mpsc::Receiver<anyhow::Result<Record>>;

/// Follows `.in` after `after`, handing each record over in order.
fn spawn_reader(channels: Arc<dyn SessionChannels>, mut after: Option<u64>, poll: Duration) -> (Incoming, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            match channels.next_input(after, poll).await {
                Ok(Some(record)) => {
                    let closed = record.header(CONTROL_HEADER) == Some(SESSION_CLOSED);
                    after = Some(record.seq);
                    if tx.send(Ok(record)).await.is_err() || closed {
                        return;
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
    });
    (rx, AbortOnDrop(task))
}

fn is_stop(record: &Record) -> bool {
    matches!(ChatInput::parse(&record.body), Ok(ChatInput::Stop))
}

/// Serves one run: answers messages until the run should end.
pub async fn serve(
    agent: &dyn ChatAgent,
    channels: Arc<dyn SessionChannels>,
    options: ServeOptions,
    cancel: CancellationToken,
) -> anyhow::Result<Outcome> {
    let (mut incoming, _reader) = spawn_reader(channels.clone(), options.resume_after, options.idle);
    let mut queued: VecDeque<Record> = VecDeque::new();
    let mut ids = PartIds::default();
    let mut turns = 0;
    loop {
        let record = match queued.pop_front() {
            Some(record) => record,
            None => tokio::select! {
                _ = cancel.cancelled() => return Ok(Outcome { exit: Exit::Canceled, turns }),
                next = tokio::time::timeout(options.idle, incoming.recv()) => match next {
                    Err(_) => return Ok(Outcome { exit: Exit::Idle, turns }),
                    Ok(None) => anyhow::bail!("the .in reader stopped"),
                    Ok(Some(record)) => record?,
                },
            },
        };
        if record.header(CONTROL_HEADER) == Some(SESSION_CLOSED) {
            return Ok(Outcome { exit: Exit::SessionClosed, turns });
        }
        if record.header(CONTROL_HEADER).is_some() {
            continue;
        }
        let payload = match ChatInput::parse(&record.body) {
            Ok(ChatInput::Message { payload }) => payload,
            // A stop with no turn running has nothing to stop.
            Ok(ChatInput::Stop | ChatInput::Other) => continue,
            Err(err) => {
                tracing::warn!(seq = record.seq, %err, "skipping an .in record that is not chat input");
                continue;
            }
        };
        match payload.trigger {
            Trigger::Close => {
                // A close the conversation already went on from (a later record
                // is stored) is history a continuation replays: skip it.
                if queued.is_empty() && !channels.has_input_after(record.seq).await? {
                    return Ok(Outcome { exit: Exit::Closed, turns });
                }
                continue;
            }
            Trigger::Unknown => continue,
            Trigger::SubmitMessage | Trigger::RegenerateMessage | Trigger::Action => {}
        }
        let turn = Turn { in_seq: record.seq, payload };
        let Some(answered) =
            run_turn(agent, channels.as_ref(), &turn, &mut ids, &mut incoming, &mut queued, &cancel).await?
        else {
            return Ok(Outcome { exit: Exit::Canceled, turns });
        };
        complete_turn(channels.as_ref(), answered).await?;
        turns += 1;
    }
}

/// Runs the agent on one turn while watching `.in`: a `stop` ends the turn at
/// once; other records wait in `queued`. Returns the `.in` seq the turn
/// answered (the message, or the stop that cut it short), or None if the run
/// was canceled.
async fn run_turn(
    agent: &dyn ChatAgent,
    channels: &dyn SessionChannels,
    turn: &Turn,
    ids: &mut PartIds,
    incoming: &mut Incoming,
    queued: &mut VecDeque<Record>,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<u64>> {
    let mut answered = turn.in_seq;
    let mut failure = None;
    {
        let mut out = TurnWriter::new(channels, ids);
        let respond = agent.respond(turn, &mut out);
        tokio::pin!(respond);
        let mut reading = true;
        loop {
            tokio::select! {
                done = &mut respond => {
                    failure = done.err();
                    break;
                }
                _ = cancel.cancelled() => return Ok(None),
                next = incoming.recv(), if reading => match next {
                    None => reading = false,
                    Some(record) => {
                        let record = record?;
                        if is_stop(&record) {
                            // Only when no message waits before it may the turn
                            // claim the stop's seq: a resume past it would skip
                            // the waiting message.
                            if queued.is_empty() {
                                answered = record.seq;
                            }
                            break;
                        }
                        queued.push_back(record);
                    }
                },
            }
        }
    }
    if let Some(err) = failure {
        tracing::warn!(seq = turn.in_seq, err = %format!("{err:#}"), "the agent failed a turn");
        let mut out = TurnWriter::new(channels, ids);
        out.write(KnownChunk::Error { error_text: format!("{err:#}") }).await?;
    }
    Ok(Some(answered))
}

/// The run payload fields the loop reads: where to resume and the idle timeout.
pub fn options_from_payload(payload: &Value, default_idle: Duration) -> ServeOptions {
    ServeOptions {
        resume_after: payload.get("resumeAfterInSeq").and_then(Value::as_u64),
        idle: payload
            .get("idleTimeoutInSeconds")
            .and_then(Value::as_u64)
            .map(Duration::from_secs)
            .unwrap_or(default_idle),
    }
}

/// The last `.in` seq a `turn-complete` on `.out` says was answered: where a
/// run resumes when the server gave no `resumeAfterInSeq` (in-memory channels).
pub fn last_answered(output: &[Record]) -> Option<u64> {
    output
        .iter()
        .filter(|r| r.header(CONTROL_HEADER) == Some(super::turn::TURN_COMPLETE))
        .filter_map(|r| r.header(super::turn::SESSION_IN_EVENT_ID_HEADER)?.parse().ok())
        .max()
}
