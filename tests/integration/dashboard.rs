//! The operator dashboard over HTTP: sign-in, the cookie and CSRF rules, the
//! roles, pages, the audited close, and the live channel tail. Every POST
//! route, read from the router's source, is walked for sign-in, CSRF (field
//! and htmx's `X-CSRF-Token` header) and role.

use std::time::Duration;

use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{redirect, StatusCode};
use sessiond::operators::{self, Role};

use crate::common::{session_body, TestApp};

pub const ADMIN: (&str, &str) = ("admin@example.com", "admin password 1");
pub const VIEWER: (&str, &str) = ("viewer@example.com", "viewer password 1");

pub async fn with_operators(app: &TestApp) {
    operators::create(app.db(), ADMIN.0, ADMIN.1, Role::Admin).await.unwrap();
    operators::create(app.db(), VIEWER.0, VIEWER.1, Role::Viewer).await.unwrap();
}

/// A browser-like client of the dashboard: no redirects followed, the session
/// cookie and CSRF token kept by hand.
pub struct Operator {
    http: reqwest::Client,
    base: String,
    pub cookie: String,
    pub csrf: String,
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(redirect::Policy::none()).build().unwrap()
}

fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The value of the first `name="csrf"` hidden field in a page.
fn csrf_field(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

/// GETs the login form, posts the credentials; the response of the post.
async fn try_login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    let http = no_redirects();
    let form = http.get(format!("{}/dashboard/login", app.base)).send().await.unwrap();
    let login_cookie = set_cookie(&form, "sessiond_login").expect("a login cookie");
    let csrf = csrf_field(&form.text().await.unwrap());
    http.post(format!("{}/dashboard/login", app.base))
        .header(COOKIE, format!("sessiond_login={login_cookie}"))
        .form(&[("email", email), ("password", password), ("csrf", &csrf)])
        .send()
        .await
        .unwrap()
}

impl Operator {
    pub async fn login(app: &TestApp, (email, password): (&str, &str)) -> Operator {
        let resp = try_login(app, email, password).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[LOCATION], "/dashboard/sessions");
        let cookie = set_cookie(&resp, "sessiond_dashboard").expect("a session cookie");
        let mut op = Operator { http: no_redirects(), base: app.base.clone(), cookie, csrf: String::new() };
        let (_, page) = op.get("/dashboard/sessions").await;
        op.csrf = csrf_field(&page);
        op
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, format!("sessiond_dashboard={}", self.cookie))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    pub async fn post(&self, path: &str, csrf: Option<&str>) -> reqwest::Response {
        let form: Vec<(&str, &str)> = csrf.map(|c| vec![("csrf", c)]).unwrap_or_default();
        self.post_form(path, &form).await
    }

    /// POSTs a form of any fields (the CSRF token among them, or not).
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.post_htmx(path, form, None).await
    }

    /// POSTs a form as htmx does: the CSRF token, if any, in the
    /// `X-CSRF-Token` header rather than among the fields.
    pub async fn post_htmx(&self, path: &str, form: &[(&str, &str)], csrf_header: Option<&str>) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, format!("sessiond_dashboard={}", self.cookie))
            .form(form);
        if let Some(token) = csrf_header {
            req = req.header("x-csrf-token", token);
        }
        req.send().await.unwrap()
    }
}

async fn is_closed(app: &TestApp, friendly: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT closed_at IS NOT NULL FROM sessions WHERE friendly_id = $1")
        .bind(friendly)
        .fetch_one(app.db())
        .await
        .unwrap()
}

pub async fn audit_rows(app: &TestApp) -> Vec<(String, String)> {
    sqlx::query_as("SELECT action, target FROM audit_log ORDER BY created_at").fetch_all(app.db()).await.unwrap()
}

