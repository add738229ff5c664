//! From decoded pgoutput messages to the ClickHouse rows of `sessions` and
//! `task_runs`.
//!
//! [`Decoder`] keeps what the stream itself does not repeat: the relations
//! (tables) by id, and the open transaction. Columns are found by name, so
//! the tables may gain columns or order them differently without touching
//! this code; a column the rows need and the table lacks is an error.
//!
//! Every row of a transaction is versioned with the transaction's commit LSN,
//! which pgoutput announces up front (Begin's `final_lsn`): ReplacingMergeTree
//! then keeps the newest committed state, and a backfilled copy (versioned with
//! an LSN read before its chunk) loses to any change committed after it.
//! Several changes of one row in one transaction share that version; the
//! consumer keeps their order, and ClickHouse keeps the last inserted.
//!
//! The tables must be `REPLICA IDENTITY FULL`: a delete then carries the whole
//! old row (ClickHouse needs its sort key to hide it), and an update carries
//! the old row too, whose values stand in for TOASTed columns the update did
//! not resend.

mod text;

use std::collections::HashMap;

use crate::analytics::rows::{RunRow, SessionRow};
use crate::analytics::watermark::Table;
use crate::replication::pgoutput::{Begin, Commit, Datum, Message, OldTuple, Relation, Tuple};
use crate::runs::RunStatus;

pub use text::TextError;

/// What a message means for the ClickHouse copy.
// Nearly every event is a Change, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A transaction starts; its rows follow, versioned `final_lsn`.
    Begin(Begin),
    Change(Change),
    /// An update moved a row within ClickHouse's sort key (a changed
    /// `created_at`, say): ReplacingMergeTree replaces only rows with the same
    /// key, so the old key's row is deleted (`.0`) beside the new row (`.1`).
    Rekeyed(Change, Change),
    /// These tables were emptied. No per-row deletes follow: the copy must be
    /// rebuilt (a backfill), which is the consumer's call.
    Truncate(Vec<Table>),
    /// The transaction is complete: everything since its Begin may be written.
    Commit(Commit),
}

/// One row's new state (or its deletion, `_is_deleted = 1`).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Session(SessionRow),
    Run(RunRow),
}

