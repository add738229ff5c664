//! The run engine and the session as run manager, on real Postgres and Redis.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{dequeue_one, eventually, session_body, tasks, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::audit::Actor;
use sessiond::jobs::JobKind;
use sessiond::runs::jobs::CancelRun;
use sessiond::sessions::run_manager::Ensured;
use sessiond::worker::{RunContext, TaskHandler};
use uuid::Uuid;

async fn audit_reasons(app: &TestApp, session: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT reason FROM session_runs WHERE session_id = $1 ORDER BY created_at")
        .bind(session)
        .fetch_all(app.db())
        .await
        .unwrap()
}

#[tokio::test]
async fn create_dequeue_complete_then_continuation() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("flow"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    assert_eq!(run.id, s["runId"]);
    assert_eq!(run.attempt_number, 1);
    assert_eq!(run.session_id.as_deref(), s["id"].as_str());
    assert!(run.payload.get("continuation").is_none() && run.payload.get("trigger").is_none(), "{}", run.payload);
    assert_eq!(run.payload["chatId"], "flow");
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");

    // The run token works for this run only.
    let hb = w.heartbeat(&run).await.unwrap();
    assert!(hb.ok && !hb.cancel);
    let (status, _) = app.post(&format!("/api/v1/runs/{}/heartbeat", "run_other"), &run.token, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let done = w.complete(&run, json!({"ok": true})).await.unwrap();
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"], json!({"ok": true}));
    // Completing the same attempt again (its answer lost, say) answers as the
    // first did; failing it after is a different outcome, refused.
    assert_eq!(w.complete(&run, json!({"ok": true})).await.unwrap(), done);
    let refused = w.fail(&run, json!({"message": "late"}), true).await.unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");

    // Next activity (here: create again) boots a continuation.
    let again = app.create_session(session_body(Some("flow"))).await;
    assert_eq!(again["isCached"], true);
    assert_ne!(again["runId"], s["runId"]);
    assert_eq!(again["currentRunId"], again["runId"]);
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    assert_eq!(audit_reasons(&app, sid).await, vec!["initial", "continuation"]);
    let next = dequeue_one(&w).await;
    assert_eq!(next.id, again["runId"]);
    assert_eq!((&next.payload["continuation"], &next.payload["previousRunId"]), (&json!(true), &s["runId"]));
}

#[tokio::test]
async fn missed_heartbeats_crash_the_run_and_activity_continues() {
    let app = TestApp::spawn_without_sweeps().await;
    let s = app.create_session(session_body(Some("crashy"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    // Within its deadline the sweep leaves it alone.
    assert!(app.sweep(JobKind::RunSweep).await.starts_with("0 runs finalised"));
    // The worker dies: no heartbeat past the deadline. The sweep marks the run CRASHED.
    app.age_run(&run.id, 10).await;
    let out = app.sweep(JobKind::RunSweep).await;
    assert!(out.starts_with("1 runs finalised"), "{out}");
    assert_eq!(app.run_status(&run.id).await, "CRASHED");
    let hb = w.heartbeat(&run).await.unwrap();
    assert!(hb.cancel && !hb.ok);
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    let ensured = app.state.runs.ensure_run(app.a.env.id, sid).await.unwrap();
    let Ensured::Triggered(new_run) = ensured else { panic!("expected a continuation, got {ensured:?}") };
    assert_ne!(new_run, run.id);
    assert_eq!(audit_reasons(&app, sid).await, vec!["initial", "continuation"]);
    // Alive now: a second ensure is a no-op.
    assert_eq!(app.state.runs.ensure_run(app.a.env.id, sid).await.unwrap(), Ensured::Alive(new_run));
}

#[tokio::test]
async fn concurrent_ensure_run_on_a_dead_session_makes_exactly_one_run() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("herd"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    w.complete(&run, json!(null)).await.unwrap();
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;

    let mut calls = Vec::new();
    for _ in 0..50 {
        let state = app.state.clone();
        let env = app.a.env.id;
        calls.push(tokio::spawn(async move { state.runs.ensure_run(env, sid).await }));
    }
    let mut run_ids = HashSet::new();
    let mut triggered = 0;
    for c in calls {
        match c.await.unwrap().expect("ensure_run") {
            Ensured::Triggered(r) => {
                triggered += 1;
                run_ids.insert(r);
            }
            Ensured::Alive(r) => {
                run_ids.insert(r);
            }
        }
    }
    assert_eq!(triggered, 1);
    assert_eq!(run_ids.len(), 1, "{run_ids:?}");
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_runs WHERE session_id = $1 AND status IN ('QUEUED', 'EXECUTING', 'WAITING')",
    )
    .bind(sid)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert_eq!(live, 1, "no orphaned live runs");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM task_runs WHERE session_id = $1")
        .bind(sid)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(total, 2);
}

#[tokio::test]
async fn end_and_continue_swaps_only_for_the_current_run() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("upgrade"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    let handoff = w.end_and_continue(&run, "upgrade").await.unwrap();
    assert!(handoff.swapped);
    assert_ne!(handoff.run_id, run.id);
    let (_, now) = app.get("/api/v1/sessions/upgrade", &app.a.key).await;
    assert_eq!(now["currentRunId"], handoff.run_id);
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    assert_eq!(audit_reasons(&app, sid).await, vec!["initial", "upgrade"]);
    let next = dequeue_one(&w).await;
    assert_eq!(next.id, handoff.run_id);
    assert_eq!((&next.payload["continuation"], &next.payload["previousRunId"]), (&json!(true), &json!(run.id)));

    // The old run is stale now: no swap, and it learns who holds the session.
    let stale = w.end_and_continue(&run, "upgrade").await.unwrap();
    assert_eq!((stale.swapped, stale.run_id.clone()), (false, handoff.run_id.clone()));
    assert_eq!(audit_reasons(&app, sid).await.len(), 2);

    // Another session's run token cannot hand this session off.
    let other = app.create_session(session_body(Some("other"))).await;
    let other_run = dequeue_one(&w).await;
    assert_eq!(other_run.id, other["runId"]);
    let (status, _) = app
        .post(
            "/api/v1/sessions/upgrade/end-and-continue",
            &other_run.token,
            json!({"callingRunId": other_run.id, "reason": "upgrade"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) =
        app.post("/api/v1/sessions/upgrade/end-and-continue", &app.a.key, json!({"reason": "upgrade"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
}

/// Waits for its cancel token, then asks the server once more what it says
/// about the run (what made the worker cancel it).
struct WaitForCancel(tokio::sync::mpsc::UnboundedSender<sessiond::worker::client::HeartbeatReply>);

#[async_trait::async_trait]
impl TaskHandler for WaitForCancel {
    async fn run(&self, ctx: RunContext) -> anyhow::Result<Value> {
        ctx.cancel.cancelled().await;
        let _ = self.0.send(ctx.client.heartbeat(&ctx.run).await?);
        Ok(json!("stopped"))
    }
}

#[tokio::test]
async fn cancel_reaches_the_worker() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("cancel-me"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    // Nothing in this test cancels `stop`: only a heartbeat answer can.
    let stop = tokio_util::sync::CancellationToken::new();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let worker =
        tokio::spawn(sessiond::worker::execute(w.clone(), Arc::new(WaitForCancel(seen_tx)), run.clone(), stop.clone()));
    let (status, body) =
        app.post(&format!("/api/v2/runs/{}/cancel", s["runId"].as_str().unwrap()), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Audited as the dashboard's cancel is (one service), as the environment's key.
    let audited: (String, String, String, Option<String>, Value) =
        sqlx::query_as("SELECT action, target, actor_kind, actor, detail FROM audit_log")
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(
        (audited.0.as_str(), audited.1.clone(), audited.2.as_str(), audited.3.clone()),
        ("run.cancel", format!("run:{}", run.id), "secret-key", Some(app.a.env.id.to_string()))
    );
    assert_eq!(audited.4["job"], body["jobId"]);
    // The handler only returns once the heartbeat answer carried the cancel.
    tokio::time::timeout(Duration::from_secs(10), worker).await.expect("worker stopped").unwrap();
    let reply = seen.try_recv().expect("the handler saw its cancel");
    assert!(reply.cancel && !reply.ok && reply.status == "CANCELED", "{reply:?}");
    assert_eq!(app.run_status(&run.id).await, "CANCELED");
    // The stopped worker reported no result over the cancel.
    let output: Option<Value> = sqlx::query_scalar("SELECT output FROM task_runs WHERE friendly_id = $1")
        .bind(&run.id)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(output, None);
    let job: String =
        sqlx::query_scalar("SELECT status FROM jobs WHERE kind = 'cancel-run'").fetch_one(app.db()).await.unwrap();
    assert_eq!(job, "succeeded");
}

#[tokio::test]
async fn failed_attempts_retry_up_to_max_attempts_then_fail() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(Some("flaky"))).await; // maxAttempts 3
    let w = app.worker();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let run = dequeue_one(&w).await;
        seen.push(run.attempt_number);
        let r = w.fail(&run, json!({"message": format!("boom {}", run.attempt_number)}), true).await.unwrap();
        let expected = if run.attempt_number < 3 { "QUEUED" } else { "FAILED" };
        assert_eq!(r["status"], expected);
    }
    assert_eq!(seen, vec![1, 2, 3]);
    let (status, error): (String, Value) =
        sqlx::query_as("SELECT status, error FROM task_runs").fetch_one(app.db()).await.unwrap();
    assert_eq!(status, "FAILED");
    assert_eq!(error["message"], "boom 3");
    // Nothing more to dequeue.
    assert!(w.dequeue(&tasks(), 1, Duration::from_secs(1)).await.unwrap().is_empty());
}

#[tokio::test]
async fn complete_and_fail_are_idempotent_by_attempt() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(Some("repeat"))).await; // maxAttempts 3
    let w = app.worker();
    let first = dequeue_one(&w).await;
    let failed = w.fail(&first, json!({"message": "boom"}), true).await.unwrap();
    assert_eq!(failed["status"], "QUEUED");
    assert_eq!(
        w.fail(&first, json!({"message": "boom"}), true).await.unwrap(),
        failed,
        "a repeat answers as the first"
    );

    let second = dequeue_one(&w).await;
    assert_eq!((second.id.as_str(), second.attempt_number), (first.id.as_str(), 2));
    // A repeat of attempt 1's failure arriving late never fails attempt 2.
    w.fail(&first, json!({"message": "boom"}), true).await.expect("attempt 1 did fail");
    assert_eq!(app.run_status(&second.id).await, "EXECUTING");
    // Nor does attempt 1 complete: it failed.
    assert_eq!(w.complete(&first, json!("late")).await.unwrap_err().status(), Some(409));

    let done = w.complete(&second, json!({"n": 2})).await.unwrap();
    assert_eq!(w.complete(&second, json!({"n": 2})).await.unwrap(), done);
    assert_eq!(w.fail(&second, json!({"message": "x"}), false).await.unwrap_err().status(), Some(409));
    assert_eq!(app.run_status(&second.id).await, "COMPLETED");
}

/// A handler that panics.
struct Panics;

#[async_trait::async_trait]
impl TaskHandler for Panics {
    async fn run(&self, _ctx: RunContext) -> anyhow::Result<Value> {
        panic!("the handler broke");
    }
}

#[tokio::test]
async fn a_handler_that_panics_fails_its_attempts_instead_of_leaving_the_run_to_crash() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("panics"))).await; // maxAttempts 3
    let stop = tokio_util::sync::CancellationToken::new();
    let worker =
        tokio::spawn(sessiond::worker::Worker::new(app.worker(), tasks(), 4).run(Arc::new(Panics), stop.clone()));
    let run = s["runId"].as_str().unwrap().to_string();
    eventually(20, "every attempt failed", || async { (app.run_status(&run).await == "FAILED").then_some(()) }).await;
    let (attempts, error): (i32, Value) =
        sqlx::query_as("SELECT attempt_number, error FROM task_runs WHERE friendly_id = $1")
            .bind(&run)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(error["message"].as_str().unwrap().contains("the handler broke"), "{error}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
}

#[tokio::test]
async fn non_retryable_failure_is_final() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(Some("fatal"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    let r = w.fail(&run, json!({"message": "bad input"}), false).await.unwrap();
    assert_eq!(r["status"], "FAILED");
}

#[tokio::test]
async fn queued_runs_expire_after_their_ttl() {
    let app = TestApp::spawn_without_sweeps().await;
    let mut body = session_body(Some("ttl"));
    body["triggerConfig"]["ttl"] = json!("10s");
    let s = app.create_session(body).await;
    let run = s["runId"].as_str().unwrap();
    app.sweep(JobKind::RunSweep).await;
    assert_eq!(app.run_status(run).await, "QUEUED", "within its ttl");
    app.age_run(run, 11).await;
    app.sweep(JobKind::RunSweep).await;
    assert_eq!(app.run_status(run).await, "EXPIRED");
    assert!(app.worker().dequeue(&tasks(), 1, Duration::from_secs(1)).await.unwrap().is_empty());
}

#[tokio::test]
async fn max_duration_times_out_a_run() {
    let app = TestApp::spawn_without_sweeps().await;
    let mut body = session_body(Some("slow"));
    body["triggerConfig"]["maxDuration"] = json!(10);
    app.create_session(body).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    app.sweep(JobKind::RunSweep).await;
    assert_eq!(app.run_status(&run.id).await, "EXECUTING", "within its maxDuration");
    // Started 11 s ago, and alive: only maxDuration may end it.
    app.age_run(&run.id, 11).await;
    assert!(!w.heartbeat(&run).await.unwrap().cancel);
    app.sweep(JobKind::RunSweep).await;
    assert_eq!(app.run_status(&run.id).await, "TIMED_OUT");
    assert!(w.heartbeat(&run).await.unwrap().cancel);
}

#[tokio::test]
async fn expiry_sweep_cancels_runs_of_expired_sessions_idempotently() {
    let app = TestApp::spawn_without_sweeps().await;
    let mut body = session_body(Some("expiring"));
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    body["expiresAt"] = json!(expires_at.to_rfc3339());
    let s = app.create_session(body).await;
    let run = s["runId"].as_str().unwrap().to_string();
    assert!(app.sweep(JobKind::SessionExpirySweep).await.starts_with("0 runs"));
    // The session's time is up (expiresAt is write-once, so wait it out).
    let left = (expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    let out = app.sweep(JobKind::SessionExpirySweep).await;
    assert!(out.starts_with("1 runs"), "{out}");
    assert_eq!(app.run_status(&run).await, "CANCELED");
    // Running the sweep again changes nothing.
    let out = app.sweep(JobKind::SessionExpirySweep).await;
    assert!(out.starts_with("0 runs"), "{out}");
    assert_eq!(app.run_status(&run).await, "CANCELED");
    // Expired sessions get no new runs.
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    assert!(app.state.runs.ensure_run(app.a.env.id, sid).await.is_err());
    let (_, listed) = app.get("/api/v1/sessions?filter[status]=EXPIRED", &app.a.key).await;
    assert_eq!(listed["data"][0]["id"], s["id"]);
}

#[tokio::test]
async fn one_run_never_reaches_two_workers() {
    let app = TestApp::spawn().await;
    for i in 0..20 {
        app.create_session(session_body(Some(&format!("par-{i}")))).await;
    }
    let mut pollers = Vec::new();
    for _ in 0..8 {
        let w = app.worker();
        pollers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let runs = w.dequeue(&tasks(), 3, Duration::from_secs(1)).await.unwrap();
                if runs.is_empty() {
                    break got;
                }
                got.extend(runs.into_iter().map(|r| r.id));
            }
        }));
    }
    let mut all = Vec::new();
    for p in pollers {
        all.extend(p.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 20, "every run handed out once: {all:?}");
    assert_eq!(unique.len(), 20);
}

/// The dequeue's periodic re-check is set far beyond the wait, so only the
/// wake-up signal can hand the run over before the wait ends.
fn no_dequeue_recheck(c: &mut sessiond::config::Config) {
    c.dequeue_recheck_ms = 600_000;
}

/// Not a latency bound: the dequeue's last pop at the end of its 20 s wait
/// would find the run too, so anything well inside the wait means the signal
/// woke it (the bound leaves room for a loaded machine).
fn assert_woken_early(run_created: std::time::Instant) {
    let took = run_created.elapsed();
    assert!(took < Duration::from_secs(10), "woke by signal, not at the end of the wait: {took:?}");
}

#[tokio::test]
async fn a_waiting_dequeue_wakes_when_a_run_is_triggered() {
    let app = TestApp::spawn_with(no_dequeue_recheck).await;
    let w = app.worker();
    let waiter = tokio::spawn(async move { w.dequeue(&tasks(), 1, Duration::from_secs(20)).await.unwrap() });
    // No readiness signal reaches the test from inside the long poll; a waiter
    // that is not parked yet when the run arrives pops it directly, which makes
    // this test pass without exercising the wake-up (never fail wrongly).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let s = app.create_session(session_body(Some("wake"))).await;
    let runs = waiter.await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, s["runId"]);
    assert_woken_early(started);
}

