//! A process told to stop (SIGTERM) drains: its open SSE responses end with
//! the contract's `event: error` (the official client resumes after an error
//! with `Last-Event-ID`, but takes a clean end as final), `/readyz` turns 503,
//! long polls answer at once, and it exits 0 within `SHUTDOWN_GRACE_MS`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;

use crate::common::held_job::HeldJob;
use crate::common::server_proc::ServerProc;
use crate::common::{session_body, tasks, TestApp};

/// Reads SSE frames until the stream ends or `timeout`; the frames' event names.
async fn events_until_end(resp: reqwest::Response, timeout: Duration) -> (Vec<String>, bool) {
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buf.drain(..end + 2).collect();
            let frame = String::from_utf8_lossy(&raw).to_string();
            if let Some(e) = frame.lines().find_map(|l| l.strip_prefix("event: ")) {
                events.push(e.to_string());
            }
        }
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
            Ok(Some(Err(_))) | Ok(None) => return (events, true),
            Err(_) => return (events, false),
        }
    }
}

#[tokio::test]
async fn sigterm_ends_sse_with_an_error_event_and_exits_within_the_grace() {
    let app = TestApp::spawn_without_sweeps().await;
    let mut proc = ServerProc::start(&app, &[("SHUTDOWN_GRACE_MS", "5000")]).await;
    let mut body = session_body(Some("drained"));
    body["taskIdentifier"] = serde_json::json!("task-drained");
    app.create_session(body).await;
    let (status, _) = app.append("drained", "out", &app.a.key, "r0", &[("x-part-id", "p0")]).await;
    assert_eq!(status, StatusCode::OK);

    let resp = proc
        .client
        .get(format!("{}/realtime/v1/sessions/drained/out", proc.base()))
        .bearer_auth(&app.a.key)
        .header("timeout-seconds", "60")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Let the backlog frame arrive before the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    proc.terminate();
    let (events, ended) = events_until_end(resp, Duration::from_secs(5)).await;
    assert!(ended, "the SSE response was still open 5 s after SIGTERM (window 60 s); events {events:?}");
    assert_eq!(events, ["batch", "error"], "the stream ends with event: error after what it had");
    let exit = proc.wait_exit(Duration::from_secs(7)).await.expect("exited within the grace");
    assert!(exit.success(), "exit status {exit}");
    assert!(started.elapsed() < Duration::from_secs(5), "exit took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_draining_process_is_not_ready_and_answers_long_polls_at_once() {
    let app = TestApp::spawn_without_sweeps().await;
    let (status, _) = app.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    // Draining begins (as serve does first thing on SIGTERM); this in-process
    // server's listener stays open, so the answers can be seen.
    app.state.drain.begin();
    let (status, _) = app.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let started = Instant::now();
    let runs = app.worker().dequeue(&tasks(), 1, Duration::from_secs(20)).await.unwrap();
    assert!(runs.is_empty());
    assert!(started.elapsed() < Duration::from_secs(2), "a dequeue long poll took {:?}", started.elapsed());
}

/// A job attempt still running when the grace ends is handed back: logged
/// `abandoned`, not counted against the job (its budget grows by one), and
/// pushed again, so the next process runs it at once. The attempt here is a
/// `trigger-run` held on its run's row lock, which the test keeps.
#[tokio::test]
async fn sigterm_hands_back_a_job_attempt_it_cannot_finish() {
    let held = HeldJob::start("task-held").await;
    let (app, job) = (&held.app, held.job);
    let mut proc = ServerProc::start(app, &[("SHUTDOWN_GRACE_MS", "1500")]).await;
    held.attempt_under_way().await;
    let started = Instant::now();
    proc.terminate();
    let exit = proc.wait_exit(Duration::from_secs(6)).await.expect("exited");
    assert!(exit.success(), "exit status {exit}; log:\n{}", proc.log());
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1_500 + 1_500), "exit took {took:?} with a 1.5 s grace");
    let (status, attempts, max_attempts): (String, i32, i32) =
        sqlx::query_as("SELECT status, attempts, max_attempts FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(app.db())
            .await
            .unwrap();
    let all: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT attempt, status, error FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
            .bind(job)
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), attempts, max_attempts),
        ("pending", 1, 6),
        "handed back, budget one larger; attempts {all:?} after {took:?}; log:\n{}",
        proc.log()
    );
    let first: (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM job_attempts WHERE job_id = $1 AND attempt = 1")
            .bind(job)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(first, ("abandoned".to_string(), Some("handed back at shutdown".to_string())));

    // The lock goes; the next process runs the job at once (pushed again,
    // not left to apalis' recovery of the dead worker's tasks).
    held.release().await;
    proc.restart().await;
    app.job_succeeded(10, "the handed-back job", job).await;
    assert_eq!(held.attempt_statuses().await, ["abandoned", "succeeded"]);
}

/// A replicating process told to stop releases the replication lease (and
/// its slot) before it exits: another process takes the slot at once rather
/// than after the lease's term (30 s here).
#[tokio::test]
async fn sigterm_releases_the_replication_lease_before_exit() {
    use sessiond::replication::lease;
    let mut app = TestApp::spawn_with(|c| {
        crate::replication::replicating(c);
        c.replication_enabled = false;
    })
    .await;
    // The process replicates through the deployment's slot: dropped at the
    // end even if the test fails.
    app.guard_slot();
    app.clickhouse_ready().await;
    let mut proc = ServerProc::start(
        &app,
        &[
            ("SESSION_REPLICATION_ENABLED", "true"),
            ("REPLICATION_LEASE_MS", "30000"),
            ("REPLICATION_BATCH_MS", "50"),
            ("CLICKHOUSE_RETRY_AFTER_MS", "100"),
        ],
    )
    .await;
    let slot = app.state.config.replication_slot_name();
    let prefix = app.state.config.redis_prefix.clone();
    crate::common::eventually(40, "the process streaming the slot under the lease", || async {
        let active: Option<bool> = sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(app.db())
            .await
            .unwrap();
        let held = lease::holder(&app.state.redis, &prefix, &slot).await.unwrap();
        (active == Some(true) && held.is_some()).then_some(())
    })
    .await;
    proc.terminate();
    let exit = proc.wait_exit(Duration::from_secs(12)).await.expect("exited within the grace");
    assert!(exit.success(), "exit status {exit}; log:\n{}", proc.log());
    assert_eq!(
        lease::holder(&app.state.redis, &prefix, &slot).await.unwrap(),
        None,
        "the lease is still held after the process exited; log:\n{}",
        proc.log()
    );
    // Postgres ends the walsender once it reads the closed connection: a
    // moment after the exit, not at it.
    crate::common::eventually(5, "the slot no longer streamed after the process exited", || async {
        let active: Option<bool> = sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(app.db())
            .await
            .unwrap();
        (active != Some(true)).then_some(())
    })
    .await;
    crate::replication::finish(app).await;
}
