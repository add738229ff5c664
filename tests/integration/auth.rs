//! Authentication and authorization: secret keys, public tokens, scopes,
//! environment isolation and CORS.

use crate::common::{session_body, TestApp};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sessiond::auth::jwt::{self, AUDIENCE, ISSUER};

fn claims(env: uuid::Uuid, scopes: &[&str], exp_offset: i64) -> Value {
    json!({
        "sub": env.to_string(), "pub": true, "scopes": scopes,
        "iss": ISSUER, "aud": AUDIENCE,
        "exp": chrono::Utc::now().timestamp() + exp_offset,
    })
}

fn sign(claims: &Value, key: &str, alg: Algorithm) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
}

fn token(app: &TestApp, scopes: &[&str]) -> String {
    sign(&claims(app.a.env.id, scopes, 600), &app.a.key, Algorithm::HS256)
}

#[tokio::test]
async fn missing_or_unknown_credentials_are_401() {
    let app = TestApp::spawn().await;
    let (status, body) = app.call(Method::GET, "/api/v1/sessions", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string());
    for bad in ["tr_dev_notakey", "garbage", "a.b.c"] {
        assert_eq!(app.get("/api/v1/sessions", bad).await.0, StatusCode::UNAUTHORIZED, "{bad}");
    }
}