/// A run pushed through one server wakes a dequeue waiting on another, through
/// the queue's Redis announcement.
#[tokio::test]
async fn a_waiting_dequeue_on_another_server_wakes_when_a_run_is_triggered() {
    let app = TestApp::spawn_with(no_dequeue_recheck).await;
    // The other server answers HTTP and follows the queue's announcements but
    // runs no jobs, so the run's push (a job) always happens on `app`: a push
    // on the peer itself would wake its waiter locally.
    let config = app.state.config.clone();
    let master = sessiond::app::master_key(&config).unwrap();
    let peer = sessiond::app::AppState::connect(config, app.state.db.clone(), master).await.unwrap();
    tokio::spawn(peer.run_queue.clone().listen(peer.redis_client.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, sessiond::http::router(peer)).await });
    // Both servers follow the queue's announcements before anything is pushed.
    let channel = format!("{}:runq-ready", app.state.config.redis_prefix);
    eventually(10, "both servers subscribed", || async {
        let (_, n): (String, usize) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query_async(&mut app.state.redis.clone()).await.unwrap();
        (n == 2).then_some(())
    })
    .await;
    let w = sessiond::worker::WorkerClient::new(&peer_base, &app.a.key);
    let waiter = tokio::spawn(async move { w.dequeue(&tasks(), 1, Duration::from_secs(20)).await.unwrap() });
    // (As above: the sleep can only make the test pass vacuously, not fail.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let s = app.create_session(session_body(Some("wake-peer"))).await;
    let runs = waiter.await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, s["runId"]);
    assert_woken_early(started);
}

