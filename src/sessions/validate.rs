//! Request bodies of the session control plane and the rules they must satisfy.
//! Shapes follow `@trigger.dev/core`'s zod schemas; anything the schema strips
//! (unknown keys) is ignored here too.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::ids::SESSION_PREFIX;
use crate::runs::{RunSettings, TriggerReason};
use crate::validation::{
    check_len, check_tags, parse_duration_secs, timestamp_from_millis, timestamp_in_range, Validated, ValidationError,
    MAX_DURATION_SECS,
};

/// The most a session's `metadata` may take, serialized as it is stored and
/// served (create and update alike). It bounds each item of a list page: with
/// create's 32 KB body (which bounds `triggerConfig`), an item is at most
/// about 65 KB, and a page (at most `list::MAX_PAGE_SIZE` items) about 6.5 MB.
pub const MAX_METADATA_BYTES: usize = 32 * 1024;

/// 422 naming `field` if `metadata` serializes to more than [`MAX_METADATA_BYTES`].
/// Measured as serialized, not as sent: a body may spell numbers shorter
/// (`1e9` is stored and served as `1000000000.0`).
pub fn check_metadata(field: &str, metadata: &Map<String, Value>) -> Validated<()> {
    /// Counts bytes instead of keeping them.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut size = Counter(0);
    // Writing a JSON map cannot fail; a failure would mean it is unmeasurable.
    let fits = serde_json::to_writer(&mut size, metadata).is_ok() && size.0 <= MAX_METADATA_BYTES;
    if !fits {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_METADATA_BYTES} bytes as JSON (it is {} bytes)", size.0),
        ));
    }
    Ok(())
}

const MACHINES: &[&str] = &["micro", "small-1x", "small-2x", "medium-1x", "medium-2x", "large-1x", "large-2x"];

/// `SessionTriggerConfig`: drives every run the session schedules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerConfig {
    pub base_payload: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Vec<String>>,
    /// String or number on the wire; stored as a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_to_version: Option<String>,
    /// `null` and blank mean "not pinned".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_deployment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_in_seconds: Option<i64>,
    /// A duration string (`10m`) or whole seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Value>,
}

