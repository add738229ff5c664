//! pgoutput decoding against real Postgres: a publication and a logical slot
//! on the test's own schema, real writes through the API (and a delete in
//! SQL), the slot's raw pgoutput bytes decoded, and every row compared with
//! what the backfill makes of the same Postgres row.

use std::collections::HashMap;
use std::time::Duration;

use futures::FutureExt;
use serde_json::{json, Value};
use sessiond::analytics::rows::{parse_lsn, RunRow, SessionRow};
use sessiond::replication::decode::{Change, Decoder, Event};
use sessiond::replication::pgoutput::{self, Datum, Message, OldTuple};
use sessiond::runs::store::Run;
use sessiond::sessions::model::Session;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use uuid::Uuid;

use crate::common::{database_url, eventually, session_body, TestApp};

/// A publication of the test schema's `sessions` and `task_runs` and a
/// pgoutput slot reading it. Both live database-wide, so names are unique.
struct Slot {
    name: String,
    publication: String,
}

impl Slot {
    async fn create(app: &TestApp) -> Slot {
        let suffix = Uuid::new_v4().simple();
        let slot = Slot { name: format!("sessiond_test_{suffix}"), publication: format!("sessiond_test_{suffix}") };
        for table in ["sessions", "task_runs"] {
            sqlx::query(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")).execute(app.db()).await.unwrap();
        }
        // The pool's search_path is the test's schema.
        sqlx::query(&format!("CREATE PUBLICATION {} FOR TABLE sessions, task_runs", slot.publication))
            .execute(app.db())
            .await
            .unwrap();
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot.name)
            .execute(app.db())
            .await
            .unwrap();
        slot
    }

    /// Consumes what the slot holds: (LSN, xid, pgoutput message) per row.
    /// pgoutput prints timestamps in the reading session's TimeZone, so this
    /// reads on a connection of its own set to a zone west of UTC with half
    /// hours (-03:30, -02:30 in summer): the parser must honour the offset.
    async fn take(&self) -> Vec<(u64, u32, Vec<u8>)> {
        let options: PgConnectOptions = database_url().parse().unwrap();
        let mut conn = options.connect().await.unwrap();
        // sqlx pins TimeZone to UTC at connect; set it afterwards.
        sqlx::query("SET TimeZone = 'America/St_Johns'").execute(&mut conn).await.unwrap();
        let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT lsn::text, xid::text, data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)",
        )
        .bind(&self.name)
        .bind(&self.publication)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        rows.into_iter().map(|(lsn, xid, data)| (parse_lsn(&lsn).unwrap(), xid.parse().unwrap(), data)).collect()
    }

    /// A slot left behind would hold WAL forever: dropped whatever happened.
    async fn remove(self, app: &TestApp) {
        let dropped = sqlx::query("SELECT pg_drop_replication_slot($1)").bind(&self.name).execute(app.db()).await;
        let unpublished =
            sqlx::query(&format!("DROP PUBLICATION IF EXISTS {}", self.publication)).execute(app.db()).await;
        if let Err(e) = dropped.and(unpublished) {
            eprintln!("could not drop replication slot {} / publication: {e}", self.name);
        }
    }
}

/// Everything decoded so far, checked as it arrives.
#[derive(Default)]
struct Stream {
    /// Every row change, in stream order.
    changes: Vec<Change>,
    /// Raw messages, to look at what Postgres sent.
    messages: Vec<Message>,
    transactions: usize,
    last_commit: u64,
    /// (final LSN, xid, commit time) of the open transaction.
    open: Option<(u64, u32, chrono::DateTime<chrono::Utc>)>,
}

