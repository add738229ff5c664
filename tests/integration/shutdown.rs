//! A process told to stop (SIGTERM) drains: its open SSE responses end with
//! the contract's `event: error` (the official client resumes after an error
//! with `Last-Event-ID`, but takes a clean end as final), `/readyz` turns 503,
//! long polls answer at once, and it exits 0 within `SHUTDOWN_GRACE_MS`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;

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