/// A row change as pgoutput sends it.
#[derive(Debug, Clone, Copy)]
pub enum RowChange<'a> {
    Insert { new: &'a Tuple },
    Update { old: Option<&'a OldTuple>, new: &'a Tuple },
    Delete { old: &'a OldTuple },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChangeError {
    #[error("change to relation {0}, which no Relation message described")]
    UnknownRelation(u32),
    #[error("{table} has no column {column}")]
    MissingColumn { table: &'static str, column: &'static str },
    #[error("{table}: a tuple of {found} columns for a relation of {expected}")]
    ColumnCount { table: &'static str, expected: usize, found: usize },
    #[error("{table}.{column} is null")]
    Null { table: &'static str, column: &'static str },
    #[error("{table}.{column} holds a NULL element")]
    NullElement { table: &'static str, column: &'static str },
    #[error("{table}.{column} is an unchanged TOASTed value and no old row carries it (is the table REPLICA IDENTITY FULL?)")]
    Unchanged { table: &'static str, column: &'static str },
    #[error("a delete from {0} carries only the key; the table must be REPLICA IDENTITY FULL")]
    KeyOnly(&'static str),
    #[error("{table}.{column}: {source}")]
    Value { table: &'static str, column: &'static str, source: TextError },
    #[error("task_runs.status: unknown status {0:?}")]
    UnknownStatus(String),
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("Begin of {next:#x} while the transaction of {open:#x} is open")]
    NestedBegin { open: u64, next: u64 },
    #[error("Commit at {commit:#x} ends the transaction that began for {begin:#x}")]
    CommitLsn { begin: u64, commit: u64 },
}

/// Turns the message stream of one replication connection into [`Event`]s.
/// After an error the stream must be restarted (from the slot's confirmed
/// position), with a new decoder.
#[derive(Debug)]
pub struct Decoder {
    namespace: String,
    relations: HashMap<u32, Relation>,
    /// Commit LSN of the open transaction.
    open: Option<u64>,
}

impl Decoder {
    /// Decodes changes of `sessions` and `task_runs` in the schema
    /// `namespace` (`public` unless `DATABASE_SCHEMA` says otherwise); changes
    /// of any other table are skipped.
    pub fn new(namespace: impl Into<String>) -> Self {
        Decoder { namespace: namespace.into(), relations: HashMap::new(), open: None }
    }

    /// The relation last described under `id`.
    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id)
    }

    /// Between a Begin and its Commit: rows seen so far are not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// What `message` means for the copy; `None` for messages that only feed
    /// the decoder (Relation), carry nothing for it (Origin, Type, logical
    /// messages) or concern other tables.
    pub fn decode(&mut self, message: Message) -> Result<Option<Event>, ChangeError> {
        match message {
            Message::Begin(begin) => {
                if let Some(open) = self.open {
                    return Err(ChangeError::NestedBegin { open, next: begin.final_lsn });
                }
                self.open = Some(begin.final_lsn);
                Ok(Some(Event::Begin(begin)))
            }
            Message::Commit(commit) => {
                let begin = self.open.take().ok_or(ChangeError::OutsideTransaction("Commit"))?;
                if begin != commit.commit_lsn {
                    return Err(ChangeError::CommitLsn { begin, commit: commit.commit_lsn });
                }
                Ok(Some(Event::Commit(commit)))
            }
            Message::Relation(relation) => {
                self.relations.insert(relation.id, relation);
                Ok(None)
            }
            Message::Insert(m) => self.row(m.relation_id, RowChange::Insert { new: &m.new }),
            Message::Update(m) => self.row(m.relation_id, RowChange::Update { old: m.old.as_ref(), new: &m.new }),
            Message::Delete(m) => self.row(m.relation_id, RowChange::Delete { old: &m.old }),
            Message::Truncate(m) => {
                self.version("Truncate")?;
                let mut tables = Vec::new();
                for id in m.relation_ids {
                    let relation = self.relations.get(&id).ok_or(ChangeError::UnknownRelation(id))?;
                    tables.extend(table_of(&self.namespace, relation));
                }
                Ok((!tables.is_empty()).then_some(Event::Truncate(tables)))
            }
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => Ok(None),
        }
    }

    fn version(&self, what: &'static str) -> Result<u64, ChangeError> {
        self.open.ok_or(ChangeError::OutsideTransaction(what))
    }

    fn row(&self, relation_id: u32, change: RowChange<'_>) -> Result<Option<Event>, ChangeError> {
        let version = self.version("a row change")?;
        let relation = self.relations.get(&relation_id).ok_or(ChangeError::UnknownRelation(relation_id))?;
        let Some(table) = table_of(&self.namespace, relation) else { return Ok(None) };
        let new = row(table, relation, change, version)?;
        if let RowChange::Update { old: Some(old @ OldTuple::Row(_)), .. } = change {
            let before = row(table, relation, RowChange::Delete { old }, version)?;
            if sort_key(&before) != sort_key(&new) {
                return Ok(Some(Event::Rekeyed(before, new)));
            }
        }
        Ok(Some(Event::Change(new)))
    }
}

/// The columns of ClickHouse's sort key (its partition key is `created_at`'s
/// month, so it is covered).
fn sort_key(change: &Change) -> (&str, &str, &str, chrono::DateTime<chrono::Utc>, &str) {
    match change {
        Change::Session(r) => (&r.organization_id, &r.project_id, &r.environment_id, r.created_at, &r.session_id),
        Change::Run(r) => (&r.organization_id, &r.project_id, &r.environment_id, r.created_at, &r.run_id),
    }
}

/// Which replicated table `relation` is, if any.
fn table_of(namespace: &str, relation: &Relation) -> Option<Table> {
    match (relation.namespace == namespace, relation.name.as_str()) {
        (true, "sessions") => Some(Table::Sessions),
        (true, "task_runs") => Some(Table::Runs),
        _ => None,
    }
}

/// The row `change` leaves in `table` (described by `relation`), versioned
/// `version`.
pub fn row(table: Table, relation: &Relation, change: RowChange<'_>, version: u64) -> Result<Change, ChangeError> {
    let name = match table {
        Table::Sessions => "sessions",
        Table::Runs => "task_runs",
    };
    let (tuple, fallback, deleted) = match change {
        RowChange::Insert { new } => (new, None, false),
        RowChange::Update { old, new } => match old {
            Some(OldTuple::Row(old)) => (new, Some(old), false),
            // A key tuple's other columns are null because they were not
            // sent, not because they are null: nothing to take from it.
            Some(OldTuple::Key(_)) | None => (new, None, false),
        },
        RowChange::Delete { old: OldTuple::Row(old) } => (old, None, true),
        RowChange::Delete { old: OldTuple::Key(_) } => return Err(ChangeError::KeyOnly(name)),
    };
    let image = Image::new(name, relation, tuple, fallback)?;
    let is_deleted = u8::from(deleted);
    Ok(match table {
        Table::Sessions => Change::Session(session_row(&image, version, is_deleted)?),
        Table::Runs => Change::Run(run_row(&image, version, is_deleted)?),
    })
}

