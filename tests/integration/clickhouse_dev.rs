//! The ClickHouse dev server (chDB behind ClickHouse's HTTP interface) as the
//! `clickhouse` crate sees it: what dev and tests run against must behave
//! like the real ClickHouse that production uses, or the code paths differ.

use chrono::{DateTime, TimeZone, Utc};
use clickhouse::{error::Error, Client, Compression, Row};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::common::clickhouse::{clickhouse_url, fresh_database, PrivateClickHouse};

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
struct Event {
    id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    session: Uuid,
    kind: String,
    seq: u64,
    flags: u8,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros::option")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(with = "clickhouse::serde::chrono::datetime64::micros")]
    created_at: DateTime<Utc>,
    tags: Vec<String>,
    metadata: String,
}

const EVENTS_DDL: &str = "CREATE TABLE events (
    id String,
    session UUID,
    kind LowCardinality(String),
    seq UInt64,
    flags UInt8,
    finished_at Nullable(DateTime64(6)),
    created_at DateTime64(6),
    tags Array(String),
    metadata String
) ENGINE = MergeTree ORDER BY (session, seq)";

fn event(seq: u64) -> Event {
    // Microsecond values that are not whole seconds, so a lost fraction shows.
    let created = Utc.timestamp_opt(1_760_000_000 + seq as i64, 123_456_000).unwrap();
    Event {
        id: format!("ev-{seq}"),
        session: Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210 + seq as u128),
        kind: if seq.is_multiple_of(2) { "run.started" } else { "run.finished" }.into(),
        seq,
        flags: (seq % 256) as u8,
        finished_at: (seq % 2 == 1).then(|| created + chrono::Duration::microseconds(654_321)),
        created_at: created,
        tags: (0..seq % 3).map(|i| format!("tag-{i}, 'q'")).collect(),
        metadata: serde_json::json!({ "seq": seq, "note": "naïve \"json\"" }).to_string(),
    }
}

async fn insert_events(client: &Client, rows: &[Event]) {
    let mut insert = client.insert::<Event>("events").await.expect("start insert");
    for row in rows {
        insert.write(row).await.expect("write row");
    }
    insert.end().await.expect("end insert");
}

fn bad_response(err: Error) -> String {
    match err {
        Error::BadResponse(msg) => msg,
        other => panic!("expected the crate's BadResponse, got {other:?}"),
    }
}

#[tokio::test]
async fn rows_round_trip_with_validation_on_and_off() {
    let (_db, client) = fresh_database(&clickhouse_url()).await;
    client.query(EVENTS_DDL).execute().await.unwrap();

    // Validation on: DESCRIBE TABLE first, then RowBinaryWithNamesAndTypes.
    let validated: Vec<Event> = (0..5).map(event).collect();
    insert_events(&client, &validated).await;
    // Validation off: plain RowBinary.
    let raw: Vec<Event> = (5..10).map(event).collect();
    insert_events(&client.clone().with_validation(false), &raw).await;

    let expected: Vec<Event> = (0..10).map(event).collect();
    let sql = "SELECT ?fields FROM events ORDER BY seq";
    let read: Vec<Event> = client.query(sql).fetch_all().await.unwrap();
    assert_eq!(read, expected, "read with validation (RowBinaryWithNamesAndTypes)");
    let read: Vec<Event> = client.clone().with_validation(false).query(sql).fetch_all().await.unwrap();
    assert_eq!(read, expected, "read without validation (RowBinary)");

    // The metadata column is JSON text that ClickHouse's JSON functions read.
    let notes: Vec<(u64, String)> = client
        .query("SELECT JSONExtractUInt(metadata, 'seq'), JSONExtractString(metadata, 'note') FROM events ORDER BY seq")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(notes, (0..10).map(|s| (s, "naïve \"json\"".to_string())).collect::<Vec<_>>());
}

#[tokio::test]
async fn replacing_merge_tree_final_hides_old_versions_and_deleted_rows() {
    #[derive(Debug, PartialEq, Row, Serialize, Deserialize)]
    struct Item {
        id: String,
        name: String,
        _version: u64,
        _is_deleted: u8,
    }
    let (_db, client) = fresh_database(&clickhouse_url()).await;
    client
        .query(
            "CREATE TABLE items (id String, name String, _version UInt64, _is_deleted UInt8)
             ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY id",
        )
        .execute()
        .await
        .unwrap();
    let item = |id: &str, name: &str, version: u64, deleted: u8| Item {
        id: id.into(),
        name: name.into(),
        _version: version,
        _is_deleted: deleted,
    };
    // One INSERT each, so every version lands in a part of its own, as the
    // replication feed will write them; the newer version comes first once.
    for row in [
        item("a", "a-old", 1, 0),
        item("b", "b-live", 1, 0),
        item("c", "c-new", 2, 0),
        item("a", "a-new", 2, 0),
        item("b", "b-deleted", 2, 1),
        item("c", "c-old", 1, 0),
    ] {
        let mut insert = client.insert::<Item>("items").await.unwrap();
        insert.write(&row).await.unwrap();
        insert.end().await.unwrap();
    }
    let rows: Vec<Item> = client.query("SELECT ?fields FROM items FINAL ORDER BY id").fetch_all().await.unwrap();
    assert_eq!(rows, vec![item("a", "a-new", 2, 0), item("c", "c-new", 2, 0)]);
}