impl TriggerConfig {
    /// Checks every field and normalises the loose ones in place.
    pub fn validate(&mut self) -> Validated<()> {
        let f = |name: &str| format!("triggerConfig.{name}");
        if let Some(m) = &self.machine {
            if !MACHINES.contains(&m.as_str()) {
                return Err(ValidationError::new(f("machine"), format!("must be one of {}", MACHINES.join(", "))));
            }
        }
        if let Some(q) = &self.queue {
            check_len(&f("queue"), q, 0, 128)?;
        }
        if let Some(limits) = &self.concurrency {
            if limits.len() > 2 {
                return Err(ValidationError::new(f("concurrency"), "at most 2 named limits"));
            }
            for name in limits {
                let ok = (1..=122).contains(&name.len())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    return Err(ValidationError::new(
                        f("concurrency"),
                        "names are 1-122 characters using only letters, numbers, underscores and hyphens",
                    ));
                }
            }
        }
        self.concurrency_key = match self.concurrency_key.take() {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Value::String(s)),
            Some(Value::Number(n)) => Some(Value::String(n.to_string())),
            Some(_) => return Err(ValidationError::new(f("concurrencyKey"), "must be a string or a number")),
        };
        if let Some(tags) = &self.tags {
            check_tags(&f("tags"), tags)?;
        }
        if let Some(n) = self.max_attempts {
            if !(1..=10).contains(&n) {
                return Err(ValidationError::new(f("maxAttempts"), "must be an integer from 1 to 10"));
            }
        }
        if let Some(n) = self.max_duration {
            if !(1..=MAX_DURATION_SECS).contains(&n) {
                return Err(ValidationError::new(
                    f("maxDuration"),
                    format!("must be an integer from 1 to {MAX_DURATION_SECS} (seconds)"),
                ));
            }
        }
        self.external_deployment_id =
            self.external_deployment_id.take().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(id) = &self.external_deployment_id {
            check_len(&f("externalDeploymentId"), id, 0, 128)?;
        }
        if let Some(n) = self.idle_timeout_in_seconds {
            if !(1..=3600).contains(&n) {
                return Err(ValidationError::new(f("idleTimeoutInSeconds"), "must be an integer from 1 to 3600"));
            }
        }
        if let Some(ttl) = &self.ttl {
            if self.ttl_secs().is_none() && !ttl.is_null() {
                return Err(ValidationError::new(
                    f("ttl"),
                    format!(
                        "must be a duration such as \"10m\" or a whole number of seconds from 0 to {MAX_DURATION_SECS}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn ttl_secs(&self) -> Option<i64> {
        match self.ttl.as_ref()? {
            Value::String(s) => parse_duration_secs(s),
            Value::Number(n) => n.as_i64().filter(|n| (0..=MAX_DURATION_SECS).contains(n)),
            _ => None,
        }
    }

    /// What the run engine needs of this config for each run it triggers.
    pub fn run_settings(&self) -> RunSettings {
        // Durations are validated to fit (`MAX_DURATION_SECS`); clamp anyway.
        let clamp = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
        RunSettings {
            base_payload: self.base_payload.clone(),
            queue: self.queue.clone(),
            machine: self.machine.clone(),
            tags: self.tags.clone().unwrap_or_default(),
            max_attempts: self.max_attempts.map(clamp).unwrap_or(1),
            max_duration_secs: self.max_duration.map(clamp),
            ttl_secs: self.ttl_secs().map(clamp),
            lock_to_version: self.lock_to_version.clone(),
            idle_timeout_secs: self.idle_timeout_in_seconds,
        }
    }
}

/// Accepts an ISO-8601 string or epoch milliseconds, as `z.coerce.date()` does,
/// within the range every client timestamp keeps to (`validation::MAX_TIMESTAMP_MILLIS`).
#[derive(Debug, Clone, Copy)]
pub struct DateInput(pub DateTime<Utc>);

impl<'de> Deserialize<'de> for DateInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => DateTime::parse_from_rfc3339(&s)
                .ok()
                .map(|t| t.with_timezone(&Utc))
                .filter(|t| timestamp_in_range(*t))
                .map(DateInput)
                .ok_or_else(|| D::Error::custom("expected an ISO-8601 date from 1970 to 9999")),
            Value::Number(n) => {
                n.as_i64().and_then(timestamp_from_millis).map(DateInput).ok_or_else(|| {
                    D::Error::custom("expected epoch milliseconds from 0 to 253402300799999 (year 9999)")
                })
            }
            _ => Err(D::Error::custom("expected an ISO-8601 date or epoch milliseconds")),
        }
    }
}

