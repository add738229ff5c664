//! The session row and how it is shown on the wire.

use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Session {
    pub id: Uuid,
    pub friendly_id: String,
    pub external_id: Option<String>,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub task_identifier: String,
    pub trigger_config: Value,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub runtime_environment_id: Uuid,
    pub environment_type: String,
    pub current_run_id: Option<Uuid>,
    pub current_run_version: i32,
    /// Friendly id of the current run, joined in by every read.
    pub current_run_friendly_id: Option<String>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_reason: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When closing (or expiry) finished sealing the channels and ending the
    /// waits; null until then, even on a closed row.
    #[sqlx(default)]
    pub channels_closed_at: Option<DateTime<Utc>>,
    /// Postgres' `now()` when the row was read: expiry is judged by the clock
    /// that wrote `expires_at` and that the expiry sweep uses, never this
    /// process's (see `crate::clock`).
    pub read_at: DateTime<Utc>,
    /// When this process decoded the row, to age `read_at` by monotonic time
    /// while the row is held (the lookup cache keeps rows up to a second).
    #[sqlx(skip)]
    pub read_instant: ReadInstant,
}

/// The monotonic instant a row was decoded at (its `Default` is "now", which
/// is when sqlx builds a skipped field).
#[derive(Debug, Clone, Copy)]
pub struct ReadInstant(pub Instant);

impl Default for ReadInstant {
    fn default() -> Self {
        ReadInstant(Instant::now())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SessionStatus {
    Active,
    Closed,
    Expired,
}

impl SessionStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ACTIVE" => Some(SessionStatus::Active),
            "CLOSED" => Some(SessionStatus::Closed),
            "EXPIRED" => Some(SessionStatus::Expired),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "ACTIVE",
            SessionStatus::Closed => "CLOSED",
            SessionStatus::Expired => "EXPIRED",
        }
    }

    /// Status is derived, never stored: closing wins over expiry, and a session
    /// is expired once `expires_at` is not in the future.
    pub fn derive(closed_at: Option<DateTime<Utc>>, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Self {
        if closed_at.is_some() {
            SessionStatus::Closed
        } else if expires_at.is_some_and(|e| e <= now) {
            SessionStatus::Expired
        } else {
            SessionStatus::Active
        }
    }
}

impl Session {
    pub fn status(&self, now: DateTime<Utc>) -> SessionStatus {
        SessionStatus::derive(self.closed_at, self.expires_at, now)
    }

    /// Postgres' clock now, as this row tells it: the time it was read at plus
    /// the monotonic time since, so a row held a while is not judged as of
    /// its read.
    pub fn db_now(&self) -> DateTime<Utc> {
        let held = TimeDelta::from_std(self.read_instant.0.elapsed()).unwrap_or(TimeDelta::MAX);
        self.read_at.checked_add_signed(held).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The status now, by Postgres' clock (see [`Session::db_now`]).
    pub fn status_now(&self) -> SessionStatus {
        self.status(self.db_now())
    }

    pub fn is_closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// Why the session takes no more writes (records, waits), if it does not:
    /// it is closed, or expired even if the expiry sweep has not reached it yet.
    /// Judged by Postgres' clock (see [`Session::db_now`]).
    pub fn write_refusal(&self) -> Option<&'static str> {
        match self.status_now() {
            SessionStatus::Active => None,
            SessionStatus::Closed => Some("Session is closed"),
            SessionStatus::Expired => Some("Session is expired"),
        }
    }

    /// The reason its channels were closed with: the close's own, or
    /// "expired" for a session the expiry sweep closes.
    pub fn close_reason(&self) -> Option<String> {
        match self.status_now() {
            SessionStatus::Closed => self.closed_reason.clone(),
            SessionStatus::Expired => Some("expired".into()),
            SessionStatus::Active => None,
        }
    }

    /// Does closing wake the current run with a `session-closed` record on `.in`?
    /// Not when the close comes from that run itself (it is already exiting).
    pub fn close_wakes_in(&self, calling_run: Option<&str>) -> bool {
        calling_run.is_none() || calling_run != self.current_run_friendly_id.as_deref()
    }

    /// Every identifier the session answers to, for scope checks.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys = vec![self.friendly_id.as_str()];
        if let Some(ext) = self.external_id.as_deref().filter(|e| !e.is_empty()) {
            keys.push(ext);
        }
        keys
    }

    pub fn to_item(&self) -> SessionItem {
        SessionItem {
            id: self.friendly_id.clone(),
            external_id: self.external_id.clone(),
            kind: self.kind.clone(),
            task_identifier: self.task_identifier.clone(),
            trigger_config: Some(self.trigger_config.clone()),
            current_run_id: self.current_run_friendly_id.clone(),
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
            closed_at: self.closed_at,
            closed_reason: self.closed_reason.clone(),
            expires_at: self.expires_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// `SessionItem` of the wire contract.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionItem {
    pub id: String,
    pub external_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub task_identifier: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger_config: Option<Value>,
    pub current_run_id: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Option<Value>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_reason: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn status_derivation() {
        let now = Utc::now();
        assert_eq!(SessionStatus::derive(None, None, now), SessionStatus::Active);
        assert_eq!(SessionStatus::derive(None, Some(now + Duration::hours(1)), now), SessionStatus::Active);
        assert_eq!(SessionStatus::derive(None, Some(now), now), SessionStatus::Expired);
        assert_eq!(SessionStatus::derive(Some(now), Some(now - Duration::hours(1)), now), SessionStatus::Closed);
    }
}
