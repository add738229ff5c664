//! What an agent writes on `.out`: AI SDK UI message stream chunks (the
//! `UIMessageChunk` union of `ai@5`), each wrapped in the envelope the official
//! clients unwrap, `{"data": <chunk>, "id": <part id>}`.
//!
//! Field names and `type` tags follow the AI SDK's schema exactly, so
//! `readUIMessageStream` and `useChat` accept every chunk unchanged.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Why a message finished (`finish.finishReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
    ToolCalls,
    Error,
    Other,
    Unknown,
}

/// One UI message stream chunk with a fixed `type`. `data-*` chunks, whose type
/// is open-ended, are [`DataChunk`]; [`UiChunk`] holds either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum KnownChunk {
    Start {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_metadata: Option<Value>,
    },
    StartStep,
    TextStart {
        id: String,
    },
    TextDelta {
        id: String,
        delta: String,
    },
    TextEnd {
        id: String,
    },
    ReasoningStart {
        id: String,
    },
    ReasoningDelta {
        id: String,
        delta: String,
    },
    ReasoningEnd {
        id: String,
    },
    ToolInputStart {
        tool_call_id: String,
        tool_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    ToolInputDelta {
        tool_call_id: String,
        input_text_delta: String,
    },
    ToolInputAvailable {
        tool_call_id: String,
        tool_name: String,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dynamic: Option<bool>,
    },
    ToolInputError {
        tool_call_id: String,
        tool_name: String,
        input: Value,
        error_text: String,
    },
    ToolOutputAvailable {
        tool_call_id: String,
        output: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preliminary: Option<bool>,
    },
    ToolOutputError {
        tool_call_id: String,
        error_text: String,
    },
    SourceUrl {
        source_id: String,
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    SourceDocument {
        source_id: String,
        media_type: String,
        title: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
    },
    File {
        url: String,
        media_type: String,
    },
    FinishStep,
    Finish {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<FinishReason>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_metadata: Option<Value>,
    },
    MessageMetadata {
        message_metadata: Value,
    },
    Error {
        error_text: String,
    },
    Abort,
}

/// A custom `data-<name>` chunk: application data the UI renders as a data part.
#[derive(Debug, Clone, PartialEq)]
pub struct DataChunk {
    /// The part's name, without the `data-` prefix.
    pub name: String,
    /// Chunks with the same id replace each other's data in the message.
    pub id: Option<String>,
    pub data: Value,
    /// Sent to the client but not kept in the message.
    pub transient: Option<bool>,
}

const DATA_PREFIX: &str = "data-";

impl Serialize for DataChunk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(format!("{DATA_PREFIX}{}", self.name)));
        if let Some(id) = &self.id {
            m.insert("id".into(), Value::String(id.clone()));
        }
        m.insert("data".into(), self.data.clone());
        if let Some(t) = self.transient {
            m.insert("transient".into(), Value::Bool(t));
        }
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DataChunk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = Map::<String, Value>::deserialize(d)?;
        let name = match m.get("type").and_then(Value::as_str).and_then(|t| t.strip_prefix(DATA_PREFIX)) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => return Err(D::Error::custom("a data chunk's type starts with \"data-\"")),
        };
        let id = match m.remove("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(D::Error::custom("a data chunk's id is a string")),
        };
        let transient = match m.remove("transient") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(b),
            Some(_) => return Err(D::Error::custom("a data chunk's transient is a boolean")),
        };
        Ok(DataChunk { name, id, data: m.remove("data").unwrap_or(Value::Null), transient })
    }
}

/// Any UI message stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UiChunk {
    Known(KnownChunk),
    Data(DataChunk),
}

impl From<KnownChunk> for UiChunk {
    fn from(c: KnownChunk) -> Self {
        UiChunk::Known(c)
    }
}

impl From<DataChunk> for UiChunk {
    fn from(c: DataChunk) -> Self {
        UiChunk::Data(c)
    }
}

/// The `.out` record body of one chunk: the envelope the clients unwrap. The
/// part id must be unique on the channel: the clients drop a repeated one.
pub fn envelope(chunk: &UiChunk, part_id: &str) -> String {
    serde_json::json!({ "data": chunk, "id": part_id }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire(c: impl Into<UiChunk>) -> Value {
        serde_json::to_value(c.into()).unwrap()
    }

    #[test]
    fn chunks_serialise_as_the_ai_sdk_schema_says() {
        assert_eq!(wire(KnownChunk::Start { message_id: None, message_metadata: None }), json!({"type": "start"}));
        assert_eq!(
            wire(KnownChunk::TextDelta { id: "t1".into(), delta: "hi".into() }),
            json!({"type": "text-delta", "id": "t1", "delta": "hi"})
        );
        assert_eq!(
            wire(KnownChunk::Finish { finish_reason: Some(FinishReason::ContentFilter), message_metadata: None }),
            json!({"type": "finish", "finishReason": "content-filter"})
        );
        assert_eq!(
            wire(KnownChunk::ToolInputAvailable {
                tool_call_id: "c1".into(),
                tool_name: "search".into(),
                input: json!({"q": 1}),
                dynamic: None
            }),
            json!({"type": "tool-input-available", "toolCallId": "c1", "toolName": "search", "input": {"q": 1}})
        );
        assert_eq!(
            wire(KnownChunk::ToolInputDelta { tool_call_id: "c1".into(), input_text_delta: "{".into() }),
            json!({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": "{"})
        );
        assert_eq!(
            wire(KnownChunk::Error { error_text: "boom".into() }),
            json!({"type": "error", "errorText": "boom"})
        );
        assert_eq!(wire(KnownChunk::StartStep), json!({"type": "start-step"}));
        assert_eq!(wire(KnownChunk::Abort), json!({"type": "abort"}));
        assert_eq!(
            wire(KnownChunk::SourceUrl { source_id: "s".into(), url: "https://x".into(), title: None }),
            json!({"type": "source-url", "sourceId": "s", "url": "https://x"})
        );
        assert_eq!(
            wire(DataChunk { name: "weather".into(), id: Some("w1".into()), data: json!({"t": 3}), transient: None }),
            json!({"type": "data-weather", "id": "w1", "data": {"t": 3}})
        );
    }

    #[test]
    fn chunks_read_back_including_data_parts() {
        for v in [
            json!({"type": "reasoning-delta", "id": "r", "delta": "hm"}),
            json!({"type": "tool-output-available", "toolCallId": "c", "output": [1], "preliminary": true}),
            json!({"type": "message-metadata", "messageMetadata": {"a": 1}}),
            json!({"type": "data-progress", "data": 0.5, "transient": true}),
            json!({"type": "finish-step"}),
        ] {
            let chunk: UiChunk = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(&chunk).unwrap(), v);
        }
        assert!(serde_json::from_value::<UiChunk>(json!({"type": "text-delta", "id": "t"})).is_err());
        assert!(serde_json::from_value::<UiChunk>(json!({"type": "nonsense"})).is_err());
        assert!(serde_json::from_value::<UiChunk>(json!({"type": "data-"})).is_err());
    }

    #[test]
    fn the_envelope_carries_the_part_id() {
        let body = envelope(&KnownChunk::TextEnd { id: "t".into() }.into(), "p-1");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, json!({"data": {"type": "text-end", "id": "t"}, "id": "p-1"}));
    }
}
