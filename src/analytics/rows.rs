//! Rows as ClickHouse stores them, and how a Postgres row becomes one.
//!
//! Ids travel as lowercase hyphenated uuid text, which orders like Postgres
//! orders uuids; times as DateTime64(6), the precision of `timestamptz`.

use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::runs::store::Run;
use crate::sessions::model::Session;

/// A row of `sessions_v1`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct SessionRow {
    pub session_id: String,
    pub friendly_id: String,
    pub organization_id: String,
    pub project_id: String,
    pub environment_id: String,
    pub environment_type: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub task_identifier: String,
    pub external_id: Option<String>,
    pub tags: Vec<String>,
    pub metadata: String,
    pub current_run_id: Option<String>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_reason: Option<String>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub updated_at: DateTime<Utc>,
    pub _version: u64,
    pub _is_deleted: u8,
}

impl SessionRow {
    /// The row for `s` as of the change numbered `version`.
    pub fn from_session(s: &Session, version: u64) -> Self {
        SessionRow {
            session_id: s.id.to_string(),
            friendly_id: s.friendly_id.clone(),
            organization_id: s.organization_id.to_string(),
            project_id: s.project_id.to_string(),
            environment_id: s.runtime_environment_id.to_string(),
            environment_type: s.environment_type.clone(),
            kind: s.kind.clone(),
            task_identifier: s.task_identifier.clone(),
            external_id: s.external_id.clone(),
            tags: s.tags.clone(),
            metadata: s.metadata.as_ref().map(|m| m.to_string()).unwrap_or_default(),
            current_run_id: s.current_run_id.map(|id| id.to_string()),
            closed_at: s.closed_at,
            closed_reason: s.closed_reason.clone(),
            expires_at: s.expires_at,
            created_at: s.created_at,
            updated_at: s.updated_at,
            _version: version,
            _is_deleted: 0,
        }
    }
}

/// A row of `task_runs_v1`.
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct RunRow {
    pub run_id: String,
    pub friendly_id: String,
    pub organization_id: String,
    pub project_id: String,
    pub environment_id: String,
    pub session_id: Option<String>,
    pub task_identifier: String,
    pub status: String,
    pub attempt_number: u32,
    pub max_attempts: u32,
    pub superseded_by: Option<String>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    pub updated_at: DateTime<Utc>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    pub completed_at: Option<DateTime<Utc>>,
    pub _version: u64,
    pub _is_deleted: u8,
}

impl RunRow {
    pub fn from_run(r: &Run, version: u64) -> Self {
        RunRow {
            run_id: r.id.to_string(),
            friendly_id: r.friendly_id.clone(),
            organization_id: r.organization_id.to_string(),
            project_id: r.project_id.to_string(),
            environment_id: r.runtime_environment_id.to_string(),
            session_id: r.session_id.map(|id| id.to_string()),
            task_identifier: r.task_identifier.clone(),
            status: r.status.as_str().to_string(),
            attempt_number: r.attempt_number.max(0) as u32,
            max_attempts: r.max_attempts.max(0) as u32,
            superseded_by: r.superseded_by.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
            _version: version,
            _is_deleted: 0,
        }
    }
}

/// A row of the copy that can be marked deleted.
pub trait Versioned: clickhouse::RowOwned + clickhouse::RowRead + clickhouse::RowWrite {
    /// This row as deleted (`_is_deleted = 1`) by the change numbered `version`.
    fn tombstone(&mut self, version: u64);
}

impl Versioned for SessionRow {
    fn tombstone(&mut self, version: u64) {
        self._version = version;
        self._is_deleted = 1;
    }
}

impl Versioned for RunRow {
    fn tombstone(&mut self, version: u64) {
        self._version = version;
        self._is_deleted = 1;
    }
}

/// A Postgres LSN (`XXXXXXXX/YYYYYYYY`, two hex halves) as the u64 that
/// versions ClickHouse rows: later WAL positions are larger numbers.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_order_as_numbers() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert!(parse_lsn("0/FFFFFFFF") < parse_lsn("1/0"));
        for bad in ["", "16B3748", "x/1", "1/", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }
}
