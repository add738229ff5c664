//! Per-environment rate-limit overrides (issue 24 item 10): set by an admin on
//! the dashboard's environments page (CSRF, roles, validation, audited in the
//! change's transaction), enforced at once by the process that took the
//! change and by every other after its next background reload.

use reqwest::header::LOCATION;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{eventually, TestApp};
use crate::dashboard::{audit_rows, with_operators, Operator, ADMIN, VIEWER};

fn limits_path(env: Uuid) -> String {
    format!("/dashboard/environments/{env}/rate-limits")
}

/// The `data-limit` and `data-source` of one environment's cell of `class`
/// on the environments page.
fn shown_limit(page: &str, env: Uuid, class: &str) -> (String, String) {
    let table = &page[page.find("<table id=\"rate-limits\"").expect("the rate-limits table")..];
    let row = &table[table.find(&format!("data-env-id=\"{env}\"")).expect("the environment's row")..];
    let cell = &row[row.find(&format!("data-class=\"{class}\"")).expect("the class's cell")..];
    let attr = |name: &str| {
        let at = cell.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        cell[at..].split('"').next().unwrap().to_string()
    };
    (attr("data-limit"), attr("data-source"))
}

/// Session lists with `key` until one is refused: how many were admitted,
/// and the refusal (None if `max` were all admitted).
async fn list_until_refused(app: &TestApp, key: &str, max: usize) -> (usize, Option<reqwest::Response>) {
    for admitted in 0..max {
        let resp = app.client.get(format!("{}/api/v1/sessions", app.base)).bearer_auth(key).send().await.expect("list");
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            return (admitted, Some(resp));
        }
        assert_eq!(resp.status(), StatusCode::OK);
    }
    (max, None)
}

async fn overrides(app: &TestApp) -> Vec<(Uuid, String, i32)> {
    sqlx::query_as("SELECT environment_id, route_class, per_second FROM environment_rate_limits ORDER BY 1, 2")
        .fetch_all(app.db())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_override_lowers_one_environments_limit_and_another_keeps_the_default() {
    // A long window: the count cannot drain while the test runs.
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_list_per_sec = 1_000;
        c.rate_limit_window_ms = 60_000;
    })
    .await;
    with_operators(&app).await;
    let (a, b) = (app.a.env.id, app.b.env.id);
    let admin = Operator::login(&app, ADMIN).await;
    // A's lists are already counted (and leased) under the default.
    assert_eq!(list_until_refused(&app, &app.a.key, 5).await.0, 5);

    let saved = admin.post_form(&limits_path(a), &[("csrf", &admin.csrf), ("list", "3")]).await;
    assert_eq!(saved.status(), StatusCode::SEE_OTHER);
    assert_eq!(saved.headers()[LOCATION], format!("/dashboard/environments?saved={a}#rate-limits"));
    let (_, page) = admin.get(&format!("/dashboard/environments?saved={a}")).await;
    assert!(page.contains("Rate limits of org-a"), "the notice names the environment");
    assert_eq!(shown_limit(&page, a, "list"), ("3".into(), "override".into()));
    assert_eq!(shown_limit(&page, a, "create"), ("1000".into(), "default".into()));
    assert_eq!(shown_limit(&page, b, "list"), ("1000".into(), "default".into()));

    // The 5 lists already made fill A's new limit of 3: the next is refused,
    // at once on this process (no reload awaited), with the override's limit.
    let (admitted, refused) = list_until_refused(&app, &app.a.key, 10).await;
    // At most a lease of the new limit kept from the old one's budget, and
    // one more on credit (a lease of 3 is one request).
    assert!(admitted <= 2, "{admitted} lists admitted past a limit of 3 already spent");
    let refused = refused.expect("A's lists past its override of 3 were all admitted");
    assert_eq!(refused.headers()["x-ratelimit-limit"], "3");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], json!("rate_limited"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("3 list requests per second"), "{body}");
    // B keeps the default.
    assert_eq!(list_until_refused(&app, &app.b.key, 20).await.0, 20);

    // Back to the default: A is admitted again within the same window.
    let reset = admin.post_form(&limits_path(a), &[("csrf", &admin.csrf), ("list", "default")]).await;
    assert_eq!(reset.status(), StatusCode::SEE_OTHER);
    assert_eq!(list_until_refused(&app, &app.a.key, 5).await.0, 5);
    let (_, page) = admin.get("/dashboard/environments").await;
    assert_eq!(shown_limit(&page, a, "list"), ("1000".into(), "default".into()));
    assert!(overrides(&app).await.is_empty());

    // Each change is audited with the old and new limit (null: the default).
    let target = format!("environment:{a}");
    assert_eq!(
        audit_rows(&app).await,
        vec![("environment.rate_limits".to_string(), target.clone()), ("environment.rate_limits".to_string(), target)]
    );
    let details: Vec<Value> =
        sqlx::query_scalar("SELECT detail FROM audit_log ORDER BY created_at").fetch_all(app.db()).await.unwrap();
    assert_eq!(details, vec![json!({"list": {"from": null, "to": 3}}), json!({"list": {"from": 3, "to": null}})]);
    // Saving what is already in force changes and audits nothing.
    let same = admin.post_form(&limits_path(a), &[("csrf", &admin.csrf), ("list", "")]).await;
    assert_eq!(same.status(), StatusCode::SEE_OTHER);
    assert_eq!(audit_rows(&app).await.len(), 2);
}

