//! What one caller may take: concurrent SSE subscriptions (per token, per
//! session, per environment, and the connections kept for everything else),
//! a channel's size, a run's pending waitpoints, and the dashboard's session
//! page, which pages what it lists.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{eventually, running_session, session_body, TestApp};
use crate::dashboard::{with_operators, Operator, ADMIN};

/// Opens an SSE subscription to `session`'s `.out`. Ok: the open response,
/// held until dropped (dropping it disconnects). Err: the refusal.
async fn try_sse(app: &TestApp, session: &str, token: &str) -> Result<reqwest::Response, (StatusCode, Value, bool)> {
    // A client per subscription: each holds its own connection.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let resp = client
        .get(format!("{}/realtime/v1/sessions/{session}/out", app.base))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .header("timeout-seconds", "120")
        .send()
        .await
        .expect("the server answers the subscription");
    if resp.status() == StatusCode::OK {
        return Ok(resp);
    }
    let status = resp.status();
    let retry_after = resp.headers().contains_key("retry-after");
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Err((status, body, retry_after))
}

async fn sse_ok(app: &TestApp, session: &str, token: &str) -> reqwest::Response {
    match try_sse(app, session, token).await {
        Ok(resp) => resp,
        Err((status, body, _)) => panic!("subscription refused: {status} {body}"),
    }
}

/// The refusal of a subscription over a cap: 429 in the API's error shape,
/// naming the cap, with `Retry-After`.
async fn sse_refused(app: &TestApp, session: &str, token: &str, scope: &str) {
    match try_sse(app, session, token).await {
        Ok(_) => panic!("a subscription over the {scope} cap was accepted"),
        Err((status, body, retry_after)) => {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
            assert_eq!(body["code"], "too_many_streams", "{body}");
            assert_eq!(body["scope"], scope, "{body}");
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
            assert!(retry_after, "a 429 says when to retry");
        }
    }
}