#[tokio::test]
async fn parameters_are_bound_as_values_never_spliced_into_sql() {
    let (_db, client) = fresh_database(&clickhouse_url()).await;
    // Named x, so the classic payload below would drop it if spliced in.
    client.query("CREATE TABLE x (name String) ENGINE = MergeTree ORDER BY name").execute().await.unwrap();
    let nasty: Vec<String> = [
        "it's",
        r"back\slash \\ \' \n",
        "comma, separated, 'list'",
        "'; DROP TABLE x; --",
        "{name:String}",
        "tab\tnew\nline",
        "naïve 日本語 🎉",
        "plain",
    ]
    .map(String::from)
    .to_vec();
    #[derive(Row, Serialize)]
    struct Name<'a> {
        name: &'a str,
    }
    let mut insert = client.insert::<Name>("x").await.unwrap();
    for name in &nasty {
        insert.write(&Name { name }).await.unwrap();
    }
    insert.end().await.unwrap();

    for value in &nasty {
        let echoed: String = client.query("SELECT {v:String}").param("v", value).fetch_one().await.unwrap();
        assert_eq!(&echoed, value, "the parameter arrives as the exact value");
        let matched: Vec<String> =
            client.query("SELECT name FROM x WHERE name = {v:String}").param("v", value).fetch_all().await.unwrap();
        assert_eq!(&matched, std::slice::from_ref(value), "exactly one row matches {value:?}");
    }

    let wanted = vec![nasty[0].clone(), nasty[3].clone(), nasty[6].clone(), "absent'".to_string()];
    let mut matched: Vec<String> = client
        .query("SELECT name FROM x WHERE has({names:Array(String)}, name)")
        .param("names", &wanted)
        .fetch_all()
        .await
        .unwrap();
    matched.sort();
    let mut expected = wanted[..3].to_vec();
    expected.sort();
    assert_eq!(matched, expected, "an Array(String) parameter");

    let count: u64 = client.query("SELECT count() FROM x").fetch_one().await.unwrap();
    assert_eq!(count, nasty.len() as u64, "the table survived every parameter");
}