impl Stream {
    fn feed(&mut self, decoder: &mut Decoder, taken: Vec<(u64, u32, Vec<u8>)>) {
        for (lsn, xid, data) in taken {
            let message = pgoutput::decode(&data).unwrap_or_else(|e| panic!("decode {data:?}: {e}"));
            self.messages.push(message.clone());
            match decoder.decode(message).unwrap_or_else(|e| panic!("decode at {lsn:#x}: {e}")) {
                Some(Event::Begin(b)) => {
                    assert!(self.open.is_none(), "Begin inside a transaction");
                    assert_eq!(b.xid, xid, "Begin's xid");
                    assert!(b.final_lsn > self.last_commit, "transactions arrive in commit order");
                    let age = chrono::Utc::now() - b.commit_time;
                    assert!(
                        age >= chrono::Duration::zero() && age < chrono::Duration::minutes(5),
                        "commit time {}",
                        b.commit_time
                    );
                    self.open = Some((b.final_lsn, xid, b.commit_time));
                }
                Some(Event::Change(change)) => {
                    let (final_lsn, open_xid, _) = self.open.expect("a change outside a transaction");
                    assert_eq!(open_xid, xid);
                    let version = match &change {
                        Change::Session(s) => s._version,
                        Change::Run(r) => r._version,
                    };
                    assert_eq!(version, final_lsn, "rows carry their transaction's commit LSN");
                    self.changes.push(change);
                }
                Some(Event::Commit(c)) => {
                    let (final_lsn, _, commit_time) = self.open.take().expect("Commit outside a transaction");
                    assert_eq!(c.commit_lsn, final_lsn, "Commit LSN = Begin's final LSN");
                    assert_eq!(c.commit_time, commit_time, "Begin and Commit agree on the commit time");
                    assert!(c.commit_lsn > self.last_commit, "commit LSNs increase");
                    assert!(c.end_lsn > c.commit_lsn, "the commit record ends after it starts");
                    // The SQL interface files a commit under the end of its record.
                    assert_eq!(lsn, c.end_lsn, "Commit's end LSN is where Postgres says it is");
                    self.last_commit = c.commit_lsn;
                    self.transactions += 1;
                }
                Some(Event::Truncate(tables)) => panic!("unexpected truncate of {tables:?}"),
                Some(Event::Rekeyed(old, _)) => panic!("no update here moves a sort key: {old:?}"),
                None => {}
            }
        }
    }

    /// The newest row per id.
    fn latest(&self) -> (HashMap<String, SessionRow>, HashMap<String, RunRow>) {
        let (mut sessions, mut runs) = (HashMap::new(), HashMap::new());
        for change in &self.changes {
            match change {
                Change::Session(s) => {
                    sessions.insert(s.session_id.clone(), s.clone());
                }
                Change::Run(r) => {
                    runs.insert(r.run_id.clone(), r.clone());
                }
            }
        }
        (sessions, runs)
    }

    fn session_history(&self, id: Uuid) -> Vec<&SessionRow> {
        let id = id.to_string();
        self.changes
            .iter()
            .filter_map(|c| match c {
                Change::Session(s) if s.session_id == id => Some(s),
                _ => None,
            })
            .collect()
    }
}

/// The rows the backfill would write for what Postgres holds now, versioned
/// as the decoded rows are (the versions are checked against the stream).
async fn expected_rows(
    app: &TestApp,
    decoded: &(HashMap<String, SessionRow>, HashMap<String, RunRow>),
) -> (HashMap<String, SessionRow>, HashMap<String, RunRow>) {
    let sessions: Vec<Session> =
        sqlx::query_as("SELECT s.*, NULL::text AS current_run_friendly_id, now() AS read_at FROM sessions s")
            .fetch_all(app.db())
            .await
            .unwrap();
    let runs: Vec<Run> =
        sqlx::query_as("SELECT t.*, NULL::text AS session_friendly_id, now() AS read_at FROM task_runs t")
            .fetch_all(app.db())
            .await
            .unwrap();
    let version_of_session = |id: &str| decoded.0.get(id).map_or(0, |r| r._version);
    let version_of_run = |id: &str| decoded.1.get(id).map_or(0, |r| r._version);
    (
        sessions
            .iter()
            .map(|s| {
                let id = s.id.to_string();
                let row = SessionRow::from_session(s, version_of_session(&id));
                (id, row)
            })
            .collect(),
        runs.iter()
            .map(|r| {
                let id = r.id.to_string();
                let row = RunRow::from_run(r, version_of_run(&id));
                (id, row)
            })
            .collect(),
    )
}

