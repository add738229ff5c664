//! Control-plane endpoints against a real server and Postgres.

use crate::common;

use crate::common::{session_body, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.db()).await.unwrap()
}

#[tokio::test]
async fn create_inserts_session_first_run_claim_and_audit() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, session_body(Some("chat-1"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("session_"));
    assert_eq!(body["externalId"], "chat-1");
    assert_eq!(body["type"], "chat.agent");
    assert_eq!(body["taskIdentifier"], "echo-agent");
    assert_eq!(body["isCached"], false);
    assert_eq!(body["tags"], json!(["test"]));
    assert_eq!(body["metadata"], json!({"user": "u1"}));
    assert_eq!(body["triggerConfig"]["basePayload"], json!({"chatId": "chat-1"}));
    assert!(body["closedAt"].is_null() && body["expiresAt"].is_null());
    let run_id = body["runId"].as_str().unwrap();
    assert!(run_id.starts_with("run_"));
    assert_eq!(body["currentRunId"], run_id);
    assert_eq!(body["publicAccessToken"].as_str().unwrap().split('.').count(), 3);

    let (status, run_payload, version): (String, Value, i32) = sqlx::query_as(
        "SELECT r.status, r.payload, s.current_run_version FROM task_runs r JOIN sessions s ON s.current_run_id = r.id
         WHERE r.friendly_id = $1",
    )
    .bind(run_id)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert_eq!(status, "QUEUED");
    assert_eq!(version, 1);
    assert_eq!(run_payload, json!({"chatId": "chat-1", "sessionId": body["id"]}));
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM session_runs").fetch_all(app.db()).await.unwrap();
    assert_eq!(reasons, vec!["initial"]);
    let max_attempts: i32 = sqlx::query_scalar("SELECT max_attempts FROM task_runs").fetch_one(app.db()).await.unwrap();
    assert_eq!(max_attempts, 3);
}

#[tokio::test]
async fn create_is_idempotent_on_external_id_and_refreshes_trigger_config() {
    let app = TestApp::spawn().await;
    let first = app.create_session(session_body(Some("chat-1"))).await;
    let mut again = session_body(Some("chat-1"));
    again["triggerConfig"]["basePayload"] = json!({"chatId": "chat-1", "model": "new"});
    let (status, second) = app.post("/api/v1/sessions", &app.a.key, again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["isCached"], true);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["runId"], first["runId"]);
    assert_eq!(second["triggerConfig"]["basePayload"]["model"], "new");
    assert_eq!(count(&app, "SELECT count(*) FROM task_runs").await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM session_runs").await, 1);

    // Without an external id every create is a new session.
    let x = app.create_session(session_body(None)).await;
    let y = app.create_session(session_body(None)).await;
    assert_ne!(x["id"], y["id"]);
    assert_eq!(x["isCached"], false);
}

#[tokio::test]
async fn concurrent_first_creates_yield_exactly_one_201() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let client = app.client.clone();
        let url = format!("{}/api/v1/sessions", app.base);
        let key = app.a.key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).bearer_auth(key).json(&session_body(Some("race"))).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status} {body}");
        if status == StatusCode::CREATED {
            created += 1;
            assert_eq!(body["isCached"], false);
        } else {
            assert_eq!(body["isCached"], true);
        }
        ids.insert(body["id"].as_str().unwrap().to_string());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(count(&app, "SELECT count(*) FROM task_runs").await, 1);
}

