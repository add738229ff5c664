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
use sessiond::replication::health::{self, ReplicationHealth};
use sessiond::replication::slot;

use crate::common::{eventually, session_body, TestApp};

pub fn replicating(c: &mut Config) {
    c.replication_enabled = true;
    c.replication_batch_ms = 50;
    // Long enough that a renewal late on a loaded machine (eight tests at
    // once) does not stop the consumer; short enough for the takeover test.
    c.replication_lease_ms = 3_000;
    c.clickhouse_retry_after_ms = 100;
}

/// Stops the server and drops its slot and publication (a slot left behind
/// would keep WAL forever).
pub async fn finish(app: TestApp) {
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

/// Ends the server's replication stream and drops its slot before the
/// consumer reconnects (retried: the consumer may win the race once).
pub async fn drop_slot_under(app: &TestApp) {
    let name = app.state.config.replication_slot_name();
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
}

async fn health(app: &TestApp) -> ReplicationHealth {
    let slot = app.state.config.replication_slot_name();
    health::status(app.db(), &app.state.redis, &app.state.config.redis_prefix, &slot).await.unwrap()
}

/// Waits until every change is in ClickHouse and the watermark has passed it.
pub async fn settled(app: &TestApp) {
    eventually(20, "replication to settle", || async {
        let newest: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT max(t) FROM (SELECT max(updated_at) AS t FROM sessions
                                 UNION ALL SELECT max(updated_at) FROM task_runs) changes",
        )
        .fetch_one(app.db())
        .await
        .unwrap();
        let mark = watermark::read(&app.state.analytics, Table::Sessions).await.unwrap();
        let passed = mark.zip(newest).is_some_and(|(mark, newest)| mark >= newest);
        (passed && health(app).await.pending_flushes == 0).then_some(())
    })
    .await;
}