#[tokio::test]
async fn unrelayed_jobs_are_relayed_later() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("outbox"))).await;
    let w = app.worker();
    let run = dequeue_one(&w).await;
    w.complete(&run, json!(null)).await.unwrap();
    // A transition committed while Redis was unreachable: the job row exists but
    // was never pushed. The relay loop finds and runs it.
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    let run_id: Uuid = sqlx::query_scalar("SELECT id FROM task_runs WHERE friendly_id = $1")
        .bind(&run.id)
        .fetch_one(app.db())
        .await
        .unwrap();
    let mut tx = sessiond::db::begin(app.db()).await.unwrap();
    let job = sessiond::jobs::store::insert(&mut *tx, &CancelRun { run_id }, 5).await.unwrap().id();
    tx.commit().await.unwrap();
    eventually(15, "relayed job ran", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().unwrap();
        (row.status == sessiond::jobs::store::JobStatus::Succeeded && row.relayed_at.is_some()).then_some(())
    })
    .await;
    let _ = sid;
}

#[tokio::test]
async fn a_job_that_keeps_failing_ends_failed_and_retry_runs_it_again() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("broken"))).await;
    let run_id: Uuid = sqlx::query_scalar("SELECT current_run_id FROM sessions WHERE friendly_id = $1")
        .bind(s["id"].as_str().unwrap())
        .fetch_one(app.db())
        .await
        .unwrap();
    // A recovery push would deliver the job twice and its attempts would not
    // be spread by the backoff.
    app.job_queue_ready().await;
    // Break what the cancel-run job needs, so every attempt fails inside Postgres.
    sqlx::query("ALTER TABLE task_runs RENAME COLUMN cancel_requested_at TO cancel_requested_gone")
        .execute(app.db())
        .await
        .unwrap();
    let job = app.state.jobs.submit(&CancelRun { run_id }).await.unwrap();
    let row = eventually(20, "job failed", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().unwrap();
        (row.status == sessiond::jobs::store::JobStatus::Failed).then_some(row)
    })
    .await;
    assert_eq!(row.attempts, 5);
    assert!(row.last_error.as_deref().unwrap_or("").contains("cancel_requested_at"), "{:?}", row.last_error);
    let attempts = sessiond::jobs::store::attempts(app.db(), job).await.unwrap();
    assert_eq!(attempts.len(), 5);
    assert!(attempts.iter().all(|a| a.status == sessiond::jobs::store::AttemptStatus::Failed && a.error.is_some()));
    // Backoff: the attempts were spread out, not fired back to back.
    let spread = attempts.last().unwrap().started_at - attempts.first().unwrap().started_at;
    assert!(spread >= chrono::Duration::milliseconds(50 + 100 + 200 + 400), "{spread}");
    let failed = sessiond::jobs::store::list(app.db(), true, 10).await.unwrap();
    assert_eq!(failed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job]);

    // Fix the cause and retry by id.
    sqlx::query("ALTER TABLE task_runs RENAME COLUMN cancel_requested_gone TO cancel_requested_at")
        .execute(app.db())
        .await
        .unwrap();
    assert!(app.state.jobs.retry(job).await.unwrap().is_some());
    eventually(10, "job succeeded after retry", || async {
        let row = sessiond::jobs::store::find(app.db(), job).await.unwrap().unwrap();
        (row.status == sessiond::jobs::store::JobStatus::Succeeded).then_some(())
    })
    .await;
    assert_eq!(app.run_status(s["runId"].as_str().unwrap()).await, "CANCELED");
    // Retrying a job that did not fail is refused.
    assert!(app.state.jobs.retry(job).await.unwrap().is_none());
}

