//! The agent playground: starting and reopening sessions from the dashboard
//! (admin only, CSRF-checked, audited, nothing changed on bad input), the
//! conversation page's session-scoped public token, the dev script's key, and
//! `tests/browser/playground.mjs`: a two-turn conversation with the echo
//! agent in headless Chromium at 1280 px and at 390 px.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::LOCATION;
use reqwest::StatusCode;
use serde_json::json;
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

use crate::browser;
use crate::common::{self, chat_message, eventually, session_body, TestApp};
use crate::dashboard::{audit_rows, with_operators, Operator, ADMIN, VIEWER};

/// Checks `playground.mjs` runs; update with the script.
const CHECKS: usize = 9;

async fn session_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sessions").fetch_one(app.db()).await.unwrap()
}

/// The playground's start form as posted: environment, task, what to reopen.
fn start_form<'a>(csrf: Option<&'a str>, env: &'a str, task: &'a str, reopen: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut form = vec![("env", env), ("task", task), ("reopen", reopen)];
    if let Some(c) = csrf {
        form.push(("csrf", c));
    }
    form
}

/// The session a redirect to its conversation names.
fn conversation_of(resp: &reqwest::Response) -> String {
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "a redirect");
    let to = resp.headers()[LOCATION].to_str().unwrap();
    to.strip_prefix("/dashboard/playground/").unwrap_or_else(|| panic!("to a conversation: {to}")).to_string()
}

/// The value of `data-{name}="…"` in a page.
fn data_attr(page: &str, name: &str) -> Option<String> {
    let marker = format!("data-{name}=\"");
    let at = page.find(&marker)? + marker.len();
    page[at..].split('"').next().map(str::to_string)
}

#[tokio::test]
async fn signed_out_the_playground_sends_to_the_login() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for resp in [
        http.get(format!("{}/dashboard/playground", app.base)).send().await.unwrap(),
        http.get(format!("{}/dashboard/playground/session_x", app.base)).send().await.unwrap(),
        http.post(format!("{}/dashboard/playground", app.base))
            .form(&[("env", app.a.env.id.to_string()), ("task", "echo-agent".into())])
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[LOCATION], "/dashboard/login");
    }
    assert_eq!(session_count(&app).await, 0);
}

#[tokio::test]
async fn an_admin_starts_a_session_whose_first_run_is_queued_and_audited() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let admin = Operator::login(&app, ADMIN).await;
    let env = app.a.env.id.to_string();
    let mut other_task = session_body(None);
    other_task["taskIdentifier"] = json!("support-bot");
    app.create_session(other_task).await;
    let before = session_count(&app).await;

    let (status, page) = admin.get("/dashboard/playground").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"playground-start\"") && page.contains(&env), "{page}");
    assert!(page.contains("value=\"echo-agent\""), "the example agent is the default task");
    // The task field suggests the tasks each environment has run.
    let datalist = |env: &str| {
        let at = page.find(&format!("<datalist id=\"tasks-{env}\">")).expect("a datalist per environment");
        page[at..].split("</datalist>").next().unwrap().to_string()
    };
    let (in_a, in_b) = (datalist(&env), datalist(&app.b.env.id.to_string()));
    assert!(in_a.contains("value=\"support-bot\"") && in_a.contains("value=\"echo-agent\""), "{in_a}");
    assert!(!in_b.contains("support-bot") && in_b.contains("value=\"echo-agent\""), "{in_b}");

    let resp = admin.post_form("/dashboard/playground", &start_form(Some(&admin.csrf), &env, "echo-agent", "")).await;
    let id = conversation_of(&resp);
    assert_eq!(session_count(&app).await, before + 1);
    let (task, env_id, tags, external, run_status): (String, uuid::Uuid, Vec<String>, Option<String>, String) =
        sqlx::query_as(
            "SELECT s.task_identifier, s.runtime_environment_id, s.tags, s.external_id, r.status
             FROM sessions s JOIN task_runs r ON r.id = s.current_run_id WHERE s.friendly_id = $1",
        )
        .bind(&id)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!((task.as_str(), env_id, tags), ("echo-agent", app.a.env.id, vec!["playground".to_string()]));
    assert!(external.as_deref().is_some_and(|e| e.starts_with("playground-")), "{external:?}");
    assert_eq!(run_status, "QUEUED");
    // The trigger job ran: the run is on its queue for a worker.
    eventually(10, "the first run pushed to its queue", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT r.enqueued_at IS NOT NULL FROM sessions s JOIN task_runs r ON r.id = s.current_run_id
             WHERE s.friendly_id = $1",
        )
        .bind(&id)
        .fetch_one(app.db())
        .await
        .unwrap()
        .then_some(())
    })
    .await;
    assert_eq!(audit_rows(&app).await, vec![("playground.start".to_string(), format!("session:{id}"))]);
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail["task"], "echo-agent");
    assert_eq!(detail["environment"], env);
}