/// A `sessions` row, as `SessionRow::from_session` makes it from the same row.
fn session_row(img: &Image<'_>, version: u64, is_deleted: u8) -> Result<SessionRow, ChangeError> {
    Ok(SessionRow {
        session_id: img.req("id", text::uuid)?,
        friendly_id: img.text("friendly_id")?,
        organization_id: img.req("organization_id", text::uuid)?,
        project_id: img.req("project_id", text::uuid)?,
        environment_id: img.req("runtime_environment_id", text::uuid)?,
        environment_type: img.text("environment_type")?,
        kind: img.text("type")?,
        task_identifier: img.text("task_identifier")?,
        external_id: img.opt("external_id", text_value)?,
        tags: img.text_array("tags")?,
        metadata: img.opt("metadata", text::json)?.unwrap_or_default(),
        current_run_id: img.opt("current_run_id", text::uuid)?,
        closed_at: img.opt("closed_at", text::timestamptz)?,
        closed_reason: img.opt("closed_reason", text_value)?,
        expires_at: img.opt("expires_at", text::timestamptz)?,
        created_at: img.req("created_at", text::timestamptz)?,
        updated_at: img.req("updated_at", text::timestamptz)?,
        _version: version,
        _is_deleted: is_deleted,
    })
}

/// A `task_runs` row, as `RunRow::from_run` makes it from the same row.
fn run_row(img: &Image<'_>, version: u64, is_deleted: u8) -> Result<RunRow, ChangeError> {
    let status = img.text("status")?;
    Ok(RunRow {
        run_id: img.req("id", text::uuid)?,
        friendly_id: img.text("friendly_id")?,
        organization_id: img.req("organization_id", text::uuid)?,
        project_id: img.req("project_id", text::uuid)?,
        environment_id: img.req("runtime_environment_id", text::uuid)?,
        session_id: img.opt("session_id", text::uuid)?,
        task_identifier: img.text("task_identifier")?,
        status: RunStatus::parse(&status).ok_or(ChangeError::UnknownStatus(status))?.as_str().to_string(),
        attempt_number: img.req("attempt_number", text::int4)?.max(0) as u32,
        max_attempts: img.req("max_attempts", text::int4)?.max(0) as u32,
        superseded_by: img.opt("superseded_by", text_value)?,
        created_at: img.req("created_at", text::timestamptz)?,
        updated_at: img.req("updated_at", text::timestamptz)?,
        started_at: img.opt("started_at", text::timestamptz)?,
        completed_at: img.opt("completed_at", text::timestamptz)?,
        _version: version,
        _is_deleted: is_deleted,
    })
}

fn text_value(s: &str) -> Result<String, TextError> {
    Ok(s.to_owned())
}

/// A row's values by column name: `tuple`, with unchanged TOASTed values
/// taken from `fallback` (the update's old row).
struct Image<'a> {
    table: &'static str,
    relation: &'a Relation,
    tuple: &'a Tuple,
    fallback: Option<&'a Tuple>,
}

impl<'a> Image<'a> {
    fn new(
        table: &'static str,
        relation: &'a Relation,
        tuple: &'a Tuple,
        fallback: Option<&'a Tuple>,
    ) -> Result<Self, ChangeError> {
        let expected = relation.columns.len();
        for t in std::iter::once(tuple).chain(fallback) {
            if t.0.len() != expected {
                return Err(ChangeError::ColumnCount { table, expected, found: t.0.len() });
            }
        }
        Ok(Image { table, relation, tuple, fallback })
    }

