//! Slow and idle clients cannot hold connections: the header-read, body-read and
//! idle timeouts, each with short settings so the test takes seconds.

use std::time::{Duration, Instant};

use crate::common::{session_body, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).await.expect("connect")
}

/// Reads until the server closes the connection (EOF or reset), for at most
/// `limit`; returns what it sent and how long that took, or None if it did not close.
async fn until_closed(read: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), read.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((String::from_utf8_lossy(&got).into_owned(), started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` one at a time, `every` apart, until done or the socket fails.
fn trickle(mut write: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for b in bytes {
            if write.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[tokio::test]
async fn a_request_head_sent_byte_by_byte_is_cut_at_the_header_read_timeout() {
    let app = TestApp::spawn_with(|c| c.header_read_timeout_ms = 1_000).await;
    let (mut read, write) = connect(&app).await.into_split();
    // A slow-loris head: every byte arrives in time, the whole head never does.
    let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n", "a".repeat(200));
    let writer = trickle(write, head.into_bytes(), Duration::from_millis(250));
    let (sent, took) =
        until_closed(&mut read, Duration::from_secs(5)).await.expect("the slow head is still held after 5 s");
    assert!(!sent.contains("200 OK"), "answered a head that never completed: {sent}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "closed after {took:?}");
    writer.abort();
}

#[tokio::test]
async fn a_request_body_sent_byte_by_byte_is_answered_408_at_the_body_read_timeout() {
    let app = TestApp::spawn_with(|c| c.body_read_timeout_ms = 1_000).await;
    let (mut read, mut write) = connect(&app).await.into_split();
    let body = serde_json::to_vec(&session_body(Some("slow-body"))).unwrap();
    let head = format!(
        "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        app.a.key,
        body.len()
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = trickle(write, body, Duration::from_millis(250));
    let (sent, took) =
        until_closed(&mut read, Duration::from_secs(5)).await.expect("the slow body is still held after 5 s");
    assert!(sent.starts_with("HTTP/1.1 408"), "answer: {sent}");
    assert!(sent.contains("\"error\""), "answer: {sent}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "closed after {took:?}");
    writer.abort();
    // Nothing was created from the partial body.
    let (status, _) = app.get("/api/v1/sessions/slow-body", &app.a.key).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_body_that_arrives_in_time_is_served() {
    let app = TestApp::spawn_with(|c| c.body_read_timeout_ms = 2_000).await;
    let (mut read, mut write) = connect(&app).await.into_split();
    let body = serde_json::to_vec(&session_body(Some("steady-body"))).unwrap();
    let head = format!(
        "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        app.a.key,
        body.len()
    );
    write.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(body.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        write.write_all(chunk).await.unwrap();
    }
    let (sent, _) = until_closed(&mut read, Duration::from_secs(5)).await.expect("answered and closed");
    assert!(sent.starts_with("HTTP/1.1 201"), "answer: {sent}");
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_a_quiet_sse_stream_is_not() {
    let app = TestApp::spawn_with(|c| {
        c.header_read_timeout_ms = 30_000;
        c.idle_timeout_ms = 1_000;
        c.sse_keepalive_ms = 300;
    })
    .await;
    // Never sends a byte.
    let mut silent = connect(&app).await;
    // Sends one request, then stays open without another.
    let mut kept = connect(&app).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let session = app.create_session(session_body(None)).await;
    let id = session["id"].as_str().unwrap();
    let mut sse = app.sse(&format!("/realtime/v1/sessions/{id}/out"), &app.a.key, &[("timeout-seconds", "30")]).await;

    let (_, took) =
        until_closed(&mut silent, Duration::from_secs(5)).await.expect("an idle connection is still open after 5 s");
    assert!(took < Duration::from_secs(3), "idle connection closed after {took:?}");
    let (sent, _) = until_closed(&mut kept, Duration::from_secs(5))
        .await
        .expect("a kept-alive idle connection is still open after 5 s");
    assert!(sent.starts_with("HTTP/1.1 200"), "answer: {sent}");

    // Quiet for longer than the idle timeout, but its keep-alives keep it open.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, _) = app.append(id, "out", &app.a.key, "still here", &[]).await;
    assert_eq!(status, 200);
    let batch = sse.next_batch(Duration::from_secs(5)).await.expect("the SSE stream was cut");
    assert_eq!(batch[0].body, "still here");
}

#[tokio::test]
async fn an_sse_stream_outlives_the_header_read_and_idle_timeouts() {
    let app = TestApp::spawn_with(|c| {
        c.header_read_timeout_ms = 1_000;
        c.idle_timeout_ms = 1_000;
        c.sse_keepalive_ms = 300;
    })
    .await;
    let session = app.create_session(session_body(None)).await;
    let id = session["id"].as_str().unwrap();
    let mut sse = app.sse(&format!("/realtime/v1/sessions/{id}/out"), &app.a.key, &[("timeout-seconds", "30")]).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/realtime/v1/sessions/{id}/out/append", app.base))
        .bearer_auth(&app.a.key)
        .body("late")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let batch = sse.next_batch(Duration::from_secs(5)).await.expect("the SSE stream was cut");
    assert_eq!(batch[0].body, "late");
}
