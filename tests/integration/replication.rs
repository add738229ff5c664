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
use sessiond::replication::consumer::Replicator;
use sessiond::replication::health::{self, ReplicationHealth};
use sessiond::replication::{lease, slot};
use tokio::sync::watch;

use crate::common::{eventually, session_body, TestApp};

pub fn replicating(c: &mut Config) {
    c.replication_enabled = true;
    c.replication_batch_ms = 50;
    // Long enough that a renewal late on a loaded machine (eight tests at
    // once) does not stop the consumer; short enough for the takeover test.
    c.replication_lease_ms = 3_000;
    c.clickhouse_retry_after_ms = 100;
}

/// Stops the server, waiting until its consumer has stopped (so nothing of
/// it can recreate the slot), then drops its slot and publication (a slot
/// left behind would keep WAL on the shared server for good) and checks that
/// the slot is gone.
pub async fn finish(app: TestApp) {
    let db = app.db().clone();
    let name = app.state.config.replication_slot_name();
    app.stop().await;
    drop_slot_of_stopped(&db, &name).await;
}

/// Drops the slot of a deployment none of whose consumers runs any more, and
/// checks it stays dropped. Postgres ends the walsender a moment after the
/// consumer's connection closes; until then the slot is active and cannot
/// be dropped.
async fn drop_slot_of_stopped(db: &sqlx::PgPool, name: &str) {
    eventually(20, "the slot to be released and dropped", || async { slot::drop(db, name).await.ok() }).await;
    assert!(slot::status(db, name).await.unwrap().is_none(), "the slot {name} is still there after its test");
}

/// A replicating deployment whose server runs no consumer of its own: the
/// test runs consumers itself ([`own_consumer`]), to close one's shutdown
/// channel or abort it outright.
async fn without_consumer(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut app = TestApp::spawn_with(|c| {
        replicating(c);
        tweak(c);
        c.replication_enabled = false;
    })
    .await;
    app.guard_slot();
    app.clickhouse_ready().await;
    app
}

/// A consumer of `app`'s deployment run by the test.
struct OwnConsumer {
    task: tokio::task::JoinHandle<()>,
    stop: Option<watch::Sender<bool>>,
    open_rows: watch::Receiver<usize>,
}

fn own_consumer(app: &TestApp) -> OwnConsumer {
    let s = &app.state;
    let replicator = Replicator::new(&s.config, s.db.clone(), s.redis.clone(), s.jobs.clone(), s.analytics.clone());
    let open_rows = replicator.open_rows();
    let (stop, rx) = watch::channel(false);
    OwnConsumer { task: tokio::spawn(replicator.run(rx)), stop: Some(stop), open_rows }
}

/// The lease's current token, if anyone holds it.
async fn lease_token(app: &TestApp) -> Option<u64> {
    let (prefix, name) = (&app.state.config.redis_prefix, app.state.config.replication_slot_name());
    lease::holder(&app.state.redis, prefix, &name).await.unwrap()
}