#[tokio::test]
async fn jwt_claims_endpoint_serves_the_sdk() {
    let app = TestApp::spawn().await;
    for method in [Method::GET, Method::POST] {
        let (status, body) = app.call(method, "/api/v1/auth/jwt/claims", Some(&app.a.key), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"sub": app.a.env.id.to_string(), "pub": true}));
    }
    // A token signed with those claims, as the SDK's auth.createPublicToken does, works.
    let t = token(&app, &["read:sessions"]);
    assert_eq!(app.get("/api/v1/sessions", &t).await.0, StatusCode::OK);
    // Public tokens cannot mint claims.
    assert_eq!(app.get("/api/v1/auth/jwt/claims", &t).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn session_token_works_for_both_forms_and_nothing_else() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("chat-9"))).await;
    let other = app.create_session(session_body(Some("chat-10"))).await;
    let pat = s["publicAccessToken"].as_str().unwrap();
    let id = s["id"].as_str().unwrap();

    assert_eq!(app.get(&format!("/api/v1/sessions/{id}"), pat).await.0, StatusCode::OK);
    assert_eq!(app.get("/api/v1/sessions/chat-9", pat).await.0, StatusCode::OK);
    // Someone else's session, existing or not: 403 either way (no existence leak).
    let other_id = other["id"].as_str().unwrap();
    let (status, body) = app.get(&format!("/api/v1/sessions/{other_id}"), pat).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status2, body2) = app.get("/api/v1/sessions/session_doesnotexist", pat).await;
    assert_eq!((status2, body2), (status, body));
    assert_eq!(app.get("/api/v1/sessions/chat-10", pat).await.0, StatusCode::FORBIDDEN);
    // A secret key learns a missing session is missing.
    assert_eq!(app.get("/api/v1/sessions/session_doesnotexist", &app.a.key).await.0, StatusCode::NOT_FOUND);

    // The session token may write its own session, and cannot create or list.
    let (status, _) = app.patch("/api/v1/sessions/chat-9", pat, json!({"tags": ["from-browser"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.post("/api/v1/sessions", pat, session_body(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/v1/sessions", pat).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.post(&format!("/api/v1/sessions/{id}/close"), pat, json!({})).await.0, StatusCode::OK);
}

#[tokio::test]
async fn cross_form_scopes_and_read_only_tokens() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("xf"))).await;
    let id = s["id"].as_str().unwrap();
    // Scoped to the friendly id, used on the external-id URL, and the other way round.
    let by_friendly = token(&app, &[&format!("read:sessions:{id}")]);
    assert_eq!(app.get("/api/v1/sessions/xf", &by_friendly).await.0, StatusCode::OK);
    let by_ext = token(&app, &["read:sessions:xf"]);
    assert_eq!(app.get(&format!("/api/v1/sessions/{id}"), &by_ext).await.0, StatusCode::OK);
    // Read scope does not write.
    assert_eq!(app.patch("/api/v1/sessions/xf", &by_ext, json!({"tags": []})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.post("/api/v1/sessions/xf/close", &by_ext, json!({})).await.0, StatusCode::FORBIDDEN);
    let (_, still) = app.get("/api/v1/sessions/xf", &app.a.key).await;
    assert!(still["closedAt"].is_null());
    // Admin on the session writes; super scopes reach every session.
    let admin = token(&app, &["admin:sessions:xf"]);
    assert_eq!(app.patch(&format!("/api/v1/sessions/{id}"), &admin, json!({"tags": ["x"]})).await.0, StatusCode::OK);
    for sup in ["read:sessions", "read:all", "admin"] {
        assert_eq!(app.get("/api/v1/sessions/xf", &token(&app, &[sup])).await.0, StatusCode::OK, "{sup}");
    }
    assert_eq!(app.patch("/api/v1/sessions/xf", &token(&app, &["write:all"]), json!({})).await.0, StatusCode::OK);
    assert_eq!(app.get("/api/v1/sessions/xf", &token(&app, &["read:runs"])).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn listing_with_task_scopes() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(None)).await;
    let mut other = session_body(None);
    other["taskIdentifier"] = json!("secret-task");
    app.create_session(other).await;

    let task = token(&app, &["read:tasks:echo-agent"]);
    let (status, body) = app.get("/api/v1/sessions?filter[taskIdentifier]=echo-agent", &task).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(app.get("/api/v1/sessions", &task).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        app.get("/api/v1/sessions?filter[taskIdentifier]=echo-agent,secret-task", &task).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, body) = app.get("/api/v1/sessions", &token(&app, &["read:sessions"])).await;
    assert_eq!((status, body["data"].as_array().unwrap().len()), (StatusCode::OK, 2));
}

#[tokio::test]
async fn environments_are_isolated() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("mine"))).await;
    let id = s["id"].as_str().unwrap();
    // B's secret key: A's session does not exist for it.
    assert_eq!(app.get(&format!("/api/v1/sessions/{id}"), &app.b.key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/api/v1/sessions/mine", &app.b.key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.patch("/api/v1/sessions/mine", &app.b.key, json!({"tags": ["x"]})).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.post("/api/v1/sessions/mine/close", &app.b.key, json!({})).await.0, StatusCode::NOT_FOUND);
    // B's token with every scope: still nothing of A's.
    let b_admin = sign(&claims(app.b.env.id, &["admin", "read:sessions:mine"], 600), &app.b.key, Algorithm::HS256);
    assert_eq!(app.get("/api/v1/sessions/mine", &b_admin).await.0, StatusCode::NOT_FOUND);
    let (_, listed) = app.get("/api/v1/sessions", &b_admin).await;
    assert_eq!(listed["data"], json!([]));
    // A token claiming A's environment but signed with B's key is rejected.
    let forged = sign(&claims(app.a.env.id, &["admin"], 600), &app.b.key, Algorithm::HS256);
    assert_eq!(app.get("/api/v1/sessions/mine", &forged).await.0, StatusCode::UNAUTHORIZED);
    // The same external id in B is a different session.
    let (status, theirs) = app.post("/api/v1/sessions", &app.b.key, session_body(Some("mine"))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(theirs["id"], s["id"]);
    let (_, mine) = app.get("/api/v1/sessions/mine", &app.a.key).await;
    assert!(mine["closedAt"].is_null());
    assert_eq!(mine["tags"], json!(["test"]));
}

#[tokio::test]
async fn bad_tokens_are_rejected() {
    let app = TestApp::spawn().await;
    app.create_session(session_body(Some("t"))).await;
    let path = "/api/v1/sessions/t";
    let env = app.a.env.id;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());

    // Sanity: a good token passes.
    assert_eq!(app.get(path, &token(&app, &["read:sessions"])).await.0, StatusCode::OK);

    let expired = sign(&claims(env, &["read:sessions"], -3600), &app.a.key, Algorithm::HS256);
    let beyond_leeway = sign(&claims(env, &["read:sessions"], -90), &app.a.key, Algorithm::HS256);
    let hs512 = sign(&claims(env, &["read:sessions"], 600), &app.a.key, Algorithm::HS512);
    let mut no_exp = claims(env, &["read:sessions"], 600);
    no_exp.as_object_mut().unwrap().remove("exp");
    let no_exp = sign(&no_exp, &app.a.key, Algorithm::HS256);
    let mut wrong_iss = claims(env, &["read:sessions"], 600);
    wrong_iss["iss"] = json!("https://evil.example");
    let wrong_iss = sign(&wrong_iss, &app.a.key, Algorithm::HS256);
    let mut wrong_aud = claims(env, &["read:sessions"], 600);
    wrong_aud["aud"] = json!("someone-else");
    let wrong_aud = sign(&wrong_aud, &app.a.key, Algorithm::HS256);
    let mut not_pub = claims(env, &["read:sessions"], 600);
    not_pub["pub"] = json!(false);
    let not_pub = sign(&not_pub, &app.a.key, Algorithm::HS256);
    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims(env, &["admin"], 600)));
    // Tampered: a valid read-only token whose payload is swapped for admin.
    let good = token(&app, &["read:sessions:other"]);
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims(env, &["admin"], 600)), parts[2]);

    for (name, t) in [
        ("expired", expired),
        ("beyond leeway", beyond_leeway),
        ("HS512", hs512),
        ("no exp", no_exp),
        ("wrong issuer", wrong_iss),
        ("wrong audience", wrong_aud),
        ("not pub", not_pub),
        ("alg none", alg_none),
        ("tampered", tampered),
    ] {
        let (status, body) = app.get(path, &t).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
    }
    // Within the leeway, a just-expired token still passes.
    let recent = sign(&claims(env, &["read:sessions"], -5), &app.a.key, Algorithm::HS256);
    assert_eq!(app.get(path, &recent).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_token_for_an_unknown_environment_reads_like_any_bad_token() {
    let app = TestApp::spawn().await;
    let path = "/api/v1/sessions";
    let unknown_env = sign(&claims(uuid::Uuid::new_v4(), &["read:sessions"], 600), "tr_dev_guess", Algorithm::HS256);
    let wrong_key = sign(&claims(app.a.env.id, &["read:sessions"], 600), "tr_dev_guess", Algorithm::HS256);
    let expired_forged = sign(&claims(app.a.env.id, &["read:sessions"], -3600), "tr_dev_guess", Algorithm::HS256);
    let (status, reference) = app.get(path, &unknown_env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (name, t) in [("wrong key", wrong_key), ("expired, forged", expired_forged), ("malformed", "a.b.c".to_string())]
    {
        assert_eq!(app.get(path, &t).await, (StatusCode::UNAUTHORIZED, reference.clone()), "{name}");
    }
    // Only a genuine token (signed with the environment's key, which a prober
    // does not have) is told its time is up, so clock skew shows by name.
    let expired = sign(&claims(app.a.env.id, &["read:sessions"], -3600), &app.a.key, Algorithm::HS256);
    let (status, body) = app.get(path, &expired).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("expired") && e.contains("clock")), "{body}");
}