/// A job delivered twice (the lost-queue recovery pushes every unfinished job,
/// one waiting out its backoff included) still gets no more than its attempt
/// budget between both copies; only a last attempt abandoned for ten minutes
/// (its process died) runs once more.
#[tokio::test]
async fn duplicate_deliveries_share_one_attempt_budget() {
    use sessiond::jobs::store::{self, JobStatus};
    let app = TestApp::spawn().await;
    let run_id = Uuid::now_v7();
    // Keep this server's own runtime off the job: its start-up queue check is
    // done (no recovery push) and the row is marked relayed (no relay push).
    app.job_queue_ready().await;
    let job = store::insert(app.db(), &CancelRun { run_id }, 2).await.unwrap().id();
    let stamp = store::Pushed { id: job, generation: store::FIRST_GENERATION, task: "none".into() };
    store::mark_relayed(app.db(), &[stamp]).await.unwrap();
    let first = store::begin_attempt(app.db(), job).await.unwrap().expect("first attempt");
    assert_eq!(first.attempts, 1);
    // A second copy starts while the first is running: it is attempt 2, the last.
    let second = store::begin_attempt(app.db(), job).await.unwrap().expect("second copy");
    assert_eq!(second.attempts, 2);
    store::finish_attempt(app.db(), job, 1, Some("boom"), false).await.unwrap();
    // The first copy retries: the budget is spent, so it does not start.
    assert!(store::begin_attempt(app.db(), job).await.unwrap().is_none());
    // The second copy's process dies mid-attempt; ten minutes later a
    // redelivery runs it once more.
    assert!(store::begin_attempt(app.db(), job).await.unwrap().is_none());
    sqlx::query("UPDATE jobs SET status = 'running', updated_at = now() - interval '11 minutes' WHERE id = $1")
        .bind(job)
        .execute(app.db())
        .await
        .unwrap();
    let revived = store::begin_attempt(app.db(), job).await.unwrap().expect("abandoned attempt revived");
    assert_eq!(revived.attempts, 3);
    store::finish_attempt(app.db(), job, 3, Some("boom"), true).await.unwrap();
    // A failed job is not started by a stray delivery either.
    assert!(store::begin_attempt(app.db(), job).await.unwrap().is_none());
    let row = store::find(app.db(), job).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (JobStatus::Failed, 3));
}