#[tokio::test]
async fn sign_in_with_a_password_and_a_signed_cookie() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let http = no_redirects();

    let form = http.get(format!("{}/dashboard/login", app.base)).send().await.unwrap();
    assert_eq!(form.status(), StatusCode::OK);
    let csp = form.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let login_cookie = form.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"), "{login_cookie}");

    // Wrong password, unknown email, a login form without its cookie: refused, no session.
    let wrong = try_login(&app, ADMIN.0, "not the password").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookie(&wrong, "sessiond_dashboard").is_none());
    assert!(wrong.text().await.unwrap().contains("Wrong email or password"));
    assert_eq!(try_login(&app, "nobody@example.com", ADMIN.1).await.status(), StatusCode::UNAUTHORIZED);
    let forged = http
        .post(format!("{}/dashboard/login", app.base))
        .form(&[("email", ADMIN.0), ("password", ADMIN.1), ("csrf", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(&forged, "sessiond_dashboard").is_none());

    // Signed in: case-insensitive email, a cookie that is HttpOnly and Strict.
    let ok = try_login(&app, "ADMIN@example.com", ADMIN.1).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let raw = ok.headers().get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
    let session = raw.iter().find(|c| c.starts_with("sessiond_dashboard=")).unwrap();
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict") && session.contains("Path=/dashboard"));

    // Pages need the cookie; a tampered one is refused like none.
    let anonymous = http.get(format!("{}/dashboard/sessions", app.base)).send().await.unwrap();
    assert_eq!(
        (anonymous.status(), &anonymous.headers()[LOCATION]),
        (StatusCode::SEE_OTHER, &"/dashboard/login".parse().unwrap())
    );
    let mut op = Operator::login(&app, ADMIN).await;
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::OK);
    let good = op.cookie.clone();
    let (id, sig) = good.split_once('.').unwrap();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    op.cookie = format!("{id}.{flipped}{}", &sig[1..]);
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::SEE_OTHER);
    op.cookie = format!("{}.{sig}", uuid::Uuid::new_v4());
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::SEE_OTHER);
    op.cookie = good;

    // Logout needs the CSRF token, and revokes the cookie for good.
    assert_eq!(op.post("/dashboard/logout", None).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::OK);
    let out = op.post("/dashboard/logout", Some(&op.csrf.clone())).await;
    assert_eq!((out.status(), out.headers()[LOCATION].to_str().unwrap()), (StatusCode::SEE_OTHER, "/dashboard/login"));
    assert_eq!(op.get("/dashboard/sessions").await.0, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn api_credentials_and_the_dashboard_cookie_do_not_cross() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let op = Operator::login(&app, ADMIN).await;
    // An API key on the dashboard: not signed in.
    let resp =
        no_redirects().get(format!("{}/dashboard/sessions", app.base)).bearer_auth(&app.a.key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    // The dashboard cookie on the API: unauthorized.
    let resp = no_redirects()
        .get(format!("{}/api/v1/sessions", app.base))
        .header(COOKIE, format!("sessiond_dashboard={}", op.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_sessions_page_filters_pages_and_switches_environments() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    for i in 0..30 {
        let mut body = session_body(Some(&format!("ext-{i}")));
        body["tags"] = serde_json::json!(if i % 3 == 0 { vec!["vip"] } else { vec!["plain"] });
        app.create_session(body).await;
    }
    let op = Operator::login(&app, VIEWER).await;
    let env = app.a.env.id;
    let rows = |html: &str| html.matches("<tr data-session-id=").count();

    let (status, page) = op.get(&format!("/dashboard/sessions?env={env}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rows(&page), 25, "a page holds 25");
    let end = page.find("\" rel=\"next\"").expect("a link to older sessions");
    let start = page[..end].rfind("href=\"").unwrap() + "href=\"".len();
    let next = page[start..end].replace("&#38;", "&").replace("&amp;", "&");
    assert!(next.contains("after="), "{next}");
    let (_, older) = op.get(&next).await;
    assert_eq!(rows(&older), 5);

    let (_, vip) = op.get(&format!("/dashboard/sessions?env={env}&tag=vip")).await;
    assert_eq!(rows(&vip), 10);
    let (_, one) = op.get(&format!("/dashboard/sessions?env={env}&external_id=ext-7")).await;
    assert_eq!(rows(&one), 1);
    let (_, closed) = op.get(&format!("/dashboard/sessions?env={env}&status=CLOSED")).await;
    assert_eq!(rows(&closed), 0);
    assert!(closed.contains("class=\"empty\""), "an empty state says what to do");
    // The other environment has none of them.
    let (_, other) = op.get(&format!("/dashboard/sessions?env={}", app.b.env.id)).await;
    assert_eq!(rows(&other), 0);
    // Bad input is a page with a 4xx, never a raw error.
    let (status, bad) = op.get(&format!("/dashboard/sessions?env={env}&from=yesterday")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad.contains("must be a date") && bad.contains("<html"), "{bad}");
    let (status, _) = op.get("/dashboard/sessions?env=not-an-id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn closing_needs_an_admin_and_the_token_and_is_audited_in_its_transaction() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("to-close"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    let close = format!("/dashboard/sessions/{id}/close");

    let viewer = Operator::login(&app, VIEWER).await;
    let (_, page) = viewer.get(&format!("/dashboard/sessions/{id}")).await;
    assert!(page.contains(&id) && !page.contains("data-action"), "a viewer sees no action buttons");
    assert_eq!(viewer.post(&close, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);

    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get(&format!("/dashboard/sessions/{id}")).await;
    assert!(page.contains("data-action=\"close\""));
    assert_eq!(admin.post(&close, None).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    assert_eq!(admin.post(&close, Some("wrong")).await.status(), StatusCode::FORBIDDEN, "another token");
    assert_eq!(
        admin.post(&close, Some(&viewer.csrf.clone())).await.status(),
        StatusCode::FORBIDDEN,
        "another session's token"
    );
    assert!(!is_closed(&app, &id).await);
    assert!(audit_rows(&app).await.is_empty());
    // Fills this process's lookup cache with the session, open.
    assert_eq!(app.append(&id, "in", &app.a.key, r#"{"kind":"message"}"#, &[]).await.0, StatusCode::OK);

    // The audit insert fails: the close is rolled back with it, and the
    // operator gets an error page, not a raw 500 body.
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone").execute(app.db()).await.unwrap();
    let failed = admin.post(&close, Some(&admin.csrf.clone())).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = failed.text().await.unwrap();
    assert!(body.contains("<html") && !body.contains("audit_log"), "{body}");
    assert!(!is_closed(&app, &id).await, "the close did not commit without its audit row");
    sqlx::query("ALTER TABLE audit_log_gone RENAME TO audit_log").execute(app.db()).await.unwrap();

    let done = admin.post(&close, Some(&admin.csrf.clone())).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert!(is_closed(&app, &id).await);
    assert_eq!(audit_rows(&app).await, vec![("session.close".to_string(), format!("session:{id}"))]);
    // As after an API close (one service for both): the channels are sealed
    // before the answer, and this process's lookup cache (which the append
    // before the close filled) forgets the session, so an append is refused
    // at once.
    let sealed: bool = sqlx::query_scalar("SELECT channels_closed_at IS NOT NULL FROM sessions WHERE friendly_id = $1")
        .bind(&id)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert!(sealed, "the channels were sealed before the redirect");
    let (status, body) = app.append(&id, "in", &app.a.key, r#"{"kind":"message"}"#, &[]).await;
    assert!(status.is_client_error() && body.to_string().contains("closed"), "{status} {body}");
    let (_, audit) = viewer.get("/dashboard/audit").await;
    assert!(audit.contains("session.close") && audit.contains(ADMIN.0), "the audit page shows the action");
    // An API close of another session shows who took it: the environment's key.
    let other = app.create_session(session_body(Some("api-close"))).await;
    let (status, _) = app.post("/api/v1/sessions/api-close/close", &app.a.key, serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, audit) = viewer.get("/dashboard/audit").await;
    let by_key = format!("secret-key {}", app.a.env.id);
    assert!(audit.contains(&by_key) && audit.contains(other["id"].as_str().unwrap()), "{audit}");
}

#[tokio::test]
async fn the_session_page_tails_out_live() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("tail"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(app.append(&id, "out", &app.a.key, "<b>before</b>", &[]).await.0, StatusCode::OK);
    let op = Operator::login(&app, VIEWER).await;
    let mut stream = op
        .http
        .get(format!("{}/dashboard/sessions/{id}/out/tail", app.base))
        .header(COOKIE, format!("sessiond_dashboard={}", op.cookie))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut seen = String::new();
    read_until(&mut stream, "before", &mut seen).await;
    assert!(
        seen.contains("event: record") && seen.contains("&#60;b&#62;before&#60;/b&#62;"),
        "records are escaped HTML: {seen}"
    );
    assert_eq!(app.append(&id, "out", &app.a.key, "live-marker-1", &[]).await.0, StatusCode::OK);
    read_until(&mut stream, "live-marker-1", &mut seen).await;
    // Not signed in: no stream.
    let anonymous = no_redirects().get(format!("{}/dashboard/sessions/{id}/out/tail", app.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
}

async fn read_until(stream: &mut reqwest::Response, needle: &str, seen: &mut String) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            let chunk = stream.chunk().await.unwrap().expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} never arrived; got {seen:?}"));
}

#[tokio::test]
async fn an_admin_triggers_a_fresh_run_audited_with_it() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("to-trigger"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    let first_run = s["runId"].as_str().unwrap().to_string();
    let trigger = format!("/dashboard/sessions/{id}/trigger");

    let viewer = Operator::login(&app, VIEWER).await;
    assert_eq!(viewer.post(&trigger, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);
    let admin = Operator::login(&app, ADMIN).await;
    assert_eq!(admin.post(&trigger, None).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    let current = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT r.friendly_id FROM sessions s JOIN task_runs r ON r.id = s.current_run_id WHERE s.friendly_id = $1",
        )
        .bind(&id)
        .fetch_one(app.db())
        .await
        .unwrap()
    };
    assert_eq!(current().await, first_run, "refused triggers changed nothing");
    assert!(audit_rows(&app).await.is_empty());

    let done = admin.post(&trigger, Some(&admin.csrf.clone())).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let second = current().await;
    assert_ne!(second, first_run);
    assert_eq!(audit_rows(&app).await, vec![("session.trigger".to_string(), format!("session:{id}"))]);
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail["run"], second.as_str(), "the audit row names the run it made");
    let (_, page) = admin.get(&format!("/dashboard/sessions/{id}")).await;
    assert!(page.contains(&second) && page.contains("manual"), "the timeline shows the manual run");

    // A closed session runs nothing: a 4xx page, no new run, no audit row.
    let (status, _) = app.post(&format!("/api/v1/sessions/{id}/close"), &app.a.key, serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let audited = audit_rows(&app).await;
    assert_eq!(audited.len(), 2, "the trigger and the API's close: {audited:?}");
    let refused = admin.post(&trigger, Some(&admin.csrf.clone())).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(current().await, second);
    assert_eq!(audit_rows(&app).await, audited);
}

/// The dashboard's POST routes, read from the router's own source, so that a
/// route added there is walked by [`every_post_route_needs_a_session_the_token_and_an_admin`]
/// without anyone listing it: a new action that skips sign-in, CSRF or the
/// role check fails that test. Every route is one `.route("…", …)` call in
/// `router()`; a POST one names `post(` (or `any(`) in it.
fn dashboard_post_routes() -> Vec<String> {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/dashboard/mod.rs")).unwrap();
    let start = src.find("pub fn router()").expect("router() in src/dashboard/mod.rs");
    let body = &src[start..];
    let body = &body[..body.find(".layer(").expect("router() ends with its layers")];
    // A nested or merged router's routes would escape this walk.
    assert!(!body.contains(".nest(") && !body.contains(".merge("), "walk nested routers too");
    let routes: Vec<String> = body
        .split(".route(")
        .skip(1)
        .filter(|call| call.contains("post(") || call.contains("any("))
        .map(|call| call.split('"').nth(1).expect("a route's path literal").to_string())
        .collect();
    // The reading itself is checked, so a change of style cannot empty it.
    for known in ["/dashboard/sessions/{session}/close", "/dashboard/jobs/retry-matching", "/dashboard/logout"] {
        assert!(routes.iter().any(|r| r == known), "{known} not found among {routes:?}");
    }
    routes
}

/// Whether a response is the sign-in redirect (what a dashboard request
/// without a valid session gets, by design, rather than a 401).
fn to_sign_in(resp: &reqwest::Response) -> bool {
    resp.status() == StatusCode::SEE_OTHER && resp.headers().get(LOCATION).is_some_and(|l| l == "/dashboard/login")
}

/// The CSRF refusal and the role refusal are both 403; their pages differ.
async fn refused(resp: reqwest::Response, title: &str) -> Result<(), String> {
    let status = resp.status();
    let body = resp.text().await.unwrap();
    if status == StatusCode::FORBIDDEN && body.contains(title) {
        Ok(())
    } else {
        Err(format!("{status} without {title:?}: {}", body.chars().take(300).collect::<String>()))
    }
}

#[tokio::test]
async fn every_post_route_needs_a_session_the_token_and_an_admin() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    // The sign-in form is the one POST without a session (its own CSRF is a
    // double-submit cookie, tested with sign-in); a viewer may sign out.
    const NO_SESSION_NEEDED: &[&str] = &["/dashboard/login"];
    const VIEWER_MAY: &[&str] = &["/dashboard/logout"];
    let session = app.create_session(session_body(Some("walked"))).await["id"].as_str().unwrap().to_string();
    let job = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, finished_at)
         VALUES ($1, 'probe', '{\"kind\": \"probe\", \"fail_first\": 0}', 'failed', 5, 5, 'on purpose', now(), now())",
    )
    .bind(job)
    .execute(app.db())
    .await
    .unwrap();
    // Real things where the route names one; the checks come before any
    // lookup, so a missing run or environment is refused all the same.
    let fill = |route: &str| -> String {
        let mut path = route.to_string();
        for (param, value) in [
            ("{session}", session.clone()),
            ("{job}", job.to_string()),
            ("{action}", "retry".to_string()),
            ("{run}", "run_notthere".to_string()),
            ("{env}", uuid::Uuid::new_v4().to_string()),
        ] {
            path = path.replace(param, &value);
        }
        assert!(!path.contains('{'), "give {route}'s parameter a value in this test");
        path
    };
    let mut routes = dashboard_post_routes();
    for exempt in NO_SESSION_NEEDED.iter().chain(VIEWER_MAY) {
        assert!(routes.iter().any(|r| r == exempt), "the exemption {exempt} names no route any more");
    }
    routes.retain(|r| !NO_SESSION_NEEDED.contains(&r.as_str()));
    // Signing out last, as it ends the session the other checks use.
    routes.sort_by_key(|r| VIEWER_MAY.contains(&r.as_str()));

    let viewer = Operator::login(&app, VIEWER).await;
    let admin = Operator::login(&app, ADMIN).await;
    let stranger = no_redirects();
    let mut failures = Vec::new();
    for route in &routes {
        let path = fill(route);
        let resp =
            stranger.post(format!("{}{path}", app.base)).form(&[("csrf", admin.csrf.as_str())]).send().await.unwrap();
        if !to_sign_in(&resp) {
            failures.push(format!("{route}: without a session answered {}", resp.status()));
        }
        let forged = stranger
            .post(format!("{}{path}", app.base))
            .header(COOKIE, format!("sessiond_dashboard={}.{}", uuid::Uuid::new_v4(), "0".repeat(64)))
            .header("x-csrf-token", &admin.csrf)
            .send()
            .await
            .unwrap();
        if !to_sign_in(&forged) {
            failures.push(format!("{route}: with a forged cookie answered {}", forged.status()));
        }
        for (what, resp) in [
            ("no token", admin.post_htmx(&path, &[], None).await),
            ("a wrong token in the header", admin.post_htmx(&path, &[], Some("wrong")).await),
            ("another session's token in the header", admin.post_htmx(&path, &[], Some(&viewer.csrf)).await),
            (
                "a wrong field over the right header",
                admin.post_htmx(&path, &[("csrf", "wrong")], Some(&admin.csrf)).await,
            ),
        ] {
            if let Err(e) = refused(resp, "Form expired").await {
                failures.push(format!("{route}: an admin with {what}: {e}"));
            }
        }
        if !VIEWER_MAY.contains(&route.as_str()) {
            for (how, resp) in [
                ("header", viewer.post_htmx(&path, &[], Some(&viewer.csrf)).await),
                ("field", viewer.post_form(&path, &[("csrf", viewer.csrf.as_str())]).await),
            ] {
                if let Err(e) = refused(resp, "Not allowed").await {
                    failures.push(format!("{route}: a viewer with the token in the {how}: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} checks failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(audit_rows(&app).await, vec![], "no refused request acted");

    // The token in htmx's header alone is accepted on every route: past
    // every check (whatever the action then makes of the stand-in ids).
    for route in &routes {
        let path = fill(route);
        let resp = admin.post_htmx(&path, &[], Some(&admin.csrf)).await;
        let status = resp.status();
        if route == "/dashboard/logout" {
            assert!(to_sign_in(&resp), "signing out answered {status}");
            assert!(admin.get("/dashboard/sessions").await.0 == StatusCode::SEE_OTHER, "the session ended");
        } else {
            let signed_out = to_sign_in(&resp);
            let body = resp.text().await.unwrap();
            assert!(
                status != StatusCode::FORBIDDEN && !signed_out,
                "{route}: the right token in the header was refused: {status} {body}"
            );
        }
    }
    assert!(was_acted_on(&app, job).await, "the job retry took the header's token");
    assert!(is_closed(&app, &session).await, "the close took the header's token");
    // The viewer may sign out, with the token in the header.
    let resp = viewer.post_htmx("/dashboard/logout", &[], Some(&viewer.csrf)).await;
    assert!(to_sign_in(&resp), "a viewer signs out: {}", resp.status());
    assert_eq!(viewer.get("/dashboard/sessions").await.0, StatusCode::SEE_OTHER, "the viewer's session ended");
}

async fn was_acted_on(app: &TestApp, job: uuid::Uuid) -> bool {
    sqlx::query_scalar::<_, String>("SELECT status FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(app.db())
        .await
        .unwrap()
        != "failed"
}