#[tokio::test]
async fn create_rejects_bad_input_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let reserved = session_body(Some("session_abc"));
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, reserved).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "externalId");
    assert!(body["error"].as_str().unwrap().contains("session_"));

    let mut no_task = session_body(None);
    no_task.as_object_mut().unwrap().remove("taskIdentifier");
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, no_task).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"].as_str().unwrap().contains("taskIdentifier"), "{body}");

    let mut many_tags = session_body(None);
    many_tags["tags"] = json!((0..11).map(|i| i.to_string()).collect::<Vec<_>>());
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, many_tags).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("tags")));

    let mut wrong_type = session_body(None);
    wrong_type["triggerConfig"]["maxAttempts"] = json!("three");
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, wrong_type).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("triggerConfig.maxAttempts")));

    let r = app
        .client
        .post(format!("{}/api/v1/sessions", app.base))
        .bearer_auth(&app.a.key)
        .header("content-type", "application/json")
        .body("{\"type\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());

    let mut huge = session_body(None);
    huge["metadata"] = json!({"blob": "x".repeat(2 * 1024 * 1024)});
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"].is_string());

    assert_eq!(count(&app, "SELECT count(*) FROM sessions").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM task_runs").await, 0);
}

#[tokio::test]
async fn create_on_a_closed_external_id_is_409_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("done"))).await;
    let id = s["id"].as_str().unwrap();
    let (status, _) = app.post(&format!("/api/v1/sessions/{id}/close"), &app.a.key, json!({"reason": "bye"})).await;
    assert_eq!(status, StatusCode::OK);
    let mut again = session_body(Some("done"));
    again["triggerConfig"]["basePayload"] = json!({"changed": true});
    let r = app
        .client
        .post(format!("{}/api/v1/sessions", app.base))
        .bearer_auth(&app.a.key)
        .json(&again)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // Final, so the official client must not retry it.
    assert_eq!(r.headers()["x-should-retry"], "false");
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("closed"));
    let (_, now) = app.get(&format!("/api/v1/sessions/{id}"), &app.a.key).await;
    assert_eq!(now["triggerConfig"]["basePayload"], json!({"chatId": "done"}));
    assert_eq!(count(&app, "SELECT count(*) FROM task_runs").await, 1);
}

#[tokio::test]
async fn create_on_an_expired_external_id_is_409_saying_so_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("lapsed"))).await;
    let id = s["id"].as_str().unwrap();
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE friendly_id = $1")
        .bind(id)
        .execute(app.db())
        .await
        .unwrap();
    let (_, before) = app.get(&format!("/api/v1/sessions/{id}"), &app.a.key).await;
    let mut again = session_body(Some("lapsed"));
    again["triggerConfig"]["basePayload"] = json!({"changed": true});
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, again).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("expired"), "{body}");
    let (_, after) = app.get(&format!("/api/v1/sessions/{id}"), &app.a.key).await;
    assert_eq!(after, before, "the expired session is untouched");
    assert_eq!(count(&app, "SELECT count(*) FROM task_runs").await, 1);
}

#[tokio::test]
async fn create_refuses_an_expiry_in_the_past() {
    let app = TestApp::spawn().await;
    for past in [json!("2001-01-01T00:00:00Z"), json!(chrono::Utc::now().timestamp_millis() - 1_000)] {
        let mut body = session_body(Some("born-expired"));
        body["expiresAt"] = past;
        let (status, body) = app.post("/api/v1/sessions", &app.a.key, body).await;
        assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("expiresAt")), "{body}");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM sessions").await, 0);
    let mut future = session_body(Some("later"));
    future["expiresAt"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    app.create_session(future).await;
}