/// Waits until the slot streams under a lease newer than `after` and the
/// first backfill has vouched for the copy; returns the lease's token.
async fn streaming_after(app: &TestApp, after: u64) -> u64 {
    let name = app.state.config.replication_slot_name();
    eventually(30, "a consumer streaming the slot under a new lease", || async {
        let active = slot::status(app.db(), &name).await.unwrap().is_some_and(|s| s.active);
        let mark = watermark::read(&app.state.analytics, Table::Sessions).await.ok().flatten();
        let token = lease_token(app).await.filter(|t| *t > after);
        if active && mark.is_some() {
            token
        } else {
            None
        }
    })
    .await
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

/// A consumer killed outright (no graceful stop, no release) while its open
/// batch holds rows loses none of them: the slot never confirmed past them,
/// so the next holder's stream replays them.
#[tokio::test]
async fn a_consumer_killed_mid_batch_loses_nothing() {
    // Batches wait long enough that the kill finds them unflushed.
    let app = without_consumer(|c| {
        c.replication_batch_ms = 60_000;
        c.replication_batch_rows = 1_000;
    })
    .await;
    let mut consumer = own_consumer(&app);
    let killed_token = streaming_after(&app, 0).await;
    let name = app.state.config.replication_slot_name();
    let wal_now = || async {
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(app.db()).await.unwrap();
        sessiond::analytics::rows::parse_lsn(&lsn).unwrap()
    };
    let mut ids = Vec::new();
    let mut after_first = 0;
    for i in 0..5 {
        let s = app.create_session(session_body(Some(&format!("kill-{i}")))).await;
        ids.push(s["id"].as_str().unwrap().to_string());
        if i == 0 {
            after_first = wal_now().await;
        }
    }
    // Each create commits a session and its first run together.
    let rows = ids.len() * 2;
    tokio::time::timeout(Duration::from_secs(20), consumer.open_rows.wait_for(|n| *n >= rows))
        .await
        .expect("the consumer never buffered the creates' rows")
        .expect("the consumer's row count");
    for id in &ids {
        assert!(in_clickhouse(&app, id).await.is_none(), "{id} was flushed: the kill would not find it buffered");
    }
    // With rows buffered, the slot must not confirm past them. The consumer
    // reports its position every 500 ms; two reports after the rows were
    // buffered carry whatever its confirmer made of them.
    let buffered_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now()").fetch_one(app.db()).await.unwrap();
    eventually(20, "two position reports after the rows were buffered", || async {
        let reported: Option<bool> = sqlx::query_scalar(
            "SELECT reply_time > $2 + interval '1100 milliseconds' FROM pg_stat_replication WHERE application_name = $1",
        )
        .bind(sessiond::replication::consumer::application_name(&name))
        .bind(buffered_at)
        .fetch_optional(app.db())
        .await
        .unwrap();
        (reported == Some(true)).then_some(())
    })
    .await;
    let confirmed = slot::status(app.db(), &name).await.unwrap().and_then(|s| s.confirmed_flush_lsn);
    let confirmed = confirmed.as_deref().and_then(sessiond::analytics::rows::parse_lsn).unwrap_or(0);
    assert!(
        confirmed < after_first,
        "the slot confirmed {confirmed:X}, past the first buffered create (before {after_first:X})"
    );
    consumer.task.abort();
    assert!(consumer.task.await.unwrap_err().is_cancelled());
    // Another server of the deployment takes the slot over (its holder gone
    // without a release) and replays the batch the kill lost.
    let survivor = app
        .peer(|c| {
            c.replication_enabled = true;
            c.replication_batch_ms = 50;
        })
        .await;
    assert!(streaming_after(&survivor, killed_token).await > killed_token);
    for id in &ids {
        replicated(&survivor, id).await.expect("replayed after the kill");
    }
    finish(survivor).await;
    app.stop().await;
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
    // A flush job uses up its attempts while ClickHouse is away and fails.
    // (The consumer revives it within 2 s, so its `failed` status may be
    // missed between two polls; its failed attempts are not.)
    let budget = sessiond::jobs::DEFAULT_MAX_ATTEMPTS as i64;
    let job: uuid::Uuid = eventually(30, "a flush job to fail every attempt", || async {
        sqlx::query_scalar(
            "SELECT j.id FROM jobs j WHERE j.kind = 'replication-flush'
               AND (SELECT count(*) FROM job_attempts a WHERE a.job_id = j.id AND a.status = 'failed') >= $1
             LIMIT 1",
        )
        .bind(budget)
        .fetch_optional(app.db())
        .await
        .unwrap()
    })
    .await;
    // Re-budgeted rather than left failed: back in line with a fresh budget
    // on top of the attempts spent.
    let max_attempts: i32 = eventually(10, "the failed flush job to be given a fresh budget", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().expect("job row");
        (row.max_attempts as i64 > budget).then_some(row.max_attempts)
    })
    .await;
    assert!(max_attempts as i64 >= 2 * budget, "a fresh budget on top of the {budget} spent: {max_attempts}");
    // Health shows the backlog while ClickHouse is away.
    let stalled = eventually(10, "health to show the pending flushes and their error", || async {
        let h = health(&app).await;
        // Three sessions and their runs: six rows at least.
        (h.pending_flushes > 0 && h.pending_rows >= 6 && h.last_error.is_some()).then_some(h)
    })
    .await;
    assert!(stalled.oldest_pending_age_ms.is_some(), "{stalled:?}");
    private.restart().await;
    for id in &ids {
        replicated(&app, id).await.expect("arrived after ClickHouse returned");
    }
    eventually(20, "the backlog to drain", || async { (health(&app).await.pending_flushes == 0).then_some(()) }).await;
    // The revived job itself landed, on an attempt past its first budget.
    app.job_succeeded(20, "the revived flush job", job).await;
    let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().expect("job row");
    assert!(row.attempts as i64 > budget, "{row:?}");
    finish(app).await;
}

#[tokio::test]
async fn one_of_two_servers_consumes_and_the_other_takes_over() {
    // A lease that tolerates a renewal seconds late on a loaded machine: the
    // first server keeps it until it stops.
    let long_lease = |c: &mut Config| c.replication_lease_ms = 10_000;
    let first = ready(long_lease).await;
    let first_token = streaming_after(&first, 0).await;
    let second = first.peer(long_lease).await;
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
    assert_eq!(lease_token(&first).await, Some(first_token), "the lease changed hands while its holder ran");

    // The first server stops (its consumer gone, the lease released); the
    // second, the only consumer left, takes the lease with a newer token.
    first.stop().await;
    let taken = streaming_after(&second, first_token).await;
    let fence: i64 = sqlx::query_scalar("SELECT fence FROM replication_state WHERE slot = $1")
        .bind(&name)
        .fetch_one(second.db())
        .await
        .unwrap();
    assert_eq!(taken as i64, fence, "the new holder's token is the slot's newest");
    let s = second.create_session(session_body(Some("two-2"))).await;
    replicated(&second, s["id"].as_str().unwrap()).await.expect("replicated by the survivor");
    assert_eq!(lease_token(&second).await, Some(taken), "the survivor holds the lease");
    finish(second).await;
}