/// A field of a PATCH body: absent (leave alone), `null` (clear), or a value.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Patch<T> {
    #[default]
    Missing,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Patch::Null,
            Some(v) => Patch::Value(v),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateSessionBody {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub external_id: Option<String>,
    pub task_identifier: String,
    pub trigger_config: TriggerConfig,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub expires_at: Option<DateInput>,
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub kind: String,
    pub external_id: Option<String>,
    pub task_identifier: String,
    pub trigger_config: TriggerConfig,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// External ids are trimmed, follow the path id rule (so each can be addressed
/// in a URL: [`crate::ids::id_problem`]), and never look like a friendly id (a
/// `session_` prefix would route lookups to the wrong column).
pub fn external_id(field: &str, raw: &str) -> Validated<String> {
    let trimmed = raw.trim();
    if let Some(problem) = crate::ids::id_problem(trimmed) {
        return Err(ValidationError::new(field, problem));
    }
    if trimmed.starts_with(SESSION_PREFIX) {
        return Err(ValidationError::new(
            field,
            "externalId cannot start with 'session_' (reserved prefix for internal friendlyIds)",
        ));
    }
    Ok(trimmed.to_string())
}

pub fn create(body: CreateSessionBody) -> Validated<NewSession> {
    check_len("type", &body.kind, 1, 64)?;
    let task_identifier = body.task_identifier.trim().to_string();
    check_len("taskIdentifier", &task_identifier, 1, 128)?;
    let external_id = body.external_id.as_deref().map(|e| external_id("externalId", e)).transpose()?;
    let tags = body.tags.unwrap_or_default();
    check_tags("tags", &tags)?;
    if let Some(metadata) = &body.metadata {
        check_metadata("metadata", metadata)?;
    }
    let mut trigger_config = body.trigger_config;
    trigger_config.validate()?;
    Ok(NewSession {
        kind: body.kind,
        external_id,
        task_identifier,
        trigger_config,
        tags,
        metadata: body.metadata.map(Value::Object),
        // Whether it lies ahead is judged at insert, by Postgres' clock (the
        // one the expiry sweep uses): see `store::CreateOutcome::ExpiryPast`.
        expires_at: body.expires_at.map(|d| d.0),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateSessionBody {
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: Patch<Map<String, Value>>,
    #[serde(default)]
    pub external_id: Patch<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SessionPatch {
    pub tags: Option<Vec<String>>,
    pub metadata: Patch<Value>,
    pub external_id: Patch<String>,
}

impl SessionPatch {
    /// Does the patch set or clear the external id (which takes admin rights)?
    pub fn changes_external_id(&self) -> bool {
        self.external_id != Patch::Missing
    }
}

pub fn update(body: UpdateSessionBody) -> Validated<SessionPatch> {
    if let Some(tags) = &body.tags {
        check_tags("tags", tags)?;
    }
    let external_id = match body.external_id {
        Patch::Value(v) => Patch::Value(external_id("externalId", &v)?),
        Patch::Null => Patch::Null,
        Patch::Missing => Patch::Missing,
    };
    let metadata = match body.metadata {
        Patch::Value(m) => {
            check_metadata("metadata", &m)?;
            Patch::Value(Value::Object(m))
        }
        Patch::Null => Patch::Null,
        Patch::Missing => Patch::Missing,
    };
    Ok(SessionPatch { tags: body.tags, metadata, external_id })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloseSessionBody {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub calling_run_id: Option<String>,
}

pub fn close_reason(body: &CloseSessionBody) -> Validated<Option<String>> {
    if let Some(r) = &body.reason {
        check_len("reason", r, 0, 256)?;
    }
    Ok(body.reason.clone())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndAndContinueBody {
    pub calling_run_id: String,
    pub reason: String,
}

/// The handoff's audit reason: one of the four known reasons if given, otherwise
/// `upgrade` (the reason is a free-form label on the wire).
pub fn end_and_continue(body: &EndAndContinueBody) -> Validated<TriggerReason> {
    check_len("callingRunId", &body.calling_run_id, 1, 128)?;
    check_len("reason", &body.reason, 0, 64)?;
    Ok(match body.reason.as_str() {
        "continuation" => TriggerReason::Continuation,
        "manual" => TriggerReason::Manual,
        _ => TriggerReason::Upgrade,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> CreateSessionBody {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> Value {
        json!({"type": "chat.agent", "taskIdentifier": "echo", "triggerConfig": {"basePayload": {"chatId": "c"}}})
    }

    #[test]
    fn minimal_create_is_valid() {
        let s = create(body(base())).unwrap();
        assert_eq!(s.kind, "chat.agent");
        assert!(s.external_id.is_none() && s.tags.is_empty());
    }

    #[test]
    fn external_id_rules() {
        let mut v = base();
        v["externalId"] = json!("  chat-1 ");
        assert_eq!(create(body(v.clone())).unwrap().external_id.as_deref(), Some("chat-1"));
        v["externalId"] = json!("session_abc");
        assert_eq!(create(body(v.clone())).unwrap_err().field, "externalId");
        v["externalId"] = json!("   ");
        assert!(create(body(v.clone())).is_err());
        v["externalId"] = json!("x".repeat(257));
        assert!(create(body(v)).is_err());
    }

    #[test]
    fn trigger_config_rules() {
        let cases = [
            (json!({"machine": "huge"}), "triggerConfig.machine"),
            (json!({"maxAttempts": 11}), "triggerConfig.maxAttempts"),
            (json!({"maxAttempts": 0}), "triggerConfig.maxAttempts"),
            (json!({"idleTimeoutInSeconds": 3601}), "triggerConfig.idleTimeoutInSeconds"),
            (json!({"ttl": "soon"}), "triggerConfig.ttl"),
            (json!({"concurrency": ["a b"]}), "triggerConfig.concurrency"),
            (json!({"queue": "q".repeat(129)}), "triggerConfig.queue"),
        ];
        for (extra, field) in cases {
            let mut v = base();
            for (k, val) in extra.as_object().unwrap() {
                v["triggerConfig"][k] = val.clone();
            }
            assert_eq!(create(body(v)).unwrap_err().field, field);
        }
        let mut v = base();
        v["triggerConfig"]["concurrencyKey"] = json!(42);
        v["triggerConfig"]["ttl"] = json!("10m");
        v["triggerConfig"]["externalDeploymentId"] = json!("  ");
        let s = create(body(v)).unwrap();
        assert_eq!(s.trigger_config.concurrency_key, Some(json!("42")));
        assert_eq!(s.trigger_config.ttl_secs(), Some(600));
        assert!(s.trigger_config.external_deployment_id.is_none());
    }

    #[test]
    fn type_and_task_bounds() {
        let mut v = base();
        v["type"] = json!("");
        assert_eq!(create(body(v)).unwrap_err().field, "type");
        let mut v = base();
        v["taskIdentifier"] = json!(" ");
        assert_eq!(create(body(v)).unwrap_err().field, "taskIdentifier");
    }

    #[test]
    fn patch_distinguishes_missing_null_and_value() {
        let b: UpdateSessionBody = serde_json::from_value(json!({"externalId": null})).unwrap();
        assert_eq!(update(b).unwrap().external_id, Patch::Null);
        let b: UpdateSessionBody = serde_json::from_value(json!({})).unwrap();
        let p = update(b).unwrap();
        assert_eq!(p.external_id, Patch::Missing);
        assert_eq!(p.metadata, Patch::Missing);
        let b: UpdateSessionBody = serde_json::from_value(json!({"externalId": "session_x"})).unwrap();
        assert!(update(b).is_err());
    }

    #[test]
    fn metadata_is_bounded_as_serialized() {
        let mut v = base();
        v["metadata"] = json!({"pad": "x".repeat(MAX_METADATA_BYTES - 10)});
        assert!(create(body(v.clone())).is_ok(), "exactly the cap");
        v["metadata"] = json!({"pad": "x".repeat(MAX_METADATA_BYTES - 9)});
        assert_eq!(create(body(v)).unwrap_err().field, "metadata");
        let patch = |m: Value| update(serde_json::from_value(json!({"metadata": m})).unwrap());
        assert_eq!(patch(json!({"n": vec![1e9; 3000]})).unwrap_err().field, "metadata");
        assert!(patch(json!({"n": vec![1; 3000]})).is_ok());
        assert!(patch(Value::Null).is_ok());
    }

    #[test]
    fn dates_accept_iso_and_millis() {
        let mut v = base();
        v["expiresAt"] = json!("2030-01-01T00:00:00.000Z");
        assert!(create(body(v)).unwrap().expires_at.is_some());
        let mut v = base();
        v["expiresAt"] = json!(1_900_000_000_000i64);
        assert!(create(body(v)).unwrap().expires_at.is_some());
        let mut v = base();
        // A past one parses: the store refuses it by Postgres' clock.
        v["expiresAt"] = json!(chrono::Utc::now().timestamp_millis() - 1);
        assert!(create(body(v)).unwrap().expires_at.is_some());
    }

    #[test]
    fn out_of_range_numbers_and_dates_are_refused() {
        let with = |k: &str, v: Value| {
            let mut b = base();
            b["triggerConfig"][k] = v;
            create(body(b)).map(|_| ()).map_err(|e| e.field)
        };
        assert_eq!(with("maxDuration", json!(MAX_DURATION_SECS + 1)), Err("triggerConfig.maxDuration".into()));
        assert_eq!(with("maxDuration", json!(MAX_DURATION_SECS)), Ok(()));
        assert_eq!(with("ttl", json!(i64::MAX)), Err("triggerConfig.ttl".into()));
        assert_eq!(with("ttl", json!("106751991167300d")), Err("triggerConfig.ttl".into()));
        // Before 4713 BC (chrono takes it, Postgres does not: a 500), past 9999, before 1970.
        for bad in [
            json!(-8_210_266_876_800_000i64),
            json!(8_210_266_876_799_999i64),
            json!("+100000-01-01T00:00:00Z"),
            json!(-1),
        ] {
            let mut v = base();
            v["expiresAt"] = bad.clone();
            assert!(serde_json::from_value::<CreateSessionBody>(v).is_err(), "{bad}");
        }
    }

    mod props {
        use super::*;
        use crate::validation::MAX_TIMESTAMP_MILLIS;
        use proptest::prelude::*;

        fn expires(v: Value) -> Option<DateTime<Utc>> {
            let mut b = base();
            b["expiresAt"] = v;
            serde_json::from_value::<CreateSessionBody>(b).ok().and_then(|b| b.expires_at.map(|d| d.0))
        }

        proptest! {
            #[test]
            fn expires_at_millis_round_trip_in_range(ms in any::<i64>()) {
                let parsed = expires(json!(ms));
                if (0..=MAX_TIMESTAMP_MILLIS).contains(&ms) {
                    prop_assert_eq!(parsed.map(|t| t.timestamp_millis()), Some(ms));
                    // The ISO form of the same instant reads back the same.
                    let iso = parsed.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                    prop_assert_eq!(expires(json!(iso)), parsed);
                } else {
                    prop_assert_eq!(parsed, None);
                }
            }

            #[test]
            fn expires_at_strings_never_panic(s in ".{0,40}", y in 0u32..=99_999, rest in "-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z") {
                if let Some(t) = expires(json!(s)) {
                    prop_assert!((0..=MAX_TIMESTAMP_MILLIS).contains(&t.timestamp_millis()));
                }
                if let Some(t) = expires(json!(format!("{y:04}{rest}"))) {
                    prop_assert!((0..=MAX_TIMESTAMP_MILLIS).contains(&t.timestamp_millis()));
                }
            }

            #[test]
            fn durations_in_trigger_config_are_bounded(n in any::<i64>(), text in ".{0,20}") {
                let mut b = base();
                b["triggerConfig"]["maxDuration"] = json!(n);
                prop_assert_eq!(create(body(b)).is_ok(), (1..=MAX_DURATION_SECS).contains(&n));
                for ttl in [json!(n), json!(text.clone())] {
                    let mut b = base();
                    b["triggerConfig"]["ttl"] = ttl;
                    if let Ok(s) = create(body(b)) {
                        let secs = s.trigger_config.ttl_secs();
                        prop_assert!(secs.is_some_and(|t| (0..=MAX_DURATION_SECS).contains(&t)));
                        prop_assert!(secs.is_some_and(|t| i32::try_from(t).is_ok()));
                    }
                }
            }

            #[test]
            fn strings_with_nul_are_refused(prefix in "[a-z]{1,8}", field in 0usize..5) {
                let bad = format!("{prefix}\0");
                let mut v = base();
                match field {
                    0 => v["type"] = json!(bad),
                    1 => v["taskIdentifier"] = json!(bad),
                    2 => v["externalId"] = json!(bad),
                    3 => v["tags"] = json!([bad]),
                    _ => v["triggerConfig"]["queue"] = json!(bad),
                }
                prop_assert!(create(body(v)).is_err());
            }
        }
    }
}
