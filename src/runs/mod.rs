//! Task runs: one execution of a task, triggered by a session.

pub mod store;

use serde_json::{Map, Value};

/// Why a session triggered a run (the `session_runs.reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerReason {
    Initial,
    Continuation,
    Upgrade,
    Manual,
}

impl TriggerReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerReason::Initial => "initial",
            TriggerReason::Continuation => "continuation",
            TriggerReason::Upgrade => "upgrade",
            TriggerReason::Manual => "manual",
        }
    }
}

/// A run's payload: the session's `basePayload` with the server's runtime fields
/// merged on top (`sessionId`, and `trigger` = the reason this run exists), so a
/// task can tell a first run from a continuation without extra calls.
pub fn session_payload(base: &Map<String, Value>, session_friendly_id: &str, reason: TriggerReason) -> Value {
    let mut payload = base.clone();
    payload.insert("sessionId".into(), Value::String(session_friendly_id.into()));
    payload.insert("trigger".into(), Value::String(reason.as_str().into()));
    Value::Object(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_merges_runtime_fields_over_the_base() {
        let base = json!({"chatId": "c1", "trigger": "user value"});
        let p = session_payload(base.as_object().unwrap(), "session_x", TriggerReason::Continuation);
        assert_eq!(p, json!({"chatId": "c1", "trigger": "continuation", "sessionId": "session_x"}));
    }
}
