//! One process of a deployment whose clock is off by ±30 s (the test-only
//! `SESSIOND_TEST_CLOCK_OFFSET_MS`), next to one whose clock is right:
//! tokens minted on either work on the other, a worker heartbeating through
//! the skewed process keeps its run alive and its session's run in place
//! (no CRASHED, no hand-off) while input arrives through both processes; and
//! a process off by more than the JWT leeway refuses the other's tokens with
//! a 401 that names the cause.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sessiond::worker::WorkerClient;

use crate::common::faults::{phase, report};
use crate::common::server_proc::ServerProc;
use crate::common::{session_body, TestApp};

/// The leeway the servers run with (the default; see `config.rs`).
const LEEWAY_SECS: i64 = 60;

async fn call(base: &str, method: Method, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, format!("{base}{path}")).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Mints a read token for session `s` on the process at `base`.
async fn mint(base: &str, key: &str, s: &str, expiration: &str) -> String {
    let body = json!({"scopes": [format!("read:sessions:{s}")], "expirationTime": expiration});
    let (status, v) = call(base, Method::POST, "/api/v1/auth/public-tokens", key, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "mint: {v}");
    v["token"].as_str().unwrap().to_string()
}

async fn read_session(base: &str, s: &str, token: &str) -> (StatusCode, Value) {
    call(base, Method::GET, &format!("/api/v1/sessions/{s}"), token, None).await
}

fn input(i: usize) -> String {
    json!({"data": {"n": i}, "id": format!("in-{i}")}).to_string()
}

/// Figures of one offset.
struct Skewed {
    cross_tokens: usize,
    heartbeats: usize,
    appends: usize,
    handoffs: i64,
    status: String,
}

