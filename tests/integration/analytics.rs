//! The ClickHouse copy and the list served from it, on the dev server's real
//! engine and real Postgres: schema, backfill (resume, versions), the list and
//! its read-your-writes overlay, count and tags, and the Postgres fallback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::analytics::backfill::BackfillChunk;
use sessiond::analytics::backfill::{self, BackfillRequest, BackfillStatus, Faults};
use sessiond::analytics::rows::{parse_lsn, SessionRow};
use sessiond::analytics::watermark::Table;
use sessiond::analytics::{schema, ClickHouse};
use sessiond::app::job_dispatch::execute;
use sessiond::jobs::Job;
use sessiond::sessions::list::{EnvScope, ListQuery, PgSessionList, SessionListRepository};
use uuid::Uuid;

use crate::common::{eventually, session_body, TestApp};

/// A list request's status, body and the store that served it.
async fn list(app: &TestApp, query: &str) -> (StatusCode, Value, String) {
    list_as(app, &app.a.key, query).await
}

/// [`list`] as the caller of the environment `key` belongs to.
async fn list_as(app: &TestApp, key: &str, query: &str) -> (StatusCode, Value, String) {
    let resp = app.client.get(format!("{}/api/v1/sessions?{query}", app.base)).bearer_auth(key).send().await.unwrap();
    let status = resp.status();
    let source =
        resp.headers().get("x-sessiond-list-source").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, resp.json().await.unwrap_or(Value::Null), source)
}

fn ids(body: &Value) -> Vec<String> {
    body["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

fn scope(app: &TestApp) -> EnvScope {
    EnvScope::from(&app.a.env)
}

/// Writes `n` sessions into environment A with SQL: two types, three tasks,
/// tags, some external ids, some closed, some expired, some not yet expired,
/// three sessions per creation time (ties the (created_at, id) cursor must
/// break), all last changed two hours ago.
async fn seed(app: &TestApp, n: i32) {
    let env = &app.a.env;
    sqlx::query(
        "INSERT INTO sessions (id, friendly_id, type, task_identifier, trigger_config, tags, metadata,
             organization_id, project_id, runtime_environment_id, environment_type, external_id,
             closed_at, closed_reason, expires_at, created_at, updated_at)
         SELECT gen_random_uuid(), 'session_seed' || i, (ARRAY['chat', 'job'])[1 + i % 2],
             (ARRAY['agent-a', 'agent-b', 'agent-c'])[1 + i % 3], '{}'::jsonb,
             CASE i % 4 WHEN 0 THEN ARRAY['red'] WHEN 1 THEN ARRAY['blue', 'red'] WHEN 2 THEN ARRAY['green'] ELSE '{}' END,
             jsonb_build_object('i', i), $1, $2, $3, 'DEVELOPMENT',
             CASE WHEN i % 5 = 0 THEN 'ext-' || i END,
             CASE WHEN i % 7 = 0 THEN now() - interval '3 hours' END,
             CASE WHEN i % 7 = 0 THEN 'done' END,
             CASE i % 6 WHEN 0 THEN now() - interval '30 minutes' WHEN 1 THEN now() + interval '1 day' END,
             timestamptz '2026-01-01 00:00:00+00' + (i / 3) * interval '1 minute',
             now() - interval '2 hours'
         FROM generate_series(1, $4) i",
    )
    .bind(env.organization_id)
    .bind(env.project_id)
    .bind(env.id)
    .bind(n)
    .execute(app.db())
    .await
    .unwrap();
}

/// Backfills both tables through the job runtime and waits for the end.
async fn backfill_all(app: &TestApp, chunk_size: i32) {
    let req = BackfillRequest { tables: vec![Table::Sessions, Table::Runs], from: None, to: None, chunk_size };
    let started = backfill::start(app.db(), &app.state.jobs, &req).await.unwrap();
    for b in started {
        eventually(30, "backfill to finish", || async {
            let now = backfill::store::find(app.db(), b.id).await.unwrap().unwrap();
            (now.status == BackfillStatus::Completed).then_some(())
        })
        .await;
    }
}

async fn ch_count(ch: &ClickHouse, sql: &str, env: Uuid) -> u64 {
    ch.client().query(sql).param("env", env.to_string()).fetch_one::<u64>().await.unwrap()
}

#[tokio::test]
async fn schema_applies_once_and_records_each_file() {
    let app = TestApp::spawn().await;
    let ch = &app.state.analytics;
    let first = schema::migrate(ch).await.unwrap();
    assert_eq!(first, vec!["sessions_v1", "task_runs_v1", "watermarks", "replication_lag"]);
    assert!(schema::migrate(ch).await.unwrap().is_empty(), "a second run applies nothing");
    let tables: Vec<String> = ch
        .client()
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        vec!["replication_lag_v1", "sessiond_schema_migrations", "sessiond_watermarks", "sessions_v1", "task_runs_v1"]
    );
    let engine: String = ch
        .client()
        .query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = 'sessions_v1'")
        .fetch_one()
        .await
        .unwrap();
    assert!(engine.contains("ReplacingMergeTree(_version, _is_deleted)"), "{engine}");
    assert!(engine.contains("PARTITION BY toYYYYMM(created_at)"), "{engine}");
    assert!(
        engine.contains("ORDER BY (organization_id, project_id, environment_id, created_at, session_id)"),
        "{engine}"
    );
}

#[tokio::test]
async fn backfill_fills_both_tables_and_then_clickhouse_serves_the_list() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    for i in 0..7 {
        app.create_session(session_body(Some(&format!("chat-{i}")))).await;
    }
    // Nothing vouches for ClickHouse yet: Postgres serves.
    let (status, before, source) = list(&app, "page[size]=50").await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"));
    assert_eq!(ids(&before).len(), 7);

    backfill_all(&app, 3).await;
    let ch = &app.state.analytics;
    let env = app.a.env.id;
    assert_eq!(ch_count(ch, "SELECT count() FROM sessions_v1 FINAL WHERE environment_id = {env:String}", env).await, 7);
    assert_eq!(
        ch_count(ch, "SELECT count() FROM task_runs_v1 FINAL WHERE environment_id = {env:String}", env).await,
        7
    );
    let runs: Vec<(String, String)> =
        ch.client().query("SELECT friendly_id, status FROM task_runs_v1 FINAL").fetch_all().await.unwrap();
    assert!(runs.iter().all(|(id, status)| id.starts_with("run_") && status == "QUEUED"), "{runs:?}");
    // 7 rows in chunks of 3: 3 + 3 + 1, the short chunk ends it.
    let chunks: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT target, chunks_done, rows_copied FROM clickhouse_backfills ORDER BY target")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(chunks, vec![("runs".into(), 3, 7), ("sessions".into(), 3, 7)]);

    let (status, after, source) = list(&app, "page[size]=50").await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"));
    assert_eq!(after, before, "the same answer from either store");
}

