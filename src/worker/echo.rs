//! The example agent: a chat-like task that echoes each `.in` message back on
//! `.out` as a stream of chunks, ends each turn with a turn-complete control
//! record, waits on `.in` between turns, and exits after its idle timeout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::channels::{ChannelFactory, Record, SessionChannels};
use super::{RunContext, TaskHandler};

pub const TASK: &str = "echo-agent";
/// Header naming the control subtype of a control record (empty body).
pub const CONTROL_HEADER: &str = "trigger-control";
pub use crate::streams::ANSWERED_HEADER;
const DEFAULT_IDLE_SECS: u64 = 60;

pub struct EchoAgent {
    pub channels: Arc<dyn ChannelFactory>,
}

/// The user text in an `.in` record: the SDK wraps chunks as
/// `{"data": <chunk>, "id": <partId>}`, where the chunk may be a string, a JSON
/// string of an object, or an object with `text`/`content`.
pub fn message_text(body: &str) -> String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(inner @ Value::Object(_)) => from_value(&inner),
                _ => Some(s.clone()),
            },
            Value::Object(m) => m
                .get("data")
                .and_then(from_value)
                .or_else(|| m.get("text").and_then(from_value))
                .or_else(|| m.get("content").and_then(from_value)),
            _ => None,
        }
    }
    serde_json::from_str::<Value>(body).ok().and_then(|v| from_value(&v)).unwrap_or_else(|| body.to_string())
}

/// The `.out` records answering one message: text-delta chunks, then the
/// turn-complete control record.
pub fn reply_records(input: &Record) -> Vec<(String, Vec<(String, String)>)> {
    let text = format!("echo: {}", message_text(&input.body));
    let mut records: Vec<(String, Vec<(String, String)>)> = text
        .split_inclusive(' ')
        .enumerate()
        .map(|(i, word)| {
            let chunk = json!({"type": "text-delta", "delta": word});
            (json!({"data": chunk, "id": format!("echo-{}-{i}", input.seq)}).to_string(), Vec::new())
        })
        .collect();
    records.push((
        String::new(),
        vec![(CONTROL_HEADER.into(), "turn-complete".into()), (ANSWERED_HEADER.into(), input.seq.to_string())],
    ));
    records
}

/// Where a run starts reading `.in`: after the seq the server says the last
/// finished turn answered (`resumeAfterInSeq`, set on a run that replaces
/// another).
pub fn resume_after(payload: &Value) -> Option<u64> {
    payload.get("resumeAfterInSeq").and_then(Value::as_u64)
}

/// The last `.in` seq a previous run answered, read from `.out`.
pub fn last_answered(output: &[Record]) -> Option<u64> {
    output.iter().filter_map(|r| r.header(ANSWERED_HEADER)?.parse().ok()).max()
}

#[async_trait]
impl TaskHandler for EchoAgent {
    async fn run(&self, ctx: RunContext) -> anyhow::Result<Value> {
        let channels: Arc<dyn SessionChannels> = self.channels.for_run(&ctx.run);
        let idle = Duration::from_secs(
            ctx.run.payload.get("idleTimeoutInSeconds").and_then(Value::as_u64).unwrap_or(DEFAULT_IDLE_SECS),
        );
        let mut last = match resume_after(&ctx.run.payload) {
            Some(seq) => Some(seq),
            // No resume point from the server (a first run, or channels it
            // cannot see such as in-memory ones): read our own answers.
            None => last_answered(&channels.read_output().await?),
        };
        let mut turns = 0u64;
        loop {
            let next = tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(json!({"exit": "canceled", "turns": turns})),
                next = channels.next_input(last, idle) => next?,
            };
            let Some(record) = next else {
                return Ok(json!({"exit": "idle", "turns": turns}));
            };
            last = Some(record.seq);
            if record.header(CONTROL_HEADER) == Some("session-closed") {
                return Ok(json!({"exit": "session-closed", "turns": turns}));
            }
            if record.header(CONTROL_HEADER).is_some() {
                continue;
            }
            for (body, headers) in reply_records(&record) {
                channels.append_output(&body, &headers).await?;
            }
            turns += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_text_from_sdk_envelopes() {
        assert_eq!(message_text(r#"{"data":"hello","id":"p1"}"#), "hello");
        assert_eq!(message_text(r#"{"data":{"text":"hi there"},"id":"p1"}"#), "hi there");
        assert_eq!(message_text(r#"{"data":"{\"content\":\"nested\"}","id":"p"}"#), "nested");
        assert_eq!(message_text("plain words"), "plain words");
    }

    #[test]
    fn replies_end_with_turn_complete_naming_the_input() {
        let input = Record { seq: 7, body: r#"{"data":"a b"}"#.into(), headers: vec![] };
        let out = reply_records(&input);
        assert_eq!(out.len(), 4); // "echo: ", "a ", "b", control
        let (body, headers) = out.last().unwrap();
        assert!(body.is_empty());
        assert!(headers.contains(&("trigger-control".into(), "turn-complete".into())));
        assert!(headers.contains(&(ANSWERED_HEADER.into(), "7".into())));
        let records: Vec<Record> = out
            .iter()
            .enumerate()
            .map(|(i, (b, h))| Record { seq: i as u64, body: b.clone(), headers: h.clone() })
            .collect();
        assert_eq!(last_answered(&records), Some(7));
        assert_eq!(resume_after(&json!({"resumeAfterInSeq": 7})), Some(7));
        assert_eq!(resume_after(&json!({"trigger": "initial"})), None);
    }
}