pub async fn ready(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let app = TestApp::spawn_with(|c| {
        replicating(c);
        tweak(c);
    })
    .await;
    app.clickhouse_ready().await;
    // The slot is new: the consumer starts a full backfill, whose end vouches
    // for ClickHouse (the watermark).
    eventually(30, "the first backfill's watermark", || async {
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

    // A change to a sort-key column (created_at) leaves one visible row.
    sqlx::query("UPDATE sessions SET created_at = created_at - interval '40 days' WHERE friendly_id = $1")
        .bind(&friendly)
        .execute(app.db())
        .await
        .unwrap();
    let moved = replicated(&app, &friendly).await.expect("moved");
    assert_eq!(moved.created_at, closed.created_at - chrono::Duration::days(40));
    let visible: u64 = app
        .state
        .analytics
        .client()
        .query("SELECT count() FROM sessions_v1 FINAL WHERE friendly_id = {f:String}")
        .param("f", &friendly)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(visible, 1, "no duplicate under the old key");

    // A delete: the row vanishes under FINAL.
    sqlx::query("DELETE FROM session_runs").execute(app.db()).await.unwrap();
    sqlx::query("UPDATE task_runs SET session_id = NULL").execute(app.db()).await.unwrap();
    sqlx::query("DELETE FROM sessions WHERE friendly_id = $1").bind(&friendly).execute(app.db()).await.unwrap();
    assert!(replicated(&app, &friendly).await.is_none());

    // The list is served by ClickHouse, and the watermark follows the commits.
    let mark = watermark::read(&app.state.analytics, Table::Sessions).await.unwrap().unwrap();
    assert!(mark >= closed.updated_at - chrono::Duration::seconds(1), "watermark {mark} vs {}", closed.updated_at);

    // Health: the slot streams to a lease holder and retains little WAL;
    // every batch is flushed.
    let h = eventually(10, "health to settle", || async {
        let h = health(&app).await;
        (h.pending_flushes == 0 && h.slot.as_ref().is_some_and(|s| s.active)).then_some(h)
    })
    .await;
    let slot = h.slot.as_ref().unwrap();
    assert!(slot.confirmed_flush_lsn.is_some(), "{h:?}");
    assert_eq!(slot.wal_status, Some(slot::WalStatus::Reserved), "{h:?}");
    // The slot was created by this server: its generation's copy is complete
    // once the first backfill has run.
    let generation = h.generation.as_ref().expect("the slot's generation");
    assert!(generation.generation >= 1 && generation.incomplete.is_empty(), "{h:?}");
    assert!(h.lease_token.is_some(), "{h:?}");
    assert!(h.last_flush_at.is_some() && h.last_flush_lag_ms.is_some_and(|ms| ms >= 0), "{h:?}");
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
    // Health shows the backlog while ClickHouse is away.
    let stalled = eventually(10, "health to show the pending flushes and their error", || async {
        let h = health(&app).await;
        // Three sessions and their runs: six rows at least.
        (h.pending_flushes > 0 && h.pending_rows >= 6 && h.last_error.is_some()).then_some(h)
    })
    .await;
    assert!(stalled.oldest_pending_age_ms.is_some(), "{stalled:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    private.restart().await;
    for id in &ids {
        replicated(&app, id).await.expect("arrived after ClickHouse returned");
    }
    eventually(20, "the backlog to drain", || async { (health(&app).await.pending_flushes == 0).then_some(()) }).await;
    finish(app).await;
}

#[tokio::test]
async fn one_of_two_servers_consumes_and_the_other_takes_over() {
    let first = ready(|_| {}).await;
    let second = first.peer(|_| {}).await;
    let name = first.state.config.replication_slot_name();
    let s = first.create_session(session_body(Some("two-1"))).await;
    replicated(&first, s["id"].as_str().unwrap()).await.expect("replicated");
    let walsenders = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE application_name = $1")
            .bind(sessiond::replication::consumer::application_name(&name))
            .fetch_one(first.db())
            .await
            .unwrap();
        n
    };
    // A consumer may be between two streams for a moment (a lease renewal
    // late on a loaded machine); one streams, never two.
    eventually(10, "one consumer to stream the slot", || async { (walsenders().await == 1).then_some(()) }).await;
    for _ in 0..10 {
        assert!(walsenders().await <= 1, "two consumers stream the slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first server goes away (its lease expires); the second takes over.
    drop(first);
    let s = second.create_session(session_body(Some("two-2"))).await;
    replicated(&second, s["id"].as_str().unwrap()).await.expect("replicated by the survivor");
    finish(second).await;
}

#[tokio::test]
async fn a_slot_dropped_under_a_running_server_is_recreated_and_backfilled() {
    let app = ready(|_| {}).await;
    let a = app.create_session(session_body(Some("slot-1"))).await;
    replicated(&app, a["id"].as_str().unwrap()).await.expect("replicated");
    // Cut the stream and drop the slot before the consumer reconnects.
    drop_slot_under(&app).await;
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
    // A server of its own for the fence's table; it does not replicate.
    let app = TestApp::spawn().await;
    let (db, redis, prefix) = (app.db(), &app.state.redis, app.state.config.redis_prefix.as_str());
    let ttl = Duration::from_millis(600);
    let mut first = Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().expect("free lease");
    assert!(Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().is_none(), "one holder at a time");
    assert!(first.renew().await.unwrap() && first.held());
    // Unrenewed, the holder stops counting itself the holder (at 2/3 of the
    // time) before anyone else can take the lease (at its end).
    tokio::time::sleep(ttl * 2 / 3 + Duration::from_millis(20)).await;
    assert!(!first.held());
    assert!(Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().is_none(), "not yet expired");
    tokio::time::sleep(ttl / 3 + Duration::from_millis(50)).await;
    let second = Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().expect("expired lease is free");
    assert!(second.token > first.token, "each term has a higher fencing token");
    assert!(!first.renew().await.unwrap(), "the old holder cannot renew the new holder's lease");
    second.release().await;
    assert!(Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().is_some(), "released");
}

/// Redis restarted without its data takes pending flush jobs with it; the
/// ledger relays them again, long before their own retry would come.
#[tokio::test]
async fn flush_jobs_lost_with_redis_are_relayed_again() {
    use crate::common::redis_proc::{start_fresh, TempDir};
    let dir = TempDir::new();
    let redis = start_fresh(&dir.0).await;
    let redis_url = redis.url();
    let mut private = crate::common::clickhouse::PrivateClickHouse::start().await;
    let ch_url = private.url();
    let app = ready(move |c| {
        c.clickhouse_url = ch_url;
        c.redis_url = redis_url;
    })
    .await;
    // From here on a failed attempt waits 30 s (and more) for its retry.
    let app = app.restart(|c| c.job_retry_base_ms = 30_000).await;
    private.stop().await;
    let s = app.create_session(session_body(Some("lost-flush"))).await;
    let job: uuid::Uuid = eventually(20, "a flush attempt to fail", || async {
        sqlx::query_scalar(
            "SELECT j.id FROM jobs j JOIN job_attempts a ON a.job_id = j.id
             WHERE j.kind = 'replication-flush' AND a.status = 'failed' LIMIT 1",
        )
        .fetch_optional(app.db())
        .await
        .unwrap()
    })
    .await;
    // ClickHouse is back before the queue is lost, so the job relayed again
    // can succeed at once.
    private.restart().await;
    redis.flush_all().await;
    // Well inside the 30 s its own retry waits.
    app.job_succeeded(15, "the lost flush job to run again", job).await;
    replicated(&app, s["id"].as_str().unwrap()).await.expect("replicated");
    eventually(15, "no batch left pending", || async { (health(&app).await.pending_flushes == 0).then_some(()) }).await;
    finish(app).await;
}

/// The scheduled reconciliation finds the hours where ClickHouse differs
/// from Postgres (a lost update, a lost insert, a lost delete) and repairs
/// them; run again, it finds nothing.
#[tokio::test]
async fn reconciliation_repairs_what_clickhouse_lost() {
    use crate::reconcile::figure;
    use sessiond::analytics::rows::parse_lsn;
    // No sweeps: nothing changes the rows behind the test's back.
    let app = ready(|c| {
        c.list_overlay_margin_ms = 0;
        c.job_schedules_file = Some(crate::common::schedules_file(&[]));
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = app.create_session(session_body(Some(&format!("rec-{i}")))).await;
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    let mut rows = Vec::new();
    for id in &ids {
        rows.push(replicated(&app, id).await.expect("replicated"));
    }
    settled(&app).await;
    // Nothing differs yet.
    let job = sessiond::jobs::Job::ReplicationReconcile;
    let clean = app.sweep(job.clone()).await;
    assert_eq!(figure(&clean, "sessions", "hours differ"), 0, "{clean}");
    assert_eq!(figure(&clean, "runs", "hours differ"), 0, "{clean}");

    // Damage the copy as lost changes would, versioned as if written now.
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(app.db()).await.unwrap();
    let now = parse_lsn(&lsn).unwrap();
    let mut stale = rows[0].clone();
    stale.tags = vec!["stale".into()];
    stale.updated_at -= chrono::Duration::seconds(5);
    stale._version = now;
    let gone = SessionRow { _is_deleted: 1, _version: now, ..rows[1].clone() };
    let ghost_id = uuid::Uuid::new_v4().to_string();
    let ghost = SessionRow {
        session_id: ghost_id.clone(),
        friendly_id: "session_ghost".into(),
        external_id: None,
        _version: now,
        ..rows[2].clone()
    };
    app.state.analytics.insert_rows("sessions_v1", &[stale, gone, ghost]).await.unwrap();
    assert!(in_clickhouse(&app, &ids[1]).await.is_none(), "the insert is lost");

    let found = app.sweep(job.clone()).await;
    assert_eq!(figure(&found, "sessions", "hours differ"), 1, "{found}");
    assert_eq!(figure(&found, "sessions", "rows marked deleted"), 1, "{found}");
    assert_eq!(figure(&found, "sessions", "rows copied"), 3, "{found}");
    // Copying the hour again restores the lost update and insert; the marker
    // removed the row Postgres never had.
    for id in &ids {
        replicated(&app, id).await.expect("repaired");
    }
    assert!(in_clickhouse(&app, "session_ghost").await.is_none(), "the ghost is gone");
    eventually(20, "the repair to finish", || async {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM clickhouse_backfills WHERE status = 'running'")
            .fetch_one(app.db())
            .await
            .unwrap();
        (running == 0).then_some(())
    })
    .await;
    let again = app.sweep(job).await;
    assert_eq!(figure(&again, "sessions", "hours differ"), 0, "{again}");
    let h = health(&app).await;
    assert_eq!(h.last_reconcile.as_deref(), Some(again.as_str()));
    finish(app).await;
}

/// A slot's generation: its copy is incomplete from before the slot exists
/// until a full backfill that started after the slot completes. A ranged
/// backfill, or a full one that started earlier, does not complete it; a
/// generation whose backfill was canceled asks for another.
#[tokio::test]
async fn a_new_slots_copy_is_complete_only_after_a_full_backfill_started_after_it() {
    use sessiond::analytics::backfill::{self, BackfillRequest, BackfillStatus};

    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    let (db, name) = (app.db().clone(), app.state.config.replication_slot_name());
    let schema = app.state.config.database_schema.clone().unwrap();
    app.create_session(session_body(Some("gen-1"))).await;
    // A full backfill that finished before the slot existed vouches for nothing after.
    let early = backfill::start(&db, &app.state.jobs, &backfill::full()).await.unwrap();
    let done = |ids: Vec<uuid::Uuid>| {
        let db = db.clone();
        async move {
            eventually(20, "the backfills to complete", || async {
                let mut all = true;
                for id in &ids {
                    let b = backfill::store::find(&db, *id).await.unwrap().unwrap();
                    all &= b.status == BackfillStatus::Completed;
                }
                all.then_some(())
            })
            .await
        }
    };
    done(early.iter().map(|b| b.id).collect()).await;
    assert!(!slot::copy_incomplete(&db, Table::Sessions).await.unwrap(), "no generation yet: nothing to heal");

    assert!(slot::ensure(&db, &name, &schema).await.unwrap(), "the slot is created");
    let g = slot::generation(&db, &name).await.unwrap().unwrap();
    assert_eq!((g.generation, g.incomplete.clone()), (1, vec![Table::Sessions, Table::Runs]), "{g:?}");
    assert!(slot::copy_incomplete(&db, Table::Sessions).await.unwrap());
    assert_eq!(slot::backfill_needed(&db, &name).await.unwrap(), vec![Table::Sessions, Table::Runs]);

    // A ranged backfill does not complete it.
    let now = chrono::Utc::now();
    let ranged = BackfillRequest {
        tables: vec![Table::Sessions],
        from: Some(now - chrono::Duration::days(1)),
        to: Some(now),
        chunk_size: 100,
    };
    let ranged = backfill::start(&db, &app.state.jobs, &ranged).await.unwrap();
    done(ranged.iter().map(|b| b.id).collect()).await;
    assert!(slot::copy_incomplete(&db, Table::Sessions).await.unwrap(), "a ranged backfill heals nothing");

    // A full one that started after the slot does, table by table.
    let full = backfill::start(&db, &app.state.jobs, &backfill::full()).await.unwrap();
    assert!(slot::backfill_needed(&db, &name).await.unwrap().is_empty(), "one is running");
    done(full.iter().map(|b| b.id).collect()).await;
    assert!(!slot::copy_incomplete(&db, Table::Sessions).await.unwrap());
    assert!(slot::generation(&db, &name).await.unwrap().unwrap().incomplete.is_empty());

    // The next generation's backfill canceled: another is asked for.
    slot::drop(&db, &name).await.unwrap();
    assert!(slot::ensure(&db, &name, &schema).await.unwrap());
    assert_eq!(slot::generation(&db, &name).await.unwrap().unwrap().generation, 2);
    let held = backfill::hold_chunks(app.state.analytics.database());
    let second = backfill::start(&db, &app.state.jobs, &backfill::full()).await.unwrap();
    assert!(slot::backfill_needed(&db, &name).await.unwrap().is_empty());
    sqlx::query("UPDATE clickhouse_backfills SET status = 'canceled' WHERE id = ANY($1)")
        .bind(second.iter().map(|b| b.id).collect::<Vec<_>>())
        .execute(&db)
        .await
        .unwrap();
    drop(held);
    assert_eq!(slot::backfill_needed(&db, &name).await.unwrap(), vec![Table::Sessions, Table::Runs]);
    assert!(slot::copy_incomplete(&db, Table::Sessions).await.unwrap());
    slot::drop(&db, &name).await.unwrap();
}

/// A holder that cannot start its stream (here: a new slot's backfill needs
/// ClickHouse's tables, and ClickHouse is unreachable) lets the lease go at
/// once instead of keeping every other process waiting out its whole term.
#[tokio::test]
async fn a_holder_that_cannot_start_streaming_releases_the_lease() {
    use sessiond::replication::lease;
    let app = TestApp::spawn_with(|c| {
        replicating(c);
        c.replication_lease_ms = 60_000;
        c.clickhouse_url = "http://127.0.0.1:1".into();
    })
    .await;
    let (prefix, name) = (app.state.config.redis_prefix.clone(), app.state.config.replication_slot_name());
    eventually(20, "the consumer's failure to be recorded", || async {
        health(&app).await.last_error.filter(|e| !e.is_empty())
    })
    .await;
    // Between its retries the lease is free (held, it would be for 60 s).
    eventually(10, "the lease to be released", || async {
        lease::holder(&app.state.redis, &prefix, &name).await.unwrap().is_none().then_some(())
    })
    .await;
    finish(app).await;
}