/// A holder killed outright (aborted, so it neither stops its stream
/// gracefully nor releases the lease) is replaced by the other server: the
/// lease is still its own after the kill, then a newer token streams.
#[tokio::test]
async fn a_holder_aborted_without_a_release_is_taken_over() {
    let app = without_consumer(|c| c.replication_lease_ms = 6_000).await;
    let holder = own_consumer(&app);
    let aborted_token = streaming_after(&app, 0).await;
    let s = app.create_session(session_body(Some("abort-1"))).await;
    replicated(&app, s["id"].as_str().unwrap()).await.expect("replicated by the first holder");
    holder.task.abort();
    assert!(holder.task.await.unwrap_err().is_cancelled());
    // Renewed every 2 s, the lease has some 4 s left: still the aborted one's.
    assert_eq!(lease_token(&app).await, Some(aborted_token), "the aborted holder's lease is gone at once");
    // The other server comes up to a slot nobody streams, under a lease
    // nobody renews.
    let second = app.peer(|c| c.replication_enabled = true).await;
    let taken = streaming_after(&second, aborted_token).await;
    let s = second.create_session(session_body(Some("abort-2"))).await;
    replicated(&second, s["id"].as_str().unwrap()).await.expect("replicated by the new holder");
    assert_eq!(lease_token(&second).await, Some(taken));
    finish(second).await;
    app.stop().await;
}

/// A lease whose holder died before streaming (no slot to find idle) is only
/// freed by its expiry: the other server's consumer waits it out, then takes
/// it and streams.
#[tokio::test]
async fn an_unreleased_lease_expires_and_is_taken_over() {
    let ttl = Duration::from_secs(3);
    let app = without_consumer(|c| c.replication_lease_ms = ttl.as_millis() as u64).await;
    let (db, redis, prefix) = (app.db().clone(), app.state.redis.clone(), app.state.config.redis_prefix.clone());
    let name = app.state.config.replication_slot_name();
    // A holder that takes the lease and renews it, as a consumer preparing
    // its slot would.
    let mut lease = lease::Lease::try_acquire(&db, &redis, &prefix, &name, ttl).await.unwrap().expect("free lease");
    let dead_token = lease.token;
    let renewer = tokio::spawn(async move {
        loop {
            assert!(lease.renew().await.unwrap(), "the holder lost its lease while renewing it");
            tokio::time::sleep(ttl / 3).await;
        }
    });
    let second = app.peer(|c| c.replication_enabled = true).await;
    // Killed without a release: Redis keeps the lease for the rest of its term.
    renewer.abort();
    let _ = renewer.await;
    let before_read = std::time::Instant::now();
    let left_ms: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}:replication:{name}:lease"))
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    assert!(left_ms > 0, "the lease was gone at once ({left_ms})");
    assert_eq!(lease_token(&app).await, Some(dead_token));
    let taken = eventually(20, "the other server to take the lease", || async {
        lease_token(&app).await.filter(|t| *t > dead_token)
    })
    .await;
    let waited = before_read.elapsed();
    assert!(
        waited >= Duration::from_millis(left_ms as u64),
        "taken over after {waited:?}, before the lease expired ({left_ms} ms after the kill)"
    );
    assert_eq!(streaming_after(&second, dead_token).await, taken);
    let s = second.create_session(session_body(Some("expired-1"))).await;
    replicated(&second, s["id"].as_str().unwrap()).await.expect("replicated by the new holder");
    assert_eq!(lease_token(&second).await, Some(taken));
    finish(second).await;
    app.stop().await;
}

/// A server whose shutdown sender is dropped without a signal (a server torn
/// down mid-test) stops its consumer: it releases the lease and ends, so the
/// slot dropped after it stays dropped.
#[tokio::test]
async fn a_consumer_whose_shutdown_sender_is_dropped_stops() {
    let app = without_consumer(|_| {}).await;
    let mut consumer = own_consumer(&app);
    streaming_after(&app, 0).await;
    drop(consumer.stop.take());
    tokio::time::timeout(Duration::from_secs(20), consumer.task)
        .await
        .expect("the consumer kept running after its shutdown sender was dropped")
        .expect("the consumer's task");
    assert_eq!(lease_token(&app).await, None, "the stopped consumer kept the lease");
    let (db, name) = (app.db().clone(), app.state.config.replication_slot_name());
    app.stop().await;
    drop_slot_of_stopped(&db, &name).await;
}

