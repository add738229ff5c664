//! Logical replication into ClickHouse on real Postgres (`wal_level=logical`)
//! and the ClickHouse dev server. Each test's server replicates its own
//! schema through its own slot and publication (named after the schema), and
//! drops them at the end.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sessiond::analytics::rows::SessionRow;
use sessiond::analytics::watermark::{self, Table};
use sessiond::config::Config;
use sessiond::replication::slot;

use crate::common::{eventually, session_body, TestApp};

fn replicating(c: &mut Config) {
    c.replication_enabled = true;
    c.replication_batch_ms = 50;
    c.replication_lease_ms = 1_500;
    c.clickhouse_retry_after_ms = 100;
}

/// Stops the server and drops its slot and publication (a slot left behind
/// would keep WAL forever).
async fn finish(app: TestApp) {
    let db = app.db().clone();
    let name = app.state.config.replication_slot_name();
    drop(app);
    eventually(20, "the slot to be released and dropped", || async { slot::drop(&db, &name).await.ok() }).await;
}

/// The session's row as ClickHouse shows it (FINAL), if any.
async fn in_clickhouse(app: &TestApp, friendly: &str) -> Option<SessionRow> {
    app.state
        .analytics
        .client()
        .query("SELECT ?fields FROM sessions_v1 FINAL WHERE friendly_id = {f:String}")
        .param("f", friendly)
        .fetch_optional()
        .await
        .unwrap()
}

/// Waits until ClickHouse holds exactly the row Postgres holds (all but the
/// version), or its deletion.
async fn replicated(app: &TestApp, friendly: &str) -> Option<SessionRow> {
    let secs = 20;
    eventually(secs, &format!("{friendly} to replicate"), || async {
        let pg = sessiond::sessions::store::find(app.db(), app.a.env.id, friendly).await.unwrap();
        let ch = in_clickhouse(app, friendly).await;
        match (pg, ch) {
            (None, None) => Some(None),
            (Some(pg), Some(ch)) => {
                let expected = SessionRow::from_session(&pg, ch._version);
                (expected == ch).then_some(Some(ch))
            }
            _ => None,
        }
    })
    .await
}

async fn ready(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let app = TestApp::spawn_with(|c| {
        replicating(c);
        tweak(c);
    })
    .await;
    app.clickhouse_ready().await;
    // The slot is new: the consumer starts a full backfill, whose end vouches
    // for ClickHouse (the watermark).
    eventually(20, "the first backfill's watermark", || async {
        watermark::read(&app.state.analytics, Table::Sessions).await.ok().flatten()
    })
    .await;
    app
}

#[tokio::test]
async fn inserts_updates_closes_and_deletes_replicate() {
    let app = ready(|_| {}).await;
    let s = app.create_session(session_body(Some("repl-1"))).await;
    let friendly = s["id"].as_str().unwrap().to_string();
    let first = replicated(&app, &friendly).await.expect("inserted");
    assert_eq!(first.tags, vec!["test"]);

    let (status, _) =
        app.patch(&format!("/api/v1/sessions/{friendly}"), &app.a.key, json!({"tags": ["a, b", "it's"]})).await;
    assert_eq!(status, StatusCode::OK);
    let updated = replicated(&app, &friendly).await.expect("updated");
    assert_eq!(updated.tags, vec!["a, b", "it's"]);
    assert!(updated._version > first._version, "a later commit, a higher version");

    let (status, _) =
        app.post(&format!("/api/v1/sessions/{friendly}/close"), &app.a.key, json!({"reason": "done"})).await;
    assert_eq!(status, StatusCode::OK);
    let closed = replicated(&app, &friendly).await.expect("closed");
    assert_eq!(closed.closed_reason.as_deref(), Some("done"));

    // The session's first run replicates too.
    let runs: u64 = app
        .state
        .analytics
        .client()
        .query("SELECT count() FROM task_runs_v1 FINAL WHERE session_id = {s:String}")
        .param("s", first.session_id.clone())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(runs, 1);

    // A delete: the row vanishes under FINAL.
    sqlx::query("DELETE FROM session_runs").execute(app.db()).await.unwrap();
    sqlx::query("UPDATE task_runs SET session_id = NULL").execute(app.db()).await.unwrap();
    sqlx::query("DELETE FROM sessions WHERE friendly_id = $1").bind(&friendly).execute(app.db()).await.unwrap();
    assert!(replicated(&app, &friendly).await.is_none());

    // The list is served by ClickHouse, and the watermark follows the commits.
    let mark = watermark::read(&app.state.analytics, Table::Sessions).await.unwrap().unwrap();
    assert!(mark >= closed.updated_at - chrono::Duration::seconds(1), "watermark {mark} vs {}", closed.updated_at);
    finish(app).await;
}

