//! What the official chat clients append to `.in`, typed: a message record
//! `{"kind": "message", "payload": {message, chatId, trigger, metadata, …}}`, or
//! `{"kind": "stop"}`. The clients post the record as the raw body; a writer
//! that wraps it in the stream envelope (`{"data": <record>, "id": …}`, the
//! record as an object or a JSON string) is read the same way.

use serde::Deserialize;
use serde_json::Value;

/// Why the client sent a message record (`payload.trigger`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// A new user message (or a tool answer) to respond to.
    SubmitMessage,
    /// Answer the last user message again; carries no message.
    RegenerateMessage,
    /// A custom action (`payload.action`), not a message.
    Action,
    /// The conversation is over: the agent's run ends.
    Close,
    /// A trigger this library does not know (e.g. from a newer client).
    #[serde(other)]
    Unknown,
}

/// A UI message as the clients send it: id, role and typed parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UiMessage {
    #[serde(default)]
    pub id: Option<String>,
    pub role: String,
    #[serde(default)]
    pub parts: Vec<Value>,
}

impl UiMessage {
    /// The message's text: its `text` parts, concatenated.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect()
    }
}

/// A message record's payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagePayload {
    /// The newest message; absent for `regenerate-message`, `action` and `close`.
    #[serde(default)]
    pub message: Option<UiMessage>,
    #[serde(default)]
    pub chat_id: Option<String>,
    pub trigger: Trigger,
    /// The client's `clientData` (per message, so it may change between turns).
    #[serde(default)]
    pub metadata: Value,
    /// The custom action of an `action` trigger.
    #[serde(default)]
    pub action: Option<Value>,
    /// The message to regenerate (`useChat` names it).
    #[serde(default)]
    pub message_id: Option<String>,
}

/// One `.in` record, typed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChatInput {
    Message {
        payload: MessagePayload,
    },
    Stop,
    /// A kind this library does not handle (handover records, newer kinds).
    #[serde(other)]
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("not a chat input record: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl ChatInput {
    /// Reads a `.in` record body (raw, or in the stream envelope).
    pub fn parse(body: &str) -> Result<ChatInput, InputError> {
        let value: Value = serde_json::from_str(body)?;
        let record = match value.get("data") {
            Some(Value::String(inner)) if value.get("kind").is_none() => serde_json::from_str(inner)?,
            Some(inner @ Value::Object(_)) if value.get("kind").is_none() => inner.clone(),
            _ => value,
        };
        Ok(serde_json::from_value(record)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(trigger: &str) -> String {
        json!({"kind": "message", "payload": {
            "message": {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
            "chatId": "c1", "trigger": trigger, "metadata": {"user": "u1"}
        }})
        .to_string()
    }

    #[test]
    fn reads_the_message_records_the_clients_send() {
        let ChatInput::Message { payload } = ChatInput::parse(&message("submit-message")).unwrap() else {
            panic!("a message")
        };
        assert_eq!(payload.trigger, Trigger::SubmitMessage);
        assert_eq!(payload.chat_id.as_deref(), Some("c1"));
        assert_eq!(payload.metadata, json!({"user": "u1"}));
        assert_eq!(payload.message.unwrap().text(), "hello there");
        for (wire, trigger) in [
            ("regenerate-message", Trigger::RegenerateMessage),
            ("action", Trigger::Action),
            ("close", Trigger::Close),
            ("something-new", Trigger::Unknown),
        ] {
            let ChatInput::Message { payload } = ChatInput::parse(&message(wire)).unwrap() else { panic!() };
            assert_eq!(payload.trigger, trigger);
        }
        // AgentChat's close and action carry no message.
        let close = json!({"kind": "message", "payload": {"chatId": "c1", "trigger": "close"}}).to_string();
        let ChatInput::Message { payload } = ChatInput::parse(&close).unwrap() else { panic!() };
        assert!(payload.message.is_none() && payload.metadata.is_null());
        let action =
            json!({"kind": "message", "payload": {"chatId": "c", "trigger": "action", "action": {"type": "undo"}}});
        let ChatInput::Message { payload } = ChatInput::parse(&action.to_string()).unwrap() else { panic!() };
        assert_eq!(payload.action, Some(json!({"type": "undo"})));
    }

    #[test]
    fn reads_stop_other_kinds_and_enveloped_records() {
        assert_eq!(ChatInput::parse(r#"{"kind":"stop"}"#).unwrap(), ChatInput::Stop);
        assert_eq!(ChatInput::parse(r#"{"kind":"handover-skip"}"#).unwrap(), ChatInput::Other);
        let as_string = json!({"data": r#"{"kind":"stop"}"#, "id": "p"}).to_string();
        assert_eq!(ChatInput::parse(&as_string).unwrap(), ChatInput::Stop);
        let as_object = json!({"data": {"kind": "stop"}, "id": "p"}).to_string();
        assert_eq!(ChatInput::parse(&as_object).unwrap(), ChatInput::Stop);
        assert!(ChatInput::parse("plain words").is_err());
        assert!(ChatInput::parse(r#"{"data":"hello","id":"p"}"#).is_err());
        assert!(ChatInput::parse(r#"{"kind":"message","payload":{"chatId":"c"}}"#).is_err(), "trigger is required");
    }
}
