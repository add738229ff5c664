//! The example agent (`sessiond worker --task echo-agent`), built on the chat
//! protocol ([`super::chat`]): it answers each user message with
//! `echo: <the message's text>`, streamed as one text part in several deltas
//! (a word each), between `start` and `finish`.
//!
//! Test seam: a message whose metadata (the client's `clientData`) sets
//! `echoDelayMs` has its deltas paced that far apart, so a test can stop a
//! long turn in the middle or kill the worker mid-turn. Any holder of a
//! session token can set it, so the pauses of one turn add up to
//! [`MAX_TURN_PACING`] at most: a long message cannot hold a worker's slot
//! for minutes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::channels::ChannelFactory;
use super::chat::{ChatAgent, ChatTask, FinishReason, KnownChunk, MessagePayload, Trigger, Turn, TurnWriter};
use super::{RunContext, TaskHandler};

pub const TASK: &str = "echo-agent";
/// The most the `echoDelayMs` seam may pause in one whole turn, all its
/// deltas together; once spent, the rest of the turn streams unpaced (the
/// early deltas keep the pace asked for, which is what a stop or a kill
/// mid-turn needs). Half a minute: a browser test clicks Stop mid-turn, and
/// the 5 s this was at first left a loaded 2-core CI too little room for the
/// click to land before the turn ended whole.
pub const MAX_TURN_PACING: Duration = Duration::from_secs(30);

/// The echo agent as a worker task, on the session channels `channels` makes.
pub struct EchoAgent {
    pub channels: Arc<dyn ChannelFactory>,
}

#[async_trait]
impl TaskHandler for EchoAgent {
    async fn run(&self, ctx: RunContext) -> anyhow::Result<Value> {
        ChatTask { agent: Echo, channels: self.channels.clone() }.run(ctx).await
    }
}

/// The echo agent's answers.
pub struct Echo;

/// What the echo agent answers to a message.
pub fn reply_text(payload: &MessagePayload) -> String {
    let said = match (&payload.trigger, &payload.message, &payload.action) {
        (Trigger::Action, _, Some(action)) => format!("action {action}"),
        (_, Some(message), _) => message.text(),
        // regenerate-message carries no message, and this agent keeps no history.
        _ => String::from("(nothing to repeat)"),
    };
    format!("echo: {said}")
}

/// The text split into deltas: a word each, spaces kept.
pub fn deltas(text: &str) -> Vec<&str> {
    text.split_inclusive(' ').collect()
}

/// The pause before each of `count` deltas: the pace the metadata asks for,
/// until the turn's [`MAX_TURN_PACING`] is spent, then none.
fn pauses(metadata: &Value, count: usize) -> Vec<Duration> {
    let asked = metadata.get("echoDelayMs").and_then(Value::as_u64).map(Duration::from_millis).unwrap_or_default();
    let mut left = MAX_TURN_PACING;
    (0..count)
        .map(|_| {
            let pause = asked.min(left);
            left -= pause;
            pause
        })
        .collect()
}