/// Walks every page forward from the first, then back from the last page's
/// previous cursor; returns each page's ids and pagination. `page(query)`
/// fetches one page.
async fn walk<F, Fut>(filter: &str, page: F) -> Vec<(Vec<String>, Value)>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<String>, Value)>,
{
    let mut pages = Vec::new();
    let mut query = format!("{filter}&page[size]=7");
    loop {
        let (ids, pagination) = page(query.clone()).await;
        let next = pagination["next"].as_str().map(String::from);
        pages.push((ids, pagination));
        match next {
            Some(n) => query = format!("{filter}&page[size]=7&page[after]={n}"),
            None => break,
        }
    }
    let mut prev = pages.last().and_then(|p| p.1["previous"].as_str().map(String::from));
    while let Some(p) = prev {
        let (ids, pagination) = page(format!("{filter}&page[size]=7&page[before]={p}")).await;
        prev = pagination["previous"].as_str().map(String::from);
        pages.push((ids, pagination));
    }
    pages
}

/// The walk through the HTTP list, which ClickHouse must serve.
async fn walk_http(app: &TestApp, filter: &str) -> Vec<(Vec<String>, Value)> {
    walk(filter, |query| async move {
        let (status, body, source) = list(app, &query).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "{query}: {body}");
        (ids(&body), body["pagination"].clone())
    })
    .await
}

/// The same walk answered by Postgres alone.
async fn walk_postgres(app: &TestApp, filter: &str) -> Vec<(Vec<String>, Value)> {
    let pg = PgSessionList { pool: app.db().clone() };
    walk(filter, |query| {
        let pg = pg.clone();
        async move {
            let q = ListQuery::parse(&query, chrono::Utc::now()).unwrap();
            let p = pg.list(scope(app), &q).await.unwrap().value;
            let ids: Vec<String> = p.sessions.iter().map(|s| s.friendly_id.clone()).collect();
            let mut pagination = serde_json::Map::new();
            if let Some(n) = p.next {
                pagination.insert("next".into(), json!(n.encode()));
            }
            if let Some(n) = p.previous {
                pagination.insert("previous".into(), json!(n.encode()));
            }
            (ids, Value::Object(pagination))
        }
    })
    .await
}

#[tokio::test]
async fn every_filter_and_both_directions_match_the_postgres_list() {
    let app = TestApp::spawn_with(|c| c.list_overlay_margin_ms = 0).await;
    app.clickhouse_ready().await;
    seed(&app, 120).await;
    backfill_all(&app, 50).await;
    // Unmerged versions crowd the newest rows (as replayed changes would):
    // the list's created_at bound, read without FINAL, lands too close and
    // the bounded page comes back short, so it must be read again unbounded.
    let newest = sessiond::sessions::store::export_chunk(&mut app.db().acquire().await.unwrap(), None, None, None, 200)
        .await
        .unwrap();
    let mut insert = app.state.analytics.client().insert::<SessionRow>("sessions_v1").await.unwrap();
    for (i, s) in newest.iter().rev().take(3).enumerate() {
        for v in 0..10 {
            insert.write(&SessionRow::from_session(s, u64::MAX - 100 + (i * 10 + v) as u64)).await.unwrap();
        }
    }
    insert.end().await.unwrap();
    let filters = [
        "",
        "filter[type]=chat",
        "filter[taskIdentifier]=agent-a,agent-c",
        "filter[tags]=red",
        "filter[tags]=blue,green",
        "filter[externalId]=ext-35",
        "filter[status]=ACTIVE",
        "filter[status]=CLOSED",
        "filter[status]=EXPIRED",
        "filter[status]=EXPIRED,CLOSED",
        "filter[createdAt][from]=1767226800000&filter[createdAt][to]=1767227400000",
        "filter[type]=job&filter[tags]=red&filter[status]=ACTIVE",
    ];
    for filter in filters {
        let from_clickhouse = walk_http(&app, filter).await;
        let from_postgres = walk_postgres(&app, filter).await;
        // Equal walks prove something only over rows: each filter matches
        // some of the 120, and (but the empty one) not all of them, so a
        // filter both stores ignored, or one that matched nothing, fails here.
        assert!(!from_postgres[0].0.is_empty(), "filter {filter:?} matches no seeded session");
        let matched = forward_rows(&from_postgres);
        if filter.is_empty() {
            assert_eq!(matched, 120);
        } else {
            assert!(matched < 120, "filter {filter:?} matched every session");
        }
        assert_eq!(from_clickhouse, from_postgres, "filter {filter:?}");
    }
    // The unfiltered walk covers all 120 in order, forward.
    let pages = walk_http(&app, "").await;
    let forward: usize = pages.iter().take_while(|p| p.1.get("next").is_some()).map(|p| p.0.len()).sum();
    assert_eq!(forward + 1, 120, "17 full pages of 7 and a last page of 1");
}

/// The rows of a walk's forward pages: the pages up to and including the
/// first without a next cursor.
fn forward_rows(pages: &[(Vec<String>, Value)]) -> usize {
    let last = pages.iter().position(|p| p.1.get("next").is_none()).expect("a last page");
    pages[..=last].iter().map(|p| p.0.len()).sum()
}

