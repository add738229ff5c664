//! Every dashboard input (path segments, query fields, form fields) is held
//! to the API's text rules: NUL, or bytes that are no UTF-8, answer the
//! dashboard's 400 page, never a 500 (issue 24, item 7).

use reqwest::header::{CONTENT_TYPE, COOKIE};
use reqwest::{Method, StatusCode};

use crate::common::TestApp;
use crate::dashboard::{with_operators, Operator, ADMIN};

/// Values no dashboard field may hold, percent-encoded as sent: a NUL in
/// the middle, a NUL alone, a lone UTF-8 lead byte, a byte never in UTF-8.
const BAD: &[&str] = &["a%00b", "%00", "%C3", "%FF"];

/// GET pages and the query fields each reads.
const PAGES: &[(&str, &[&str])] = &[
    ("/dashboard/overview", &["env", "window"]),
    (
        "/dashboard/sessions",
        &["env", "status", "kind", "task", "tag", "external_id", "from", "to", "after", "before", "fragment"],
    ),
    ("/dashboard/audit", &["after"]),
    ("/dashboard/jobs", &["kind", "status", "q", "after", "before", "retried"]),
    ("/dashboard/jobs/retry-matching", &["kind", "status", "q"]),
    ("/dashboard/runs", &["env", "status", "task", "session", "after", "before"]),
    ("/dashboard/handoffs", &["after"]),
    ("/dashboard/schedules", &["any"]),
    ("/dashboard/replication", &["after", "before"]),
    ("/dashboard/environments", &["any"]),
    ("/dashboard/playground", &["any"]),
    ("/dashboard/login", &["any"]),
];

/// Routes with a path parameter, `{}` where it goes.
const PATHS: &[(Method, &str)] = &[
    (Method::GET, "/dashboard/sessions/{}"),
    (Method::POST, "/dashboard/sessions/{}/close"),
    (Method::POST, "/dashboard/sessions/{}/trigger"),
    (Method::GET, "/dashboard/sessions/{}/out/tail"),
    (Method::GET, "/dashboard/sessions/session_x/{}/tail"),
    (Method::GET, "/dashboard/jobs/{}"),
    (Method::POST, "/dashboard/jobs/{}/retry"),
    (Method::POST, "/dashboard/jobs/00000000-0000-0000-0000-000000000000/{}"),
    (Method::GET, "/dashboard/runs/{}"),
    (Method::POST, "/dashboard/runs/{}/cancel"),
    (Method::POST, "/dashboard/handoffs/{}/retry"),
    (Method::POST, "/dashboard/environments/{}/rotate-key"),
    (Method::POST, "/dashboard/environments/{}/rate-limits"),
    (Method::GET, "/dashboard/playground/{}"),
    (Method::GET, "/dashboard/static/{}"),
];

/// Form posts and their fields (the CSRF token is added, valid, unless it is
/// the field under test).
const FORMS: &[(&str, &[&str])] = &[
    ("/dashboard/login", &["email", "password", "csrf"]),
    ("/dashboard/logout", &["csrf"]),
    ("/dashboard/sessions/session_x/close", &["csrf"]),
    ("/dashboard/sessions/session_x/trigger", &["csrf"]),
    ("/dashboard/jobs/retry-selected", &["ids", "kind", "status", "q", "csrf"]),
    ("/dashboard/jobs/retry-matching", &["kind", "status", "q", "as_of", "csrf"]),
    ("/dashboard/jobs/00000000-0000-0000-0000-000000000000/retry", &["kind", "status", "q", "csrf"]),
    ("/dashboard/runs/run_x/cancel", &["csrf"]),
    ("/dashboard/handoffs/session_x/retry", &["csrf"]),
    ("/dashboard/replication/backfill", &["csrf"]),
    ("/dashboard/environments/00000000-0000-0000-0000-000000000000/rotate-key", &["hint", "csrf"]),
    ("/dashboard/environments/00000000-0000-0000-0000-000000000000/rate-limits", &["create", "csrf"]),
    ("/dashboard/playground", &["env", "task", "reopen", "csrf"]),
];

struct Walk<'a> {
    app: &'a TestApp,
    admin: &'a Operator,
    http: reqwest::Client,
    checked: usize,
    wrong: Vec<String>,
}

impl Walk<'_> {
    async fn expect_400(&mut self, method: Method, path: &str, body: Option<String>) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.app.base))
            .header(COOKIE, format!("sessiond_dashboard={}", self.admin.cookie));
        if let Some(body) = body.clone() {
            req = req.header(CONTENT_TYPE, "application/x-www-form-urlencoded").body(body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let page = resp.text().await.unwrap();
        self.checked += 1;
        if status != StatusCode::BAD_REQUEST || !page.contains("<h1>Check the form</h1>") {
            let title = page.split("<h1>").nth(1).and_then(|t| t.split("</h1>").next()).unwrap_or("-");
            self.wrong.push(format!("{method} {path} {} → {status} ({title})", body.unwrap_or_default()));
        }
    }
}

#[tokio::test]
async fn bad_text_anywhere_in_a_dashboard_request_is_a_400_page() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let admin = Operator::login(&app, ADMIN).await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let mut walk = Walk { app: &app, admin: &admin, http, checked: 0, wrong: Vec::new() };

    for (page, fields) in PAGES {
        for field in *fields {
            for bad in BAD {
                walk.expect_400(Method::GET, &format!("{page}?{field}={bad}"), None).await;
            }
        }
        // A bad field name is refused like a bad value.
        walk.expect_400(Method::GET, &format!("{page}?st%00atus=failed"), None).await;
    }
    for (method, route) in PATHS {
        for bad in BAD {
            let body = (*method == Method::POST).then(|| format!("csrf={}", admin.csrf));
            walk.expect_400(method.clone(), &route.replace("{}", bad), body).await;
        }
    }
    for (route, fields) in FORMS {
        for field in *fields {
            for bad in BAD {
                let mut body: Vec<String> = fields.iter().filter(|f| *f != field).map(|f| format!("{f}=ok")).collect();
                if *field != "csrf" {
                    body.retain(|f| !f.starts_with("csrf="));
                    body.push(format!("csrf={}", admin.csrf));
                }
                body.push(format!("{field}={bad}"));
                walk.expect_400(Method::POST, route, Some(body.join("&"))).await;
            }
        }
    }
    assert!(walk.checked > 300, "walked {} requests", walk.checked);
    assert!(
        walk.wrong.is_empty(),
        "{} of {} not a 400 page:\n{}",
        walk.wrong.len(),
        walk.checked,
        walk.wrong.join("\n")
    );

    // Good input still passes where bad was refused.
    let (status, _) = admin.get("/dashboard/sessions?tag=a%20b&task=caf%C3%A9").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = admin.get("/dashboard/jobs?q=caf%C3%A9").await;
    assert_eq!(status, StatusCode::OK);
}