#[tokio::test]
async fn describe_table_answers_like_clickhouse() {
    #[derive(Debug, Row, Deserialize)]
    struct Column {
        name: String,
        r#type: String,
        default_type: String,
        default_expression: String,
        comment: String,
        codec_expression: String,
        ttl_expression: String,
    }
    let (_db, client) = fresh_database(&clickhouse_url()).await;
    client.query(EVENTS_DDL).execute().await.unwrap();
    client.query("ALTER TABLE events ADD COLUMN note String DEFAULT 'n/a' COMMENT 'why'").execute().await.unwrap();
    let columns: Vec<Column> = client.query("DESCRIBE TABLE events").fetch_all().await.unwrap();
    let got: Vec<(&str, &str)> = columns.iter().map(|c| (c.name.as_str(), c.r#type.as_str())).collect();
    assert_eq!(
        got,
        [
            ("id", "String"),
            ("session", "UUID"),
            ("kind", "LowCardinality(String)"),
            ("seq", "UInt64"),
            ("flags", "UInt8"),
            ("finished_at", "Nullable(DateTime64(6))"),
            ("created_at", "DateTime64(6)"),
            ("tags", "Array(String)"),
            ("metadata", "String"),
            ("note", "String"),
        ]
    );
    let note = columns.last().unwrap();
    assert_eq!((note.default_type.as_str(), note.default_expression.as_str()), ("DEFAULT", "'n/a'"));
    assert_eq!(note.comment, "why");
    assert!(columns.iter().all(|c| c.codec_expression.is_empty() && c.ttl_expression.is_empty()));
}

#[tokio::test]
async fn errors_carry_code_and_message_and_the_server_keeps_serving() {
    let url = clickhouse_url();
    let (db, client) = fresh_database(&url).await;

    let msg = bad_response(client.query("SELEC 1").execute().await.unwrap_err());
    assert!(msg.starts_with("Code: 62. DB::Exception: Syntax error"), "{msg}");
    assert!(msg.contains("(SYNTAX_ERROR)"), "{msg}");

    let msg = bad_response(client.query("SELECT * FROM no_such_table").fetch_all::<u8>().await.unwrap_err());
    assert!(msg.starts_with("Code: 60. DB::Exception:") && msg.contains("no_such_table"), "{msg}");

    // An insert into a missing table fails at its DESCRIBE TABLE (validation
    // on) or when the server reads the rows (validation off).
    #[derive(Row, Serialize)]
    struct One {
        a: u8,
    }
    let err = client.insert::<One>("no_such_table").await.err().expect("DESCRIBE of a missing table fails");
    assert!(bad_response(err).starts_with("Code: 60."));
    let mut insert = client.clone().with_validation(false).insert::<One>("no_such_table").await.unwrap();
    insert.write(&One { a: 1 }).await.unwrap();
    let msg = bad_response(insert.end().await.unwrap_err());
    assert!(msg.starts_with("Code: 60.") && msg.contains("no_such_table"), "{msg}");

    // On the wire: ClickHouse's status, header and body.
    let resp = reqwest::Client::new()
        .post(format!("{url}/?database={db}"))
        .body("SELECT * FROM no_such_table")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["X-ClickHouse-Exception-Code"], "60");
    assert!(resp.text().await.unwrap().starts_with("Code: 60. DB::Exception:"));

    let one: u8 = client.query("SELECT 1").fetch_one().await.unwrap();
    assert_eq!(one, 1, "the server still answers after the errors");
}

#[tokio::test]
async fn an_lz4_client_gets_a_clear_error() {
    let (_db, client) = fresh_database(&clickhouse_url()).await;
    client.query("CREATE TABLE t (a UInt8) ENGINE = MergeTree ORDER BY a").execute().await.unwrap();
    let lz4 = client.clone().with_compression(Compression::Lz4);

    let msg = bad_response(lz4.query("SELECT 1").fetch_one::<u8>().await.unwrap_err());
    assert!(msg.starts_with("Code: 48.") && msg.contains("CLICKHOUSE_COMPRESSION=none"), "{msg}");

    // Inserts announce compressed data differently (decompress=1).
    #[derive(Row, Serialize)]
    struct A {
        a: u8,
    }
    let mut insert = lz4.clone().with_validation(false).insert::<A>("t").await.unwrap();
    insert.write(&A { a: 1 }).await.unwrap();
    let msg = bad_response(insert.end().await.unwrap_err());
    assert!(msg.contains("CLICKHOUSE_COMPRESSION=none"), "{msg}");

    let count: u64 = client.query("SELECT count() FROM t").fetch_one().await.unwrap();
    assert_eq!(count, 0, "nothing of the compressed insert landed");
}

#[tokio::test]
async fn concurrent_requests_keep_their_own_database_and_settings() {
    let url = clickhouse_url();
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (db, client) = fresh_database(&url).await;
            client.query("CREATE TABLE t (v UInt64) ENGINE = MergeTree ORDER BY v").execute().await.unwrap();
            for round in 0..10u64 {
                #[derive(Row, Serialize)]
                struct V {
                    v: u64,
                }
                let mut insert = client.insert::<V>("t").await.unwrap();
                insert.write(&V { v: i * 1000 + round }).await.unwrap();
                insert.end().await.unwrap();
                // Unqualified names resolve in this request's database only,
                // and a per-request setting does not leak into other requests.
                let (current, sum, limit): (String, u64, String) = client
                    .query("SELECT currentDatabase(), sum(v), getSetting('max_result_rows')::String FROM t")
                    .with_option("max_result_rows", (100 + i).to_string())
                    .fetch_one()
                    .await
                    .unwrap();
                assert_eq!(current, db);
                assert_eq!(sum, (0..=round).map(|r| i * 1000 + r).sum::<u64>());
                assert_eq!(limit, (100 + i).to_string());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let client = crate::common::clickhouse::client(&url);
    let limit: String = client.query("SELECT getSetting('max_result_rows')::String").fetch_one().await.unwrap();
    assert_eq!(limit, "0", "no setting leaked into a later request");
}

#[tokio::test]
async fn a_private_instance_keeps_its_data_across_a_restart() {
    let mut ch = PrivateClickHouse::start().await;
    let url = ch.url();
    let (db, client) = fresh_database(&url).await;
    client.query(EVENTS_DDL).execute().await.unwrap();
    let rows: Vec<Event> = (0..3).map(event).collect();
    insert_events(&client, &rows).await;

    ch.restart().await;
    assert_eq!(ch.url(), url, "same address after a restart");
    let client = crate::common::clickhouse::client(&url).with_database(&db);
    let read: Vec<Event> = client.query("SELECT ?fields FROM events ORDER BY seq").fetch_all().await.unwrap();
    assert_eq!(read, rows);
    assert!(ch.log().contains("clickhouse-dev-server: stopped"), "a clean shutdown on SIGTERM:\n{}", ch.log());
}