#[tokio::test]
async fn count_and_tags_come_from_clickhouse_and_match_postgres() {
    let app = TestApp::spawn_with(|c| c.list_overlay_margin_ms = 0).await;
    app.clickhouse_ready().await;
    seed(&app, 60).await;
    backfill_all(&app, 100).await;
    let repo = &app.state.session_list;
    let pg = PgSessionList { pool: app.db().clone() };
    for filter in ["", "filter[tags]=red", "filter[status]=CLOSED", "filter[type]=chat&filter[status]=ACTIVE,EXPIRED"] {
        let q = ListQuery::parse(filter, chrono::Utc::now()).unwrap();
        let ch = repo.count(scope(&app), &q).await.unwrap();
        assert_eq!(ch.source.as_str(), "clickhouse");
        assert_eq!(ch.value, pg.count(scope(&app), &q).await.unwrap().value, "{filter}");
    }
    let tags = repo.tags(scope(&app), "", 10).await.unwrap();
    assert_eq!(tags.source.as_str(), "clickhouse");
    assert_eq!(tags.value, vec!["blue", "green", "red"]);
    assert_eq!(repo.tags(scope(&app), "r", 10).await.unwrap().value, vec!["red"]);
    // A fresh tag shows at once, through the overlay.
    let s = app
        .create_session(json!({"type": "chat", "taskIdentifier": "echo-agent", "tags": ["rare"],
        "triggerConfig": {"basePayload": {}}}))
        .await;
    assert!(s["id"].is_string());
    let tags = repo.tags(scope(&app), "", 10).await.unwrap();
    assert_eq!(
        (tags.source.as_str(), tags.value),
        ("clickhouse", vec!["blue".into(), "green".into(), "rare".into(), "red".into()])
    );
}

#[tokio::test]
async fn the_overlay_shows_fresh_creates_closes_and_updates_at_once() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    backfill_all(&app, 100).await;
    let (_, first, source) = list(&app, "page[size]=5").await;
    assert_eq!(source, "clickhouse");

    // No replication yet: ClickHouse never hears of these changes.
    let fresh = app.create_session(session_body(Some("fresh-1"))).await;
    let fresh_id = fresh["id"].as_str().unwrap().to_string();
    let (_, body, source) = list(&app, "page[size]=5").await;
    assert_eq!(source, "clickhouse");
    // The seeded rows were created in January; the fresh one is the newest.
    assert_eq!(ids(&body)[0], fresh_id);
    assert_eq!(ids(&body)[1..], ids(&first)[..4]);

    let (status, _) = app.post(&format!("/api/v1/sessions/{fresh_id}/close"), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, active, source) = list(&app, "filter[status]=ACTIVE&filter[externalId]=fresh-1").await;
    assert_eq!((source.as_str(), ids(&active).len()), ("clickhouse", 0));
    let (_, closed, _) = list(&app, "filter[status]=CLOSED&filter[externalId]=fresh-1").await;
    assert_eq!(ids(&closed), vec![fresh_id.clone()]);

    // A seeded (backfilled) row changed in Postgres: ClickHouse's copy is stale,
    // the overlay wins.
    let (status, _) = app.patch("/api/v1/sessions/session_seed1", &app.a.key, json!({"tags": ["moved"]})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, moved, source) = list(&app, "filter[tags]=moved").await;
    assert_eq!((source.as_str(), ids(&moved)), ("clickhouse", vec!["session_seed1".to_string()]));
    let (_, old, _) = list(&app, "filter[tags]=blue&page[size]=100").await;
    assert!(!ids(&old).contains(&"session_seed1".to_string()), "the stale copy's tag no longer matches");
}

/// `n` sessions ClickHouse has not seen, changed now (a write burst while it
/// lags): every one is in the list's overlay; the even ones are tagged `burst`.
async fn insert_burst(app: &TestApp, n: i32) {
    let env = &app.a.env;
    sqlx::query(
        "INSERT INTO sessions (id, friendly_id, type, task_identifier, trigger_config, tags, metadata,
             organization_id, project_id, runtime_environment_id, environment_type, created_at, updated_at)
         SELECT gen_random_uuid(), 'session_burst' || i, 'chat', 'agent-a', '{}'::jsonb,
             CASE WHEN i % 2 = 0 THEN ARRAY['burst'] ELSE '{}' END, '{}'::jsonb, $1, $2, $3, 'DEVELOPMENT',
             timestamptz '2026-02-01 00:00:00+00' + i * interval '1 second', now()
         FROM generate_series(1, $4) i",
    )
    .bind(env.organization_id)
    .bind(env.project_id)
    .bind(env.id)
    .bind(n)
    .execute(app.db())
    .await
    .unwrap();
}

/// An overlay near LIST_OVERLAY_MAX_ROWS (a write burst while ClickHouse
/// lags) is still served by ClickHouse, and right: its ids are too many for a
/// URL, so they must not travel in one.
#[tokio::test]
async fn a_large_overlay_is_served_by_clickhouse() {
    let app = TestApp::spawn_with(|c| c.list_overlay_max_rows = 3_000).await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    backfill_all(&app, 100).await;
    // 2,500 sessions ClickHouse has not seen, changed now: all in the overlay.
    insert_burst(&app, 2500).await;
    for filter in ["page[size]=25", "filter[tags]=burst&page[size]=10", "filter[tags]=red&page[size]=10"] {
        let (status, body, source) = list(&app, filter).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "{filter}");
        let q = ListQuery::parse(filter, chrono::Utc::now()).unwrap();
        let pg = PgSessionList { pool: app.db().clone() }.list(scope(&app), &q).await.unwrap().value;
        let expected: Vec<String> = pg.sessions.iter().map(|s| s.friendly_id.clone()).collect();
        assert_eq!(ids(&body), expected, "{filter}: the first page matches Postgres");
    }
    let q = ListQuery::parse("filter[tags]=burst", chrono::Utc::now()).unwrap();
    let count = app.state.session_list.count(scope(&app), &q).await.unwrap();
    assert_eq!((count.value, count.source.as_str()), (1_250, "clickhouse"));
}

#[tokio::test]
async fn a_killed_backfill_resumes_where_it_stopped() {
    // No job runtime: the test runs each chunk's job itself.
    let app = TestApp::spawn_with(|c| c.run_jobs = false).await;
    app.clickhouse_ready().await;
    seed(&app, 35).await;
    let req = BackfillRequest { tables: vec![Table::Sessions], from: None, to: None, chunk_size: 10 };
    let (created, _) = backfill::create(app.db(), &req).await.unwrap();
    let id = created[0].id;
    let ctx = app.state.job_context();
    let chunk = |n: i32| Job::new(&BackfillChunk { backfill_id: id, chunk: n }).unwrap();
    for n in 0..2 {
        execute(&ctx, &chunk(n), 1).await.unwrap();
    }
    let after_two = backfill::store::find(app.db(), id).await.unwrap().unwrap();
    assert_eq!((after_two.chunks_done, after_two.rows_copied), (2, 20));

    // Chunk 2 dies after writing to ClickHouse, before recording itself.
    let faults = Faults { stop_before_commit: true, ..Faults::default() };
    let err = backfill::run_chunk(app.db(), &ctx.analytics, &ctx.jobs, id, 2, faults).await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    let killed = backfill::store::find(app.db(), id).await.unwrap().unwrap();
    assert_eq!(killed.cursor(), after_two.cursor(), "the cursor stays at the last recorded chunk");
    assert_eq!(killed.chunks_done, 2);

    // Its job runs again (a retry): it resumes at chunk 2, not at the start.
    execute(&ctx, &chunk(2), 1).await.unwrap();
    // A chunk delivered twice moves nothing.
    let again = execute(&ctx, &chunk(2), 1).await.unwrap();
    assert!(again.contains("already recorded"), "{again}");
    execute(&ctx, &chunk(3), 1).await.unwrap();
    let done = backfill::store::find(app.db(), id).await.unwrap().unwrap();
    assert_eq!((done.status, done.chunks_done, done.rows_copied), (BackfillStatus::Completed, 4, 35));
    // One durable job per chunk, each written by the chunk before it.
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'backfill'").fetch_one(app.db()).await.unwrap();
    assert_eq!(jobs, 4);
    let env = app.a.env.id;
    let ch = &app.state.analytics;
    assert_eq!(
        ch_count(ch, "SELECT count() FROM sessions_v1 FINAL WHERE environment_id = {env:String}", env).await,
        35
    );
}