#[tokio::test]
async fn refused_starts_change_nothing() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let admin = Operator::login(&app, ADMIN).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let env = app.a.env.id.to_string();
    let unknown = uuid::Uuid::new_v4().to_string();
    let long_task = "t".repeat(129);

    let (status, page) = viewer.get("/dashboard/playground").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Only admins can use the playground"), "the viewer is told why");
    assert!(page.contains("data-action=\"playground-start\" disabled"), "{page}");

    for (who, form, expected) in [
        ("no CSRF token", start_form(None, &env, "echo-agent", ""), StatusCode::FORBIDDEN),
        ("a wrong CSRF token", start_form(Some("forged"), &env, "echo-agent", ""), StatusCode::FORBIDDEN),
        ("an unknown environment", start_form(Some(&admin.csrf), &unknown, "echo-agent", ""), StatusCode::NOT_FOUND),
        ("no environment", start_form(Some(&admin.csrf), "", "echo-agent", ""), StatusCode::BAD_REQUEST),
        ("no task", start_form(Some(&admin.csrf), &env, "  ", ""), StatusCode::BAD_REQUEST),
        ("a task too long", start_form(Some(&admin.csrf), &env, &long_task, ""), StatusCode::BAD_REQUEST),
        ("a missing session", start_form(Some(&admin.csrf), &env, "echo-agent", "no-such-chat"), StatusCode::NOT_FOUND),
        ("a control character", start_form(Some(&admin.csrf), &env, "echo-agent", "a\u{7}b"), StatusCode::BAD_REQUEST),
    ] {
        let resp = admin.post_form("/dashboard/playground", &form).await;
        assert_eq!(resp.status(), expected, "{who}");
        let body = resp.text().await.unwrap();
        assert!(body.contains("<html") && body.contains("role=\"alert\""), "{who}: an error page: {body}");
    }
    let resp = viewer.post_form("/dashboard/playground", &start_form(Some(&viewer.csrf), &env, "echo-agent", "")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "a viewer");
    assert_eq!(session_count(&app).await, 0, "no session was created");
    assert!(audit_rows(&app).await.is_empty(), "nothing was audited");
}

#[tokio::test]
async fn a_session_reopens_by_external_id_or_session_id_in_its_environment() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let admin = Operator::login(&app, ADMIN).await;
    let made = app.create_session(session_body(Some("support-chat-7"))).await;
    let id = made["id"].as_str().unwrap().to_string();
    let (env_a, env_b) = (app.a.env.id.to_string(), app.b.env.id.to_string());

    for key in ["support-chat-7", id.as_str()] {
        let resp = admin.post_form("/dashboard/playground", &start_form(Some(&admin.csrf), &env_a, "", key)).await;
        assert_eq!(conversation_of(&resp), id, "reopened by {key}");
    }
    // Another environment has no such session: a 404 page.
    let resp =
        admin.post_form("/dashboard/playground", &start_form(Some(&admin.csrf), &env_b, "", "support-chat-7")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.text().await.unwrap().contains("No session support-chat-7 in this environment"));
    assert_eq!(session_count(&app).await, 1, "reopening creates nothing");
    let reopened = ("playground.reopen".to_string(), format!("session:{id}"));
    assert_eq!(audit_rows(&app).await, vec![reopened.clone(), reopened]);
}