/// A test server let go of stops its consumer well inside its shutdown grace
/// (set far longer than the wait here, so the server's own bounded wait for
/// the consumer cannot end it): the lease is released and the slot, dropped
/// after, is not recreated.
#[tokio::test]
async fn a_dropped_test_server_stops_replicating() {
    let app = ready(|c| c.shutdown_grace_ms = 120_000).await;
    let token = streaming_after(&app, 0).await;
    let (db, redis, prefix) = (app.db().clone(), app.state.redis.clone(), app.state.config.redis_prefix.clone());
    let name = app.state.config.replication_slot_name();
    tokio::time::timeout(Duration::from_secs(30), app.stop()).await.expect("the dropped server kept running");
    assert_eq!(lease::holder(&redis, &prefix, &name).await.unwrap(), None, "token {token} still held");
    drop_slot_of_stopped(&db, &name).await;
}

#[tokio::test]
async fn a_slot_dropped_under_a_running_server_is_recreated_and_backfilled() {
    let app = ready(|_| {}).await;
    let name = app.state.config.replication_slot_name();
    let before = slot::generation(app.db(), &name).await.unwrap().expect("the first generation").generation;
    let a = app.create_session(session_body(Some("slot-1"))).await;
    replicated(&app, a["id"].as_str().unwrap()).await.expect("replicated");
    // Cut the stream and drop the slot before the consumer reconnects.
    drop_slot_under(&app).await;
    // Written around the drop: if no slot existed at its commit, only the
    // healing backfill can bring it.
    let b = app.create_session(session_body(Some("slot-2"))).await;
    // The consumer recreates the slot (a new generation), and a full
    // backfill started after the new slot completes the copy.
    let healed = eventually(30, "the new generation's copy to be completed by a backfill", || async {
        let g = slot::generation(app.db(), &name).await.unwrap()?;
        (g.generation > before && g.slot_created_at.is_some() && g.incomplete.is_empty()).then_some(g)
    })
    .await;
    let (backfills, copied): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(rows_copied), 0)::bigint FROM clickhouse_backfills
         WHERE status = 'completed' AND created_from IS NULL AND created_to IS NULL AND started_at >= $1",
    )
    .bind(healed.slot_created_at)
    .fetch_one(app.db())
    .await
    .unwrap();
    // One per table; together they copied at least the first session and its run.
    assert_eq!(backfills, 2, "the healing backfill of both tables: {healed:?}");
    assert!(copied >= 2, "the healing backfill copied {copied} rows");
    replicated(&app, b["id"].as_str().unwrap()).await.expect("healed by a backfill");
    let c = app.create_session(session_body(Some("slot-3"))).await;
    replicated(&app, c["id"].as_str().unwrap()).await.expect("replicated by the new slot");
    finish(app).await;
}

#[tokio::test]
async fn the_lease_has_one_holder_and_expires_when_not_renewed() {
    use sessiond::replication::lease::Lease;
    use std::time::Instant;
    // A server of its own for the fence's table; it does not replicate.
    let app = TestApp::spawn().await;
    let (db, redis, prefix) = (app.db(), &app.state.redis, app.state.config.redis_prefix.as_str());
    let ttl = Duration::from_secs(3);
    let mut first = Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().expect("free lease");
    assert!(Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap().is_none(), "one holder at a time");
    let renewed = Instant::now();
    assert!(first.renew().await.unwrap() && first.held());
    // Unrenewed, the holder stops counting itself the holder (at 2/3 of the
    // term) a third of the term before anyone else can take the lease (at
    // its end). Checked as it happens, with bounds a slow machine only
    // widens: the holder's last `held()` and the other's first success are
    // more than a third of the term apart, and the success comes after the
    // term.
    let mut last_held = renewed;
    let second = loop {
        if first.held() {
            last_held = Instant::now();
        }
        if let Some(lease) = Lease::try_acquire(db, redis, prefix, "slot", ttl).await.unwrap() {
            let taken = Instant::now();
            assert!(!first.held(), "taken while the old holder still counted itself the holder");
            assert!(taken - last_held > ttl / 3, "taken {:?} after the holder last held it", taken - last_held);
            assert!(taken - renewed >= ttl, "taken {:?} after the last renewal", taken - renewed);
            break lease;
        }
        assert!(renewed.elapsed() < ttl * 5, "the unrenewed lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(last_held > renewed, "the holder never counted itself the holder after renewing");
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
    let job = sessiond::jobs::JobKind::ReplicationReconcile;
    let clean = app.sweep(job).await;
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

    let found = app.sweep(job).await;
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

    let mut app = TestApp::spawn().await;
    // It creates the slot itself: dropped at the end even if the test fails.
    app.guard_slot();
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