#[tokio::test]
async fn renaming_a_session_takes_a_secret_key_or_an_admin_scope() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("owned"))).await;
    let id = s["id"].as_str().unwrap();
    let path = format!("/api/v1/sessions/{id}");
    let not_owners = [
        s["publicAccessToken"].as_str().unwrap().to_string(),
        token(&app, &["write:sessions:owned"]),
        token(&app, &[&format!("write:sessions:{id}")]),
        token(&app, &["write:sessions", "read:sessions"]),
        token(&app, &["write:all"]),
        token(&app, &["admin:all"]),
        token(&app, &["admin:sessions:someone-else"]),
    ];
    for t in &not_owners {
        for patch in [json!({"externalId": "squatted", "tags": ["x"]}), json!({"externalId": null})] {
            let (status, body) = app.patch(&path, t, patch).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        }
    }
    let (_, now) = app.get(&path, &app.a.key).await;
    assert_eq!((now["externalId"].clone(), now["tags"].clone()), (json!("owned"), json!(["test"])));
    // Tags and metadata stay writable with write scope.
    let (status, body) = app.patch(&path, &not_owners[0], json!({"tags": ["mine"], "metadata": {"k": 1}})).await;
    assert_eq!((status, body["tags"].clone()), (StatusCode::OK, json!(["mine"])));
    // Admin scopes in either id form, the session super scope, `admin`, or the key rename.
    for (scope, next) in [
        ("admin:sessions:owned".to_string(), "owned-2"),
        (format!("admin:sessions:{id}"), "owned-3"),
        ("admin:sessions".to_string(), "owned-4"),
        ("admin".to_string(), "owned-5"),
    ] {
        let (status, body) = app.patch(&path, &token(&app, &[&scope]), json!({"externalId": next})).await;
        assert_eq!((status, body["externalId"].clone()), (StatusCode::OK, json!(next)), "{scope}");
    }
    let (status, body) = app.patch(&path, &app.a.key, json!({"externalId": null})).await;
    assert_eq!((status, body["externalId"].clone()), (StatusCode::OK, Value::Null));
}