#[tokio::test]
async fn a_backfill_survives_a_server_restart() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    seed(&app, 80).await;
    let req = BackfillRequest { tables: vec![Table::Sessions], from: None, to: None, chunk_size: 2 };
    let id = backfill::start(app.db(), &app.state.jobs, &req).await.unwrap()[0].id;
    let app = app.restart(|_| {}).await;
    let done = eventually(60, "backfill to finish after the restart", || async {
        let now = backfill::store::find(app.db(), id).await.unwrap().unwrap();
        (now.status == BackfillStatus::Completed).then_some(now)
    })
    .await;
    assert_eq!((done.chunks_done, done.rows_copied), (41, 80));
    let env = app.a.env.id;
    let ch = &app.state.analytics;
    assert_eq!(
        ch_count(ch, "SELECT count() FROM sessions_v1 FINAL WHERE environment_id = {env:String}", env).await,
        80
    );
}

#[tokio::test]
async fn a_backfilled_copy_loses_to_a_later_live_change() {
    let app = TestApp::spawn_with(|c| c.run_jobs = false).await;
    app.clickhouse_ready().await;
    let s = app.create_session(session_body(Some("race"))).await;
    let friendly = s["id"].as_str().unwrap().to_string();
    let req = BackfillRequest { tables: vec![Table::Sessions], from: None, to: None, chunk_size: 10 };
    let (created, _) = backfill::create(app.db(), &req).await.unwrap();
    let ctx = app.state.job_context();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let faults = Faults { pause_after_read: Some(barrier.clone()), ..Faults::default() };
    let chunk = {
        let (db, ch, jobs, id) = (app.db().clone(), ctx.analytics.clone(), ctx.jobs.clone(), created[0].id);
        tokio::spawn(async move { backfill::run_chunk(&db, &ch, &jobs, id, 0, faults).await })
    };
    // The chunk has read the open session. Now it is closed, and the change
    // reaches ClickHouse as replication will write it: versioned by its WAL
    // position, which is past the one the chunk read before its SELECT.
    barrier.wait().await;
    let (status, _) = app.post(&format!("/api/v1/sessions/{friendly}/close"), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(app.db()).await.unwrap();
    let closed = sessiond::sessions::store::find(app.db(), app.a.env.id, &friendly).await.unwrap().unwrap();
    let mut insert = ctx.analytics.client().insert::<SessionRow>("sessions_v1").await.unwrap();
    insert.write(&SessionRow::from_session(&closed, parse_lsn(&lsn).unwrap())).await.unwrap();
    insert.end().await.unwrap();
    // The chunk now writes its older copy of the open session.
    barrier.wait().await;
    chunk.await.unwrap().unwrap();

    let rows: Vec<(u64, bool)> = ctx
        .analytics
        .client()
        .query(
            "SELECT _version, isNotNull(closed_at) FROM sessions_v1 WHERE friendly_id = {f:String} ORDER BY _version",
        )
        .param("f", &friendly)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "both copies were written: {rows:?}");
    assert!(!rows[0].1 && rows[1].1, "the backfilled (open) copy has the lower version: {rows:?}");
    let visible: Vec<bool> = ctx
        .analytics
        .client()
        .query("SELECT isNotNull(closed_at) FROM sessions_v1 FINAL WHERE friendly_id = {f:String}")
        .param("f", &friendly)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(visible.len(), 1);
    assert!(visible[0], "FINAL shows the live change, not the backfilled copy");
}

#[tokio::test]
async fn filters_are_bound_as_parameters() {
    let app = TestApp::spawn_with(|c| c.list_overlay_margin_ms = 0).await;
    app.clickhouse_ready().await;
    let evil =
        ["it's", "a\\'b", "x, y", "'; DROP TABLE sessions_v1; --", "{env:String}", "日本語 \"quoted\"", "back\\slash"];
    for (i, ext) in evil.iter().enumerate() {
        let mut body = session_body(Some(ext));
        body["tags"] = json!([format!("t'{i}")]);
        app.create_session(body).await;
    }
    // Age the rows so ClickHouse (not the overlay) answers for them.
    sqlx::query("UPDATE sessions SET updated_at = now() - interval '1 hour'").execute(app.db()).await.unwrap();
    backfill_all(&app, 100).await;
    for (i, ext) in evil.iter().enumerate() {
        let q: String = form_urlencoded::Serializer::new(String::new()).append_pair("filter[externalId]", ext).finish();
        let (status, body, source) = list(&app, &q).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "{ext}: {body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 1, "{ext}: {body}");
        assert_eq!(body["data"][0]["externalId"], *ext);
        let q: String =
            form_urlencoded::Serializer::new(String::new()).append_pair("filter[tags]", &format!("t'{i}")).finish();
        let (_, body, _) = list(&app, &q).await;
        assert_eq!(body["data"][0]["externalId"], *ext);
    }
    let env = app.a.env.id;
    let n = ch_count(
        &app.state.analytics,
        "SELECT count() FROM sessions_v1 FINAL WHERE environment_id = {env:String}",
        env,
    )
    .await;
    assert_eq!(n, evil.len() as u64, "the table is intact");
}