#[tokio::test]
async fn create_and_update_bodies_are_limited_to_32_kb_and_other_routes_keep_the_server_limit() {
    let app = TestApp::spawn().await;
    // Exactly how big a body is, in bytes.
    let sized = |ext: &str, total: usize| {
        let mut body = session_body(Some(ext));
        body["metadata"] = json!({"blob": ""});
        let pad = total - serde_json::to_vec(&body).unwrap().len();
        body["metadata"]["blob"] = json!("x".repeat(pad));
        assert_eq!(serde_json::to_vec(&body).unwrap().len(), total);
        body
    };
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, sized("at-limit", 32 * 1024)).await;
    assert_eq!(status, StatusCode::CREATED, "{}", body["error"]);
    let (status, body) = app.post("/api/v1/sessions", &app.a.key, sized("over-limit", 32 * 1024 + 1)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["error"].is_string());
    assert_eq!(count(&app, "SELECT count(*) FROM sessions").await, 1);
    // An update has create's limit too (issue 24: metadata grown by PATCH
    // filled list pages); other routes keep MAX_BODY_BYTES.
    let (status, body) =
        app.patch("/api/v1/sessions/at-limit", &app.a.key, json!({"metadata": {"blob": "y".repeat(100 * 1024)}})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].is_string());
    let (status, body) = app.append("at-limit", "in", &app.a.key, &"z".repeat(100 * 1024), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn every_external_id_create_accepts_is_addressable_in_paths() {
    let app = TestApp::spawn().await;
    let encode = |id: &str| form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>().replace('+', "%20");
    // 256 characters (512 bytes): the limit counts characters in both places.
    let wide = "é".repeat(256);
    for ext in [wide.as_str(), "ext/with:odd chars", "..."] {
        let s = app.create_session(session_body(Some(ext))).await;
        let (status, body) = app.get(&format!("/api/v1/sessions/{}", encode(ext)), &app.a.key).await;
        assert_eq!((status, body["id"].clone()), (StatusCode::OK, s["id"].clone()), "{ext:?}: {body}");
        let (status, _) = app.post(&format!("/api/v1/sessions/{}/close", encode(ext)), &app.a.key, json!({})).await;
        assert_eq!(status, StatusCode::OK, "{ext:?}");
    }
    // What a path cannot carry, create and update refuse.
    let target = app.create_session(session_body(Some("target"))).await;
    let target = target["id"].as_str().unwrap();
    for bad in ["é".repeat(257), "a\u{7}b".into(), "tab\there".into(), ".".into(), "..".into()] {
        let (status, body) = app.post("/api/v1/sessions", &app.a.key, session_body(Some(&bad))).await;
        assert_eq!(
            (status, body["field"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("externalId")),
            "{bad:?}: {body}"
        );
        let (status, body) =
            app.patch(&format!("/api/v1/sessions/{target}"), &app.a.key, json!({"externalId": bad})).await;
        assert_eq!(
            (status, body["field"].clone()),
            (StatusCode::UNPROCESSABLE_ENTITY, json!("externalId")),
            "{bad:?}: {body}"
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM sessions").await, 4);
}

#[tokio::test]
async fn retrieve_by_friendly_id_or_external_id() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("ext/with:odd chars"))).await;
    let id = s["id"].as_str().unwrap();
    let (status, by_id) = app.get(&format!("/api/v1/sessions/{id}"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_id["currentRunId"], s["runId"]);
    let encoded: String = form_urlencoded::byte_serialize(b"ext/with:odd chars").collect();
    let (status, by_ext) = app.get(&format!("/api/v1/sessions/{}", encoded.replace('+', "%20")), &app.a.key).await;
    assert_eq!(status, StatusCode::OK, "{by_ext}");
    assert_eq!(by_ext["id"], s["id"]);
    let (status, body) = app.get("/api/v1/sessions/session_doesnotexist", &app.a.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "Session not found");
    let (status, _) = app.get("/api/v1/sessions/no-such-external", &app.a.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn update_tags_metadata_and_external_id() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("u-1"))).await;
    let other = app.create_session(session_body(Some("u-2"))).await;
    let id = s["id"].as_str().unwrap();
    let path = format!("/api/v1/sessions/{id}");

    let (status, body) = app.patch(&path, &app.a.key, json!({"tags": ["a", "b"], "metadata": {"k": 2}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], json!(["a", "b"]));
    assert_eq!(body["metadata"], json!({"k": 2}));
    assert_eq!(body["externalId"], "u-1");
    assert_eq!(body["currentRunId"], s["runId"]);

    let (status, body) = app.patch("/api/v1/sessions/u-1", &app.a.key, json!({"externalId": "u-renamed"})).await;
    assert_eq!((status, body["externalId"].clone()), (StatusCode::OK, json!("u-renamed")));
    assert_eq!(app.get("/api/v1/sessions/u-1", &app.a.key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/api/v1/sessions/u-renamed", &app.a.key).await.1["id"], s["id"]);

    let (status, body) = app.patch(&path, &app.a.key, json!({"externalId": "u-2"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(app.get(&path, &app.a.key).await.1["externalId"], "u-renamed");
    assert_eq!(app.get("/api/v1/sessions/u-2", &app.a.key).await.1["id"], other["id"]);

    let (status, body) = app.patch(&path, &app.a.key, json!({"externalId": "session_nope"})).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("externalId")));
    let (status, _) = app.patch(&path, &app.a.key, json!({"tags": vec!["t"; 11]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, body) = app.patch(&path, &app.a.key, json!({"externalId": null, "metadata": null})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["externalId"].is_null() && body["metadata"].is_null());
    assert_eq!(body["tags"], json!(["a", "b"]));

    let (status, _) = app.patch("/api/v1/sessions/session_missing", &app.a.key, json!({"tags": []})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn close_is_idempotent_and_write_once() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("c-1"))).await;
    let path = "/api/v1/sessions/c-1/close";
    let (status, first) = app.post(path, &app.a.key, json!({"reason": "done"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["closedReason"], "done");
    assert!(first["closedAt"].is_string());
    assert_eq!(first["id"], s["id"]);
    let (status, second) = app.post(path, &app.a.key, json!({"reason": "other"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["closedReason"], "done");
    assert_eq!(second["closedAt"], first["closedAt"]);
    // Audited like an operator's close, as the secret key of the environment;
    // the repeated close changed nothing and wrote nothing.
    let audited: Vec<(String, String, String, Option<String>, Value)> =
        sqlx::query_as("SELECT action, target, actor_kind, actor, detail FROM audit_log ORDER BY created_at")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(audited.len(), 1, "{audited:?}");
    let (action, target, kind, actor, detail) = &audited[0];
    assert_eq!((action.as_str(), kind.as_str()), ("session.close", "secret-key"));
    assert_eq!(target, &format!("session:{}", s["id"].as_str().unwrap()));
    assert_eq!(actor.as_deref(), Some(app.a.env.id.to_string().as_str()));
    assert_eq!(detail["reason"], "done");
    // An empty body closes too (no reason).
    let t = app.create_session(session_body(None)).await;
    let r = app
        .client
        .post(format!("{}/api/v1/sessions/{}/close", app.base, t["id"].as_str().unwrap()))
        .bearer_auth(&app.a.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<Value>().await.unwrap()["closedReason"].is_null());
    let (status, _) = app.post(path, &app.a.key, json!({"reason": "r".repeat(257)})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // The database refuses to rewrite a closed row, whatever issues the UPDATE.
    let rewrite =
        sqlx::query("UPDATE sessions SET closed_reason = 'hacked' WHERE external_id = 'c-1'").execute(app.db()).await;
    assert!(rewrite.is_err());
}

#[tokio::test]
async fn concurrent_closes_write_one_closed_at() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(None)).await;
    let id = s["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = app.client.clone();
        let url = format!("{}/api/v1/sessions/{id}/close", app.base);
        let key = app.a.key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).bearer_auth(key).json(&json!({"reason": format!("r{i}")})).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.unwrap()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        let b = t.await.unwrap();
        seen.insert((b["closedAt"].to_string(), b["closedReason"].to_string()));
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}

/// A close is acknowledged only once its channels are sealed: while sealing
/// fails the close answers 5xx, and a retry seals before answering. After that
/// no append lands on any server, not even one whose lookup cache still holds
/// the open session.
#[tokio::test]
async fn a_close_is_acknowledged_only_once_its_channels_are_sealed() {
    let (proxied, redis_fails) = common::failing_redis_proxy().await;
    // Server A reaches Redis through the proxy; server B, directly.
    let a = TestApp::spawn_with(|c| c.redis_url = proxied).await;
    let b = a.peer(|c| c.redis_url = format!("redis://{}", common::redis_addr())).await;
    let s = a.create_session(session_body(Some("sealed"))).await;
    let s = s["id"].as_str().unwrap().to_string();
    let close = format!("/api/v1/sessions/{s}/close");
    let record = |data: &str| json!({"data": data, "id": data}).to_string();
    // B looks the session up (and caches it, open).
    assert_eq!(b.append(&s, "out", &b.a.key, &record("before"), &[]).await.0, StatusCode::OK);

    redis_fails.send(true).unwrap();
    let (closed, body) = a.post(&close, &a.a.key, json!({"reason": "bye"})).await;
    let (during, _) = b.append(&s, "out", &b.a.key, &record("during"), &[]).await;
    assert!(
        !(closed == StatusCode::OK && during == StatusCode::OK),
        "an append landed after the close was acknowledged"
    );
    // The switch drops A's connection and the stand-in then answers `ERR`:
    // the seal meets either (503, Redis away) or (500, an error reply), and
    // neither acknowledges the close nor tells the client more than that.
    assert!(closed.is_server_error(), "a close whose seal failed is not acknowledged: {closed} {body}");
    let expected = if closed == StatusCode::SERVICE_UNAVAILABLE {
        "Service temporarily unavailable, retry shortly"
    } else {
        "Something went wrong"
    };
    assert_eq!(body, json!({ "error": expected }));

    redis_fails.send(false).unwrap();
    let redis = a.state.redis.clone();
    common::eventually(10, "server A to reach Redis again", || {
        let mut redis = redis.clone();
        async move { redis::cmd("PING").query_async::<String>(&mut redis).await.ok() }
    })
    .await;
    // The retry finds the row closed and the channels not sealed: it seals, then answers.
    let (status, body) = a.post(&close, &a.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["closedReason"], "bye");
    let sealed: bool = sqlx::query_scalar("SELECT channels_closed_at IS NOT NULL FROM sessions WHERE friendly_id = $1")
        .bind(&s)
        .fetch_one(a.db())
        .await
        .unwrap();
    assert!(sealed);
    for server in [&a, &b] {
        for io in ["in", "out"] {
            let (status, body) = server.append(&s, io, &server.a.key, &record("after"), &[]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{io}: {body}");
        }
    }
    let (_, out) = b.get(&format!("/realtime/v1/sessions/{s}/out/records"), &b.a.key).await;
    let data: Vec<&str> = out["records"].as_array().unwrap().iter().filter_map(|r| r["data"].as_str()).collect();
    assert!(data == ["before"] || data == ["before", "during"], "{data:?}");
    // The close's record on `.in` was written once, by the retry.
    let (_, records) = b.get(&format!("/realtime/v1/sessions/{s}/in/records"), &b.a.key).await;
    let closes = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["headers"].to_string().contains("session-closed"))
        .count();
    assert_eq!(closes, 1, "{records}");
}

async fn list(app: &TestApp, query: &str) -> (StatusCode, Value) {
    app.get(&format!("/api/v1/sessions?{query}"), &app.a.key).await
}

fn ids(body: &Value) -> Vec<String> {
    body["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn list_filters_and_status() {
    let app = TestApp::spawn().await;
    let mut a = session_body(Some("l-a"));
    a["type"] = json!("alpha");
    a["tags"] = json!(["red", "blue"]);
    let a = app.create_session(a).await;
    let mut b = session_body(Some("l-b"));
    b["type"] = json!("beta");
    b["taskIdentifier"] = json!("other-task");
    b["tags"] = json!(["green"]);
    let b = app.create_session(b).await;
    let mut c = session_body(None);
    c["type"] = json!("alpha");
    let c = app.create_session(c).await;
    // Expire it (create refuses an expiry in the past).
    sqlx::query("UPDATE sessions SET expires_at = '2001-01-01T00:00:00Z' WHERE friendly_id = $1")
        .bind(c["id"].as_str().unwrap())
        .execute(app.db())
        .await
        .unwrap();
    app.post("/api/v1/sessions/l-b/close", &app.a.key, json!({})).await;

    let (status, body) = list(&app, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&body), vec![c["id"].as_str().unwrap(), b["id"].as_str().unwrap(), a["id"].as_str().unwrap()]);
    assert!(body["pagination"].get("next").is_none() && body["pagination"].get("previous").is_none());

    assert_eq!(ids(&list(&app, "filter[type]=alpha").await.1).len(), 2);
    assert_eq!(ids(&list(&app, "filter[type]=alpha,beta").await.1).len(), 3);
    assert_eq!(ids(&list(&app, "filter[tags]=green,red").await.1).len(), 2);
    assert_eq!(ids(&list(&app, "filter[taskIdentifier]=other-task").await.1), vec![b["id"].as_str().unwrap()]);
    assert_eq!(ids(&list(&app, "filter[externalId]=l-a").await.1), vec![a["id"].as_str().unwrap()]);
    assert_eq!(ids(&list(&app, "filter[status]=CLOSED").await.1), vec![b["id"].as_str().unwrap()]);
    assert_eq!(ids(&list(&app, "filter[status]=EXPIRED").await.1), vec![c["id"].as_str().unwrap()]);
    assert_eq!(ids(&list(&app, "filter[status]=ACTIVE").await.1), vec![a["id"].as_str().unwrap()]);
    assert_eq!(ids(&list(&app, "filter[status]=ACTIVE,EXPIRED").await.1).len(), 2);
    assert_eq!(ids(&list(&app, "filter[createdAt][period]=1h").await.1).len(), 3);
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(ids(&list(&app, &format!("filter[createdAt][from]={}", now + 60_000)).await.1).len(), 0);
    assert_eq!(ids(&list(&app, &format!("filter[createdAt][to]={}", now + 60_000)).await.1).len(), 3);
    // Filter values are bound parameters, never SQL.
    let (status, body) = list(&app, "filter[type]=alpha'%20OR%20'1'='1").await;
    assert_eq!((status, ids(&body).len()), (StatusCode::OK, 0));

    // Environment B sees none of A's sessions.
    let (_, body) = app.get("/api/v1/sessions", &app.b.key).await;
    assert_eq!(ids(&body).len(), 0);
}

#[tokio::test]
async fn list_paginates_in_both_directions() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..7 {
        let mut body = session_body(None);
        body["type"] = json!("paged");
        body["metadata"] = json!({"i": i});
        created.push(app.create_session(body).await["id"].as_str().unwrap().to_string());
    }
    created.reverse(); // newest first

    let (_, p1) = list(&app, "filter[type]=paged&page[size]=3").await;
    assert_eq!(ids(&p1), created[0..3]);
    assert!(p1["pagination"].get("previous").is_none());
    let next = p1["pagination"]["next"].as_str().unwrap();
    let (_, p2) = list(&app, &format!("filter[type]=paged&page[size]=3&page[after]={next}")).await;
    assert_eq!(ids(&p2), created[3..6]);
    let next = p2["pagination"]["next"].as_str().unwrap();
    let (_, p3) = list(&app, &format!("filter[type]=paged&page[size]=3&page[after]={next}")).await;
    assert_eq!(ids(&p3), created[6..7]);
    assert!(p3["pagination"].get("next").is_none());

    // Back from the last page: the items just before it, nearest included.
    let prev = p3["pagination"]["previous"].as_str().unwrap();
    let (_, back) = list(&app, &format!("filter[type]=paged&page[size]=3&page[before]={prev}")).await;
    assert_eq!(ids(&back), created[3..6]);
    let prev = back["pagination"]["previous"].as_str().unwrap();
    let (_, first) = list(&app, &format!("filter[type]=paged&page[size]=3&page[before]={prev}")).await;
    assert_eq!(ids(&first), created[0..3]);
    assert!(first["pagination"].get("previous").is_none());
    assert!(first["pagination"]["next"].is_string());

    let (status, body) = list(&app, &format!("page[after]={next}&page[before]={next}")).await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("page[before]")));
    let (status, _) = list(&app, "page[after]=not-a-cursor").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = list(&app, "page[size]=500").await;
    assert_eq!((status, body["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("page[size]")));
    let (status, _) = list(&app, "filter[status]=OPEN").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn http_edges_answer_json() {
    let app = TestApp::spawn().await;
    let r = app.client.get(format!("{}/no/such/route", app.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().get("x-request-id").is_some());
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "Not found");

    let (status, body) = app.call(Method::DELETE, "/api/v1/sessions", Some(&app.a.key), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());

    let long = "a".repeat(10_000);
    let (status, body) = app.get(&format!("/api/v1/sessions/{long}"), &app.a.key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = app.get("/api/v1/sessions/ab%00cd", &app.a.key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app.get("/api/v1/sessions/..%2F..%2Fetc", &app.a.key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/api/v1/sessions/%FF%FE", &app.a.key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Every response carries a request id, and a caller's own is echoed.
    let r = app.client.get(format!("{}/healthz", app.base)).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
}

#[tokio::test]
async fn internal_errors_are_generic_500s() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(Some("x"))).await;
    // Break the table under the server: the next query fails inside Postgres.
    sqlx::query("ALTER TABLE sessions RENAME COLUMN tags TO tags_gone").execute(app.db()).await.unwrap();
    let (status, body) = app.get("/api/v1/sessions/x", &app.a.key).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, json!({"error": "Something went wrong"}));
}
