//! The second probe's findings on what one caller may send and how refusals
//! read: PATCH bodies and metadata are bounded like create's; only a run that
//! still serves its session mints tokens; a record cannot break the dashboard
//! tail's SSE framing; every rejection is JSON naming the field in words.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{running_session, session_body, TestApp};
use crate::dashboard::{with_operators, Operator, VIEWER};

/// Words only a Rust type name would put in a message.
const RUST_WORDS: &[&str] =
    &["enum", "struct", "u8", "u16", "u32", "u64", "usize", "i32", "i64", "f64", "Expiration", "Tags", "sequence"];

/// A 422 naming `field`, whose message says nothing of Rust types.
fn assert_422_in_words(what: &str, field: &str, (status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    assert_eq!(body["field"], field, "{what}: {body}");
    let text = format!("{} {}", body["error"], body["reason"]);
    for word in RUST_WORDS {
        let words = text.split(|c: char| !c.is_alphanumeric());
        assert!(!words.clone().any(|w| w == *word), "{what}: the message names a Rust type ({word}): {text}");
    }
}

#[tokio::test]
async fn patch_bodies_and_metadata_are_bounded_like_create() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("bounded-patch"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    let browser = s["publicAccessToken"].as_str().unwrap().to_string();
    let path = format!("/api/v1/sessions/{id}");

    // A PATCH body over 32 KB: 413 in the API's shape, from the browser's
    // token as from the key, and nothing changes.
    for token in [&browser, &app.a.key] {
        let (status, body) = app.patch(&path, token, json!({"metadata": {"pad": "x".repeat(40 * 1024)}})).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(body["error"], "Request body is too large", "{body}");
    }
    let (_, now) = app.get(&path, &app.a.key).await;
    assert_eq!(now["metadata"], json!({"user": "u1"}));

    // Metadata is measured as stored and served, not as sent: `1e9` is three
    // bytes in a body and twelve once serialized (`1000000000.0`).
    let metadata = format!("{{\"n\":[{}]}}", vec!["1e9"; 7000].join(","));
    let sent = format!("{{\"metadata\":{metadata}}}");
    assert!(sent.len() < 32 * 1024, "the body itself fits: {}", sent.len());
    let raw = |method: Method, path: String, body: String| {
        let app = &app;
        async move {
            let resp = app
                .client
                .request(method, format!("{}{path}", app.base))
                .bearer_auth(&app.a.key)
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_422_in_words("patch metadata", "metadata", raw(Method::PATCH, path.clone(), sent.clone()).await);
    let mut create = session_body(Some("bounded-create"));
    create.as_object_mut().unwrap().remove("metadata");
    let mut create = serde_json::to_string(&create).unwrap();
    create.insert_str(1, &format!("\"metadata\":{metadata},"));
    assert!(create.len() < 32 * 1024 && create.contains("1e9,1e9"), "{}", create.len());
    assert_422_in_words("create metadata", "metadata", raw(Method::POST, "/api/v1/sessions".into(), create).await);
    assert_eq!(app.get("/api/v1/sessions/bounded-create", &app.a.key).await.0, StatusCode::NOT_FOUND);

    // Just under the cap is taken.
    let (status, body) = app.patch(&path, &browser, json!({"metadata": {"pad": "y".repeat(30 * 1024)}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

fn mint_body(session: &str) -> Value {
    json!({"scopes": [format!("read:sessions:{session}"), format!("write:sessions:{session}")], "expirationTime": "1h"})
}

#[tokio::test]
async fn only_the_session_s_current_live_run_may_mint_tokens() {
    let app = TestApp::spawn().await;
    let (session, first) = running_session(&app, "mint-fence").await;
    let mint = |token: String| {
        let app = &app;
        let body = mint_body(&session);
        async move { app.post("/api/v1/auth/public-tokens", &token, body).await }
    };
    let (status, body) = mint(first.token.clone()).await;
    assert_eq!(status, StatusCode::OK, "the current run mints: {body}");

    // The first run hands off; its token is now fenced off the session.
    let w = app.worker();
    let handoff = w.end_and_continue(&first, "upgrade").await.unwrap();
    assert!(handoff.swapped);
    let (status, body) = mint(first.token.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "a superseded run mints nothing: {body}");
    assert_eq!(body["code"], "run_superseded", "{body}");
    // The same answer as its fenced append to `.out`.
    let (status, fenced) = app.append(&session, "out", &first.token, "late", &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{fenced}");
    assert_eq!(fenced["code"], "run_superseded", "{fenced}");

    // The run that replaced it mints, until it ends.
    let second = dequeue_one_of(&app, "task-mint-fence").await;
    assert_eq!(second.id, handoff.run_id);
    let (status, body) = mint(second.token.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    w.complete(&second, json!({"done": true})).await.unwrap();
    let (status, body) = mint(second.token.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "an ended run mints nothing: {body}");
    assert_eq!(body["code"], "run_not_live", "{body}");
}

/// Issue 24 item 6, the rest: what a run mints names the run, so its hand-off
/// fences the minted token's `.out` writes as it fences the run's own.
#[tokio::test]
async fn a_token_minted_by_a_run_is_fenced_by_its_hand_off() {
    let app = TestApp::spawn().await;
    let (session, first) = running_session(&app, "minted-fence").await;
    let mint = |token: String| {
        let app = &app;
        let body = mint_body(&session);
        async move {
            let (status, body) = app.post("/api/v1/auth/public-tokens", &token, body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["token"].as_str().unwrap().to_string()
        }
    };
    let by_first = mint(first.token.clone()).await;
    let by_key = mint(app.a.key.clone()).await;
    // The direct-write token a channel's initialize hands the run, too.
    let init = app
        .client
        .put(format!("{}/realtime/v1/sessions/{session}/out", app.base))
        .bearer_auth(&first.token)
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), StatusCode::OK);
    let direct = init.headers()["x-write-token"].to_str().unwrap().to_string();
    let (status, body) = app.append(&session, "out", &by_first, "before", &[]).await;
    assert_eq!(status, StatusCode::OK, "the minting run still serves: {body}");

    let handoff = app.worker().end_and_continue(&first, "upgrade").await.unwrap();
    assert!(handoff.swapped);
    // Refused exactly as the superseded run's own append is.
    let (run_status, run_body) = app.append(&session, "out", &first.token, "late", &[]).await;
    assert_eq!(run_body["code"], "run_superseded", "{run_body}");
    for (what, token) in [("minted", &by_first), ("direct-write", &direct)] {
        let (status, body) = app.append(&session, "out", token, "late", &[]).await;
        assert_eq!((status, &body), (run_status, &run_body), "the {what} token");
    }
    // The user's messages on `.in` go to whichever run serves: not fenced.
    let (status, body) = app.append(&session, "in", &by_first, "hello", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The new run's token, and a secret key's, write `.out`.
    let second = dequeue_one_of(&app, "task-minted-fence").await;
    assert_eq!(second.id, handoff.run_id);
    let by_second = mint(second.token.clone()).await;
    for (who, token) in [("the new run's", &by_second), ("the secret key's", &by_key)] {
        let (status, body) = app.append(&session, "out", token, "now", &[]).await;
        assert_eq!(status, StatusCode::OK, "{who} token: {body}");
    }
}

async fn dequeue_one_of(app: &TestApp, task: &str) -> sessiond::worker::AssignedRun {
    let runs = app.worker().dequeue(&[task.to_string()], 1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(runs.len(), 1, "expected one run of {task}");
    runs.into_iter().next().unwrap()
}

/// Splits an SSE stream into events as the spec's parser does (lines end at
/// CRLF, CR or LF; a blank line ends an event): each event's fields in order.
fn sse_events(raw: &str) -> Vec<Vec<(String, String)>> {
    let mut events = Vec::new();
    let mut fields = Vec::new();
    let normalized = raw.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            if !fields.is_empty() {
                events.push(std::mem::take(&mut fields));
            }
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        fields.push((name.to_string(), value.strip_prefix(' ').unwrap_or(value).to_string()));
    }
    events
}

#[tokio::test]
async fn a_record_cannot_end_or_start_a_field_of_the_dashboard_tail() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("tail-framing"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    let record = "a\rid: x\nretry: 1\r\nevent: y\r\rdata: z\n\nb";
    let (status, appended) = app.append(&id, "out", &app.a.key, record, &[]).await;
    assert_eq!(status, StatusCode::OK, "{appended}");
    let seq = appended["seq"].as_u64().unwrap();

    let op = Operator::login(&app, VIEWER).await;
    let mut stream = app
        .client
        .get(format!("{}/dashboard/sessions/{id}/out/tail", app.base))
        .header(COOKIE, format!("sessiond_dashboard={}", op.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !raw.ends_with(b"</span>\n\n") {
            raw.extend_from_slice(&stream.chunk().await.unwrap().expect("the stream stays open"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the record never arrived: {:?}", String::from_utf8_lossy(&raw)));
    let raw = String::from_utf8(raw).unwrap();

    // Every record byte that could end a line is a character reference, so the
    // record is one data line of one event: no `id`, `retry` or `event` of its own.
    let html = format!(
        "<span class=\"record\" data-seq=\"{seq}\">#{seq} a&#13;id: x&#10;retry: 1&#13;&#10;event: y&#13;&#13;data: z&#10;&#10;b</span>"
    );
    assert_eq!(raw, format!("event: record\ndata: {html}\n\n"), "the raw stream");
    assert_eq!(
        sse_events(&raw),
        vec![vec![("event".to_string(), "record".to_string()), ("data".to_string(), html)]],
        "as a browser parses it"
    );
}

#[tokio::test]
async fn extractor_rejections_are_json_in_the_api_shape() {
    let app = TestApp::spawn().await;
    let (session, run) = running_session(&app, "rejections").await;
    let key = app.a.key.clone();
    let bad = "%FF";
    let cases = [
        (Method::GET, format!("/api/v1/sessions/{bad}")),
        (Method::PATCH, format!("/api/v1/sessions/{bad}")),
        (Method::POST, format!("/api/v1/sessions/{bad}/close")),
        (Method::POST, format!("/api/v1/sessions/{bad}/end-and-continue")),
        (Method::GET, format!("/api/v1/runs/{bad}")),
        (Method::POST, format!("/api/v1/runs/{bad}/heartbeat")),
        (Method::POST, format!("/api/v1/runs/{bad}/complete")),
        (Method::POST, format!("/api/v1/runs/{bad}/fail")),
        (Method::POST, format!("/api/v2/runs/{bad}/cancel")),
        (Method::POST, format!("/api/v1/runs/{bad}/session-streams/wait")),
        (Method::GET, format!("/api/v1/runs/{bad}/waitpoints/waitpoint_x")),
        (Method::GET, format!("/api/v1/runs/{}/waitpoints/{bad}", run.id)),
        (Method::PUT, format!("/realtime/v1/sessions/{bad}/out")),
        (Method::GET, format!("/realtime/v1/sessions/{bad}/out")),
        (Method::POST, format!("/realtime/v1/sessions/{bad}/out/append")),
        (Method::GET, format!("/realtime/v1/sessions/{session}/out/records?afterEventId={bad}")),
        (Method::GET, format!("/api/v1/runs/{}/waitpoints/waitpoint_x?waitSeconds=soon", run.id)),
        (Method::GET, format!("/api/v1/runs/{}/waitpoints/waitpoint_x?waitSeconds=-1", run.id)),
        (Method::GET, format!("/api/v1/sessions?page[size]={bad}")),
    ];
    for (method, path) in cases {
        let resp =
            app.client.request(method.clone(), format!("{}{path}", app.base)).bearer_auth(&key).send().await.unwrap();
        let status = resp.status();
        let kind = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let text = resp.text().await.unwrap();
        assert!(status.is_client_error(), "{method} {path}: {status} {text}");
        assert!(kind.starts_with("application/json"), "{method} {path}: {status} {kind}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: {text}"));
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    // A query value of the wrong shape is a 422 naming it.
    let wait = format!("/api/v1/runs/{}/waitpoints/waitpoint_x", run.id);
    assert_422_in_words("waitSeconds", "waitSeconds", app.get(&format!("{wait}?waitSeconds=soon"), &key).await);
    assert_422_in_words("negative waitSeconds", "waitSeconds", app.get(&format!("{wait}?waitSeconds=-1"), &key).await);
}

#[tokio::test]
async fn validation_messages_name_the_field_in_words() {
    let app = TestApp::spawn().await;
    let (session, run) = running_session(&app, "in-words").await;
    let key = app.a.key.clone();

    let mut body = mint_body(&session);
    body["expirationTime"] = json!(true);
    assert_422_in_words("expirationTime", "expirationTime", app.post("/api/v1/auth/public-tokens", &key, body).await);
    let wait = json!({"session": session, "io": "in", "tags": 5});
    let path = format!("/api/v1/runs/{}/session-streams/wait", run.id);
    assert_422_in_words("waitpoint tags", "tags", app.post(&path, &run.token, wait).await);
    let dequeue = json!({"tasks": ["none"], "maxRuns": "many", "waitSeconds": 0});
    assert_422_in_words("maxRuns", "maxRuns", app.post("/api/v1/worker/dequeue", &key, dequeue).await);
    let dequeue = json!({"tasks": ["none"], "waitSeconds": -1});
    assert_422_in_words("waitSeconds", "waitSeconds", app.post("/api/v1/worker/dequeue", &key, dequeue).await);
    assert_422_in_words("a body that is no object", "body", app.post("/api/v1/sessions", &key, json!(5)).await);
    let patch = json!({"tags": {"a": 1}});
    assert_422_in_words("tags", "tags", app.patch(&format!("/api/v1/sessions/{session}"), &key, patch).await);

    // A worker id has a documented length limit.
    let long = json!({"tasks": ["none"], "waitSeconds": 0, "workerId": "w".repeat(129)});
    assert_422_in_words("workerId", "workerId", app.post("/api/v1/worker/dequeue", &key, long).await);
    let fits = json!({"tasks": ["none"], "waitSeconds": 0, "workerId": "w".repeat(128)});
    assert_eq!(app.post("/api/v1/worker/dequeue", &key, fits).await.0, StatusCode::OK);
}

#[tokio::test]
async fn dashboard_posts_that_are_no_form_get_a_page() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let op = Operator::login(&app, VIEWER).await;
    for (path, cookie) in [("/dashboard/login", None), ("/dashboard/logout", Some(&op.cookie))] {
        for kind in [Some("application/json"), Some("text/plain"), None] {
            let mut req = app.client.post(format!("{}{path}", app.base)).body("{\"csrf\": \"x\"}");
            if let Some(kind) = kind {
                req = req.header(CONTENT_TYPE, kind);
            }
            if let Some(cookie) = cookie {
                req = req.header(COOKIE, format!("sessiond_dashboard={cookie}"));
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let page = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let text = resp.text().await.unwrap();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} as {kind:?}: {text}");
            assert!(page.starts_with("text/html"), "{path} as {kind:?}: {page}: {text}");
            assert!(text.contains("form"), "{path} as {kind:?}: {text}");
        }
    }
    // Still signed in: the refused logout changed nothing.
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::OK);
}