    /// The column's text, `None` when null.
    fn raw(&self, column: &'static str) -> Result<Option<&'a str>, ChangeError> {
        let table = self.table;
        let i = self.relation.column_index(column).ok_or(ChangeError::MissingColumn { table, column })?;
        let datum = match &self.tuple.0[i] {
            Datum::Unchanged => self.fallback.map(|old| &old.0[i]).unwrap_or(&Datum::Unchanged),
            datum => datum,
        };
        match datum {
            Datum::Null => Ok(None),
            Datum::Text(s) => Ok(Some(s)),
            Datum::Unchanged => Err(ChangeError::Unchanged { table, column }),
        }
    }

    fn opt<T>(
        &self,
        column: &'static str,
        parse: impl FnOnce(&str) -> Result<T, TextError>,
    ) -> Result<Option<T>, ChangeError> {
        self.raw(column)?.map(parse).transpose().map_err(|source| ChangeError::Value {
            table: self.table,
            column,
            source,
        })
    }

    fn req<T>(&self, column: &'static str, parse: impl FnOnce(&str) -> Result<T, TextError>) -> Result<T, ChangeError> {
        self.opt(column, parse)?.ok_or(ChangeError::Null { table: self.table, column })
    }

    fn text(&self, column: &'static str) -> Result<String, ChangeError> {
        self.req(column, text_value)
    }

    /// A `text[]` without NULL elements (the rows, like `Vec<String>`, have
    /// no room for them).
    fn text_array(&self, column: &'static str) -> Result<Vec<String>, ChangeError> {
        self.req(column, text::array)?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(ChangeError::NullElement { table: self.table, column })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::{
        Column, Delete, Insert, LogicalMessage, Origin, ReplicaIdentity, Truncate, TypeInfo, Update,
    };
    use crate::runs::store::Run;
    use crate::sessions::model::Session;
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    const SESSIONS: u32 = 100;
    const RUNS: u32 = 200;
    const OTHER: u32 = 300;

    /// Every `sessions` column, in an order of our own, with one the rows do
    /// not read added in the middle.
    const SESSION_COLUMNS: &[&str] = &[
        "updated_at",
        "tags",
        "id",
        "friendly_id",
        "external_id",
        "type",
        "task_identifier",
        "trigger_config",
        "not_in_the_rows",
        "metadata",
        "organization_id",
        "project_id",
        "runtime_environment_id",
        "environment_type",
        "current_run_id",
        "current_run_version",
        "closed_at",
        "closed_reason",
        "expires_at",
        "created_at",
    ];

    const RUN_COLUMNS: &[&str] = &[
        "id",
        "friendly_id",
        "organization_id",
        "project_id",
        "runtime_environment_id",
        "task_identifier",
        "session_id",
        "payload",
        "status",
        "queue",
        "tags",
        "max_attempts",
        "attempt_number",
        "created_at",
        "updated_at",
        "started_at",
        "completed_at",
        "superseded_by",
        "output",
    ];

    fn relation(id: u32, namespace: &str, name: &str, columns: &[&str]) -> Relation {
        Relation {
            id,
            namespace: namespace.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Full,
            columns: columns
                .iter()
                .map(|c| Column { flags: u8::from(*c == "id"), name: (*c).into(), type_oid: 25, type_modifier: -1 })
                .collect(),
        }
    }

    /// A tuple for `columns` from (column, value) pairs; unnamed columns are null.
    fn tuple(columns: &[&str], values: &[(&str, Datum)]) -> Tuple {
        Tuple(
            columns
                .iter()
                .map(|c| values.iter().find(|(name, _)| name == c).map(|(_, d)| d.clone()).unwrap_or(Datum::Null))
                .collect(),
        )
    }

    fn t(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn ids() -> [Uuid; 5] {
        [
            Uuid::parse_str("0190f2a8-1b2c-7d3e-8f40-123456789abc").unwrap(),
            Uuid::parse_str("00000000-0000-0000-0000-000000000001").unwrap(),
            Uuid::parse_str("00000000-0000-0000-0000-000000000002").unwrap(),
            Uuid::parse_str("00000000-0000-0000-0000-000000000003").unwrap(),
            Uuid::parse_str("ffffffff-ffff-ffff-ffff-fffffffffffe").unwrap(),
        ]
    }

    /// A session as Postgres would hand it to sqlx.
    fn session() -> Session {
        let [id, org, project, env, run] = ids();
        Session {
            id,
            friendly_id: "session_abc".into(),
            external_id: Some("chat, \"one\"".into()),
            kind: "chat.agent".into(),
            task_identifier: "echo-agent".into(),
            trigger_config: serde_json::json!({}),
            tags: vec!["a,b".into(), "say \"hi\"".into(), "back\\slash".into(), "NULL".into(), "".into()],
            metadata: Some(serde_json::json!({"user": "u1", "n": [1, 2.5], "nested": {"z": null, "a": true}})),
            organization_id: org,
            project_id: project,
            runtime_environment_id: env,
            environment_type: "DEVELOPMENT".into(),
            current_run_id: Some(run),
            current_run_version: 1,
            current_run_friendly_id: Some("run_xyz".into()),
            closed_at: Some(at("2026-01-02T03:04:05.000006Z")),
            closed_reason: Some("done".into()),
            expires_at: None,
            created_at: at("2026-01-01T00:00:00.123456Z"),
            updated_at: at("2026-01-02T03:04:05.000006Z"),
            channels_closed_at: None,
            read_at: at("2026-01-02T03:04:06Z"),
            read_instant: Default::default(),
        }
    }

    /// The same session as pgoutput sends it (text formats, jsonb spacing,
    /// a non-UTC offset on one timestamp).
    fn session_values() -> Vec<(&'static str, Datum)> {
        vec![
            ("id", t("0190f2a8-1b2c-7d3e-8f40-123456789abc")),
            ("friendly_id", t("session_abc")),
            ("external_id", t("chat, \"one\"")),
            ("type", t("chat.agent")),
            ("task_identifier", t("echo-agent")),
            ("trigger_config", t("{}")),
            ("not_in_the_rows", t("whatever")),
            ("tags", t(r#"{"a,b","say \"hi\"","back\\slash","NULL",""}"#)),
            ("metadata", t(r#"{"n": [1, 2.5], "user": "u1", "nested": {"a": true, "z": null}}"#)),
            ("organization_id", t("00000000-0000-0000-0000-000000000001")),
            ("project_id", t("00000000-0000-0000-0000-000000000002")),
            ("runtime_environment_id", t("00000000-0000-0000-0000-000000000003")),
            ("environment_type", t("DEVELOPMENT")),
            ("current_run_id", t("ffffffff-ffff-ffff-ffff-fffffffffffe")),
            ("current_run_version", t("1")),
            ("closed_at", t("2026-01-02 05:04:05.000006+02")),
            ("closed_reason", t("done")),
            ("expires_at", Datum::Null),
            ("created_at", t("2026-01-01 00:00:00.123456+00")),
            ("updated_at", t("2026-01-02 03:04:05.000006+00")),
        ]
    }

    fn run() -> Run {
        let [id, org, project, env, session] = ids();
        Run {
            id,
            friendly_id: "run_xyz".into(),
            organization_id: org,
            project_id: project,
            runtime_environment_id: env,
            task_identifier: "echo-agent".into(),
            session_id: Some(session),
            session_friendly_id: Some("session_abc".into()),
            payload: serde_json::json!({}),
            status: RunStatus::Executing,
            attempt_number: 2,
            max_attempts: 3,
            max_duration_secs: None,
            ttl_secs: None,
            heartbeat_deadline: None,
            cancel_requested_at: None,
            available_at: at("2026-01-01T00:00:00Z"),
            output: None,
            error: None,
            created_at: at("2026-01-01T00:00:00Z"),
            updated_at: at("2026-01-01T00:00:01.5Z"),
            started_at: Some(at("2026-01-01T00:00:01Z")),
            completed_at: None,
            superseded_by: Some("run_next".into()),
            worker_id: None,
            read_at: at("2026-01-01T00:00:02Z"),
        }
    }

    fn run_values() -> Vec<(&'static str, Datum)> {
        vec![
            ("id", t("0190f2a8-1b2c-7d3e-8f40-123456789abc")),
            ("friendly_id", t("run_xyz")),
            ("organization_id", t("00000000-0000-0000-0000-000000000001")),
            ("project_id", t("00000000-0000-0000-0000-000000000002")),
            ("runtime_environment_id", t("00000000-0000-0000-0000-000000000003")),
            ("task_identifier", t("echo-agent")),
            ("session_id", t("ffffffff-ffff-ffff-ffff-fffffffffffe")),
            ("payload", t("{}")),
            ("status", t("EXECUTING")),
            ("tags", t("{}")),
            ("max_attempts", t("3")),
            ("attempt_number", t("2")),
            ("created_at", t("2026-01-01 00:00:00+00")),
            ("updated_at", t("2026-01-01 00:00:01.5+00")),
            ("started_at", t("2026-01-01 00:00:01+00")),
            ("completed_at", Datum::Null),
            ("superseded_by", t("run_next")),
        ]
    }

    /// A decoder that knows both tables (and one other), inside a transaction
    /// committing at `lsn`.
    fn decoder_in_transaction(lsn: u64) -> Decoder {
        let mut d = Decoder::new("app");
        for rel in [
            relation(SESSIONS, "app", "sessions", SESSION_COLUMNS),
            relation(RUNS, "app", "task_runs", RUN_COLUMNS),
            relation(OTHER, "app", "jobs", &["id"]),
        ] {
            assert_eq!(d.decode(Message::Relation(rel)).unwrap(), None);
        }
        d.decode(Message::Begin(Begin { final_lsn: lsn, commit_time: at("2026-01-01T00:00:00Z"), xid: 9 })).unwrap();
        d
    }

    fn insert(relation_id: u32, new: Tuple) -> Message {
        Message::Insert(Insert { relation_id, new })
    }

    fn session_change(d: &mut Decoder, msg: Message) -> SessionRow {
        match d.decode(msg).unwrap() {
            Some(Event::Change(Change::Session(row))) => row,
            other => panic!("not a session change: {other:?}"),
        }
    }

    #[test]
    fn session_insert_matches_from_session() {
        let mut d = decoder_in_transaction(0x1_0000_0100);
        let row = session_change(&mut d, insert(SESSIONS, tuple(SESSION_COLUMNS, &session_values())));
        assert_eq!(row, SessionRow::from_session(&session(), 0x1_0000_0100));
    }

    #[test]
    fn column_order_is_irrelevant() {
        let reversed: Vec<&str> = SESSION_COLUMNS.iter().rev().copied().collect();
        let mut d = decoder_in_transaction(7);
        d.decode(Message::Relation(relation(SESSIONS, "app", "sessions", &reversed))).unwrap();
        let row = session_change(&mut d, insert(SESSIONS, tuple(&reversed, &session_values())));
        assert_eq!(row, SessionRow::from_session(&session(), 7));
    }

    #[test]
    fn nulls_and_empty_values() {
        let mut values = session_values();
        for (name, value) in values.iter_mut() {
            match *name {
                "external_id" | "metadata" | "current_run_id" | "closed_at" | "closed_reason" => *value = Datum::Null,
                "tags" => *value = t("{}"),
                "expires_at" => *value = t("2027-01-01 00:00:00+00"),
                _ => {}
            }
        }
        let mut d = decoder_in_transaction(7);
        let row = session_change(&mut d, insert(SESSIONS, tuple(SESSION_COLUMNS, &values)));
        let mut expected = session();
        expected.external_id = None;
        expected.metadata = None;
        expected.current_run_id = None;
        expected.closed_at = None;
        expected.closed_reason = None;
        expected.tags = vec![];
        expected.expires_at = Some(at("2027-01-01T00:00:00Z"));
        assert_eq!(row, SessionRow::from_session(&expected, 7));
        assert_eq!(row.metadata, "");
    }

    #[test]
    fn run_insert_matches_from_run() {
        let mut d = decoder_in_transaction(42);
        let Some(Event::Change(Change::Run(row))) = d.decode(insert(RUNS, tuple(RUN_COLUMNS, &run_values()))).unwrap()
        else {
            panic!("not a run change")
        };
        assert_eq!(row, RunRow::from_run(&run(), 42));
    }

    #[test]
    fn update_takes_unchanged_toast_from_the_old_row() {
        let mut d = decoder_in_transaction(8);
        let old = tuple(SESSION_COLUMNS, &session_values());
        let mut new_values = session_values();
        for (name, value) in new_values.iter_mut() {
            match *name {
                "metadata" => *value = Datum::Unchanged,
                "tags" => *value = t("{x}"),
                _ => {}
            }
        }
        let new = tuple(SESSION_COLUMNS, &new_values);
        let update = |old| Message::Update(Update { relation_id: SESSIONS, old, new: new.clone() });
        let row = session_change(&mut d, update(Some(OldTuple::Row(old.clone()))));
        let mut expected = session();
        expected.tags = vec!["x".into()];
        assert_eq!(row, SessionRow::from_session(&expected, 8));

        // Without the old row (or with the key only) nothing holds the value.
        let missing = ChangeError::Unchanged { table: "sessions", column: "metadata" };
        assert_eq!(d.decode(update(None)), Err(missing.clone()));
        assert_eq!(d.decode(update(Some(OldTuple::Key(old)))), Err(missing));
    }

    #[test]
    fn an_update_that_moves_the_sort_key_also_deletes_the_old_key() {
        let mut d = decoder_in_transaction(10);
        let old = tuple(SESSION_COLUMNS, &session_values());
        let mut moved = session_values();
        for (name, value) in moved.iter_mut() {
            if *name == "created_at" {
                *value = t("2025-11-20 00:00:00+00");
            }
        }
        let new = tuple(SESSION_COLUMNS, &moved);
        let event =
            d.decode(Message::Update(Update { relation_id: SESSIONS, old: Some(OldTuple::Row(old.clone())), new }));
        let mut expected = session();
        expected.created_at = at("2025-11-20T00:00:00Z");
        assert_eq!(
            event.unwrap(),
            Some(Event::Rekeyed(
                Change::Session(SessionRow { _is_deleted: 1, ..SessionRow::from_session(&session(), 10) }),
                Change::Session(SessionRow::from_session(&expected, 10)),
            ))
        );
        // An update inside the same sort key is a plain change.
        let same = Message::Update(Update { relation_id: SESSIONS, old: Some(OldTuple::Row(old.clone())), new: old });
        assert!(matches!(d.decode(same).unwrap(), Some(Event::Change(_))));
    }

    #[test]
    fn unchanged_in_an_unread_column_is_fine() {
        let mut d = decoder_in_transaction(8);
        let mut values = session_values();
        values.retain(|(name, _)| *name != "trigger_config");
        values.push(("trigger_config", Datum::Unchanged));
        let new = tuple(SESSION_COLUMNS, &values);
        let row = session_change(&mut d, Message::Update(Update { relation_id: SESSIONS, old: None, new }));
        assert_eq!(row, SessionRow::from_session(&session(), 8));
    }

    #[test]
    fn delete_yields_the_old_row_marked_deleted() {
        let mut d = decoder_in_transaction(9);
        let old = tuple(SESSION_COLUMNS, &session_values());
        let row =
            session_change(&mut d, Message::Delete(Delete { relation_id: SESSIONS, old: OldTuple::Row(old.clone()) }));
        assert_eq!(row, SessionRow { _is_deleted: 1, ..SessionRow::from_session(&session(), 9) });

        let run_old = tuple(RUN_COLUMNS, &run_values());
        let deleted = d.decode(Message::Delete(Delete { relation_id: RUNS, old: OldTuple::Row(run_old) })).unwrap();
        assert_eq!(deleted, Some(Event::Change(Change::Run(RunRow { _is_deleted: 1, ..RunRow::from_run(&run(), 9) }))));

        let key_only = Message::Delete(Delete { relation_id: SESSIONS, old: OldTuple::Key(old) });
        assert_eq!(d.decode(key_only), Err(ChangeError::KeyOnly("sessions")));
    }

    #[test]
    fn bad_values_name_their_column() {
        let cases: &[(&str, Datum, ChangeError)] = &[
            ("friendly_id", Datum::Null, ChangeError::Null { table: "sessions", column: "friendly_id" }),
            ("tags", Datum::Null, ChangeError::Null { table: "sessions", column: "tags" }),
            ("tags", t("{a,NULL}"), ChangeError::NullElement { table: "sessions", column: "tags" }),
            (
                "tags",
                t("{a"),
                ChangeError::Value { table: "sessions", column: "tags", source: TextError::Array("no closing brace") },
            ),
            (
                "project_id",
                t("x"),
                ChangeError::Value { table: "sessions", column: "project_id", source: TextError::Uuid },
            ),
            ("created_at", Datum::Unchanged, ChangeError::Unchanged { table: "sessions", column: "created_at" }),
        ];
        for (column, datum, expected) in cases {
            let mut values = session_values();
            values.retain(|(name, _)| name != column);
            values.push((column, datum.clone()));
            let mut d = decoder_in_transaction(1);
            assert_eq!(d.decode(insert(SESSIONS, tuple(SESSION_COLUMNS, &values))), Err(expected.clone()), "{column}");
        }
        let mut d = decoder_in_transaction(1);
        let bad_json = session_values()
            .into_iter()
            .map(|(name, v)| if name == "metadata" { (name, t("{nope")) } else { (name, v) })
            .collect::<Vec<_>>();
        assert!(matches!(
            d.decode(insert(SESSIONS, tuple(SESSION_COLUMNS, &bad_json))),
            Err(ChangeError::Value { column: "metadata", source: TextError::Json(_), .. })
        ));

        let mut values = run_values();
        values.retain(|(name, _)| *name != "status");
        values.push(("status", t("DANCING")));
        assert_eq!(
            d.decode(insert(RUNS, tuple(RUN_COLUMNS, &values))),
            Err(ChangeError::UnknownStatus("DANCING".into()))
        );
        let mut values = run_values();
        values.retain(|(name, _)| *name != "attempt_number");
        values.push(("attempt_number", t("1.5")));
        assert_eq!(
            d.decode(insert(RUNS, tuple(RUN_COLUMNS, &values))),
            Err(ChangeError::Value { table: "task_runs", column: "attempt_number", source: TextError::Int })
        );
    }

    #[test]
    fn shape_errors() {
        let mut d = decoder_in_transaction(1);
        let short: Vec<&str> = SESSION_COLUMNS.iter().copied().filter(|c| *c != "closed_reason").collect();
        d.decode(Message::Relation(relation(SESSIONS, "app", "sessions", &short))).unwrap();
        assert_eq!(
            d.decode(insert(SESSIONS, tuple(&short, &session_values()))),
            Err(ChangeError::MissingColumn { table: "sessions", column: "closed_reason" })
        );
        assert_eq!(
            d.decode(insert(SESSIONS, Tuple(vec![Datum::Null]))),
            Err(ChangeError::ColumnCount { table: "sessions", expected: short.len(), found: 1 })
        );
        assert_eq!(d.decode(insert(999, Tuple(vec![]))), Err(ChangeError::UnknownRelation(999)));
    }

    #[test]
    fn other_tables_and_schemas_are_skipped() {
        let mut d = decoder_in_transaction(1);
        assert_eq!(d.decode(insert(OTHER, Tuple(vec![t("x")]))), Ok(None));
        d.decode(Message::Relation(relation(SESSIONS, "public", "sessions", SESSION_COLUMNS))).unwrap();
        assert_eq!(d.decode(insert(SESSIONS, tuple(SESSION_COLUMNS, &session_values()))), Ok(None));
    }

    #[test]
    fn transaction_boundaries() {
        let mut d = decoder_in_transaction(0x50);
        assert_eq!(
            d.decode(Message::Begin(Begin { final_lsn: 0x60, commit_time: at("2026-01-01T00:00:00Z"), xid: 1 })),
            Err(ChangeError::NestedBegin { open: 0x50, next: 0x60 })
        );
        let commit =
            |lsn| Commit { flags: 0, commit_lsn: lsn, end_lsn: lsn + 0x30, commit_time: at("2026-01-01T00:00:00Z") };
        assert!(d.in_transaction());
        assert_eq!(d.decode(Message::Commit(commit(0x50))), Ok(Some(Event::Commit(commit(0x50)))));
        assert!(!d.in_transaction());
        assert_eq!(d.decode(Message::Commit(commit(0x50))), Err(ChangeError::OutsideTransaction("Commit")));
        assert_eq!(
            d.decode(insert(SESSIONS, tuple(SESSION_COLUMNS, &session_values()))),
            Err(ChangeError::OutsideTransaction("a row change"))
        );
        let begin = Begin { final_lsn: 0x70, commit_time: at("2026-01-01T00:00:01Z"), xid: 2 };
        assert_eq!(d.decode(Message::Begin(begin.clone())), Ok(Some(Event::Begin(begin))));
        assert_eq!(d.decode(Message::Commit(commit(0x71))), Err(ChangeError::CommitLsn { begin: 0x70, commit: 0x71 }));
    }

    #[test]
    fn truncate_names_only_replicated_tables() {
        let mut d = decoder_in_transaction(1);
        let truncate = |relation_ids| Message::Truncate(Truncate { options: 0, relation_ids });
        assert_eq!(
            d.decode(truncate(vec![OTHER, RUNS, SESSIONS])),
            Ok(Some(Event::Truncate(vec![Table::Runs, Table::Sessions])))
        );
        assert_eq!(d.decode(truncate(vec![OTHER])), Ok(None));
        assert_eq!(d.decode(truncate(vec![12345])), Err(ChangeError::UnknownRelation(12345)));
    }

    #[test]
    fn messages_without_rows_are_skipped() {
        let mut d = decoder_in_transaction(1);
        let skipped = [
            Message::Origin(Origin { commit_lsn: 1, name: "elsewhere".into() }),
            Message::Type(TypeInfo { oid: 70000, namespace: "app".into(), name: "mood".into() }),
            Message::Message(LogicalMessage { flags: 1, lsn: 1, prefix: "p".into(), content: vec![1] }),
        ];
        for m in skipped {
            assert_eq!(d.decode(m), Ok(None));
        }
    }
}