#[tokio::test]
async fn the_conversation_page_carries_a_token_for_its_session_only() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let admin = Operator::login(&app, ADMIN).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let mine = app.create_session(session_body(Some("mine"))).await["id"].as_str().unwrap().to_string();
    let other = app.create_session(session_body(Some("other"))).await["id"].as_str().unwrap().to_string();

    let asked = chrono::Utc::now().timestamp();
    let (status, page) = admin.get(&format!("/dashboard/playground/{mine}")).await;
    let answered = chrono::Utc::now().timestamp();
    assert_eq!(status, StatusCode::OK);
    let token = data_attr(&page, "token").expect("a data-token");
    assert_eq!(data_attr(&page, "in-url").as_deref(), Some(&*format!("/realtime/v1/sessions/{mine}/in")));
    assert_eq!(data_attr(&page, "out-url").as_deref(), Some(&*format!("/realtime/v1/sessions/{mine}/out")));
    assert!(page.contains("/dashboard/static/playground.js"), "the script");
    assert!(!page.contains("<script>"), "no inline script");

    // Short-lived, and only this session's read and write.
    let c = decode_claims(&token);
    assert_eq!(c["scopes"], json!([format!("read:sessions:{mine}"), format!("write:sessions:{mine}")]));
    // Fifteen minutes from when it was minted, by this host's clock (the
    // server runs in this process): the seconds the request took, no more.
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 15 * 60, "a 15-minute token");
    assert!((asked..=answered).contains(&iat), "minted during the request: {iat} not in {asked}..={answered}");
    // The page says when it expires: the token's exp (the page and the token
    // each read the clock, so a second may tick between them).
    let shown = page.split("<time datetime=\"").nth(1).and_then(|t| t.split('"').next()).expect("the expiry shown");
    let shown = chrono::DateTime::parse_from_rfc3339(shown).unwrap().timestamp();
    assert!((exp - 1..=exp).contains(&shown), "the page shows the token's expiry: {shown}, exp {exp}");

    // The public API takes it for this session's .in and .out...
    let (status, _) = app.append(&mine, "in", &token, &chat_message("hello from the page"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, records) = app.get(&format!("/realtime/v1/sessions/{mine}/in/records"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(records["records"].as_array().map(Vec::len), Some(1), "{records}");
    let (status, _) = app.get(&format!("/realtime/v1/sessions/{mine}/out/records"), &token).await;
    assert_eq!(status, StatusCode::OK);
    // ...and refuses it for another session's.
    for io in ["in", "out"] {
        let (status, _) = app.append(&other, io, &token, &chat_message("not yours"), &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "append to the other {io}");
        let (status, _) = app.get(&format!("/realtime/v1/sessions/{other}/{io}/records"), &token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "read the other {io}");
    }

    // A viewer gets no token; a session that does not exist is a 404 page.
    let (status, page) = viewer.get(&format!("/dashboard/playground/{mine}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!page.contains("data-token"), "{page}");
    let (status, _) = admin.get("/dashboard/playground/session_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin.get("/dashboard/playground/nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A closed session's conversation is shown read-only.
    let (status, _) = app.post(&format!("/api/v1/sessions/{other}/close"), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, page) = admin.get(&format!("/dashboard/playground/{other}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(data_attr(&page, "can-send").as_deref(), Some("false"));
    assert!(page.contains("read-only") && !page.contains("id=\"pg-composer\""), "{page}");

    // The session page links to the playground for an admin.
    let (_, page) = admin.get(&format!("/dashboard/sessions/{mine}")).await;
    assert!(page.contains(&format!("href=\"/dashboard/playground/{mine}\"")), "{page}");
}

/// A JWT's claims, unverified (the test only reads what the page was given).
fn decode_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).expect("base64url claims");
    serde_json::from_slice(&bytes).unwrap()
}

/// `scripts/dev.sh` hands the worker the dev environment's key from
/// `env bootstrap-dev --key-only`: the key alone on stdout, the same one the
/// plain command prints.
#[tokio::test]
async fn bootstrap_dev_prints_the_key_alone_for_the_dev_script() {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let master = "33".repeat(32);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(args)
            .env("DATABASE_URL", common::database_url())
            .env("DATABASE_SCHEMA", &schema)
            .env("SESSIOND_MASTER_KEY", &master)
            .env("RUST_LOG", "error")
            .output()
            .expect("run sessiond");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["migrate"]);
    let plain = run(&["env", "bootstrap-dev"]);
    let key = run(&["env", "bootstrap-dev", "--key-only"]);
    assert_eq!(key.lines().count(), 1, "{key}");
    let key = key.trim();
    assert!(key.starts_with("tr_dev_"), "{key}");
    assert!(plain.contains(&format!("dev secret key:  {key}")), "the same key: {plain}");
}

/// The playground in headless Chromium, with an echo-agent worker serving
/// environment A: a two-turn conversation, the raw panes, a reload that
/// shows the history, and the same at 390 px. Screenshots land in
/// `target/test-artifacts/playground/`.
#[tokio::test]
async fn a_two_turn_conversation_in_the_playground_in_a_browser() {
    // A heartbeat late on a loaded machine must not end a run mid-turn.
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 10_000).await;
    with_operators(&app).await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()));

    let shots = browser::screenshots("playground");
    let env = [
        ("ADMIN_EMAIL", ADMIN.0.to_string()),
        ("ADMIN_PASSWORD", ADMIN.1.to_string()),
        ("PLAYGROUND_ENV", app.a.env.id.to_string()),
    ];
    browser::run("playground.mjs", &app.base, &env, &shots, CHECKS, Duration::from_secs(240), |_| async {}).await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
    // What the pages showed is what the channels hold: at 1280 px two turns
    // and a stopped one, at 390 px two turns.
    let sessions: Vec<String> = sqlx::query_scalar("SELECT friendly_id FROM sessions WHERE 'playground' = ANY(tags)")
        .fetch_all(app.db())
        .await
        .unwrap();
    let mut turns = Vec::new();
    for s in &sessions {
        let (status, out) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
        assert_eq!(status, StatusCode::OK);
        let ends = out["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["headers"].as_array().is_some_and(|h| h.contains(&json!(["trigger-control", "turn-complete"])))
            })
            .count();
        turns.push(ends);
    }
    turns.sort();
    assert_eq!(turns, vec![2, 3], "turns answered per playground session");
    let pngs = browser::screenshot_count(&shots);
    assert!(pngs >= CHECKS, "a screenshot after each check ({pngs} found)");
}
