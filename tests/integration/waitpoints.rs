//! Waitpoints on session channels, on real Postgres and Redis.

use std::time::{Duration, Instant};

use crate::common::{eventually, running_session, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::streams::{ChannelKey, Io};
use sessiond::worker::AssignedRun;

async fn wait(app: &TestApp, run: &AssignedRun, token: &str, body: Value) -> (StatusCode, Value) {
    app.post(&format!("/api/v1/runs/{}/session-streams/wait", run.id), token, body).await
}

/// A waitpoint's status straight from the database (the worker's long-poll
/// completes waitpoints itself, so it cannot show who completed one).
async fn db_status(app: &TestApp, waitpoint: &str) -> String {
    sqlx::query_scalar("SELECT status FROM waitpoints WHERE friendly_id = $1")
        .bind(waitpoint)
        .fetch_one(app.db())
        .await
        .unwrap()
}

async fn poll(app: &TestApp, run: &AssignedRun, waitpoint: &str, secs: u64) -> Value {
    let (status, body) =
        app.get(&format!("/api/v1/runs/{}/waitpoints/{waitpoint}?waitSeconds={secs}", run.id), &run.token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn data_that_already_arrived_completes_the_wait_at_once() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "race").await;
    app.append(&s, "in", &app.a.key, "early", &[]).await;
    let (status, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in", "lastSeqNum": -1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["isCached"], false);
    let wp = body["waitpointId"].as_str().unwrap();
    assert!(wp.starts_with("waitpoint_"));
    // Completed by the create call itself, before any worker polls.
    assert_eq!(db_status(&app, wp).await, "COMPLETED");
    let done = poll(&app, &run, wp, 0).await;
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"]["body"], "early");
    assert_eq!(done["output"]["seqNum"], 0);
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
}

/// The waitpoint long-poll wakes on the record's announcement: its periodic
/// re-check and the feed's safety re-read are set far beyond the wait.
#[tokio::test]
async fn a_waiting_run_resumes_with_the_next_record() {
    let app = TestApp::spawn_with(|c| {
        c.waitpoint_recheck_ms = 600_000;
        c.feed_safety_poll_ms = 600_000;
    })
    .await;
    let (s, run) = running_session(&app, "resume").await;
    app.append(&s, "in", &app.a.key, "seen already", &[]).await;
    let (_, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in", "lastSeqNum": 0})).await;
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    assert_eq!(poll(&app, &run, &wp, 0).await["status"], "WAITING");
    assert_eq!(app.run_status(&run.id).await, "WAITING");
    // Heartbeats keep a waiting run alive.
    assert!(!app.worker().heartbeat(&run).await.unwrap().cancel);
    let waiter = {
        let (client, base, token, run_id, wp) =
            (app.client.clone(), app.base.clone(), run.token.clone(), run.id.clone(), wp.clone());
        tokio::spawn(async move {
            let r = client
                .get(format!("{base}/api/v1/runs/{run_id}/waitpoints/{wp}?waitSeconds=20"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (Instant::now(), r.json::<Value>().await.unwrap())
        })
    };
    // Ready: the long poll follows the channel's feed, and the feed knows
    // where the channel ends (it broadcasts everything after).
    eventually(10, "the long poll to follow the channel", || async {
        (app.state.hub.active_feeds() == 1).then_some(())
    })
    .await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::In };
    let feed = app.state.hub.feed(key);
    eventually(10, "the feed to start", || async { feed.is_ready().then_some(()) }).await;
    let sent = Instant::now();
    app.append(&s, "in", &app.a.key, "the answer", &[("x-record-headers", r#"[["kind","msg"]]"#)]).await;
    let (woke, done) = waiter.await.unwrap();
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"]["body"], "the answer");
    assert_eq!(done["output"]["headers"], json!([["kind", "msg"]]));
    // Not a latency bound: the poll only re-reads at the end of its 20 s
    // window (where it would find the drain job's completion), so anything
    // well inside the window means the record woke it.
    assert!(woke - sent < Duration::from_secs(10), "woke after {:?}", woke - sent);
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
}

#[tokio::test]
async fn every_waiter_on_a_channel_wakes_with_the_same_record() {
    let app = TestApp::spawn().await;
    // A run waits only on its own session, so the waiters are one run's waits.
    let (target, run) = running_session(&app, "target").await;
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let (status, body) = wait(&app, &run, &app.a.key, json!({"session": target, "io": "in"})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        waiters.push(body["waitpointId"].as_str().unwrap().to_string());
    }
    let key = ChannelKey {
        session_id: sqlx::query_scalar("SELECT id FROM sessions WHERE friendly_id = $1")
            .bind(&target)
            .fetch_one(app.db())
            .await
            .unwrap(),
        io: Io::In,
    };
    let mut conn = app.state.redis.clone();
    let pending: usize =
        redis::cmd("SCARD").arg(app.state.channels.waiters_key(key)).query_async(&mut conn).await.unwrap();
    assert_eq!(pending, 3);
    app.append(&target, "in", &app.a.key, "broadcast", &[]).await;
    // Nobody polls: the drain job completes all three.
    for wp in &waiters {
        let output: Value = eventually(10, "drained", || async {
            let (status, output): (String, Option<Value>) =
                sqlx::query_as("SELECT status, output FROM waitpoints WHERE friendly_id = $1")
                    .bind(wp)
                    .fetch_one(app.db())
                    .await
                    .unwrap();
            (status == "COMPLETED").then(|| output.unwrap_or_else(|| panic!("{wp} completed without output")))
        })
        .await;
        assert_eq!(output["body"], "broadcast");
    }
    let drain: (String, Value) = sqlx::query_as("SELECT status, payload FROM jobs WHERE kind = 'waitpoint-drain'")
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(drain.1["waitpoint_ids"].as_array().map(Vec::len), Some(3), "{drain:?}");
    let pending: usize =
        redis::cmd("SCARD").arg(app.state.channels.waiters_key(key)).query_async(&mut conn).await.unwrap();
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn waits_time_out_and_the_run_resumes() {
    let app = TestApp::spawn_without_sweeps().await;
    let (s, run) = running_session(&app, "timeout").await;
    let (_, body) =
        wait(&app, &run, &run.token, json!({"session": s, "io": "in", "timeout": "30s", "tags": "t1"})).await;
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    assert_eq!(app.run_status(&run.id).await, "WAITING");
    assert!(app.sweep(sessiond::jobs::JobKind::WaitpointTimeoutSweep).await.starts_with("0 waitpoints"));
    // Its timeout passes: the sweep ends it and the run resumes.
    sqlx::query("UPDATE waitpoints SET timeout_at = now() - interval '1 second' WHERE friendly_id = $1")
        .bind(&wp)
        .execute(app.db())
        .await
        .unwrap();
    assert!(app.sweep(sessiond::jobs::JobKind::WaitpointTimeoutSweep).await.starts_with("1 waitpoints"));
    let done = poll(&app, &run, &wp, 0).await;
    assert_eq!(done["status"], "TIMED_OUT");
    assert_eq!(done["tags"], json!(["t1"]));
    assert!(done["output"].is_null());
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
}

#[tokio::test]
async fn idempotency_keys_return_the_same_waitpoint_until_they_expire() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "idem").await;
    let body = json!({"session": s, "io": "in", "idempotencyKey": "turn-1", "idempotencyKeyTTL": "1s"});
    let (_, first) = wait(&app, &run, &run.token, body.clone()).await;
    let (_, second) = wait(&app, &run, &run.token, body.clone()).await;
    assert_eq!(first["waitpointId"], second["waitpointId"]);
    assert_eq!((first["isCached"].clone(), second["isCached"].clone()), (json!(false), json!(true)));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, third) = wait(&app, &run, &run.token, body).await;
    assert_ne!(third["waitpointId"], first["waitpointId"]);
    assert_eq!(third["isCached"], false);
}

#[tokio::test]
async fn the_pending_set_ttl_only_grows() {
    let app = TestApp::spawn().await;
    let key = ChannelKey { session_id: uuid::Uuid::now_v7(), io: Io::In };
    let ch = &app.state.channels;
    let short = ch.register_waiter(key, uuid::Uuid::now_v7(), 10_000).await.unwrap();
    assert!(short > 9_000 && short <= 10_000, "{short}");
    let long = ch.register_waiter(key, uuid::Uuid::now_v7(), 100_000).await.unwrap();
    assert!(long > 99_000, "{long}");
    let after_short = ch.register_waiter(key, uuid::Uuid::now_v7(), 5_000).await.unwrap();
    assert!(after_short > 99_000, "a shorter waiter must not shrink the set's TTL: {after_short}");
}

#[tokio::test]
async fn closing_the_session_completes_pending_waits() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "close-wait").await;
    let (_, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in"})).await;
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({"reason": "done"})).await;
    let done = poll(&app, &run, &wp, 10).await;
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"]["headers"][0], json!(["trigger-control", "session-closed"]));
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
}

#[tokio::test]
async fn wait_requests_are_validated() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "valid").await;
    let (status, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "sideways"})).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("io")));
    let (status, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in", "timeout": "whenever"})).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("timeout")));
    let (status, _) =
        wait(&app, &run, &run.token, json!({"session": s, "io": "in", "idempotencyKey": "k".repeat(2049)})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) =
        app.post("/api/v1/runs/run_missing/session-streams/wait", &app.a.key, json!({"session": s, "io": "in"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Another run's token cannot wait on behalf of this run.
    let (_, other) = running_session(&app, "valid-other").await;
    let (status, _) = wait(&app, &run, &other.token, json!({"session": s, "io": "in"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    app.worker().complete(&run, json!(null)).await.unwrap();
    let (status, _) = wait(&app, &run, &app.a.key, json!({"session": s, "io": "in"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// A drained waitpoint completes with the first record after its own
/// `lastSeqNum`, even when a later append is what drained it; one whose
/// `lastSeqNum` is ahead of that append waits on for the next one.
#[tokio::test]
async fn the_drain_completes_each_waitpoint_with_its_own_next_record() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "drain-own").await;
    for body in ["r0", "r1"] {
        app.append(&s, "in", &app.a.key, body, &[]).await;
    }
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::In };
    // Two waitpoints as a create call leaves them just before its race-check:
    // registered in the pending set, still WAITING.
    let behind = insert_waiting(&app, &run, &s, 0).await; // r1 is already after it
    let ahead = insert_waiting(&app, &run, &s, 2).await; // wants seq 3 or later
    for (id, _) in [&behind, &ahead] {
        app.state.channels.register_waiter(key, *id, 60_000).await.unwrap();
    }
    // r2 drains the set: `behind` gets r1 (not r2); `ahead` goes back in the set.
    app.append(&s, "in", &app.a.key, "r2", &[]).await;
    eventually(10, "the drain job", || async { (db_status(&app, &behind.1).await == "COMPLETED").then_some(()) }).await;
    let output: Value = sqlx::query_scalar("SELECT output FROM waitpoints WHERE id = $1")
        .bind(behind.0)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(output["body"], "r1");
    assert_eq!(output["seqNum"], 1);
    assert_eq!(db_status(&app, &ahead.1).await, "WAITING");
    eventually(10, "the waitpoint back in the pending set", || async {
        app.pending_waiters(key).await.contains(&ahead.0.to_string()).then_some(())
    })
    .await;
    app.append(&s, "in", &app.a.key, "r3", &[]).await;
    eventually(10, "the next append's drain", || async {
        (db_status(&app, &ahead.1).await == "COMPLETED").then_some(())
    })
    .await;
    let output: Value = sqlx::query_scalar("SELECT output FROM waitpoints WHERE id = $1")
        .bind(ahead.0)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(output["body"], "r3");
}

/// A WAITING waitpoint row on `.in` (no race-check, no registration).
async fn insert_waiting(app: &TestApp, run: &AssignedRun, session: &str, after_seq: i64) -> (uuid::Uuid, String) {
    use sessiond::waitpoints::store::{create, Created, NewWaitpoint};
    let run_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM task_runs WHERE friendly_id = $1")
        .bind(&run.id)
        .fetch_one(app.db())
        .await
        .unwrap();
    let created = create(
        app.db(),
        &NewWaitpoint {
            env_id: app.a.env.id,
            run_id,
            session_id: app.session_uuid(session).await,
            io: sessiond::streams::Io::In,
            after_seq,
            idempotency_key: None,
            idempotency_key_ttl_secs: None,
            tags: &[],
            timeout: None,
            max_pending: sessiond::waitpoints::DEFAULT_MAX_PENDING_PER_RUN,
        },
    )
    .await
    .unwrap();
    let Created::Waitpoint(w, _) = created else { panic!("the run cannot wait: {created:?}") };
    (w.id, w.friendly_id)
}

/// Close completes waitpoints no `session-closed` record reaches: those on
/// `.out`, and on `.in` when the close came from the run itself.
#[tokio::test]
async fn close_completes_waits_the_close_record_does_not_reach() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "close-out").await;
    let (_, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "out"})).await;
    let on_out = body["waitpointId"].as_str().unwrap().to_string();
    let (_, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in"})).await;
    let on_in = body["waitpointId"].as_str().unwrap().to_string();
    let (status, _) = app
        .post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({"callingRunId": run.id, "reason": "bye"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    for wp in [&on_out, &on_in] {
        eventually(10, "close to complete the wait", || async {
            (db_status(&app, wp).await == "COMPLETED").then_some(())
        })
        .await;
        let done = poll(&app, &run, wp, 0).await;
        assert_eq!(done["output"], json!({"sessionClosed": true, "reason": "bye"}), "{wp}");
    }
    let (_, records) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
    assert_eq!(records["records"], json!([]), "no session-closed record for the closing run");
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
}

/// No new waits on a closed session: they could never complete.
#[tokio::test]
async fn waits_on_closed_sessions_are_refused() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "closed-wait").await;
    app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({})).await;
    let (status, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM waitpoints").fetch_one(app.db()).await.unwrap();
    assert_eq!(waits, 0, "nothing created");
}

/// When the drain job cannot be queued, the drained waitpoints go back into
/// the pending set instead of being lost with the failed request, and the
/// client's retry (same part id) completes them.
#[tokio::test]
async fn drained_waitpoints_survive_a_drain_job_that_cannot_be_queued() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "drain-lost").await;
    let (_, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in"})).await;
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM waitpoints WHERE friendly_id = $1")
        .bind(&wp)
        .fetch_one(app.db())
        .await
        .unwrap();
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::In };
    // The job ledger is unavailable for a moment.
    sqlx::query("ALTER TABLE jobs RENAME TO jobs_away").execute(app.db()).await.unwrap();
    let (status, body) = app.append(&s, "in", &app.a.key, "hello", &[("x-part-id", "m1")]).await;
    sqlx::query("ALTER TABLE jobs_away RENAME TO jobs").execute(app.db()).await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "Something went wrong", "no internals leak");
    // The record was stored (so the script ran and drained the set)...
    let stored = app.state.channels.read_after(key, None, 10).await.unwrap();
    assert_eq!(stored.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(), vec!["hello"]);
    // ...and the waitpoint is pending again, not completed.
    assert_eq!(app.pending_waiters(key).await, vec![id.to_string()]);
    assert_eq!(db_status(&app, &wp).await, "WAITING");
    // The client retries: a duplicate, which completes what the first attempt left.
    let (status, body) = app.append(&s, "in", &app.a.key, "hello", &[("x-part-id", "m1")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["message"].as_str().unwrap().contains("duplicate"));
    eventually(10, "the retry's drain job", || async { (db_status(&app, &wp).await == "COMPLETED").then_some(()) })
        .await;
    let output: Value =
        sqlx::query_scalar("SELECT output FROM waitpoints WHERE id = $1").bind(id).fetch_one(app.db()).await.unwrap();
    assert_eq!(output["body"], "hello");
}

/// A wait created while a close is under way (the row this server cached
/// still says active, the channel is sealed) completes at once, with the
/// close's reason.
#[tokio::test]
async fn a_wait_created_during_a_close_completes_with_its_reason() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "mid-close").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::In };
    // Cache the active row, then close behind the cache's back.
    assert_eq!(app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await.0, StatusCode::OK);
    sqlx::query("UPDATE sessions SET closed_at = now(), closed_reason = 'bye' WHERE id = $1")
        .bind(key.session_id)
        .execute(app.db())
        .await
        .unwrap();
    app.state.channels.close(key, 60_000).await.unwrap();
    let (status, body) = wait(&app, &run, &run.token, json!({"session": s, "io": "in"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wp = body["waitpointId"].as_str().unwrap();
    assert_eq!(db_status(&app, wp).await, "COMPLETED");
    assert_eq!(poll(&app, &run, wp, 0).await["output"], json!({"sessionClosed": true, "reason": "bye"}));
}