#[tokio::test]
async fn manual_trigger_replaces_the_live_run() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("manual"))).await;
    let sid = app.session_uuid(s["id"].as_str().unwrap()).await;
    let run = app.state.runs.trigger_manual(app.a.env.id, sid, &Actor::Cli).await.unwrap();
    assert_ne!(run, s["runId"].as_str().unwrap());
    eventually(10, "previous run canceled", || async {
        (app.run_status(s["runId"].as_str().unwrap()).await == "CANCELED").then_some(())
    })
    .await;
    assert_eq!(audit_reasons(&app, sid).await, vec!["initial", "manual"]);
    // Closed sessions never get new runs.
    app.post(&format!("/api/v1/sessions/{}/close", s["id"].as_str().unwrap()), &app.a.key, json!({})).await;
    assert!(app.state.runs.trigger_manual(app.a.env.id, sid, &Actor::Cli).await.is_err());
    assert!(app.state.runs.ensure_run(app.a.env.id, sid).await.is_err());
}

#[tokio::test]
async fn dequeue_validates_its_input() {
    let app = TestApp::spawn().await;
    let (status, _) = app.post("/api/v1/worker/dequeue", &app.a.key, json!({"tasks": []})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post("/api/v1/worker/dequeue", &app.a.key, json!({"tasks": ["x"], "maxRuns": 0})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let too_many = sessiond::worker::client::MAX_DEQUEUE_RUNS + 1;
    let (status, _) = app
        .post("/api/v1/worker/dequeue", &app.a.key, json!({"tasks": ["x"], "maxRuns": too_many, "waitSeconds": 0}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // The worker library asks for no more than the server allows, whatever its free slots.
    let none = app.worker().dequeue(&["x".to_string()], 200, Duration::ZERO).await.expect("200 free slots dequeue");
    assert!(none.is_empty());
    let s = app.create_session(session_body(Some("pat"))).await;
    let (status, _) = app
        .post("/api/v1/worker/dequeue", s["publicAccessToken"].as_str().unwrap(), json!({"tasks": ["echo-agent"]}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// A raw dequeue of one run as `worker` with `requestId` `key`, waiting up to `wait` seconds.
async fn keyed_dequeue(app: &TestApp, worker: &str, key: &str, wait: u64) -> Vec<Value> {
    let body = json!({"tasks": tasks(), "maxRuns": 1, "waitSeconds": wait, "workerId": worker, "requestId": key});
    let (status, json) = app.post("/api/v1/worker/dequeue", &app.a.key, body).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    json["runs"].as_array().unwrap().clone()
}

/// A dequeue whose answer was lost (the server killed or the connection cut
/// after the claim) is sent again with the same `requestId`: it gets the runs
/// the first try claimed, same attempt, and never new ones; another key, or
/// another worker with the key, never gets them.
#[tokio::test]
async fn a_repeated_dequeue_key_answers_the_runs_it_already_claimed() {
    let app = TestApp::spawn().await;
    let first = app.create_session(session_body(Some("lost-answer"))).await;
    let got = keyed_dequeue(&app, "w1", "K", 10).await;
    assert_eq!((got.len(), &got[0]["id"], &got[0]["attemptNumber"]), (1, &first["runId"], &json!(1)));
    // More work arrives; the answer above is lost and the worker library tries
    // again with the same key: it gets the run it already holds, not new work.
    let second = app.create_session(session_body(Some("other"))).await;
    let again = keyed_dequeue(&app, "w1", "K", 0).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((&again[0]["id"], &again[0]["attemptNumber"]), (&first["runId"], &json!(1)));
    assert_eq!(again[0]["payload"], got[0]["payload"]);
    // Another key gets other work, never the run K holds.
    let other = keyed_dequeue(&app, "w1", "K2", 10).await;
    assert_eq!((other.len(), &other[0]["id"]), (1, &second["runId"]));
    // Another worker using the same key does not get it either.
    assert!(keyed_dequeue(&app, "w2", "K", 0).await.is_empty());

    // The repeat's token drives the run to its end.
    let run = again[0]["id"].as_str().unwrap();
    let token = again[0]["token"].as_str().unwrap();
    let (status, hb) = app.post(&format!("/api/v1/runs/{run}/heartbeat"), token, json!({})).await;
    assert_eq!((status, &hb["ok"]), (StatusCode::OK, &json!(true)), "{hb}");
    let (status, done) =
        app.post(&format!("/api/v1/runs/{run}/complete"), token, json!({"output": 1, "attemptNumber": 1})).await;
    assert_eq!((status, &done["status"]), (StatusCode::OK, &json!("COMPLETED")), "{done}");
    // A finished run is never answered again.
    assert!(keyed_dequeue(&app, "w1", "K", 0).await.is_empty());

    let (status, _) = app
        .post("/api/v1/worker/dequeue", &app.a.key, json!({"tasks": tasks(), "waitSeconds": 0, "requestId": ""}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