#[async_trait]
impl ChatAgent for Echo {
    async fn respond(&self, turn: &Turn, out: &mut TurnWriter<'_>) -> anyhow::Result<()> {
        let text = reply_text(&turn.payload);
        let deltas = deltas(&text);
        let pauses = pauses(&turn.payload.metadata, deltas.len());
        let message_id = out.new_id("msg");
        out.write(KnownChunk::Start { message_id: Some(message_id), message_metadata: None }).await?;
        let id = out.new_id("text");
        out.write(KnownChunk::TextStart { id: id.clone() }).await?;
        for (delta, pause) in deltas.into_iter().zip(pauses) {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            out.write(KnownChunk::TextDelta { id: id.clone(), delta: delta.to_string() }).await?;
        }
        out.write(KnownChunk::TextEnd { id }).await?;
        out.write(KnownChunk::Finish { finish_reason: Some(FinishReason::Stop), message_metadata: None }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::channels::{MemoryChannels, Record, SessionChannels};
    use crate::worker::chat::session::{serve, ServeOptions};
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    fn message(text: &str, metadata: Value) -> String {
        json!({"kind": "message", "payload": {
            "message": {"id": "u", "role": "user", "parts": [{"type": "text", "text": text}]},
            "chatId": "c", "trigger": "submit-message", "metadata": metadata
        }})
        .to_string()
    }

    fn chunks(out: &[Record]) -> Vec<Value> {
        out.iter()
            .filter(|r| !r.body.is_empty())
            .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["data"].clone())
            .collect()
    }

    fn text(out: &[Record]) -> String {
        chunks(out).iter().filter_map(|c| c["delta"].as_str().map(String::from)).collect()
    }

    fn turn_ends(out: &[Record]) -> Vec<(u64, Option<String>)> {
        out.iter()
            .filter(|r| r.header("trigger-control") == Some("turn-complete"))
            .map(|r| {
                (
                    r.header("session-in-event-id").unwrap().parse().unwrap(),
                    r.header("public-access-token").map(String::from),
                )
            })
            .collect()
    }

    fn options(resume_after: Option<u64>) -> ServeOptions {
        ServeOptions { resume_after, idle: Duration::from_millis(300) }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn replies_echo_the_text_of_each_trigger() {
        let parse = |body: String| match crate::worker::chat::ChatInput::parse(&body).unwrap() {
            crate::worker::chat::ChatInput::Message { payload } => payload,
            other => panic!("{other:?}"),
        };
        assert_eq!(reply_text(&parse(message("a b", Value::Null))), "echo: a b");
        let action = json!({"kind": "message", "payload": {"trigger": "action", "action": {"t": 1}}}).to_string();
        assert_eq!(reply_text(&parse(action)), r#"echo: action {"t":1}"#);
        assert_eq!(deltas("echo: a b"), vec!["echo: ", "a ", "b"]);
    }

    #[test]
    fn the_pauses_of_one_turn_add_up_to_the_cap_at_most() {
        let ms = |d: &[Duration]| d.iter().map(|p| p.as_millis() as u64).collect::<Vec<_>>();
        // A short paced turn keeps its pace throughout.
        assert_eq!(ms(&pauses(&json!({"echoDelayMs": 40}), 4)), [40, 40, 40, 40]);
        assert_eq!(ms(&pauses(&Value::Null, 3)), [0, 0, 0]);
        // A long one keeps it until the cap is spent, then runs unpaced.
        assert_eq!(ms(&pauses(&json!({"echoDelayMs": 12000}), 5)), [12000, 12000, 6000, 0, 0]);
        let total: Duration = pauses(&json!({"echoDelayMs": u64::MAX}), 1000).iter().sum();
        assert_eq!(total, MAX_TURN_PACING);
        assert_eq!(pauses(&json!({"echoDelayMs": 60000}), 2)[0], MAX_TURN_PACING);
    }

    /// The whole turn, through the agent: a thousand words at the seam's
    /// slowest pace are answered in full after the cap's pauses (unbounded,
    /// the turn would take over an hour and the timeout fails the test). On
    /// tokio's paused clock, so the half minute costs no wall time.
    #[tokio::test(start_paused = true)]
    async fn a_long_turn_at_the_slowest_pace_pauses_the_cap_in_all() {
        let ch = Arc::new(MemoryChannels::default());
        let long: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
        let long = long.join(" ");
        ch.send_input(&message(&long, json!({"echoDelayMs": 5000})), &[]);
        let started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(
            Duration::from_secs(120),
            serve(&Echo, ch.clone(), options(None), CancellationToken::new()),
        )
        .await
        .expect("the turn ends within two minutes")
        .unwrap();
        assert!(started.elapsed() >= MAX_TURN_PACING, "paced: {:?}", started.elapsed());
        assert_eq!(text(&ch.output()), format!("echo: {long}"));
        assert_eq!(turn_ends(&ch.output()).len(), 1);
        assert_eq!(outcome.turns, 1);
    }

    #[tokio::test]
    async fn each_message_is_one_turn_of_ui_chunks_ending_in_turn_complete() {
        let ch = Arc::new(MemoryChannels::default());
        ch.set_turn_token("pat-1");
        ch.send_input(&message("hello there", Value::Null), &[]);
        ch.send_input(&message("again", Value::Null), &[]);
        let outcome = serve(&Echo, ch.clone(), options(None), CancellationToken::new()).await.unwrap();
        assert_eq!((outcome.exit, outcome.turns), (crate::worker::chat::Exit::Idle, 2));
        let out = ch.output();
        assert_eq!(turn_ends(&out), vec![(0, Some("pat-1".into())), (1, Some("pat-1".into()))]);
        let first_end = out.iter().position(|r| r.header("trigger-control").is_some()).unwrap();
        let types: Vec<String> =
            chunks(&out[..first_end]).iter().map(|c| c["type"].as_str().unwrap().to_string()).collect();
        assert_eq!(types, ["start", "text-start", "text-delta", "text-delta", "text-delta", "text-end", "finish"]);
        assert_eq!(text(&out[..first_end]), "echo: hello there");
        assert_eq!(text(&out[first_end..]), "echo: again");
        // Every record has its own part id; the text part's id is shared by its chunks.
        let ids: std::collections::HashSet<String> = out
            .iter()
            .filter(|r| !r.body.is_empty())
            .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), out.len() - 2);
        let all = chunks(&out);
        assert_eq!(all[1]["id"], all[2]["id"]);
        assert_ne!(all[1]["id"], all[8]["id"], "each turn has its own text part");
    }

    #[tokio::test]
    async fn stop_ends_the_turn_at_once_and_the_next_message_is_answered() {
        let ch = Arc::new(MemoryChannels::default());
        let long = "one two three four five six seven eight nine ten";
        ch.send_input(&message(long, json!({"echoDelayMs": 40})), &[]);
        let serving = tokio::spawn({
            let ch = ch.clone();
            async move { serve(&Echo, ch, options(None), CancellationToken::new()).await.unwrap() }
        });
        until("a few deltas", || text(&ch.output()).len() >= "echo: one two ".len()).await;
        let stop = ch.send_input(r#"{"kind":"stop"}"#, &[]);
        until("the stopped turn's end", || !turn_ends(&ch.output()).is_empty()).await;
        let stopped = ch.output();
        assert_eq!(turn_ends(&stopped), vec![(stop, None)], "the turn-complete names the stop record");
        let partial = text(&stopped);
        assert!(partial.len() < format!("echo: {long}").len() && format!("echo: {long}").starts_with(&partial));
        // The agent waits for, and answers, the next message normally.
        let next = ch.send_input(&message("after", Value::Null), &[]);
        until("the next turn", || turn_ends(&ch.output()).len() == 2).await;
        let out = ch.output();
        assert_eq!(turn_ends(&out)[1].0, next);
        assert_eq!(text(&out[stopped.len()..]), "echo: after");
        let outcome = serving.await.unwrap();
        assert_eq!(outcome.turns, 2);
    }

    #[tokio::test]
    async fn close_ends_the_run_unless_the_conversation_went_on() {
        let close = json!({"kind": "message", "payload": {"chatId": "c", "trigger": "close"}}).to_string();
        let ch = Arc::new(MemoryChannels::default());
        ch.send_input(&message("hi", Value::Null), &[]);
        ch.send_input(&close, &[]);
        let outcome = serve(&Echo, ch.clone(), options(None), CancellationToken::new()).await.unwrap();
        assert_eq!((outcome.exit, outcome.turns), (crate::worker::chat::Exit::Closed, 1));

        // A continuation replays the close, but a message follows it: the
        // close is history, the message is answered, and "hi" is not again.
        ch.send_input(&message("back again", Value::Null), &[]);
        let resume = crate::worker::chat::session::last_answered(&ch.output());
        assert_eq!(resume, Some(0));
        let outcome = serve(&Echo, ch.clone(), options(resume), CancellationToken::new()).await.unwrap();
        assert_eq!((outcome.exit, outcome.turns), (crate::worker::chat::Exit::Idle, 1));
        assert_eq!(turn_ends(&ch.output()).iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(text(&ch.output()), "echo: hiecho: back again");
    }

    #[tokio::test]
    async fn a_continuation_answers_an_interrupted_message_once_and_skips_answered_ones() {
        let ch = Arc::new(MemoryChannels::default());
        ch.send_input(&message("first", Value::Null), &[]);
        serve(&Echo, ch.clone(), options(None), CancellationToken::new()).await.unwrap();
        // The next run dies mid-turn: chunks but no turn-complete.
        ch.send_input(&message("second", Value::Null), &[]);
        ch.append_output(r#"{"data":{"type":"start"},"id":"dead-1"}"#, &[]).await.unwrap();
        let resume = crate::worker::chat::session::last_answered(&ch.output());
        let outcome = serve(&Echo, ch.clone(), options(resume), CancellationToken::new()).await.unwrap();
        assert_eq!(outcome.turns, 1);
        assert_eq!(turn_ends(&ch.output()).iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        // Cancel ends a run waiting between turns.
        let cancel = CancellationToken::new();
        cancel.cancel();
        let outcome = serve(&Echo, ch.clone(), options(Some(1)), cancel).await.unwrap();
        assert_eq!(outcome.exit, crate::worker::chat::Exit::Canceled);
        // The session's close, as the waitpoint reports it, ends the run.
        ch.send_input("", &[("trigger-control".into(), "session-closed".into())]);
        let outcome = serve(&Echo, ch.clone(), options(Some(1)), CancellationToken::new()).await.unwrap();
        assert_eq!(outcome.exit, crate::worker::chat::Exit::SessionClosed);
    }
}
