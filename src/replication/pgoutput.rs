//! Decoding of the `pgoutput` plugin's messages, protocol version 1 (the
//! PostgreSQL manual's "Logical Replication Message Formats").
//!
//! The transport hands over each XLogData payload as raw bytes; [`decode`]
//! turns one payload into a [`Message`]. It is strict: a short, overlong or
//! unknown message is a [`DecodeError`], never a panic and never a guess, since
//! a misread change would be written to ClickHouse as if it were true.
//!
//! Tuples are expected in text format (the default; we never ask for
//! `binary`), so a binary value is an error rather than bytes nobody reads.

use chrono::{DateTime, Utc};

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    /// A logical decoding message (`pg_logical_emit_message`), sent only when
    /// the `messages` option is on.
    Message(LogicalMessage),
}

/// Start of a transaction. `final_lsn` is the LSN of its commit record, the
/// same value its [`Commit`] carries as `commit_lsn`.
#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    pub final_lsn: u64,
    pub commit_time: DateTime<Utc>,
    pub xid: u32,
}

/// End of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Unused by PostgreSQL so far (always 0).
    pub flags: u8,
    pub commit_lsn: u64,
    /// The LSN just past the commit record: where to resume after it.
    pub end_lsn: u64,
    pub commit_time: DateTime<Utc>,
}

/// The transaction came from another node (only with replication origins).
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub commit_lsn: u64,
    pub name: String,
}

/// A table's shape. Sent before the first change of a table in a decoding
/// session and again whenever the table changes, so receivers cache it by id.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// Position of the column named `name` in this relation's tuples.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// What an UPDATE or DELETE carries of the old row (`REPLICA IDENTITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key.
    Default,
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Bit 0 set: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl Column {
    pub fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// A non-builtin data type used by a relation that follows.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeInfo {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub relation_id: u32,
    /// Present when the key changed (`Key`) or the table is `REPLICA IDENTITY
    /// FULL` (`Row`).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

/// The old row of an UPDATE or DELETE, as the table's replica identity allows.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity key's columns; the others are null.
    Key(Tuple),
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Row(Tuple),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    /// Bit 0 set: the message was emitted inside the transaction.
    pub flags: u8,
    pub lsn: u64,
    pub prefix: String,
    pub content: Vec<u8>,
}