#[tokio::test]
async fn serve_starts_and_answers_while_clickhouse_is_down() {
    // Nothing listens on the discard port; the schema is retried in the background.
    let app = TestApp::spawn_with(|c| {
        c.clickhouse_url = "http://127.0.0.1:9".into();
        c.clickhouse_migrate_on_start = true;
    })
    .await;
    let s = app.create_session(session_body(Some("down-1"))).await;
    assert!(s["id"].is_string());
    let (status, body, source) = list(&app, "").await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"));
    assert_eq!(ids(&body), vec![s["id"].as_str().unwrap().to_string()]);
    let q = ListQuery::parse("", chrono::Utc::now()).unwrap();
    let count = app.state.session_list.count(scope(&app), &q).await.unwrap();
    assert_eq!((count.source.as_str(), count.value), ("postgres", 1));
}

#[tokio::test]
async fn a_chunk_delivered_twice_at_once_is_recorded_once() {
    let app = TestApp::spawn_with(|c| c.run_jobs = false).await;
    app.clickhouse_ready().await;
    seed(&app, 15).await;
    let req = BackfillRequest { tables: vec![Table::Sessions], from: None, to: None, chunk_size: 10 };
    let (created, _) = backfill::create(app.db(), &req).await.unwrap();
    let ctx = app.state.job_context();
    // Both copies of chunk 0 read before either records.
    let barrier = Arc::new(tokio::sync::Barrier::new(3));
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let faults = Faults { pause_after_read: Some(barrier.clone()), ..Faults::default() };
            let (db, ch, jobs, id) = (app.db().clone(), ctx.analytics.clone(), ctx.jobs.clone(), created[0].id);
            tokio::spawn(async move { backfill::run_chunk(&db, &ch, &jobs, id, 0, faults).await.unwrap() })
        })
        .collect();
    barrier.wait().await;
    barrier.wait().await;
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(run.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| o.contains("recorded meanwhile")).count(), 1, "{outcomes:?}");
    let b = backfill::store::find(app.db(), created[0].id).await.unwrap().unwrap();
    assert_eq!((b.chunks_done, b.rows_copied), (1, 10));
    let next: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'backfill' AND payload->>'chunk' = '1'")
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(next, 1, "one job for the next chunk");
}