async fn new_session(app: &TestApp, ext: &str) -> (String, String) {
    let s = app.create_session(session_body(Some(ext))).await;
    (s["id"].as_str().unwrap().to_string(), s["publicAccessToken"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn one_token_holds_at_most_its_cap_of_subscriptions_and_a_dropped_one_frees_its_place() {
    // A short keep-alive: a subscriber that went away is noticed at the next write.
    let app = TestApp::spawn_with(|c| {
        c.sse_max_per_token = 3;
        c.sse_keepalive_ms = 200;
    })
    .await;
    let (s, token) = new_session(&app, "token-cap").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(sse_ok(&app, &s, &token).await);
    }
    sse_refused(&app, &s, &token, "token").await;
    // Another credential on the same session is not this token's cap.
    let other = sse_ok(&app, &s, &app.a.key).await;

    // Disconnect every subscription of the token: the places come back.
    drop(held);
    let first =
        eventually(10, "a place freed by the dropped subscriptions", || async { try_sse(&app, &s, &token).await.ok() })
            .await;
    let mut again = vec![first];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while again.len() < 3 {
        match try_sse(&app, &s, &token).await {
            Ok(resp) => again.push(resp),
            Err((status, body, _)) => assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for every place to come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sse_refused(&app, &s, &token, "token").await;
    drop((again, other));
}

#[tokio::test]
async fn one_session_and_one_environment_hold_at_most_their_caps_of_subscriptions() {
    let app = TestApp::spawn_with(|c| {
        c.sse_max_per_session = 2;
        c.sse_max_per_environment = 3;
    })
    .await;
    let (s1, token1) = new_session(&app, "cap-1").await;
    let (s2, _) = new_session(&app, "cap-2").await;
    let (s3, _) = new_session(&app, "cap-3").await;
    // Two credentials, one session: the session's cap counts both.
    let a = sse_ok(&app, &s1, &app.a.key).await;
    let b = sse_ok(&app, &s1, &token1).await;
    sse_refused(&app, &s1, &app.a.key, "session").await;
    // The environment's third place, on another session; then it is full.
    let c = sse_ok(&app, &s2, &app.a.key).await;
    sse_refused(&app, &s3, &app.a.key, "environment").await;
    // Another environment is not affected.
    let (status, other_env) = app.post("/api/v1/sessions", &app.b.key, session_body(Some("cap-b"))).await;
    assert!(status.is_success(), "{other_env}");
    let d = sse_ok(&app, other_env["id"].as_str().unwrap(), &app.b.key).await;
    drop((a, b, c, d));
}

#[tokio::test]
async fn long_lived_requests_leave_connections_for_healthz_and_short_requests() {
    // 12 connections, 4 of them never taken by long-lived requests.
    let app = TestApp::spawn_with(|c| {
        c.max_connections = 12;
        c.sse_reserved_connections = 4;
    })
    .await;
    let (s, _) = new_session(&app, "reserve").await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(sse_ok(&app, &s, &app.a.key).await);
    }
    sse_refused(&app, &s, &app.a.key, "server").await;
    // Health checks and secret-key calls, each on a fresh connection, are served.
    for path in ["/healthz".to_string(), format!("/api/v1/sessions/{s}")] {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let resp = client.get(format!("{}{path}", app.base)).bearer_auth(&app.a.key).send().await;
        assert_eq!(resp.map(|r| r.status()).map_err(|e| e.to_string()), Ok(StatusCode::OK), "GET {path}");
    }
    let (status, body) = app.append(&s, "out", &app.a.key, "still writable", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for sub in &mut held[..1] {
        let chunk = tokio::time::timeout(Duration::from_secs(5), sub.chunk()).await;
        assert!(matches!(chunk, Ok(Ok(Some(_)))), "the subscribers are still served");
    }
    drop(held);
}

/// Appends `count` records of `size` bytes at once; returns each answer.
async fn append_concurrently(
    app: &TestApp,
    s: &str,
    token: &str,
    count: usize,
    size: usize,
) -> Vec<(StatusCode, Value, Option<String>)> {
    let body = "x".repeat(size);
    let sends = (0..count).map(|i| {
        let request = app
            .client
            .post(format!("{}/realtime/v1/sessions/{s}/in/append", app.base))
            .bearer_auth(token)
            .header("x-part-id", format!("part-{i}"))
            .body(body.clone());
        async move {
            let resp = request.send().await.expect("append");
            let status = resp.status();
            let retry = resp.headers().get("x-should-retry").and_then(|v| v.to_str().ok()).map(String::from);
            (status, resp.json::<Value>().await.unwrap_or(Value::Null), retry)
        }
    });
    futures::future::join_all(sends).await
}

#[tokio::test]
async fn a_channel_holds_at_most_its_byte_quota_even_under_concurrent_appends() {
    let app = TestApp::spawn_with(|c| c.max_channel_bytes = 10_000).await;
    let (s, token) = new_session(&app, "full").await;
    // 1,000-byte bodies with no headers ("[]"): 1,002 bytes each, so 9 fit.
    let answers = append_concurrently(&app, &s, &token, 20, 1_000).await;
    let accepted: Vec<u64> =
        answers.iter().filter(|(st, _, _)| *st == StatusCode::OK).map(|(_, b, _)| b["seq"].as_u64().unwrap()).collect();
    assert_eq!(accepted.len(), 9, "{answers:?}");
    for (status, body, retry) in answers.iter().filter(|(st, _, _)| *st != StatusCode::OK) {
        assert_eq!(*status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["ok"], false, "{body}");
        assert_eq!(body["code"], "channel_full", "{body}");
        assert_eq!(retry.as_deref(), Some("false"), "the official client must not retry a full channel");
    }
    let (status, records) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(records["records"].as_array().unwrap().len(), 9, "only the accepted records are stored");

    // A retry of an accepted append still gets its acknowledgement.
    let first_ok = answers.iter().position(|(st, _, _)| *st == StatusCode::OK).unwrap();
    let part = format!("part-{first_ok}");
    let (status, body) = app.append(&s, "in", &token, &"x".repeat(1_000), &[("x-part-id", &part)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["seq"], answers[first_ok].1["seq"]);
    // A small record still fits; then nothing does.
    let (status, body) = app.append(&s, "in", &token, "small", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.append(&s, "in", &token, &"y".repeat(1_000), &[]).await;
    assert_eq!((status, body["code"].clone()), (StatusCode::CONFLICT, json!("channel_full")), "{body}");
    // The other channel has its own quota.
    let (status, body) = app.append(&s, "out", &app.a.key, &"z".repeat(1_000), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The close still lands its record on the full channel.
    let (status, body) = app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({"reason": "done"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(10, "the session-closed record on the full .in", || async {
        let (_, records) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
        let last = records["records"].as_array()?.last()?.clone();
        let closed = last["headers"].as_array()?.iter().any(|h| h[1] == "session-closed");
        closed.then_some(())
    })
    .await;
}

async fn wait_on(app: &TestApp, run: &sessiond::worker::AssignedRun, s: &str, key: &str) -> (StatusCode, Value) {
    app.post(
        &format!("/api/v1/runs/{}/session-streams/wait", run.id),
        &run.token,
        json!({"session": s, "io": "in", "idempotencyKey": key}),
    )
    .await
}

async fn waiting_of_run(app: &TestApp, run: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM waitpoints w JOIN task_runs r ON r.id = w.run_id
         WHERE r.friendly_id = $1 AND w.status = 'WAITING'",
    )
    .bind(run)
    .fetch_one(app.db())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_run_holds_at_most_its_quota_of_pending_waitpoints() {
    let app = TestApp::spawn_with(|c| c.max_pending_waitpoints_per_run = 3).await;
    let (s, run) = running_session(&app, "wp-quota").await;
    for i in 0..3 {
        let (status, body) = wait_on(&app, &run, &s, &format!("k{i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let resp = app
        .client
        .post(format!("{}/api/v1/runs/{}/session-streams/wait", app.base, run.id))
        .bearer_auth(&run.token)
        .json(&json!({"session": s, "io": "in", "idempotencyKey": "k3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.headers().get("x-should-retry").and_then(|v| v.to_str().ok()), Some("false"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "too_many_waitpoints", "{body}");
    assert_eq!(waiting_of_run(&app, &run.id).await, 3);
    // The same key again is the waitpoint it already has, not a new one.
    let (status, body) = wait_on(&app, &run, &s, "k0").await;
    assert_eq!((status, body["isCached"].clone()), (StatusCode::OK, json!(true)), "{body}");
    // A record completes the three; the run may wait again.
    let (status, _) = app.append(&s, "in", &app.a.key, "hello", &[]).await;
    assert_eq!(status, StatusCode::OK);
    eventually(10, "the pending waitpoints completed", || async {
        (waiting_of_run(&app, &run.id).await == 0).then_some(())
    })
    .await;
    let (status, body) = wait_on(&app, &run, &s, "k3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The `href` of the element with `id` in `html`.
fn link(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let rest = &html[at..];
    let href = rest.find("href=\"")? + "href=\"".len();
    Some(rest[href..].split('"').next()?.replace("&amp;", "&"))
}

fn waitpoint_rows(html: &str) -> Vec<String> {
    html.split("data-waitpoint-id=\"").skip(1).map(|r| r.split('"').next().unwrap().to_string()).collect()
}

#[tokio::test]
async fn the_session_page_pages_its_pending_waitpoints() {
    // Its run makes dozens of waits without a heartbeat: the test server's
    // 1.5 s heartbeat timeout would crash it on a loaded machine.
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 600_000).await;
    with_operators(&app).await;
    let (s, run) = running_session(&app, "paged").await;
    let mut created = Vec::new();
    for i in 0..30 {
        let (status, body) = wait_on(&app, &run, &s, &format!("page-{i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        created.push(body["waitpointId"].as_str().unwrap().to_string());
    }
    let op = Operator::login(&app, ADMIN).await;
    let (status, first) = op.get(&format!("/dashboard/sessions/{s}")).await;
    assert_eq!(status, StatusCode::OK);
    let page1 = waitpoint_rows(&first);
    assert_eq!(page1.len(), 25, "one page of pending waitpoints");
    assert!(first.contains("30 pending"), "the page says how many are pending");
    let next = link(&first, "waitpoints-next").expect("a link to the next page");
    assert!(link(&first, "waitpoints-previous").is_none());
    let (status, second) = op.get(&next).await;
    assert_eq!(status, StatusCode::OK);
    let page2 = waitpoint_rows(&second);
    assert_eq!(page2.len(), 5, "{second}");
    assert!(link(&second, "waitpoints-next").is_none());
    let previous = link(&second, "waitpoints-previous").expect("a link back");
    let (_, back) = op.get(&previous).await;
    assert_eq!(waitpoint_rows(&back), page1);
    let mut all: Vec<String> = page1.into_iter().chain(page2).collect();
    all.sort();
    created.sort();
    assert_eq!(all, created, "every pending waitpoint is on exactly one page");
    // A cursor that is not one is a 400 page, not a 500.
    let (status, _) = op.get(&format!("/dashboard/sessions/{s}?after=yesterday")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_run_page_pages_its_waitpoints_newest_first() {
    // Its run makes dozens of waits without a heartbeat: the test server's
    // 1.5 s heartbeat timeout would crash it on a loaded machine.
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 600_000).await;
    with_operators(&app).await;
    let (s, run) = running_session(&app, "run-paged").await;
    let mut created = Vec::new();
    for i in 0..27 {
        let (status, body) = wait_on(&app, &run, &s, &format!("run-page-{i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        created.push(body["waitpointId"].as_str().unwrap().to_string());
    }
    let op = Operator::login(&app, ADMIN).await;
    let (status, first) = op.get(&format!("/dashboard/runs/{}", run.id)).await;
    assert_eq!(status, StatusCode::OK);
    let page1 = waitpoint_rows(&first);
    assert_eq!(page1.len(), 25, "one page of waitpoints");
    // Newest first: the waits made last lead the page.
    assert_eq!(page1[0], created[26]);
    let (_, second) = op.get(&link(&first, "waitpoints-next").expect("a link to the older page")).await;
    assert_eq!(waitpoint_rows(&second), vec![created[1].clone(), created[0].clone()]);
    assert!(link(&second, "waitpoints-next").is_none());
    let (_, back) = op.get(&link(&second, "waitpoints-previous").expect("a link back")).await;
    assert_eq!(waitpoint_rows(&back), page1);
}

#[tokio::test]
async fn waitpoint_long_polls_count_against_their_token_and_free_their_place_when_answered() {
    let app = TestApp::spawn_with(|c| c.sse_max_per_token = 2).await;
    let (s, run) = running_session(&app, "poll-cap").await;
    let (status, body) = wait_on(&app, &run, &s, "poll").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    let path = format!("/api/v1/runs/{}/waitpoints/{wp}?waitSeconds=30", run.id);
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let request = app.client.get(format!("{}{path}", app.base)).bearer_auth(&run.token);
            tokio::spawn(async move { request.send().await.map(|r| r.status()) })
        })
        .collect();
    let permits = app.state.stream_permits.clone();
    eventually(10, "both long-polls waiting", || async { (permits.held() == 2).then_some(()) }).await;
    let resp = app.client.get(format!("{}{path}", app.base)).bearer_auth(&run.token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!((body["code"].clone(), body["scope"].clone()), (json!("too_many_streams"), json!("token")), "{body}");
    // A poll that does not wait holds nothing and is answered.
    let (status, _) = app.get(&format!("/api/v1/runs/{}/waitpoints/{wp}?waitSeconds=0", run.id), &run.token).await;
    assert_eq!(status, StatusCode::OK);
    // A record completes the waitpoint: both polls answer and give their places back.
    app.append(&s, "in", &app.a.key, "wake", &[]).await;
    for poll in polls {
        assert_eq!(poll.await.unwrap().unwrap(), StatusCode::OK);
    }
    eventually(10, "the long-polls' places given back", || async { (permits.held() == 0).then_some(()) }).await;
}

#[tokio::test]
async fn the_dashboard_tail_takes_a_place_among_the_servers_long_lived_requests() {
    let app = TestApp::spawn_with(|c| {
        c.max_connections = 8;
        c.sse_reserved_connections = 4;
    })
    .await;
    with_operators(&app).await;
    let op = Operator::login(&app, ADMIN).await;
    let (s, _) = new_session(&app, "tail-cap").await;
    let held: Vec<_> = futures::future::join_all((0..4).map(|_| sse_ok(&app, &s, &app.a.key))).await;
    // The server's four long-lived places are taken: the tail waits its turn.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let tail = client
        .get(format!("{}/dashboard/sessions/{s}/out/tail", app.base))
        .header("cookie", format!("sessiond_dashboard={}", op.cookie))
        .send()
        .await
        .expect("the tail is answered");
    assert_eq!(tail.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(tail.headers().contains_key("retry-after"));
    // The page itself, a short request, is served.
    let (status, _) = op.get(&format!("/dashboard/sessions/{s}")).await;
    assert_eq!(status, StatusCode::OK);
    drop(held);
}

#[tokio::test]
async fn worker_dequeue_long_polls_count_against_their_environment() {
    let app = TestApp::spawn_with(|c| c.sse_max_per_environment = 2).await;
    let url = format!("{}/api/v1/worker/dequeue", app.base);
    let body = json!({"tasks": ["nothing-queued"], "waitSeconds": 30});
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let request = app.client.post(&url).bearer_auth(&app.a.key).json(&body);
            tokio::spawn(async move { request.send().await.map(|r| r.status()) })
        })
        .collect();
    let permits = app.state.stream_permits.clone();
    eventually(10, "both dequeues waiting", || async { (permits.held() == 2).then_some(()) }).await;
    let resp = app.client.post(&url).bearer_auth(&app.a.key).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let refused: Value = resp.json().await.unwrap();
    assert_eq!((refused["code"].clone(), refused["scope"].clone()), (json!("too_many_streams"), json!("environment")));
    // Another environment has its own places; a dequeue that does not wait holds none.
    let (status, _) =
        app.post("/api/v1/worker/dequeue", &app.b.key, json!({"tasks": ["nothing-queued"], "waitSeconds": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) =
        app.post("/api/v1/worker/dequeue", &app.a.key, json!({"tasks": ["nothing-queued"], "waitSeconds": 0})).await;
    assert_eq!(status, StatusCode::OK);
    // Workers that go away mid-poll give their places back.
    for poll in polls {
        poll.abort();
    }
    eventually(10, "the dequeues' places given back", || async { (permits.held() == 0).then_some(()) }).await;
}