async fn with_offset(app: &TestApp, offset_ms: i64) -> Skewed {
    let offset = offset_ms.to_string();
    let proc = ServerProc::start(app, &[("SESSIOND_TEST_MODE", "1"), ("SESSIOND_TEST_CLOCK_OFFSET_MS", &offset)]).await;
    let (skewed, right) = (proc.base(), app.base.clone());
    assert!(proc.log().contains("clock is shifted"), "the offset was not applied:\n{}", proc.log());
    let key = &app.a.key;

    // Tokens, both ways: the session token a create hands out, and minted ones.
    let ext = format!("clock{offset_ms}");
    let mut body = session_body(Some(&ext));
    body["taskIdentifier"] = json!(format!("task-{ext}"));
    let (status, created) = call(&skewed, Method::POST, "/api/v1/sessions", key, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let s = created["id"].as_str().unwrap().to_string();
    let first_run = created["runId"].as_str().unwrap().to_string();
    let mut cross_tokens = 0;
    for (minted_on, used_on) in [(&skewed, &right), (&right, &skewed)] {
        let token = mint(minted_on, key, &s, "15m").await;
        let (status, v) = read_session(used_on, &s, &token).await;
        assert_eq!(status, StatusCode::OK, "offset {offset_ms}: minted on {minted_on}, used on {used_on}: {v}");
        cross_tokens += 1;
    }
    let session_token = created["publicAccessToken"].as_str().unwrap();
    assert_eq!(read_session(&right, &s, session_token).await.0, StatusCode::OK, "offset {offset_ms}: session token");
    cross_tokens += 1;

    // A worker on the skewed process, heartbeating at its interval, while
    // input arrives through both processes (each append asks whether the
    // session's run is alive, and would hand off to a new one if not).
    let worker = WorkerClient::new(&skewed, key);
    let run = worker.dequeue(&[format!("task-{ext}")], 1, Duration::from_secs(10)).await.unwrap().remove(0);
    assert_eq!(run.id, first_run);
    // The run's token was minted on the skewed process: it works on the other.
    let (status, v) = call(&right, Method::POST, &format!("/api/v1/runs/{}/heartbeat", run.id), &run.token, None).await;
    assert_eq!(status, StatusCode::OK, "offset {offset_ms}: the run token on the other process: {v}");
    let (mut heartbeats, mut appends) = (1, 0);
    let until = Instant::now() + phase(6.0);
    let mut next_beat = Instant::now();
    while Instant::now() < until {
        if Instant::now() >= next_beat {
            // A 503 (Redis slow on a loaded machine) is retried at the next
            // beat, as a worker does; the run's timeout allows several misses.
            match worker.heartbeat(&run).await {
                Ok(reply) => {
                    assert!(reply.ok && !reply.cancel, "offset {offset_ms}: heartbeat answered {reply:?}");
                    heartbeats += 1;
                }
                Err(err) => eprintln!("offset {offset_ms}: heartbeat failed, retried: {err}"),
            }
            next_beat += Duration::from_millis(run.heartbeat_interval_ms.min(500));
        }
        let base = if appends % 2 == 0 { &skewed } else { &right };
        let resp = reqwest::Client::new()
            .post(format!("{base}/realtime/v1/sessions/{s}/in/append"))
            .bearer_auth(key)
            .header("x-part-id", format!("in-{appends}"))
            .body(input(appends))
            .send()
            .await
            .unwrap();
        // 503 is Redis slow on a loaded machine: the same part is sent again.
        if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(resp.status(), StatusCode::OK, "offset {offset_ms}: append");
            appends += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, now) = read_session(&right, &s, key).await;
    let handoffs: i64 = sqlx::query_scalar("SELECT count(*) - 1 FROM session_runs WHERE session_id = $1")
        .bind(app.session_uuid(&s).await)
        .fetch_one(app.db())
        .await
        .unwrap();
    let status = app.run_status(&run.id).await;
    assert_eq!(
        (status.as_str(), now["currentRunId"].as_str(), handoffs),
        ("EXECUTING", Some(run.id.as_str()), 0),
        "offset {offset_ms}: the heartbeating run must stay the session's, alive"
    );
    worker.complete(&run, json!({"ok": true})).await.expect("complete");
    Skewed { cross_tokens, heartbeats, appends, handoffs, status }
}

#[tokio::test]
async fn faults_clock_offset_of_30s_on_one_process() {
    let started = Instant::now();
    // A heartbeat timeout far shorter than the skew (so a process judging
    // deadlines by its own clock would see the run dead at once), and long
    // enough for a loaded machine's slow heartbeats.
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 5_000).await;
    let plus = with_offset(&app, 30_000).await;
    let minus = with_offset(&app, -30_000).await;

    // Beyond the leeway: a process 150 s ahead.
    let beyond_secs = 150;
    let far = ServerProc::start(
        &app,
        &[("SESSIOND_TEST_MODE", "1"), ("SESSIOND_TEST_CLOCK_OFFSET_MS", &(beyond_secs * 1000).to_string())],
    )
    .await;
    let s = app.create_session(session_body(Some("clock-far"))).await["id"].as_str().unwrap().to_string();
    // Minted ahead: not valid yet on the right clock.
    let early = mint(&far.base(), &app.a.key, &s, "15m").await;
    let (early_status, early_body) = read_session(&app.base, &s, &early).await;
    // Minted on the right clock for a minute: expired on the one ahead.
    let short = mint(&app.base, &app.a.key, &s, "1m").await;
    let (late_status, late_body) = read_session(&far.base(), &s, &short).await;
    // Control: without the skew both work where they were minted.
    assert_eq!(read_session(&far.base(), &s, &early).await.0, StatusCode::OK);
    assert_eq!(read_session(&app.base, &s, &short).await.0, StatusCode::OK);

    report(
        "clock_offset",
        &[
            ("offsets_s", "+30,-30".into()),
            ("leeway_s", LEEWAY_SECS.to_string()),
            ("cross_tokens_ok", (plus.cross_tokens + minus.cross_tokens).to_string()),
            ("heartbeats", (plus.heartbeats + minus.heartbeats).to_string()),
            ("inputs", (plus.appends + minus.appends).to_string()),
            ("handoffs", (plus.handoffs + minus.handoffs).to_string()),
            ("run_status", format!("{}/{}", plus.status, minus.status)),
            ("beyond_offset_s", beyond_secs.to_string()),
            ("beyond_minted_ahead", early_status.as_u16().to_string()),
            ("beyond_minted_behind", late_status.as_u16().to_string()),
            ("total_ms", started.elapsed().as_millis().to_string()),
        ],
    );
    assert_eq!(early_status, StatusCode::UNAUTHORIZED, "{early_body}");
    assert!(early_body["error"].as_str().is_some_and(|e| e.contains("not yet valid")), "{early_body}");
    assert_eq!(late_status, StatusCode::UNAUTHORIZED, "{late_body}");
    assert!(late_body["error"].as_str().is_some_and(|e| e.contains("expired")), "{late_body}");
}