#[tokio::test]
async fn clickhouse_stopped_creates_and_appends_go_on_and_postgres_serves_the_list() {
    let mut private = crate::common::clickhouse::PrivateClickHouse::start().await;
    let url = private.url();
    let app = TestApp::spawn_with(|c| {
        c.clickhouse_url = url;
        c.clickhouse_retry_after_ms = 200;
    })
    .await;
    app.clickhouse_ready().await;
    let first = app.create_session(session_body(Some("before-stop"))).await;
    backfill_all(&app, 100).await;
    let (_, _, source) = list(&app, "").await;
    assert_eq!(source, "clickhouse");

    private.stop().await;
    let second = app.create_session(session_body(Some("after-stop"))).await;
    let token = second["publicAccessToken"].as_str().unwrap().to_string();
    let (status, _) = app.append(second["id"].as_str().unwrap(), "in", &token, "{\"kind\":\"message\"}", &[]).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..3 {
        let (status, body, source) = list(&app, "").await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"), "{body}");
        assert_eq!(
            ids(&body),
            vec![second["id"].as_str().unwrap().to_string(), first["id"].as_str().unwrap().to_string()]
        );
    }

    // Back up: after the retry window ClickHouse serves again.
    private.restart().await;
    eventually(10, "clickhouse to serve the list again", || async {
        let (_, body, source) = list(&app, "").await;
        (source == "clickhouse" && ids(&body).len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_ranged_backfill_copies_only_its_range_and_vouches_for_nothing() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    // Seeded creation times: 2026-01-01 00:00 plus (i / 3) minutes, i = 1..=30.
    seed(&app, 30).await;
    let at = |m: u32| chrono::DateTime::parse_from_rfc3339(&format!("2026-01-01T00:{m:02}:00Z")).unwrap().to_utc();
    let req = BackfillRequest { tables: vec![Table::Sessions], from: Some(at(2)), to: Some(at(4)), chunk_size: 2 };
    let id = backfill::start(app.db(), &app.state.jobs, &req).await.unwrap()[0].id;
    let done = eventually(30, "ranged backfill to finish", || async {
        let b = backfill::store::find(app.db(), id).await.unwrap().unwrap();
        (b.status == BackfillStatus::Completed).then_some(b)
    })
    .await;
    // Minutes 2, 3 and 4 hold i = 6..=14: nine sessions.
    assert_eq!(done.rows_copied, 9);
    let copied: Vec<String> = app
        .state
        .analytics
        .client()
        .query("SELECT friendly_id FROM sessions_v1 FINAL ORDER BY created_at, session_id")
        .fetch_all()
        .await
        .unwrap();
    let mut expected: Vec<String> = (6..=14).map(|i| format!("session_seed{i}")).collect();
    expected.sort();
    let mut got = copied.clone();
    got.sort();
    assert_eq!(got, expected);
    // A partial copy sets no watermark: Postgres still serves the list.
    let (_, _, source) = list(&app, "").await;
    assert_eq!(source, "postgres");
}

/// What [`PageProxy`] does with a read of `sessions_v1` (a list page, its
/// bound, a count, the tags) once it has passed its first few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageFault {
    /// Passes it on, like every other request.
    None,
    /// Never answers: the read times out.
    Stall,
    /// Answers as ClickHouse answers a failed query (HTTP 500 and the
    /// exception's code).
    Fail,
    /// Answers as ClickHouse answers a query it judges bad (HTTP 400 and
    /// SYNTAX_ERROR, as for one over `max_query_size`).
    Refuse,
    /// Answers 414 with no body, as a proxy refusing a long URL would.
    TooLong,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    fault: Mutex<(PageFault, usize)>,
    watermark_reads: AtomicUsize,
    page_reads: AtomicUsize,
    /// The path and query string of every request, in order.
    urls: Mutex<Vec<String>>,
}

/// An HTTP proxy in front of the dev ClickHouse that passes every request
/// (schema, inserts, the watermark's read) and can stall or fail the reads of
/// `sessions_v1` after passing the first `n` of them: ClickHouse failing in
/// the middle of a list, after the watermark was read fine. It counts both
/// kinds of read, so a test sees what reached ClickHouse.
struct PageProxy {
    url: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl PageProxy {
    async fn start() -> PageProxy {
        let state = Arc::new(ProxyState {
            upstream: crate::common::clickhouse::clickhouse_url(),
            http: reqwest::Client::new(),
            fault: Mutex::new((PageFault::None, 0)),
            watermark_reads: AtomicUsize::new(0),
            page_reads: AtomicUsize::new(0),
            urls: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new().fallback(proxy_request).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        PageProxy { url, state, task }
    }

    /// From now on, the reads of `sessions_v1` after the next `pass` meet `fault`.
    fn fault(&self, fault: PageFault, pass: usize) {
        let passed = self.page_reads();
        *self.state.fault.lock().unwrap() = (fault, passed + pass);
    }

    fn watermark_reads(&self) -> usize {
        self.state.watermark_reads.load(Ordering::SeqCst)
    }

    fn page_reads(&self) -> usize {
        self.state.page_reads.load(Ordering::SeqCst)
    }
}

impl Drop for PageProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_request(
    axum::extract::State(p): axum::extract::State<Arc<ProxyState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    p.urls.lock().unwrap().push(parts.uri.path_and_query().map(|q| q.to_string()).unwrap_or_default());
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    // A read's SQL is its body; an insert names its table in the URL and
    // sends rows, so "FROM <table>" in the body is a read of it.
    let sql = String::from_utf8_lossy(&body);
    if sql.contains("FROM sessiond_watermarks") {
        p.watermark_reads.fetch_add(1, Ordering::SeqCst);
    }
    if sql.contains("FROM sessions_v1") {
        let n = p.page_reads.fetch_add(1, Ordering::SeqCst);
        let (fault, from) = *p.fault.lock().unwrap();
        if n >= from {
            match fault {
                PageFault::None => {}
                PageFault::Stall => std::future::pending::<()>().await,
                PageFault::Fail => {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [("x-clickhouse-exception-code", "999")],
                        "Code: 999. DB::Exception: failed by the test's proxy",
                    )
                        .into_response()
                }
                PageFault::Refuse => {
                    return (
                        StatusCode::BAD_REQUEST,
                        [("x-clickhouse-exception-code", "62")],
                        "Code: 62. DB::Exception: Max query size exceeded: refused by the test's proxy. (SYNTAX_ERROR)",
                    )
                        .into_response()
                }
                PageFault::TooLong => return StatusCode::URI_TOO_LONG.into_response(),
            }
        }
    }
    let target = format!("{}{}", p.upstream, parts.uri.path_and_query().map(|q| q.as_str()).unwrap_or("/"));
    let mut headers = parts.headers.clone();
    for hop in ["host", "content-length", "connection", "transfer-encoding"] {
        headers.remove(hop);
    }
    let resp = match p.http.request(parts.method, target).headers(headers).body(body).send().await {
        Ok(resp) => resp,
        Err(err) => return (StatusCode::BAD_GATEWAY, err.to_string()).into_response(),
    };
    let status = resp.status();
    let mut headers = resp.headers().clone();
    for hop in ["content-length", "connection", "transfer-encoding"] {
        headers.remove(hop);
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    (status, headers, bytes).into_response()
}

/// The first page of `query` as Postgres alone answers it (friendly ids).
async fn postgres_page(app: &TestApp, query: &str) -> Vec<String> {
    let q = ListQuery::parse(query, chrono::Utc::now()).unwrap();
    let page = PgSessionList { pool: app.db().clone() }.list(scope(app), &q).await.unwrap().value;
    page.sessions.iter().map(|s| s.friendly_id.clone()).collect()
}

/// ClickHouse fails in the middle of a list: the watermark is read fine, then
/// a read of `sessions_v1` (after `pass` that succeed) meets `fault`. The
/// whole answer comes from Postgres, says so, and is the Postgres list; the
/// next list, inside the cool-down, asks ClickHouse nothing; once ClickHouse
/// answers again and the cool-down is over, it serves again.
async fn a_list_failing_midway(fault: PageFault, pass: usize) {
    let proxy = PageProxy::start().await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(move |c| {
        c.clickhouse_url = url;
        // Room for the reads that pass on a loaded machine; the stalled one
        // costs this once.
        c.clickhouse_timeout_ms = 3_000;
        // Surely longer than the next list takes on a loaded machine.
        c.clickhouse_retry_after_ms = 5_000;
    })
    .await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    backfill_all(&app, 100).await;
    // Fresh rows too, so the answer ClickHouse would give merges the overlay.
    let fresh = app.create_session(session_body(Some("midway-fresh"))).await;
    let query = "page[size]=10";

    // No list has run in this process: the watermark is not cached, so this
    // list reads it first.
    proxy.fault(fault, pass);
    let (watermarks, pages) = (proxy.watermark_reads(), proxy.page_reads());
    let (status, body, source) = list(&app, query).await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"), "{body}");
    assert_eq!(proxy.watermark_reads(), watermarks + 1, "the watermark was read, through ClickHouse");
    assert_eq!(proxy.page_reads(), pages + pass + 1, "the page's reads reached ClickHouse up to the failing one");
    assert_eq!(ids(&body), postgres_page(&app, query).await, "the Postgres list, whole");
    assert_eq!(ids(&body)[0], fresh["id"].as_str().unwrap());
    assert_eq!(body["data"].as_array().unwrap().len(), 10);

    // During the cool-down the next list goes straight to Postgres: not even
    // the watermark is asked for.
    let (watermarks, pages) = (proxy.watermark_reads(), proxy.page_reads());
    let (status, during, source) = list(&app, query).await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"), "{during}");
    assert_eq!(ids(&during), ids(&body));
    assert!(!app.state.analytics.healthy(), "still inside the cool-down");
    assert_eq!((proxy.watermark_reads(), proxy.page_reads()), (watermarks, pages), "nothing reached ClickHouse");

    // ClickHouse is well again; after its cool-down it serves the same page.
    proxy.fault(PageFault::None, 0);
    let served = eventually(20, "clickhouse to serve the list again", || async {
        let (status, again, source) = list(&app, query).await;
        assert_eq!(status, StatusCode::OK);
        (source == "clickhouse").then_some(again)
    })
    .await;
    assert_eq!(ids(&served), ids(&body), "either store, the same page");
}

#[tokio::test]
async fn clickhouse_timing_out_after_the_watermark_read_leaves_the_list_to_postgres() {
    // The page's first read (its created_at bound) never answers.
    a_list_failing_midway(PageFault::Stall, 0).await;
}

#[tokio::test]
async fn clickhouse_failing_the_page_read_leaves_the_list_to_postgres() {
    // The bound is read fine; the page read itself fails.
    a_list_failing_midway(PageFault::Fail, 1).await;
}

/// The overlay's row cap (LIST_OVERLAY_MAX_ROWS): at the cap ClickHouse still
/// serves, with every changed row from the overlay; one row more and it is too
/// far behind, so Postgres serves list, count and tags without ClickHouse
/// being asked for a page.
#[tokio::test]
async fn an_overlay_over_its_row_cap_leaves_the_list_to_postgres() {
    const CAP: usize = 5;
    let proxy = PageProxy::start().await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(move |c| {
        c.clickhouse_url = url;
        c.list_overlay_max_rows = CAP;
    })
    .await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    backfill_all(&app, 100).await;
    // Changed after the watermark: a tag ClickHouse's copy has never seen.
    let db = app.db().clone();
    let change = |i: usize| {
        let db = db.clone();
        async move {
            sqlx::query("UPDATE sessions SET tags = ARRAY['capped'], updated_at = now() WHERE friendly_id = $1")
                .bind(format!("session_seed{i}"))
                .execute(&db)
                .await
                .unwrap();
        }
    };
    for i in 1..=CAP {
        change(i).await;
    }
    let capped = "filter[tags]=capped&page[size]=50";
    for query in [capped, "page[size]=10"] {
        let (status, body, source) = list(&app, query).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "at the cap, {query}: {body}");
        assert_eq!(ids(&body), postgres_page(&app, query).await, "{query}");
    }
    let (_, body, _) = list(&app, capped).await;
    assert_eq!(ids(&body).len(), CAP, "every changed row, from the overlay");

    change(CAP + 1).await;
    let pages = proxy.page_reads();
    for query in [capped, "page[size]=10"] {
        let (status, body, source) = list(&app, query).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"), "over the cap, {query}: {body}");
        assert_eq!(ids(&body), postgres_page(&app, query).await, "{query}");
    }
    let (_, body, _) = list(&app, capped).await;
    assert_eq!(ids(&body).len(), CAP + 1);
    let q = ListQuery::parse("filter[tags]=capped", chrono::Utc::now()).unwrap();
    let count = app.state.session_list.count(scope(&app), &q).await.unwrap();
    assert_eq!((count.source.as_str(), count.value), ("postgres", CAP as u64 + 1));
    let tags = app.state.session_list.tags(scope(&app), "cap", 10).await.unwrap();
    assert_eq!((tags.source.as_str(), tags.value), ("postgres", vec!["capped".to_string()]));
    assert_eq!(proxy.page_reads(), pages, "over the cap ClickHouse is not asked for a page");
    assert!(app.state.analytics.healthy(), "ClickHouse did not fail: it was passed over");
}

/// One list of environment A meets `fault` on its page read (its created_at
/// bound passed); then environment B lists. Returns the store that served B
/// and whether ClickHouse is still in use. A's list is the Postgres list
/// whatever the fault.
async fn after_a_failed_page_read(fault: PageFault) -> (String, bool) {
    let proxy = PageProxy::start().await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(move |c| {
        c.clickhouse_url = url;
        c.clickhouse_timeout_ms = 3_000;
        // Far longer than the test: a failure that takes ClickHouse out of
        // use keeps it out for every later list here, however slow.
        c.clickhouse_retry_after_ms = 600_000;
    })
    .await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    let (status, other) = app.post("/api/v1/sessions", &app.b.key, session_body(Some("other-env"))).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    backfill_all(&app, 100).await;
    let query = "page[size]=10";

    proxy.fault(fault, 1);
    let pages = proxy.page_reads();
    let (status, body, source) = list(&app, query).await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "postgres"), "{fault:?}: {body}");
    assert_eq!(ids(&body), postgres_page(&app, query).await, "{fault:?}: the Postgres list, whole");
    assert_eq!(proxy.page_reads(), pages + 2, "{fault:?}: the bound passed, the page met the fault");

    proxy.fault(PageFault::None, 0);
    let (status, body, source) = list_as(&app, &app.b.key, query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), vec![other["id"].as_str().unwrap().to_string()], "{fault:?}: B's own session");
    (source, app.state.analytics.healthy())
}

/// A request ClickHouse refuses (a 4xx: too large, bad syntax; or a URI a
/// proxy finds too long) is that request's failure: it is answered from
/// Postgres, and the next list, of another environment, is ClickHouse's.
#[tokio::test]
async fn a_list_clickhouse_refuses_fails_alone() {
    for fault in [PageFault::Refuse, PageFault::TooLong] {
        let (source, healthy) = after_a_failed_page_read(fault).await;
        assert_eq!((source.as_str(), healthy), ("clickhouse", true), "{fault:?}");
    }
}

/// A 5xx or no answer in time is ClickHouse's failure: every environment's
/// lists go to Postgres for the cool-down.
#[tokio::test]
async fn clickhouse_failing_or_stalling_is_out_of_use_for_every_environment() {
    for fault in [PageFault::Fail, PageFault::Stall] {
        let (source, healthy) = after_a_failed_page_read(fault).await;
        assert_eq!((source.as_str(), healthy), ("postgres", false), "{fault:?}");
    }
}

/// The list filters at their caps (100 values of the longest type, task and
/// tag, and the longest external id), with text hostile to SQL and to URLs:
/// ClickHouse serves them, every page as Postgres gives it, and no filter
/// value reaches ClickHouse in a URL. A third of each value is quotes, which
/// a URL parameter spells in 6 characters (`\'`, percent-encoded) where the
/// list's own URL spells them in 3: the caller's 55 KB request became a
/// 78 KB parameter, over the 64 KiB the ClickHouse client sends, and every
/// such list went to Postgres and took ClickHouse out of use for all.
#[tokio::test]
async fn list_filters_at_their_caps_are_served_by_clickhouse_with_no_value_in_a_url() {
    use sessiond::sessions::list::{
        MAX_FILTER_EXTERNAL_ID_CHARS, MAX_FILTER_TAG_CHARS, MAX_FILTER_TASK_CHARS, MAX_FILTER_TYPE_CHARS,
        MAX_FILTER_VALUES,
    };
    let proxy = PageProxy::start().await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(move |c| {
        c.clickhouse_url = url;
        c.list_overlay_margin_ms = 0;
    })
    .await;
    app.clickhouse_ready().await;
    // `len` characters: a marker no URL may show, then SQL and URL syntax,
    // then a third quotes. No comma (it separates values), nothing to trim.
    let value = |kind: &str, i: usize, len: usize| -> String {
        let mut v = format!("{kind}{i:03}needle\\?{{x:String}}\t日");
        let mut pad = "'xy".chars().cycle();
        while v.chars().count() < len {
            v.push(pad.next().unwrap());
        }
        v
    };
    let values = |kind: &str, len: usize| (0..MAX_FILTER_VALUES).map(|i| value(kind, i, len)).collect::<Vec<_>>();
    let (types, tasks, tags) =
        (values("ty", MAX_FILTER_TYPE_CHARS), values("ta", MAX_FILTER_TASK_CHARS), values("tg", MAX_FILTER_TAG_CHARS));
    let external = value("ex", 0, MAX_FILTER_EXTERNAL_ID_CHARS).replace('\t', " ");
    // Sessions matching the three list filters by one value each (one also
    // by the external id), and near misses, each failing one filter.
    let create = |kind: &str, task: &str, tags: Vec<&str>, ext: Option<&str>| {
        let mut body = json!({"type": kind, "taskIdentifier": task, "tags": tags,
            "triggerConfig": {"basePayload": {}}});
        if let Some(ext) = ext {
            body["externalId"] = json!(ext);
        }
        body
    };
    let bodies = vec![
        create(&types[0], &tasks[0], vec![&tags[0]], Some(&external)),
        create(&types[99], &tasks[50], vec!["other", &tags[99]], None),
        create(&types[7], &tasks[99], vec![&tags[3]], Some("near-miss-ext")),
        create("chat", &tasks[0], vec![&tags[0]], None),
        create(&types[0], "echo-agent", vec![&tags[0]], None),
        create(&types[0], &tasks[0], vec!["other"], None),
    ];
    for body in bodies {
        app.create_session(body).await;
    }
    // Age the rows so ClickHouse (not the overlay) answers for them.
    sqlx::query("UPDATE sessions SET updated_at = now() - interval '1 hour'").execute(app.db()).await.unwrap();
    backfill_all(&app, 100).await;
    let lists = form_urlencoded::Serializer::new(String::new())
        .append_pair("filter[type]", &types.join(","))
        .append_pair("filter[taskIdentifier]", &tasks[..50].join(","))
        .append_pair("filter[taskIdentifier]", &tasks[50..].join(","))
        .append_pair("filter[tags]", &tags.join(","))
        .finish();
    let with_external = format!(
        "{lists}&{}",
        form_urlencoded::Serializer::new(String::new()).append_pair("filter[externalId]", &external).finish()
    );
    assert!((50_000..65_000).contains(&with_external.len()), "a list URL hyper takes: {}", with_external.len());
    let urls_before = proxy.state.urls.lock().unwrap().len();
    for (filter, expected) in [(lists.as_str(), 3), (with_external.as_str(), 1)] {
        let from_clickhouse = walk_http(&app, filter).await;
        let from_postgres = walk_postgres(&app, filter).await;
        assert_eq!(forward_rows(&from_postgres), expected);
        assert_eq!(from_clickhouse, from_postgres);
    }
    assert!(app.state.analytics.healthy());
    let urls = proxy.state.urls.lock().unwrap()[urls_before..].to_vec();
    assert!(urls.len() >= 4, "the lists' reads went through the proxy: {urls:?}");
    for url in urls {
        assert!(!url.contains("needle") && url.len() < 1_000, "a filter value in a URL: {url:.300}");
    }
}

/// Over a cap, a list is refused with 422 naming the filter, before any
/// store is asked, and leaves ClickHouse in use: the probe's 5,000 tags,
/// 101 values, and a value longer than any stored one.
#[tokio::test]
async fn list_filters_over_their_caps_are_refused_and_change_nothing() {
    let proxy = PageProxy::start().await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(move |c| {
        c.clickhouse_url = url;
        c.clickhouse_retry_after_ms = 600_000;
    })
    .await;
    app.clickhouse_ready().await;
    seed(&app, 10).await;
    backfill_all(&app, 100).await;
    let many = |n: usize| (0..n).map(|i| format!("tag{i}")).collect::<Vec<_>>().join(",");
    let over = [
        (format!("filter[tags]={}", many(5_000)), "filter[tags]"),
        (format!("filter[tags]={}&filter[tags]=one-more", many(100)), "filter[tags]"),
        (format!("filter[type]={}", many(101)), "filter[type]"),
        (format!("filter[taskIdentifier]=a,{}", "k".repeat(129)), "filter[taskIdentifier]"),
        (format!("filter[tags]={}", "t".repeat(129)), "filter[tags]"),
        (format!("filter[type]={}", "y".repeat(65)), "filter[type]"),
        (format!("filter[externalId]={}", "e".repeat(257)), "filter[externalId]"),
    ];
    let reads = proxy.state.urls.lock().unwrap().len();
    for (query, field) in &over {
        let (status, body, _) = list(&app, query).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        assert_eq!(body["field"], *field, "{body}");
        assert!(body["reason"].as_str().unwrap().contains("at most"), "{body}");
    }
    assert_eq!(proxy.state.urls.lock().unwrap().len(), reads, "no store was asked");
    assert!(app.state.analytics.healthy());
    let query = format!("filter[tags]={},red", many(99));
    let (status, body, source) = list(&app, &query).await;
    assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "{body}");
    assert_eq!(ids(&body), postgres_page(&app, &query).await);
    assert!(!ids(&body).is_empty(), "the seeded red sessions: {body}");
}

/// An overlay whose ids take the SQL past ClickHouse's default
/// `max_query_size` (256 KiB; 7,000 ids are 273 KB) is still ClickHouse's:
/// the list raises the setting for that query. ClickHouse refused it ("Max
/// query size exceeded"), which sent every list to Postgres.
#[tokio::test]
async fn an_overlay_past_the_default_query_size_is_served_by_clickhouse() {
    let app = TestApp::spawn_with(|c| c.list_overlay_max_rows = 8_000).await;
    app.clickhouse_ready().await;
    seed(&app, 30).await;
    backfill_all(&app, 100).await;
    insert_burst(&app, 7000).await;
    for filter in ["filter[tags]=burst&page[size]=10", "filter[tags]=red&page[size]=10"] {
        let (status, body, source) = list(&app, filter).await;
        assert_eq!((status, source.as_str()), (StatusCode::OK, "clickhouse"), "{filter}: {body}");
        assert_eq!(ids(&body), postgres_page(&app, filter).await, "{filter}");
    }
    assert!(app.state.analytics.healthy());
}
