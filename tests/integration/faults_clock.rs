//! One process of a deployment whose clock is off by ±30 s (the test-only
//! `SESSIOND_TEST_CLOCK_OFFSET_MS`), next to one whose clock is right:
//! tokens minted on either work on the other, a worker heartbeating through
//! the skewed process keeps its run alive and its session's run in place
//! (no CRASHED, no hand-off) while input arrives through both processes; and
//! a process off by more than the JWT leeway refuses the other's tokens with
//! a 401 that names the cause. On the skewed process, a wait with a relative
//! timeout ends after that timeout by Postgres' clock (not the skew later,
//! nor at once), and a session keeps taking writes until its expiry and
//! refuses them after it.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sessiond::worker::{AssignedRun, WorkerClient};

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
    /// A "3s" wait: `timeout_at - created_at` and `completed_at - created_at`, ms.
    wait_timeout_ms: i64,
    wait_timed_out_ms: i64,
    /// The session's last accepted and first refused write, ms from its expiry.
    last_write_ms: i64,
    first_refusal_ms: i64,
}

/// The relative timeout the skewed process is asked for.
const WAIT_TIMEOUT_SECS: i64 = 3;

/// A wait with a relative timeout, created and long-polled on the skewed
/// process until it ends (the run heartbeating meanwhile); returns its
/// `timeout_at - created_at` and `completed_at - created_at` in ms.
async fn timed_wait(app: &TestApp, skewed: &str, worker: &WorkerClient, run: &AssignedRun, s: &str) -> (i64, i64) {
    let body = json!({"session": s, "io": "in", "timeout": format!("{WAIT_TIMEOUT_SECS}s")});
    let path = format!("/api/v1/runs/{}/session-streams/wait", run.id);
    let (status, v) = call(skewed, Method::POST, &path, &run.token, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "wait: {v}");
    let w = v["waitpointId"].as_str().unwrap().to_string();
    // Long enough for the timeout, a sweep and a loaded machine; far short of
    // the 33 s a timeout computed by a clock 30 s ahead would take.
    let until = Instant::now() + Duration::from_secs(12);
    let last = loop {
        let path = format!("/api/v1/runs/{}/waitpoints/{w}?waitSeconds=1", run.id);
        let (status, v) = call(skewed, Method::GET, &path, &run.token, None).await;
        assert_eq!(status, StatusCode::OK, "poll: {v}");
        if v["status"] != "WAITING" || Instant::now() >= until {
            break v;
        }
        let _ = worker.heartbeat(run).await;
    };
    assert_eq!(last["status"], "TIMED_OUT", "a {WAIT_TIMEOUT_SECS}s wait on the skewed process: {last}");
    let (timeout, done): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM timeout_at - created_at)::float8, extract(epoch FROM completed_at - created_at)::float8
         FROM waitpoints WHERE friendly_id = $1",
    )
    .bind(&w)
    .fetch_one(app.db())
    .await
    .unwrap();
    ((timeout * 1000.0) as i64, (done * 1000.0) as i64)
}

/// A session created on the skewed process to expire a few seconds ahead
/// (by the right clock), written to on it until refused; returns the last
/// accepted and the first refused write in ms from the expiry.
async fn writes_until_expiry(skewed: &str, key: &str, ext: &str) -> (i64, i64) {
    let expires = chrono::Utc::now() + chrono::Duration::seconds(4);
    let mut body = session_body(Some(&format!("{ext}-expiring")));
    body["expiresAt"] = json!(expires.to_rfc3339());
    let (status, created) = call(skewed, Method::POST, "/api/v1/sessions", key, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "a session expiring in 4 s, created on the skewed process: {created}");
    let s = created["id"].as_str().unwrap().to_string();
    let from_expiry = || (chrono::Utc::now() - expires).num_milliseconds();
    let (mut last_ok, mut i) = (None, 0);
    let refused = loop {
        let resp = reqwest::Client::new()
            .post(format!("{skewed}/realtime/v1/sessions/{s}/in/append"))
            .bearer_auth(key)
            .header("x-part-id", format!("exp-{i}"))
            .body(input(i))
            .send()
            .await
            .unwrap();
        let (at, status) = (from_expiry(), resp.status());
        match status {
            StatusCode::OK => last_ok = Some(at),
            // Redis slow on a loaded machine: the same part again.
            StatusCode::SERVICE_UNAVAILABLE => continue,
            _ => break Some(at),
        }
        if at > 6_000 {
            break None;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last_ok = last_ok.expect("the expiring session took no write at all");
    let refused = refused.expect("the session still took writes 6 s after its expiry");
    (last_ok, refused)
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
    let (wait_timeout_ms, wait_timed_out_ms) = timed_wait(app, &skewed, &worker, &run, &s).await;
    worker.complete(&run, json!({"ok": true})).await.expect("complete");
    let (last_write_ms, first_refusal_ms) = writes_until_expiry(&skewed, key, &ext).await;
    Skewed {
        cross_tokens,
        heartbeats,
        appends,
        handoffs,
        status,
        wait_timeout_ms,
        wait_timed_out_ms,
        last_write_ms,
        first_refusal_ms,
    }
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
            ("wait_timeout_s", WAIT_TIMEOUT_SECS.to_string()),
            ("wait_timeout_at_ms", format!("{}/{}", plus.wait_timeout_ms, minus.wait_timeout_ms)),
            ("wait_timed_out_ms", format!("{}/{}", plus.wait_timed_out_ms, minus.wait_timed_out_ms)),
            ("expiry_last_write_ms", format!("{}/{}", plus.last_write_ms, minus.last_write_ms)),
            ("expiry_first_refusal_ms", format!("{}/{}", plus.first_refusal_ms, minus.first_refusal_ms)),
            ("total_ms", started.elapsed().as_millis().to_string()),
        ],
    );
    for (offset, k) in [("+30", &plus), ("-30", &minus)] {
        let timeout_ms = WAIT_TIMEOUT_SECS * 1000;
        // Set by Postgres at insert: the timeout asked for, to the clock tick.
        assert!((k.wait_timeout_ms - timeout_ms).abs() <= 500, "offset {offset}: timeout_at {}", k.wait_timeout_ms);
        // Ended by the per-second sweep after it, not before.
        assert!(
            (timeout_ms..=timeout_ms + 4_000).contains(&k.wait_timed_out_ms),
            "offset {offset}: a {timeout_ms} ms wait timed out after {} ms",
            k.wait_timed_out_ms
        );
        // Writes until its expiry (within a request's round trip and the
        // pause between writes), refused from it on.
        assert!(k.last_write_ms >= -1_000, "offset {offset}: the last write was {} ms before expiry", k.last_write_ms);
        assert!(
            (0..=1_500).contains(&k.first_refusal_ms),
            "offset {offset}: the first refusal came {} ms from expiry",
            k.first_refusal_ms
        );
    }
    assert_eq!(early_status, StatusCode::UNAUTHORIZED, "{early_body}");
    assert!(early_body["error"].as_str().is_some_and(|e| e.contains("not yet valid")), "{early_body}");
    assert_eq!(late_status, StatusCode::UNAUTHORIZED, "{late_body}");
    assert!(late_body["error"].as_str().is_some_and(|e| e.contains("expired")), "{late_body}");
}
