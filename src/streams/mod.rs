//! Session channels: the durable `.in` / `.out` streams a session owns.
//!
//! - [`store`]: records in Redis Streams, appended by one Lua script that assigns
//!   sequence numbers (dense while Redis keeps its data), dedupes retries,
//!   refuses writes after close, and drains the channel's pending waitpoints,
//!   all atomically.
//! - [`floor`]: sequence numbers leased from Postgres a block at a time, so
//!   they never go backwards when Redis loses a channel.
//! - [`effects`]: what a durable append sets off (waitpoint drain, run boot).
//! - [`jobs`]: the input-boot sweep, for boots an append never made.
//! - [`group_commit`]: concurrent appends to one channel share one script call.
//! - [`hub`]: one upstream reader per active channel per process, fanning new
//!   records out to every local subscriber.
//! - [`sse`]: the SSE encoding the official client parses, and a subscriber's
//!   backlog-then-live loop.
//! - [`permits`]: caps on concurrent SSE subscriptions (and the other
//!   long-lived requests) per token, session, environment and server.
//! - [`routes`]: the realtime HTTP routes.

pub mod effects;
pub mod floor;
pub mod group_commit;
pub mod hub;
pub mod jobs;
pub mod permits;
pub mod routes;
pub mod sse;
pub mod store;

use std::fmt;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// The settings the realtime routes read: the base URL handed out for direct
/// writes, and the SSE keep-alive interval.
#[derive(Clone)]
pub struct RealtimeSettings {
    pub public_url: Option<String>,
    pub keepalive: std::time::Duration,
}

/// Which of a session's two channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Io {
    In,
    Out,
}

impl Io {
    pub fn parse(s: &str) -> Option<Io> {
        match s {
            "in" => Some(Io::In),
            "out" => Some(Io::Out),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Io::In => "in",
            Io::Out => "out",
        }
    }
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One channel: a session's `.in` or `.out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub session_id: Uuid,
    pub io: Io,
}

/// A record as stored and as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub seq_num: u64,
    pub body: String,
    pub headers: Vec<(String, String)>,
    /// Server time of the append, epoch milliseconds.
    pub timestamp: i64,
}

/// Header naming the control subtype of a control record (which has an empty body).
pub const CONTROL_HEADER: &str = "trigger-control";
/// Header of a turn-complete record naming the `.in` seq its turn answered.
pub const ANSWERED_HEADER: &str = "session-in-event-id";
/// Control subtype that ends a turn (agents write it; clients stop reading there).
pub const TURN_COMPLETE: &str = "turn-complete";
/// Control subtype the server writes on `.in` when a session closes.
pub const SESSION_CLOSED: &str = "session-closed";

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn control(&self) -> Option<&str> {
        self.header(CONTROL_HEADER)
    }

    /// The SDK writes `{"data": <chunk>, "id": <partId>}`; the chunk is often
    /// itself a JSON string. Returns the chunk, parsed once more when it is one.
    pub fn envelope_data(&self) -> Option<Value> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        let data = v.get("data")?.clone();
        Some(match &data {
            Value::String(s) => serde_json::from_str(s).unwrap_or(data),
            _ => data,
        })
    }

    /// The envelope's part id, if the body is an SDK envelope.
    pub fn envelope_id(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        v.get("id").and_then(Value::as_str).map(String::from)
    }

    /// Does this record end a turn? Either a `turn-complete` control record, or
    /// (older agents) a data chunk of type `trigger:turn-complete`.
    pub fn is_turn_complete(&self) -> bool {
        self.control() == Some(TURN_COMPLETE)
            || self
                .envelope_data()
                .and_then(|d| d.get("type").and_then(Value::as_str).map(|t| t == "trigger:turn-complete"))
                == Some(true)
    }

    /// The `.in` seq a turn-complete record says its turn answered
    /// ([`ANSWERED_HEADER`]), so the next run resumes after it.
    pub fn answered_in_seq(&self) -> Option<u64> {
        self.headers.iter().find(|(k, _)| k == ANSWERED_HEADER).and_then(|(_, v)| v.trim().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(body: &str, headers: &[(&str, &str)]) -> Record {
        Record {
            seq_num: 0,
            body: body.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            timestamp: 0,
        }
    }

    #[test]
    fn turn_complete_in_both_forms() {
        assert!(rec("", &[("trigger-control", "turn-complete")]).is_turn_complete());
        assert!(!rec("", &[("trigger-control", "upgrade-required")]).is_turn_complete());
        // The chunk is a JSON string inside the envelope: parsed twice.
        let stringified = serde_json::json!({"data": "{\"type\":\"trigger:turn-complete\"}", "id": "p"}).to_string();
        assert!(rec(&stringified, &[]).is_turn_complete());
        let object = serde_json::json!({"data": {"type": "trigger:turn-complete"}, "id": "p"}).to_string();
        assert!(rec(&object, &[]).is_turn_complete());
        let text = serde_json::json!({"data": {"type": "text-delta", "delta": "hi"}, "id": "p"}).to_string();
        assert!(!rec(&text, &[]).is_turn_complete());
        assert!(!rec("not json", &[]).is_turn_complete());
    }

    #[test]
    fn io_parses() {
        assert_eq!(Io::parse("in"), Some(Io::In));
        assert_eq!(Io::parse("out"), Some(Io::Out));
        assert_eq!(Io::parse("sideways"), None);
    }
}