#[tokio::test]
async fn a_server_killed_mid_batch_loses_nothing() {
    // Batches wait long enough that the kill finds them unflushed.
    let app = ready(|c| {
        c.replication_batch_ms = 60_000;
        c.replication_batch_rows = 1_000;
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let s = app.create_session(session_body(Some(&format!("kill-{i}")))).await;
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(in_clickhouse(&app, &ids[0]).await.is_none(), "still buffered");
    let app = app.restart(|c| c.replication_batch_ms = 50).await;
    for id in &ids {
        replicated(&app, id).await.expect("replayed after the restart");
    }
    finish(app).await;
}

#[tokio::test]
async fn the_backlog_arrives_after_clickhouse_returns() {
    let mut private = crate::common::clickhouse::PrivateClickHouse::start().await;
    let url = private.url();
    let app = ready(move |c| c.clickhouse_url = url).await;
    private.stop().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = app.create_session(session_body(Some(&format!("backlog-{i}")))).await;
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    // The flush jobs fail (and use up their attempts) while ClickHouse is away.
    eventually(20, "a flush to fail", || async {
        let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.kind = 'replication-flush' AND a.status = 'failed'")
            .fetch_one(app.db())
            .await
            .unwrap();
        (failed > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    private.restart().await;
    for id in &ids {
        replicated(&app, id).await.expect("arrived after ClickHouse returned");
    }
    finish(app).await;
}

#[tokio::test]
async fn one_of_two_servers_consumes_and_the_other_takes_over() {
    let first = ready(|_| {}).await;
    let second = first.peer(|_| {}).await;
    let name = first.state.config.replication_slot_name();
    let s = first.create_session(session_body(Some("two-1"))).await;
    replicated(&first, s["id"].as_str().unwrap()).await.expect("replicated");
    let walsenders: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE application_name = $1")
        .bind(sessiond::replication::consumer::application_name(&name))
        .fetch_one(first.db())
        .await
        .unwrap();
    assert_eq!(walsenders, 1, "exactly one consumer streams the slot");

    // The first server goes away (its lease expires); the second takes over.
    drop(first);
    let s = second.create_session(session_body(Some("two-2"))).await;
    replicated(&second, s["id"].as_str().unwrap()).await.expect("replicated by the survivor");
    finish(second).await;
}

#[tokio::test]
async fn a_slot_dropped_under_a_running_server_is_recreated_and_backfilled() {
    let app = ready(|_| {}).await;
    let name = app.state.config.replication_slot_name();
    let a = app.create_session(session_body(Some("slot-1"))).await;
    replicated(&app, a["id"].as_str().unwrap()).await.expect("replicated");
    // Cut the stream and drop the slot before the consumer reconnects.
    eventually(10, "the slot to be dropped", || async {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
        )
        .bind(&name)
        .execute(app.db())
        .await
        .unwrap();
        sqlx::query("SELECT pg_drop_replication_slot($1)").bind(&name).execute(app.db()).await.ok()
    })
    .await;
    // Written while no slot exists: only the healing backfill can bring it.
    let b = app.create_session(session_body(Some("slot-2"))).await;
    replicated(&app, b["id"].as_str().unwrap()).await.expect("healed by a backfill");
    let c = app.create_session(session_body(Some("slot-3"))).await;
    replicated(&app, c["id"].as_str().unwrap()).await.expect("replicated by the new slot");
    finish(app).await;
}

#[tokio::test]
async fn the_lease_has_one_holder_and_expires_when_not_renewed() {
    use sessiond::replication::lease::Lease;
    let (_, redis) =
        sessiond::app::connect_redis(&Config::for_database(&crate::common::database_url(), None)).await.unwrap();
    let prefix = format!("test:lease-{}", uuid::Uuid::new_v4().simple());
    let ttl = Duration::from_millis(600);
    let mut first = Lease::try_acquire(&redis, &prefix, "slot", ttl).await.unwrap().expect("free lease");
    assert!(Lease::try_acquire(&redis, &prefix, "slot", ttl).await.unwrap().is_none(), "one holder at a time");
    assert!(first.renew().await.unwrap() && first.held());
    // Unrenewed, the holder stops counting itself the holder (at 2/3 of the
    // time) before anyone else can take the lease (at its end).
    tokio::time::sleep(ttl * 2 / 3 + Duration::from_millis(20)).await;
    assert!(!first.held());
    assert!(Lease::try_acquire(&redis, &prefix, "slot", ttl).await.unwrap().is_none(), "not yet expired");
    tokio::time::sleep(ttl / 3 + Duration::from_millis(50)).await;
    let second = Lease::try_acquire(&redis, &prefix, "slot", ttl).await.unwrap().expect("expired lease is free");
    assert!(second.token > first.token, "each term has a higher fencing token");
    assert!(!first.renew().await.unwrap(), "the old holder cannot renew the new holder's lease");
    second.release().await;
    assert!(Lease::try_acquire(&redis, &prefix, "slot", ttl).await.unwrap().is_some(), "released");
}