/// A row's values in the relation's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<Datum>);

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value the UPDATE did not change: not sent, take it from the
    /// old row if one came.
    Unchanged,
    /// The value in the type's text output format.
    Text(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {:?}", char::from(*.0))]
    UnknownMessage(u8),
    #[error("message ends inside its {0}")]
    Truncated(&'static str),
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
    #[error("{0} is not terminated")]
    UnterminatedString(&'static str),
    #[error("{0} is not UTF-8")]
    InvalidUtf8(&'static str),
    #[error("negative {0}")]
    Negative(&'static str),
    #[error("unknown replica identity {:?}", char::from(*.0))]
    UnknownReplicaIdentity(u8),
    #[error("expected {expected} but found {:?}", char::from(*.found))]
    UnexpectedMarker { expected: &'static str, found: u8 },
    #[error("unknown value kind {:?} in column {column}", char::from(*.kind))]
    UnknownDatum { column: usize, kind: u8 },
    #[error("column {0} holds a binary value; the decoder expects text format")]
    BinaryDatum(usize),
    #[error("timestamp {0} is out of range")]
    TimestampOutOfRange(i64),
}

/// Decodes one pgoutput message (an XLogData payload).
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf: rest };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: timestamp(r.i64("commit timestamp")?)?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time: timestamp(r.i64("commit timestamp")?)?,
        }),
        b'O' => Message::Origin(Origin { commit_lsn: r.u64("origin LSN")?, name: r.cstr("origin name")? }),
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type(TypeInfo {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.marker(b'N', "new tuple marker 'N'")?;
            Message::Insert(Insert { relation_id, new: tuple(&mut r)? })
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let old = match r.u8("tuple marker")? {
                b'N' => None,
                b'K' => Some(OldTuple::Key(tuple(&mut r)?)),
                b'O' => Some(OldTuple::Row(tuple(&mut r)?)),
                found => return Err(DecodeError::UnexpectedMarker { expected: "tuple marker 'K', 'O' or 'N'", found }),
            };
            if old.is_some() {
                r.marker(b'N', "new tuple marker 'N'")?;
            }
            Message::Update(Update { relation_id, old, new: tuple(&mut r)? })
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(tuple(&mut r)?),
                b'O' => OldTuple::Row(tuple(&mut r)?),
                found => return Err(DecodeError::UnexpectedMarker { expected: "tuple marker 'K' or 'O'", found }),
            };
            Message::Delete(Delete { relation_id, old })
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            // Each id takes 4 bytes: a count the message cannot hold is caught
            // before anything is allocated for it.
            if r.buf.len() / 4 < count as usize {
                return Err(DecodeError::Truncated("relation ids"));
            }
            let relation_ids = (0..count).map(|_| r.u32("relation id")).collect::<Result<_, _>>()?;
            Message::Truncate(Truncate { options, relation_ids })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.len("message length")?;
            let content = r.take(len, "message content")?.to_vec();
            Message::Message(LogicalMessage { flags, lsn, prefix, content })
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    match r.buf.len() {
        0 => Ok(message),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's epoch.
pub fn timestamp(micros: i64) -> Result<DateTime<Utc>, DecodeError> {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    micros
        .checked_add(PG_EPOCH_UNIX_MICROS)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or(DecodeError::TimestampOutOfRange(micros))
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = match r.u8("replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        other => return Err(DecodeError::UnknownReplicaIdentity(other)),
    };
    let count = r.count("column count")?;
    let mut columns = Vec::with_capacity(count.min(r.buf.len()));
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation { id, namespace, name, replica_identity, columns })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.count("tuple column count")?;
    let mut datums = Vec::with_capacity(count.min(r.buf.len()));
    for column in 0..count {
        datums.push(match r.u8("value kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::Unchanged,
            b't' => {
                let len = r.len("value length")?;
                let bytes = r.take(len, "text value")?;
                Datum::Text(std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8("text value"))?.to_owned())
            }
            b'b' => return Err(DecodeError::BinaryDatum(column)),
            kind => return Err(DecodeError::UnknownDatum { column, kind }),
        });
    }
    Ok(Tuple(datums))
}

/// Big-endian reads off the front of a message; each names what it reads, so
/// a short message says where it ended.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn marker(&mut self, expected_byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        match self.u8(expected)? {
            found if found == expected_byte => Ok(()),
            found => Err(DecodeError::UnexpectedMarker { expected, found }),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An Int16 count of columns.
    fn count(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| DecodeError::Negative(what))
    }

    /// An Int32 byte length.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| DecodeError::Negative(what))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(DecodeError::UnterminatedString(what))?;
        let text = std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::InvalidUtf8(what))?.to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    /// Builds messages byte by byte, as PostgreSQL writes them.
    #[derive(Default)]
    struct Msg(Vec<u8>);

    impl Msg {
        fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn cstr(mut self, v: &str) -> Self {
            self.0.extend(v.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend(v);
            self
        }
        /// Tuple data: `None` null, `Some(None)` unchanged TOAST, `Some(Some(t))` text.
        fn tuple(mut self, values: &[Option<Option<&str>>]) -> Self {
            self = self.i16(values.len() as i16);
            for v in values {
                self = match v {
                    None => self.u8(b'n'),
                    Some(None) => self.u8(b'u'),
                    Some(Some(t)) => self.u8(b't').i32(t.len() as i32).raw(t.as_bytes()),
                };
            }
            self
        }
    }

    fn t(s: &str) -> Datum {
        Datum::Text(s.into())
    }

    /// 2026-01-02 03:04:05.678901 UTC in PostgreSQL's microseconds.
    const WHEN_MICROS: i64 = 820_638_245_678_901;

    fn when() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::microseconds(678_901)
    }

    #[test]
    fn timestamps_count_from_2000() {
        assert_eq!(timestamp(0).unwrap(), Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(
            timestamp(-1).unwrap(),
            Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap() + chrono::Duration::microseconds(999_999)
        );
        assert_eq!(timestamp(WHEN_MICROS).unwrap(), when());
        assert_eq!(timestamp(i64::MAX), Err(DecodeError::TimestampOutOfRange(i64::MAX)));
    }

    #[test]
    fn begin_and_commit() {
        let begin = Msg::new(b'B').i64(0x1_0000_0010).i64(WHEN_MICROS).i32(777);
        assert_eq!(
            decode(&begin.0).unwrap(),
            Message::Begin(Begin { final_lsn: 0x1_0000_0010, commit_time: when(), xid: 777 })
        );
        let commit = Msg::new(b'C').u8(0).i64(0x1_0000_0010).i64(0x1_0000_0040).i64(WHEN_MICROS);
        assert_eq!(
            decode(&commit.0).unwrap(),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: 0x1_0000_0010,
                end_lsn: 0x1_0000_0040,
                commit_time: when()
            })
        );
    }

    #[test]
    fn relation_with_columns() {
        let msg = Msg::new(b'R')
            .i32(16384)
            .cstr("public")
            .cstr("sessions")
            .u8(b'f')
            .i16(2)
            .u8(1)
            .cstr("id")
            .i32(2950)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .i32(1043)
            .i32(68);
        let Message::Relation(rel) = decode(&msg.0).unwrap() else { panic!("not a relation") };
        assert_eq!(rel.id, 16384);
        assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("public", "sessions"));
        assert_eq!(rel.replica_identity, ReplicaIdentity::Full);
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key() && !rel.columns[1].is_key());
        assert_eq!(
            (rel.columns[0].name.as_str(), rel.columns[0].type_oid, rel.columns[0].type_modifier),
            ("id", 2950, -1)
        );
        assert_eq!(
            (rel.columns[1].name.as_str(), rel.columns[1].type_oid, rel.columns[1].type_modifier),
            ("name", 1043, 68)
        );
        assert_eq!(rel.column_index("name"), Some(1));
        assert_eq!(rel.column_index("nope"), None);

        for (byte, identity) in
            [(b'd', ReplicaIdentity::Default), (b'n', ReplicaIdentity::Nothing), (b'i', ReplicaIdentity::Index)]
        {
            let msg = Msg::new(b'R').i32(1).cstr("").cstr("t").u8(byte).i16(0);
            let Message::Relation(rel) = decode(&msg.0).unwrap() else { panic!("not a relation") };
            assert_eq!(rel.replica_identity, identity);
        }
        let bad = Msg::new(b'R').i32(1).cstr("").cstr("t").u8(b'x').i16(0);
        assert_eq!(decode(&bad.0), Err(DecodeError::UnknownReplicaIdentity(b'x')));
    }

    #[test]
    fn insert_with_every_tuple_kind() {
        let msg = Msg::new(b'I').i32(5).u8(b'N').tuple(&[Some(Some("a b")), None, Some(None), Some(Some(""))]);
        assert_eq!(
            decode(&msg.0).unwrap(),
            Message::Insert(Insert {
                relation_id: 5,
                new: Tuple(vec![t("a b"), Datum::Null, Datum::Unchanged, t("")])
            })
        );
        let utf8 = Msg::new(b'I').i32(5).u8(b'N').tuple(&[Some(Some("ünï ✓"))]);
        let Message::Insert(ins) = decode(&utf8.0).unwrap() else { panic!("not an insert") };
        assert_eq!(ins.new, Tuple(vec![t("ünï ✓")]));
    }

    #[test]
    fn update_without_with_key_and_with_old_row() {
        let plain = Msg::new(b'U').i32(7).u8(b'N').tuple(&[Some(Some("1")), Some(None)]);
        assert_eq!(
            decode(&plain.0).unwrap(),
            Message::Update(Update { relation_id: 7, old: None, new: Tuple(vec![t("1"), Datum::Unchanged]) })
        );
        let key =
            Msg::new(b'U').i32(7).u8(b'K').tuple(&[Some(Some("0")), None]).u8(b'N').tuple(&[Some(Some("1")), None]);
        assert_eq!(
            decode(&key.0).unwrap(),
            Message::Update(Update {
                relation_id: 7,
                old: Some(OldTuple::Key(Tuple(vec![t("0"), Datum::Null]))),
                new: Tuple(vec![t("1"), Datum::Null]),
            })
        );
        let full = Msg::new(b'U')
            .i32(7)
            .u8(b'O')
            .tuple(&[Some(Some("1")), Some(Some("big"))])
            .u8(b'N')
            .tuple(&[Some(Some("1")), Some(None)]);
        assert_eq!(
            decode(&full.0).unwrap(),
            Message::Update(Update {
                relation_id: 7,
                old: Some(OldTuple::Row(Tuple(vec![t("1"), t("big")]))),
                new: Tuple(vec![t("1"), Datum::Unchanged]),
            })
        );
        let no_new = Msg::new(b'U').i32(7).u8(b'O').tuple(&[]).u8(b'O').tuple(&[]);
        assert!(matches!(decode(&no_new.0), Err(DecodeError::UnexpectedMarker { found: b'O', .. })));
        let bad_marker = Msg::new(b'U').i32(7).u8(b'X').tuple(&[]);
        assert!(matches!(decode(&bad_marker.0), Err(DecodeError::UnexpectedMarker { found: b'X', .. })));
    }

    #[test]
    fn delete_with_key_or_old_row() {
        let key = Msg::new(b'D').i32(9).u8(b'K').tuple(&[Some(Some("k")), None]);
        assert_eq!(
            decode(&key.0).unwrap(),
            Message::Delete(Delete { relation_id: 9, old: OldTuple::Key(Tuple(vec![t("k"), Datum::Null])) })
        );
        let full = Msg::new(b'D').i32(9).u8(b'O').tuple(&[Some(Some("k")), Some(Some("v"))]);
        assert_eq!(
            decode(&full.0).unwrap(),
            Message::Delete(Delete { relation_id: 9, old: OldTuple::Row(Tuple(vec![t("k"), t("v")])) })
        );
        let new_only = Msg::new(b'D').i32(9).u8(b'N').tuple(&[]);
        assert!(matches!(decode(&new_only.0), Err(DecodeError::UnexpectedMarker { found: b'N', .. })));
    }

    #[test]
    fn truncate_lists_relations() {
        let msg = Msg::new(b'T').i32(2).u8(3).i32(10).i32(11);
        assert_eq!(decode(&msg.0).unwrap(), Message::Truncate(Truncate { options: 3, relation_ids: vec![10, 11] }));
        // A count far beyond the bytes present fails without allocating for it.
        let huge = Msg::new(b'T').i32(-1).u8(0).i32(10);
        assert_eq!(decode(&huge.0), Err(DecodeError::Truncated("relation ids")));
    }

    #[test]
    fn origin_type_and_message_decode_whole() {
        let origin = Msg::new(b'O').i64(42).cstr("node-a");
        assert_eq!(decode(&origin.0).unwrap(), Message::Origin(Origin { commit_lsn: 42, name: "node-a".into() }));
        let ty = Msg::new(b'Y').i32(70000).cstr("public").cstr("mood");
        assert_eq!(
            decode(&ty.0).unwrap(),
            Message::Type(TypeInfo { oid: 70000, namespace: "public".into(), name: "mood".into() })
        );
        let m = Msg::new(b'M').u8(1).i64(99).cstr("sessiond").i32(3).raw(b"a\0b");
        assert_eq!(
            decode(&m.0).unwrap(),
            Message::Message(LogicalMessage {
                flags: 1,
                lsn: 99,
                prefix: "sessiond".into(),
                content: b"a\0b".to_vec()
            })
        );
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        // Streaming and two-phase messages belong to later protocol versions.
        assert_eq!(decode(b"S\0\0\0\0\0"), Err(DecodeError::UnknownMessage(b'S')));
        assert_eq!(decode(&Msg::new(b'B').i64(1).0), Err(DecodeError::Truncated("commit timestamp")));
        let long = Msg::new(b'B').i64(1).i64(0).i32(1).u8(0);
        assert_eq!(decode(&long.0), Err(DecodeError::TrailingBytes(1)));
        let unterminated = Msg::new(b'O').i64(1).raw(b"abc");
        assert_eq!(decode(&unterminated.0), Err(DecodeError::UnterminatedString("origin name")));
        let bad_name = Msg::new(b'O').i64(1).raw(b"\xff\0");
        assert_eq!(decode(&bad_name.0), Err(DecodeError::InvalidUtf8("origin name")));
        let binary = Msg::new(b'I').i32(1).u8(b'N').i16(2).u8(b'n').u8(b'b').i32(1).u8(7);
        assert_eq!(decode(&binary.0), Err(DecodeError::BinaryDatum(1)));
        let unknown = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b'q');
        assert_eq!(decode(&unknown.0), Err(DecodeError::UnknownDatum { column: 0, kind: b'q' }));
        let negative_len = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(-1);
        assert_eq!(decode(&negative_len.0), Err(DecodeError::Negative("value length")));
        let overlong = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(i32::MAX).raw(b"abc");
        assert_eq!(decode(&overlong.0), Err(DecodeError::Truncated("text value")));
        let negative_count = Msg::new(b'I').i32(1).u8(b'N').i16(-1);
        assert_eq!(decode(&negative_count.0), Err(DecodeError::Negative("tuple column count")));
        let bad_text = Msg::new(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(1).u8(0xff);
        assert_eq!(decode(&bad_text.0), Err(DecodeError::InvalidUtf8("text value")));
        let short_tuple = Msg::new(b'I').i32(1).u8(b'N').i16(3).u8(b'n');
        assert_eq!(decode(&short_tuple.0), Err(DecodeError::Truncated("value kind")));
        let no_marker = Msg::new(b'I').i32(1).u8(b'O').tuple(&[]);
        assert!(matches!(decode(&no_marker.0), Err(DecodeError::UnexpectedMarker { found: b'O', .. })));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        /// Random bodies behind every known tag, so the fuzzing reaches past
        /// the first byte.
        #[test]
        fn random_bodies_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = decode(&bytes);
        }

        /// Valid inserts with random values decode to exactly those values.
        #[test]
        fn inserts_round_trip(values in proptest::collection::vec(proptest::option::of(proptest::option::of(".*")), 0..20)) {
            let borrowed: Vec<Option<Option<&str>>> =
                values.iter().map(|v| v.as_ref().map(|o| o.as_deref())).collect();
            let msg = Msg::new(b'I').i32(3).u8(b'N').tuple(&borrowed);
            let expected: Vec<Datum> = values
                .iter()
                .map(|v| match v {
                    None => Datum::Null,
                    Some(None) => Datum::Unchanged,
                    Some(Some(s)) => Datum::Text(s.clone()),
                })
                .collect();
            prop_assert_eq!(decode(&msg.0), Ok(Message::Insert(Insert { relation_id: 3, new: Tuple(expected) })));
        }
    }
}
