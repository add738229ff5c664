//! A flood of idle connections cannot lock new clients out.
//!
//! The flood comes from a child process (tests/support/flood.py): a test binary
//! has one file-descriptor limit, so a flood opened from this process would
//! starve itself, not the server. This process's limit is lowered first, so a
//! few hundred idle sockets press the server as 20,000 would at a production
//! limit; it is its own test binary because the lowered limit stays.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{session_body, TestApp};

/// The server process's file-descriptor limit (soft and hard) for the test.
const FD_LIMIT: u64 = 400;
/// Idle connections the flood opens: more than the limit allows.
const FLOOD: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_fd_limit_do_not_lock_out_new_clients() {
    // Started before the limit is lowered: the flood keeps its own limit.
    let mut flood = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/flood.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3 flood");
    rlimit::setrlimit(rlimit::Resource::NOFILE, FD_LIMIT, FD_LIMIT).expect("lower the fd limit");

    let app = TestApp::spawn().await;
    let key = app.a.key.clone();
    let session = app.create_session(session_body(None)).await;
    let id = session["id"].as_str().unwrap().to_string();
    // Subscribers are inside a request: the cap never sheds them.
    let mut subscribers = Vec::new();
    for _ in 0..5 {
        subscribers
            .push(app.sse(&format!("/realtime/v1/sessions/{id}/out"), &key, &[("timeout-seconds", "120")]).await);
    }

    let port = app.base.rsplit(':').next().unwrap().to_string();
    let mut stdin = flood.stdin.take().unwrap();
    writeln!(stdin, "127.0.0.1 {port} {FLOOD}").unwrap();
    let mut line = String::new();
    let mut stdout = BufReader::new(flood.stdout.take().unwrap());
    tokio::task::block_in_place(|| stdout.read_line(&mut line)).unwrap();
    // (Fewer than asked if the server stops accepting and its backlog fills.)
    let opened: u64 =
        line.trim().strip_prefix("open ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("flood: {line:?}"));
    assert!(opened > FD_LIMIT, "the flood opened only {opened} connections");
    // Let the server take the flood off its accept queue.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A new client (a fresh connection each) is served within a second.
    for path in ["/healthz".to_string(), format!("/api/v1/sessions/{id}")] {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let started = Instant::now();
        let resp = client.get(format!("{}{path}", app.base)).bearer_auth(&key).send().await;
        let took = started.elapsed();
        let status = resp.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
        assert_eq!(status, Ok(200), "GET {path} during the flood");
        assert!(took < Duration::from_secs(1), "GET {path} took {took:?} during the flood");
    }

    // The subscribers are still connected: they receive a record appended now.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let resp = client
        .post(format!("{}/realtime/v1/sessions/{id}/out/append", app.base))
        .bearer_auth(&key)
        .body("after the flood")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for sub in &mut subscribers {
        let batch = sub.next_batch(Duration::from_secs(5)).await.expect("subscriber still connected");
        assert_eq!(batch[0].body, "after the flood");
    }

    drop(stdin);
    let _ = flood.kill();
    let _ = flood.wait();
}