#[tokio::test]
async fn a_minted_token_never_opens_a_session_that_later_takes_its_external_id() {
    let app = TestApp::spawn().await;
    let first = app.create_session(session_body(Some("chat-x"))).await;
    let pat = first["publicAccessToken"].as_str().unwrap();
    let (status, _) = app.patch("/api/v1/sessions/chat-x", &app.a.key, json!({"externalId": "chat-x-old"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, second) = app.post("/api/v1/sessions", &app.a.key, session_body(Some("chat-x"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let second_id = second["id"].as_str().unwrap();
    for path in ["/api/v1/sessions/chat-x".to_string(), format!("/api/v1/sessions/{second_id}")] {
        assert_eq!(app.get(&path, pat).await.0, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(app.patch(&path, pat, json!({"tags": ["hijack"]})).await.0, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(app.append("chat-x", "in", pat, "hijack", &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.get("/realtime/v1/sessions/chat-x/out/records", pat).await.0, StatusCode::FORBIDDEN);
    // It still opens its own session, under any name, and the new one's token opens the new one.
    assert_eq!(app.get("/api/v1/sessions/chat-x-old", pat).await.1["id"], first["id"]);
    assert_eq!(
        app.get("/api/v1/sessions/chat-x", second["publicAccessToken"].as_str().unwrap()).await.1["id"],
        second["id"]
    );
}

#[tokio::test]
async fn server_minted_token_verifies_with_the_environment_key() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("pat"))).await;
    let c = jwt::verify(s["publicAccessToken"].as_str().unwrap(), &app.a.env.secret_key, 0).unwrap();
    assert_eq!(c.sub, app.a.env.id.to_string());
    // Scoped to the friendly id, which never passes to another session.
    let id = s["id"].as_str().unwrap();
    assert_eq!(c.scopes, vec![format!("read:sessions:{id}"), format!("write:sessions:{id}")]);
    let lifetime = c.exp - c.iat.unwrap();
    assert_eq!(lifetime, 3600);
}

#[tokio::test]
async fn rotated_keys_stop_working() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl_ms = 0).await;
    let old = app.a.key.clone();
    let old_token = token(&app, &["read:sessions"]);
    assert_eq!(app.get("/api/v1/sessions", &old).await.0, StatusCode::OK);
    let new = sessiond::tenancy::rotation::rotate(
        app.db(),
        &sessiond::app::master_key(&app.state.config).unwrap(),
        &sessiond::audit::Actor::Cli,
        app.a.env.id,
        None,
    )
    .await
    .unwrap();
    assert_eq!(app.get("/api/v1/sessions", &old).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/v1/sessions", &old_token).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/v1/sessions", new.expose()).await.0, StatusCode::OK);
}

#[tokio::test]
async fn cors_preflight_on_every_api_route_and_none_on_the_dashboard() {
    let app = TestApp::spawn().await;
    for path in ["/api/v1/sessions", "/api/v1/sessions/x", "/api/v1/sessions/x/close", "/api/v1/auth/jwt/claims"] {
        let r = app.preflight(path, "authorization,content-type,x-trigger-api-version,trigger-version").await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        let h = r.headers();
        assert_eq!(h["access-control-allow-origin"], "*");
        let allowed = h["access-control-allow-headers"].to_str().unwrap().to_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("x-trigger-api-version"), "{allowed}");
        assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    }
    // Actual responses carry the CORS header too.
    let r = app
        .client
        .get(format!("{}/api/v1/sessions", app.base))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");

    // The dashboard's credential is a cookie: it invites no other origin.
    for path in ["/dashboard/login", "/dashboard/sessions"] {
        let r = app.preflight(path, "content-type,x-csrf-token").await;
        assert!(r.headers().get("access-control-allow-origin").is_none(), "{path}: {:?}", r.headers());
        assert!(r.headers().get("access-control-allow-methods").is_none(), "{path}");
    }
    let r = app
        .client
        .get(format!("{}/dashboard/login", app.base))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// `POST /api/v1/auth/public-tokens` (the official client's `createPublicToken`):
/// a secret key mints what it asks for; a run's token only read/write on its own
/// session for an hour at most; a browser's token nothing.
#[tokio::test]
async fn public_tokens_are_minted_within_the_caller_s_rights() {
    let app = TestApp::spawn().await;
    let (session, run) = crate::common::running_session(&app, "mint").await;
    let (other, _) = crate::common::running_session(&app, "mint-other").await;
    let mint = |token: String, body: Value| {
        let app = &app;
        async move { app.post("/api/v1/auth/public-tokens", &token, body).await }
    };
    let claims = |token: &str| jwt::verify(token, &app.a.env.secret_key, 0).unwrap();

    // A run mints a token for its own session, and the token works on it.
    let scopes = json!([format!("read:sessions:{session}"), format!("write:sessions:{session}")]);
    let (status, body) = mint(run.token.clone(), json!({"scopes": scopes, "expirationTime": "1h"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let minted = body["token"].as_str().unwrap().to_string();
    let c = claims(&minted);
    assert_eq!(c.scopes, vec![format!("read:sessions:{session}"), format!("write:sessions:{session}")]);
    assert!((3590..=3610).contains(&(c.exp - chrono::Utc::now().timestamp())), "an hour: {}", c.exp);
    assert_eq!(app.get(&format!("/api/v1/sessions/{session}"), &minted).await.0, StatusCode::OK);
    assert_eq!(app.get(&format!("/api/v1/sessions/{other}"), &minted).await.0, StatusCode::FORBIDDEN);
    // No expiration named: 15 minutes. A Unix time is taken as one.
    let (_, body) = mint(run.token.clone(), json!({"scopes": [format!("read:sessions:{session}")]})).await;
    let c = claims(body["token"].as_str().unwrap());
    assert!((890..=910).contains(&(c.exp - chrono::Utc::now().timestamp())), "15 min: {}", c.exp);
    let at = chrono::Utc::now().timestamp() + 600;
    let (_, body) =
        mint(run.token.clone(), json!({"scopes": [format!("read:sessions:{session}")], "expirationTime": at})).await;
    assert_eq!(claims(body["token"].as_str().unwrap()).exp, at);

    // Beyond the run's rights: refused, with the reason.
    for scope in
        [format!("read:sessions:{other}"), "read:sessions".into(), "admin".into(), format!("write:runs:{}", run.id)]
    {
        let (status, body) = mint(run.token.clone(), json!({"scopes": [scope]})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{scope}: {body}");
        assert!(body["error"].as_str().unwrap().contains("own session"), "{body}");
    }
    let (status, body) =
        mint(run.token.clone(), json!({"scopes": [format!("read:sessions:{session}")], "expirationTime": "2h"})).await;
    assert_eq!((status, body["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("expirationTime")), "{body}");

    // A browser's session token mints nothing; the secret key mints anything.
    let created = app.create_session(session_body(Some("mint-browser"))).await;
    let browser = created["publicAccessToken"].as_str().unwrap().to_string();
    let (status, _) =
        mint(browser, json!({"scopes": [format!("read:sessions:{}", created["id"].as_str().unwrap())]})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = mint(app.a.key.clone(), json!({"scopes": ["read:sessions"], "expirationTime": "2d"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(claims(body["token"].as_str().unwrap()).scopes, vec!["read:sessions".to_string()]);

    // Bad input: 422 naming the field; no credential: 401.
    for (body, field) in [
        (json!({"scopes": []}), "scopes"),
        (json!({"scopes": ["delete:everything"]}), "scopes"),
        (json!({"scopes": ["read:all"], "expirationTime": "soon"}), "expirationTime"),
        (json!({"scopes": ["read:all"], "expirationTime": 1}), "expirationTime"),
        (json!({"scopes": ["read:all"], "oneTimeUse": true}), "oneTimeUse"),
    ] {
        let (status, answer) = mint(app.a.key.clone(), body.clone()).await;
        assert_eq!((status, answer["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{body}");
    }
    let (status, _) = mint("".into(), json!({"scopes": ["read:all"]})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