#[tokio::test]
async fn pgoutput_from_real_writes_decodes_to_backfill_rows() {
    // No cron: sweeps would keep touching runs while the test waits for quiet.
    let app = TestApp::spawn_without_sweeps().await;
    let slot = Slot::create(&app).await;
    let outcome = std::panic::AssertUnwindSafe(scenario(&app, &slot)).catch_unwind().await;
    slot.remove(&app).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(app: &TestApp, slot: &Slot) {
    let schema = app.state.config.database_schema.clone().expect("tests run in their own schema");
    let mut decoder = Decoder::new(schema);
    let mut stream = Stream::default();

    // Tags and ids that need quoting in an array literal and in JSON.
    let awkward_tags = json!(["a,b", "say \"hi\"", "back\\slash", "NULL", "", "{x}", " spaced ", "ünï"]);
    let mut first = session_body(Some("chat, \"quoted\" one"));
    first["tags"] = awkward_tags.clone();
    first["metadata"] = json!({"user": "u1", "note": "comma, \"quote\"", "nested": {"z": [1, 2.5, null], "a": true}});
    let first = app.create_session(first).await;

    // Metadata far over the TOAST threshold and incompressible: an update
    // that leaves it alone sends it as "unchanged".
    let big: String = (0..600).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let mut second = session_body(Some("toasted"));
    second["metadata"] = json!({ "blob": big });
    let second = app.create_session(second).await;

    let mut third = session_body(None);
    third["tags"] = json!([]);
    third.as_object_mut().unwrap().remove("metadata");
    let third = app.create_session(third).await;

    let id_of = |s: &Value| s["id"].as_str().unwrap().to_string();
    let (first, second, third) = (id_of(&first), id_of(&second), id_of(&third));
    let (first_id, second_id, third_id) =
        (app.session_uuid(&first).await, app.session_uuid(&second).await, app.session_uuid(&third).await);

    let (status, body) =
        app.patch(&format!("/api/v1/sessions/{first}"), &app.a.key, json!({"tags": ["x", "y,z", "\"q\""]})).await;
    assert!(status.is_success(), "patch: {status} {body}");
    let (status, body) =
        app.patch(&format!("/api/v1/sessions/{second}"), &app.a.key, json!({"tags": ["retagged"]})).await;
    assert!(status.is_success(), "patch: {status} {body}");
    let (status, body) =
        app.post(&format!("/api/v1/sessions/{first}/close"), &app.a.key, json!({"reason": "done, \"really\""})).await;
    assert!(status.is_success(), "close: {status} {body}");

    // Delete the third session and its run in SQL, once the run's trigger job
    // is done with it; RETURNING gives the rows exactly as they were deleted.
    let third_run: Uuid = sqlx::query_scalar("SELECT current_run_id FROM sessions WHERE id = $1")
        .bind(third_id)
        .fetch_one(app.db())
        .await
        .unwrap();
    eventually(10, "the third session's run to be enqueued", || async {
        let enqueued: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT enqueued_at FROM task_runs WHERE id = $1")
                .bind(third_run)
                .fetch_one(app.db())
                .await
                .unwrap();
        enqueued.map(|_| ())
    })
    .await;
    let deleted_session: Session = sqlx::query_as(
        "DELETE FROM sessions WHERE id = $1 RETURNING *, NULL::text AS current_run_friendly_id, now() AS read_at",
    )
    .bind(third_id)
    .fetch_one(app.db())
    .await
    .unwrap();
    let deleted_run: Run = sqlx::query_as(
        "DELETE FROM task_runs WHERE id = $1 RETURNING *, NULL::text AS session_friendly_id, now() AS read_at",
    )
    .bind(third_run)
    .fetch_one(app.db())
    .await
    .unwrap();

    // Read the slot until the decoded rows match Postgres (background jobs
    // may still be committing changes right after the API answered).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (decoded, mut expected) = loop {
        stream.feed(&mut decoder, slot.take().await);
        let decoded = stream.latest();
        let expected = expected_rows(app, &decoded).await;
        let live_match = expected.0.iter().all(|(id, row)| decoded.0.get(id) == Some(row))
            && expected.1.iter().all(|(id, row)| decoded.1.get(id) == Some(row));
        if live_match || tokio::time::Instant::now() > deadline {
            break (decoded, expected);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Deleted rows: the row as it was, marked deleted.
    let session_version = decoded.0.get(&third_id.to_string()).map_or(0, |r| r._version);
    let run_version = decoded.1.get(&third_run.to_string()).map_or(0, |r| r._version);
    expected.0.insert(
        third_id.to_string(),
        SessionRow { _is_deleted: 1, ..SessionRow::from_session(&deleted_session, session_version) },
    );
    expected.1.insert(third_run.to_string(), RunRow { _is_deleted: 1, ..RunRow::from_run(&deleted_run, run_version) });
    assert_eq!(expected.0.len(), 3, "three sessions");
    assert_eq!(expected.1.len(), 3, "three runs");
    assert_eq!(decoded.0, expected.0, "sessions: decoded vs backfill rows");
    assert_eq!(decoded.1, expected.1, "runs: decoded vs backfill rows");

    // The stream is whole: ended on a commit, the delete last and newest.
    assert!(stream.open.is_none(), "the last transaction is committed");
    assert!(stream.transactions >= 8, "one transaction per write at least: {}", stream.transactions);
    assert!(session_version > decoded.0[&first_id.to_string()]._version, "the delete came after the close");

    // The intermediate states went by too: created with the awkward tags,
    // retagged, then closed with its reason.
    let history = stream.session_history(first_id);
    let awkward: Vec<String> = serde_json::from_value(awkward_tags).unwrap();
    let tags_seen: Vec<&Vec<String>> = history.iter().map(|s| &s.tags).collect();
    assert_eq!(tags_seen.first(), Some(&&awkward), "created with its tags");
    assert!(tags_seen.iter().any(|t| **t == ["x", "y,z", "\"q\""]), "retagged: {tags_seen:?}");
    assert!(history.iter().all(|s| s.external_id.as_deref() == Some("chat, \"quoted\" one")));
    assert_eq!(history.last().unwrap().closed_reason.as_deref(), Some("done, \"really\""));
    assert!(history.windows(2).all(|w| w[0]._version <= w[1]._version), "versions never go back");

    // Postgres really sent the big metadata as unchanged on the retag, and
    // the decoder took it from the old row.
    let retag_sent_unchanged = stream.messages.iter().any(|m| match m {
        Message::Update(u) => {
            let rel = decoder.relation(u.relation_id).unwrap();
            let meta = rel.column_index("metadata");
            rel.name == "sessions"
                && meta.is_some_and(|i| u.new.0[i] == Datum::Unchanged)
                && matches!(&u.old, Some(OldTuple::Row(old)) if meta.is_some_and(|i| matches!(old.0[i], Datum::Text(_))))
        }
        _ => false,
    });
    assert!(retag_sent_unchanged, "no update sent metadata as an unchanged TOASTed value");
    let zoned = stream.messages.iter().any(|m| match m {
        Message::Insert(i) => {
            i.new.0.iter().any(|d| matches!(d, Datum::Text(t) if t.ends_with("-03:30") || t.ends_with("-02:30")))
        }
        _ => false,
    });
    assert!(zoned, "timestamps came in the reading session's zone");
    let second_history = stream.session_history(second_id);
    assert_eq!(second_history.last().unwrap().tags, ["retagged"]);
    assert!(
        second_history.iter().all(|s| s.metadata.contains(&big)),
        "every version of the second session has its metadata"
    );
}