/// Another process learns of a change from its background reload, with no
/// request of its own asking Postgres.
#[tokio::test]
async fn another_process_applies_an_override_after_its_next_reload() {
    let app = TestApp::spawn_with(|c| c.rate_limit_window_ms = 60_000).await;
    with_operators(&app).await;
    // Started before the change: its start-up load found no override.
    let peer = app.peer(|_| {}).await;
    let admin = Operator::login(&app, ADMIN).await;
    let saved = admin.post_form(&limits_path(app.a.env.id), &[("csrf", &admin.csrf), ("list", "2")]).await;
    assert_eq!(saved.status(), StatusCode::SEE_OTHER);
    let limit = eventually(30, "the peer to refuse A's lists at the override", || async {
        let (_, refused) = list_until_refused(&peer, &peer.a.key, 1).await;
        refused.map(|r| r.headers()["x-ratelimit-limit"].to_str().unwrap().to_string())
    })
    .await;
    assert_eq!(limit, "2");
    assert_eq!(list_until_refused(&peer, &peer.b.key, 10).await.0, 10, "B keeps the default on the peer");
}

/// Renames `audit_log` away for the length of `f`: the change's audit
/// insert fails, so the change must roll back with it.
async fn without_audit_log<T>(app: &TestApp, f: impl std::future::Future<Output = T>) -> T {
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone").execute(app.db()).await.unwrap();
    let out = f.await;
    sqlx::query("ALTER TABLE audit_log_gone RENAME TO audit_log").execute(app.db()).await.unwrap();
    out
}

#[tokio::test]
async fn only_an_admin_with_the_forms_token_and_valid_limits_changes_anything() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    let env = app.a.env.id;
    let path = limits_path(env);

    let viewer = Operator::login(&app, VIEWER).await;
    let (status, page) = viewer.get("/dashboard/environments").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown_limit(&page, env, "create"), ("1000".into(), "default".into()), "a viewer sees the limits");
    assert!(!page.contains("data-action=\"save-limits\"") && !page.contains("name=\"create\""), "but cannot edit");
    let refused = viewer.post_form(&path, &[("csrf", &viewer.csrf), ("create", "5")]).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("<h1>Not allowed</h1>"));

    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/environments").await;
    assert!(page.contains("data-action=\"save-limits\"") && page.contains(&format!("form=\"limits-{env}\"")));
    assert_eq!(admin.post_form(&path, &[("create", "5")]).await.status(), StatusCode::FORBIDDEN, "no token");
    assert_eq!(
        admin.post_form(&path, &[("csrf", "forged"), ("create", "5")]).await.status(),
        StatusCode::FORBIDDEN,
        "a wrong token"
    );

    let bad: &[(&[(&str, &str)], &str)] = &[
        (&[("create", "five")], "whole number"),
        (&[("create", "0")], "between 1 and"),
        (&[("create", "-4")], "whole number"),
        (&[("create", "2.5")], "whole number"),
        (&[("create", "1000001")], "between 1 and"),
        (&[("create", "99999999999999999999999999")], "between 1 and"),
        (&[("upload", "5")], "not a route class"),
        (&[("create", "5"), ("list", "x")], "`list`"),
        (&[("list", "5"), ("list", "6")], "given twice"),
        (&[], "names no route class"),
    ];
    for (fields, says) in bad {
        let mut form = vec![("csrf", admin.csrf.as_str())];
        form.extend_from_slice(fields);
        let resp = admin.post_form(&path, &form).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{fields:?}");
        let page = resp.text().await.unwrap();
        assert!(page.contains("<h1>Check the form</h1>") && page.contains(says), "{fields:?}: {page}");
    }
    let unknown = admin.post_form(&limits_path(Uuid::now_v7()), &[("csrf", &admin.csrf), ("create", "5")]).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let not_an_id = admin.post_form("/dashboard/environments/nope/rate-limits", &[("csrf", &admin.csrf)]).await;
    assert_eq!(not_an_id.status(), StatusCode::BAD_REQUEST);
    // The audit row cannot be written: the change rolls back with it.
    let failed = without_audit_log(&app, admin.post_form(&path, &[("csrf", &admin.csrf), ("create", "5")])).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(overrides(&app).await.is_empty(), "a refused form changed a limit");
    assert!(audit_rows(&app).await.is_empty(), "a refused form was audited");

    // Several classes in one form: one audit row naming each change.
    let saved = admin
        .post_form(&path, &[("csrf", &admin.csrf), ("create", " 7 "), ("mint", "12"), ("append", "default")])
        .await;
    assert_eq!(saved.status(), StatusCode::SEE_OTHER);
    assert_eq!(overrides(&app).await, vec![(env, "create".into(), 7), (env, "mint".into(), 12)]);
    let detail: Value = sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail, json!({"create": {"from": null, "to": 7}, "mint": {"from": null, "to": 12}}));
}
