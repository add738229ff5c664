//! The dashboard's jobs pages: the filtered, keyset-paged list, one job with
//! every attempt, and the operator's retries (one, selected, all matching)
//! and cancels: roles, CSRF, the audit row in the action's transaction, and
//! exactly which jobs each touches. Also the probe job, the test seam that
//! fails on purpose.

use std::process::Command;

use reqwest::header::LOCATION;
use reqwest::StatusCode;
use sessiond::jobs::probe::Probe;
use sessiond::jobs::store::{self, JobStatus};
use sessiond::jobs::Lane;
use uuid::Uuid;

use crate::common::{eventually, schedules_file, TestApp};
use crate::dashboard::{audit_rows, with_operators, Operator, ADMIN, VIEWER};

// Every test's server runs no cron, so the ledger holds only the jobs a test
// writes.

/// A job row as a test needs it, written straight into the ledger: already
/// relayed, so neither the relay loop nor a queue recovery pushes it (the
/// test first sets the queue's marker, [`quiet`]).
async fn seed(app: &TestApp, kind: &str, status: &str, error: Option<&str>) -> Uuid {
    let id = Uuid::now_v7();
    let payload = match kind {
        "probe" => serde_json::json!({ "kind": "probe", "fail_first": 0 }),
        other => serde_json::json!({ "kind": other }),
    };
    let attempts = if status == "pending" { 0 } else { 5 };
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, finished_at)
         VALUES ($1, $2, $3, $4, $5, 5, $6, now(),
                 CASE WHEN $4 IN ('succeeded', 'failed', 'canceled') THEN now() END)",
    )
    .bind(id)
    .bind(kind)
    .bind(payload)
    .bind(status)
    .bind(attempts)
    .bind(error)
    .execute(app.db())
    .await
    .unwrap();
    id
}

/// Logs an earlier attempt's error (a job's attempts may fail differently
/// from its last).
async fn attempt_error(app: &TestApp, job: Uuid, attempt: i32, error: &str) {
    sqlx::query(
        "INSERT INTO job_attempts (job_id, attempt, status, error, finished_at) VALUES ($1, $2, 'failed', $3, now())",
    )
    .bind(job)
    .bind(attempt)
    .bind(error)
    .execute(app.db())
    .await
    .unwrap();
}

/// A server with no cron, the two operators, and a quiet queue.
async fn jobs_app() -> TestApp {
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    quiet(&app).await;
    app
}

/// Renames the audit log away (`gone`) or back: while it is away, every
/// action's audit insert fails, and the action must roll back with it.
async fn audit_log_gone(app: &TestApp, gone: bool) {
    let sql = if gone {
        "ALTER TABLE audit_log RENAME TO audit_log_gone"
    } else {
        "ALTER TABLE audit_log_gone RENAME TO audit_log"
    };
    sqlx::query(sql).execute(app.db()).await.unwrap();
}

/// Keeps the server's own runtime off seeded rows: its start-up check of the
/// job queue is done, so no lost-queue recovery pushes every unfinished job.
async fn quiet(app: &TestApp) {
    app.job_queue_ready().await;
}

async fn row(app: &TestApp, id: Uuid) -> store::JobRow {
    store::find(app.db(), id).await.unwrap().expect("job row")
}

/// Whether a retry reset the job: a fresh budget on top of its 5 spent attempts.
async fn was_retried(app: &TestApp, id: Uuid) -> bool {
    row(app, id).await.max_attempts > 5
}

fn job_rows(html: &str) -> usize {
    html.matches("<tr data-job-id=").count()
}

/// The href of the link with `rel`, unescaped.
fn link(html: &str, rel: &str) -> String {
    let end = html.find(&format!("\" rel=\"{rel}\"")).unwrap_or_else(|| panic!("a {rel} link"));
    let start = html[..end].rfind("href=\"").unwrap() + "href=\"".len();
    html[start..end].replace("&#38;", "&").replace("&amp;", "&")
}

/// The value of the hidden field `name` in a page.
fn field(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = html.find(&marker).unwrap_or_else(|| panic!("a {name} field")) + marker.len();
    html[at..].split('"').next().unwrap().to_string()
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()[LOCATION].to_str().unwrap().to_string()
}

#[tokio::test]
async fn the_jobs_list_filters_pages_and_searches_every_attempt() {
    let app = jobs_app().await;
    let mut failed = Vec::new();
    for _ in 0..28 {
        failed.push(seed(&app, "probe", "failed", Some("probe: failing attempt 5 of 9 on purpose")).await);
    }
    seed(&app, "run-sweep", "succeeded", None).await;
    let deep = seed(&app, "run-sweep", "failed", Some("a plain last error")).await;
    attempt_error(&app, deep, 1, "Connection TIMEOUT after 30 s").await;
    let viewer = Operator::login(&app, VIEWER).await;

    let (status, page) = viewer.get("/dashboard/jobs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job_rows(&page), 25, "a page holds 25");
    assert!(page.contains(&deep.to_string()), "newest first");
    assert!(!page.contains("name=\"ids\"") && !page.contains("data-action"), "a viewer gets no actions");
    assert!(page.contains("<time datetime="));
    let older = link(&page, "next");
    assert!(older.contains("after="), "{older}");
    let (_, second) = viewer.get(&older).await;
    assert_eq!(job_rows(&second), 5);
    assert!(second.contains(&failed[0].to_string()), "the oldest job is on the last page");
    let (_, back) = viewer.get(&link(&second, "prev")).await;
    assert_eq!(job_rows(&back), 25);
    assert!(back.contains(&deep.to_string()) && !back.contains("rel=\"prev\""), "back on the newest page");

    let (_, sweeps) = viewer.get("/dashboard/jobs?kind=run-sweep").await;
    assert_eq!(job_rows(&sweeps), 2);
    let (_, ok) = viewer.get("/dashboard/jobs?status=succeeded").await;
    assert_eq!(job_rows(&ok), 1);
    // The search reads every attempt's error, whatever its case.
    let (_, found) = viewer.get("/dashboard/jobs?q=timeout").await;
    assert_eq!(job_rows(&found), 1);
    assert!(found.contains(&deep.to_string()));
    let (_, probes) = viewer.get("/dashboard/jobs?kind=probe&status=failed&q=ON+PURPOSE").await;
    assert_eq!(job_rows(&probes), 25);
    assert!(link(&probes, "next").contains("kind=probe&status=failed&q=ON+PURPOSE"), "paging keeps the filters");
    // A search's wildcards are text.
    let (_, none) = viewer.get("/dashboard/jobs?q=%25").await;
    assert_eq!(job_rows(&none), 0);
    assert!(none.contains("class=\"empty\""), "an empty state says what to do");

    // Bad input is a 4xx page, never a raw error.
    for bad in [
        "/dashboard/jobs?kind=nope",
        "/dashboard/jobs?status=lost",
        "/dashboard/jobs?after=not-a-cursor",
        "/dashboard/jobs/not-a-job",
    ] {
        let (status, body) = viewer.get(bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body.contains("<html"), "{bad}: {body}");
    }
    let (status, _) = viewer.get(&format!("/dashboard/jobs/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_job_page_shows_every_attempt_and_only_admins_get_its_actions() {
    let app = jobs_app().await;
    let failed = seed(&app, "run-sweep", "failed", Some("the last <error>")).await;
    for n in 1..=2 {
        attempt_error(&app, failed, n, &format!("attempt {n} broke")).await;
    }
    let pending = seed(&app, "probe", "pending", None).await;

    let viewer = Operator::login(&app, VIEWER).await;
    let (status, page) = viewer.get(&format!("/dashboard/jobs/{failed}?kind=run-sweep")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("attempt 1 broke") && page.contains("attempt 2 broke"), "every attempt's error");
    assert!(page.contains("the last &#60;error&#62;"), "escaped");
    assert!(page.contains("&#34;kind&#34;: &#34;run-sweep&#34;") || page.contains("\"kind\": \"run-sweep\""));
    assert!(page.contains("5 of 5") && page.contains("/dashboard/jobs?kind=run-sweep"));
    assert!(!page.contains("data-action"), "a viewer sees no action buttons");
    let (_, page) = viewer.get(&format!("/dashboard/jobs/{pending}")).await;
    assert!(!page.contains("data-action") && page.contains("No attempt yet"));

    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get(&format!("/dashboard/jobs/{failed}")).await;
    assert!(page.contains("data-action=\"retry\"") && !page.contains("data-action=\"cancel\""));
    let (_, page) = admin.get(&format!("/dashboard/jobs/{pending}")).await;
    assert!(page.contains("data-action=\"cancel\"") && !page.contains("data-action=\"retry\""));
    let (_, list) = admin.get("/dashboard/jobs").await;
    assert_eq!(list.matches("name=\"ids\"").count(), 1, "only the failed job can be ticked");
    assert!(list.contains("data-action=\"retry-selected\"") && list.contains("data-action=\"retry-matching\""));
}

#[tokio::test]
async fn retry_and_cancel_need_an_admin_and_the_token_and_are_audited_in_their_transaction() {
    let app = jobs_app().await;
    let failed = seed(&app, "probe", "failed", Some("boom")).await;
    let pending = seed(&app, "probe", "pending", None).await;
    let retry = format!("/dashboard/jobs/{failed}/retry");
    let cancel = format!("/dashboard/jobs/{pending}/cancel");

    let viewer = Operator::login(&app, VIEWER).await;
    let admin = Operator::login(&app, ADMIN).await;
    for path in [&retry, &cancel] {
        assert_eq!(viewer.post(path, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(admin.post(path, None).await.status(), StatusCode::FORBIDDEN, "{path}: no CSRF token");
        assert_eq!(admin.post(path, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(row(&app, failed).await.status, JobStatus::Failed);
    assert_eq!(row(&app, pending).await.status, JobStatus::Pending);
    assert!(audit_rows(&app).await.is_empty());

    // The audit insert fails: the action rolls back with it.
    audit_log_gone(&app, true).await;
    for path in [&retry, &cancel] {
        let resp = admin.post(path, Some(&admin.csrf.clone())).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = resp.text().await.unwrap();
        assert!(body.contains("<html") && !body.contains("audit_log"), "{body}");
    }
    assert!(!was_retried(&app, failed).await && row(&app, failed).await.status == JobStatus::Failed);
    assert_eq!(row(&app, pending).await.status, JobStatus::Pending, "the cancel did not commit alone");
    audit_log_gone(&app, false).await;

    // Retry: back in line with a fresh budget, relayed, and it runs.
    let done = admin.post_form(&retry, &[("csrf", admin.csrf.as_str()), ("kind", "probe"), ("q", "a b")]).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&done), format!("/dashboard/jobs/{failed}?kind=probe&q=a+b&done=retry"));
    assert_eq!(row(&app, failed).await.max_attempts, 10);
    app.job_succeeded(10, "retried job", failed).await;
    // A job that is no longer failed is not retried again: a 409 page.
    let again = admin.post(&retry, Some(&admin.csrf.clone())).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert!(again.text().await.unwrap().contains("succeeded"));

    // Cancel: the pending job never starts, nor is it pushed again.
    let done = admin.post(&cancel, Some(&admin.csrf.clone())).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let canceled = row(&app, pending).await;
    assert_eq!(canceled.status, JobStatus::Canceled);
    assert!(canceled.finished_at.is_some());
    assert!(store::begin_attempt(app.db(), pending).await.unwrap().is_none(), "a delivery does nothing");
    app.state.jobs.queue(Lane::Engine).push(pending).await.unwrap();
    sqlx::query("UPDATE jobs SET relayed_at = NULL WHERE id = $1").bind(pending).execute(app.db()).await.unwrap();
    assert!(store::unrelayed(app.db(), -60_000, 100).await.unwrap().is_empty(), "the relay skips it");
    assert!(store::unfinished(app.db(), None, 100).await.unwrap().is_empty(), "so does a queue recovery");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!((row(&app, pending).await.status, row(&app, pending).await.attempts), (JobStatus::Canceled, 0));
    assert_eq!(admin.post(&cancel, Some(&admin.csrf.clone())).await.status(), StatusCode::CONFLICT);
    // Running or finished jobs cannot be canceled; unknown ones are not found.
    let running = seed(&app, "probe", "running", None).await;
    let resp = admin.post(&format!("/dashboard/jobs/{running}/cancel"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(row(&app, running).await.status, JobStatus::Running);
    let resp = admin.post(&format!("/dashboard/jobs/{failed}/cancel"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let resp = admin.post(&format!("/dashboard/jobs/{}/cancel", Uuid::now_v7()), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = admin.post(&format!("/dashboard/jobs/{failed}/explode"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "no such action");

    // A canceled job can be retried: it runs after all.
    let resp = admin.post(&format!("/dashboard/jobs/{pending}/retry"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    app.job_succeeded(10, "retried canceled job", pending).await;

    assert_eq!(
        audit_rows(&app).await,
        vec![
            ("job.retry".to_string(), format!("job:{failed}")),
            ("job.cancel".to_string(), format!("job:{pending}")),
            ("job.retry".to_string(), format!("job:{pending}")),
        ]
    );
    let (_, audit) = admin.get("/dashboard/audit").await;
    assert!(audit.contains("job.cancel"));
}

#[tokio::test]
async fn retry_selected_touches_only_the_ticked_failed_or_canceled_jobs() {
    let app = jobs_app().await;
    let a = seed(&app, "probe", "failed", Some("boom")).await;
    let b = seed(&app, "probe", "failed", Some("boom")).await;
    let c = seed(&app, "probe", "canceled", None).await;
    let done = seed(&app, "probe", "succeeded", None).await;
    let path = "/dashboard/jobs/retry-selected";
    let (a_s, c_s, done_s) = (a.to_string(), c.to_string(), done.to_string());

    let viewer = Operator::login(&app, VIEWER).await;
    let resp = viewer.post_form(path, &[("csrf", viewer.csrf.as_str()), ("ids", a_s.as_str())]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let admin = Operator::login(&app, ADMIN).await;
    assert_eq!(admin.post_form(path, &[("ids", a_s.as_str())]).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    assert_eq!(admin.post_form(path, &[("csrf", admin.csrf.as_str())]).await.status(), StatusCode::BAD_REQUEST);
    let resp = admin.post_form(path, &[("csrf", admin.csrf.as_str()), ("ids", "nope")]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = admin.post_form(path, &[("csrf", admin.csrf.as_str()), ("ids", done_s.as_str())]).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT, "nothing retryable selected");

    audit_log_gone(&app, true).await;
    let resp = admin.post_form(path, &[("csrf", admin.csrf.as_str()), ("ids", a_s.as_str())]).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!was_retried(&app, a).await, "rolled back with its audit row");
    audit_log_gone(&app, false).await;

    let form = [
        ("csrf", admin.csrf.as_str()),
        ("status", "failed"),
        ("ids", a_s.as_str()),
        ("ids", c_s.as_str()),
        ("ids", done_s.as_str()),
    ];
    let resp = admin.post_form(path, &form).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/dashboard/jobs?status=failed&retried=2");
    assert!(was_retried(&app, a).await);
    assert!(was_retried(&app, c).await, "a canceled job can be retried too");
    let b_row = row(&app, b).await;
    assert_eq!((b_row.status, b_row.max_attempts), (JobStatus::Failed, 5), "not ticked, not touched");
    let done_row = row(&app, done).await;
    assert_eq!((done_row.status, done_row.attempts), (JobStatus::Succeeded, 5));
    app.job_succeeded(10, "retried a", a).await;
    app.job_succeeded(10, "retried c", c).await;
    assert_eq!(audit_rows(&app).await, vec![("job.retry_selected".to_string(), "jobs:selected".to_string())]);
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail["count"], 2);
    let (_, page) = admin.get(&location(&resp)).await;
    assert!(page.contains("2 jobs queued again"), "the list says what happened");
}

#[tokio::test]
async fn retry_all_matching_touches_exactly_the_filtered_set_as_previewed() {
    let app = jobs_app().await;
    // Matching: failed probes whose last error, or an earlier attempt's, says timeout.
    let m1 = seed(&app, "probe", "failed", Some("Connection TIMEOUT to upstream")).await;
    let m2 = seed(&app, "probe", "failed", Some("read timeout")).await;
    let m3 = seed(&app, "probe", "failed", Some("refused")).await;
    attempt_error(&app, m3, 2, "a timeout first").await;
    // Not matching: another kind, another error, not failed.
    let other_kind = seed(&app, "run-sweep", "failed", Some("timeout")).await;
    let other_error = seed(&app, "probe", "failed", Some("disk full")).await;
    let succeeded = seed(&app, "probe", "succeeded", Some("timeout, then fine")).await;
    let pending = seed(&app, "probe", "pending", Some("timeout")).await;
    let canceled = seed(&app, "probe", "canceled", Some("timeout")).await;

    let viewer = Operator::login(&app, VIEWER).await;
    let preview = "/dashboard/jobs/retry-matching?kind=probe&status=failed&q=timeout";
    assert_eq!(viewer.get(preview).await.0, StatusCode::FORBIDDEN, "the preview is an admin's");
    let admin = Operator::login(&app, ADMIN).await;
    let (status, page) = admin.get(preview).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Retry 3 failed jobs of kind probe matching \u{2018}timeout\u{2019}?"), "{page}");
    let as_of = field(&page, "as_of");
    assert!(page.contains("data-action=\"retry-matching-confirm\""));
    // A job that fails after the preview is not part of what was confirmed.
    let late = seed(&app, "probe", "failed", Some("timeout, later")).await;

    let seen = field(&page, "seen");
    let form = |csrf: &str, as_of: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("kind".to_string(), "probe".to_string()),
            ("status".to_string(), "failed".to_string()),
            ("q".to_string(), "timeout".to_string()),
            ("as_of".to_string(), as_of.to_string()),
            ("seen".to_string(), seen.clone()),
        ]
    };
    let post = |f: Vec<(String, String)>| {
        let admin = &admin;
        async move {
            let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            admin.post_form("/dashboard/jobs/retry-matching", &pairs).await
        }
    };
    let resp = viewer
        .post_form(
            "/dashboard/jobs/retry-matching",
            &[("csrf", viewer.csrf.as_str()), ("kind", "probe"), ("as_of", as_of.as_str())],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(post(form("", &as_of)).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    assert_eq!(post(form(&admin.csrf, "")).await.status(), StatusCode::BAD_REQUEST, "no preview time");
    for seen in ["", "junk", "9:5:", "5:9:12", "1:2:3:4"] {
        let mut f = form(&admin.csrf, &as_of);
        f.retain(|(k, _)| k != "seen");
        f.push(("seen".to_string(), seen.to_string()));
        assert_eq!(post(f).await.status(), StatusCode::BAD_REQUEST, "preview snapshot {seen:?}");
    }

    audit_log_gone(&app, true).await;
    assert_eq!(post(form(&admin.csrf, &as_of)).await.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!was_retried(&app, m1).await, "rolled back with its audit row");
    audit_log_gone(&app, false).await;

    let resp = post(form(&admin.csrf, &as_of)).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/dashboard/jobs?kind=probe&status=failed&q=timeout&retried=3");
    for id in [m1, m2, m3] {
        assert!(was_retried(&app, id).await, "{id} matched");
    }
    for (id, status) in [
        (other_kind, JobStatus::Failed),
        (other_error, JobStatus::Failed),
        (late, JobStatus::Failed),
        (succeeded, JobStatus::Succeeded),
        (pending, JobStatus::Pending),
        (canceled, JobStatus::Canceled),
    ] {
        let r = row(&app, id).await;
        assert_eq!((r.status, r.max_attempts), (status, 5), "{id} was not to be touched");
    }
    assert_eq!(
        audit_rows(&app).await,
        vec![("job.retry_matching".to_string(), "jobs:kind=probe&status=failed&q=timeout".to_string())]
    );
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail["count"], 3);
    assert_eq!(detail["filter"], serde_json::json!({ "kind": "probe", "status": "failed", "q": "timeout" }));
    for id in [m1, m2, m3] {
        app.job_succeeded(10, "a retried probe", id).await;
    }

    // Nothing matches: the preview says so and offers no button.
    let (_, page) = admin.get("/dashboard/jobs/retry-matching?q=no+such+error").await;
    assert!(page.contains("Nothing to retry") && !page.contains("retry-matching-confirm"), "{page}");
    let (_, page) = admin.get("/dashboard/jobs/retry-matching?status=succeeded").await;
    assert!(page.contains("only failed or canceled jobs can be retried"), "{page}");
    let (status, _) = admin.get("/dashboard/jobs/retry-matching?kind=nope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Confirming again touches nothing more: no audit row for an empty retry.
    let resp = post(form(&admin.csrf, &as_of)).await;
    assert_eq!(location(&resp), "/dashboard/jobs?kind=probe&status=failed&q=timeout&retried=0");
    assert_eq!(audit_rows(&app).await.len(), 1);
}

#[tokio::test]
async fn a_probe_fails_on_purpose_and_succeeds_after_a_retry_from_the_dashboard() {
    let app = TestApp::spawn_with(|c| {
        c.job_retry_base_ms = 10;
        c.job_schedules_file = Some(schedules_file(&[]));
    })
    .await;
    with_operators(&app).await;
    quiet(&app).await;
    let job = app.state.jobs.submit_with_attempts(&Probe { fail_first: 3 }, 2).await.unwrap();
    let failed = eventually(10, "the probe failed its 2 attempts", || async {
        let r = row(&app, job).await;
        (r.status == JobStatus::Failed).then_some(r)
    })
    .await;
    assert_eq!(failed.attempts, 2);
    assert_eq!(failed.last_error.as_deref(), Some("probe: failing attempt 2 of 3 on purpose"));

    let admin = Operator::login(&app, ADMIN).await;
    let resp = admin.post(&format!("/dashboard/jobs/{job}/retry"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    app.job_succeeded(10, "the probe after a retry", job).await;
    let done = row(&app, job).await;
    assert_eq!(done.max_attempts, 7, "a fresh budget on top of the 2 spent");
    let attempts = store::attempts(app.db(), job).await.unwrap();
    let failed_then_ok: Vec<bool> = attempts.iter().take(4).map(|a| a.error.is_none()).collect();
    assert_eq!(failed_then_ok, [false, false, false, true], "attempt 3 failed, attempt 4 succeeded");
    let (_, page) = admin.get(&format!("/dashboard/jobs/{job}")).await;
    for n in 1..=3 {
        assert!(page.contains(&format!("probe: failing attempt {n} of 3 on purpose")), "attempt {n}: {page}");
    }
    assert!(page.contains("badge succeeded"));
}

#[tokio::test]
async fn the_cli_submits_a_probe() {
    let app = TestApp::spawn_without_sweeps().await;
    quiet(&app).await;
    let schema = sqlx::query_scalar::<_, String>("SELECT current_schema()").fetch_one(app.db()).await.unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(args)
            .env("DATABASE_URL", crate::common::database_url())
            .env("DATABASE_SCHEMA", &schema)
            .env("SESSIOND_MASTER_KEY", app.state.config.master_key.clone().unwrap())
            .env("REDIS_URL", &app.state.config.redis_url)
            .env("REDIS_PREFIX", &app.state.config.redis_prefix)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run sessiond");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (ok, out) = cli(&["jobs", "probe", "--fail", "1", "--max-attempts", "2"]);
    assert!(ok, "{out}");
    let id = Uuid::parse_str(&out).expect("the job id");
    app.job_succeeded(10, "the CLI's probe", id).await;
    assert_eq!(row(&app, id).await.attempts, 2);
    let (ok, _) = cli(&["jobs", "probe", "--fail", "1", "--max-attempts", "9"]);
    assert!(!ok, "more attempts than a push is retried are refused");
}

/// The form a retry-all-matching confirm posts: the filter, and the
/// preview's time and snapshot from the preview `page`.
async fn confirm_matching(op: &Operator, q: &str, page: &str) -> reqwest::Response {
    let (as_of, seen) = (field(page, "as_of"), field(page, "seen"));
    op.post_form(
        "/dashboard/jobs/retry-matching",
        &[
            ("csrf", op.csrf.as_str()),
            ("kind", "probe"),
            ("status", "failed"),
            ("q", q),
            ("as_of", &as_of),
            ("seen", &seen),
        ],
    )
    .await
}

/// The confirm retries what had failed at the preview's time, and nothing
/// that failed after it: a job the preview counted that was then retried
/// (on its own page) and failed again is left failed with the budget that
/// retry gave it, for the operator to see and preview anew. Its new failure
/// is not what they confirmed, and it was already retried once since.
#[tokio::test]
async fn a_job_that_fails_again_after_the_preview_is_left_to_a_new_preview() {
    let app = TestApp::spawn_with(|c| {
        c.job_retry_base_ms = 10;
        c.job_schedules_file = Some(schedules_file(&[]));
    })
    .await;
    with_operators(&app).await;
    quiet(&app).await;
    let seeded = seed(&app, "probe", "failed", Some("probe: failing on purpose, seeded")).await;
    let again = app.state.jobs.submit_with_attempts(&Probe { fail_first: 100 }, 1).await.unwrap();
    let first_failure = eventually(10, "the probe failed its attempt", || async {
        let r = row(&app, again).await;
        (r.status == JobStatus::Failed).then_some(r)
    })
    .await;
    assert_eq!(first_failure.attempts, 1);

    let admin = Operator::login(&app, ADMIN).await;
    let (status, page) = admin.get("/dashboard/jobs/retry-matching?kind=probe&status=failed&q=on+purpose").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("Retry 2 failed jobs of kind probe"), "{page}");

    // After the preview, the job is retried on its own and fails again.
    let resp = admin.post(&format!("/dashboard/jobs/{again}/retry"), Some(&admin.csrf.clone())).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let failed_again = eventually(20, "the retried probe failed again", || async {
        let r = row(&app, again).await;
        (r.status == JobStatus::Failed && r.attempts > 1).then_some(r)
    })
    .await;
    assert_eq!((failed_again.attempts, failed_again.max_attempts), (6, 6), "the single retry's budget, spent");

    let resp = confirm_matching(&admin, "on purpose", &page).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(location(&resp).ends_with("&retried=1"), "{}", location(&resp));
    assert!(was_retried(&app, seeded).await, "what had failed at the preview is retried");
    let r = row(&app, again).await;
    assert_eq!(
        (r.status, r.max_attempts, r.generation),
        (JobStatus::Failed, 6, failed_again.generation),
        "the failure after the preview is left alone"
    );
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log WHERE action = 'job.retry_matching'")
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(detail["count"], 1);

    // A new preview shows it, and its confirm retries it.
    let (_, page) = admin.get("/dashboard/jobs/retry-matching?kind=probe&status=failed&q=on+purpose").await;
    assert!(page.contains("Retry 1 failed job of kind probe"), "{page}");
    let resp = confirm_matching(&admin, "on purpose", &page).await;
    assert!(location(&resp).ends_with("&retried=1"), "{}", location(&resp));
    let r = row(&app, again).await;
    assert_eq!((r.max_attempts, r.generation), (11, failed_again.generation + 1), "retried once more, once");
}

/// Two confirms of the same preview at once (a double click, two operators)
/// retry each job once between them: the one that commits second finds the
/// jobs no longer failed. Both are held on the jobs' row locks until both
/// wait, so they truly overlap.
#[tokio::test]
async fn two_confirms_at_once_retry_each_job_once() {
    let app = jobs_app().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(seed(&app, "probe", "failed", Some("confirmed twice")).await);
    }
    let generation = row(&app, ids[0]).await.generation;
    let admin = Operator::login(&app, ADMIN).await;
    let other = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/jobs/retry-matching?kind=probe&status=failed&q=twice").await;
    assert!(page.contains("Retry 20 failed jobs"), "{page}");

    let mut holder = sessiond::db::begin(app.db()).await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *holder).await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = ANY($1) FOR UPDATE").bind(&ids).fetch_all(&mut *holder).await.unwrap();
    let release = async {
        eventually(20, "both confirms waiting on the jobs' locks", || async {
            // The first waiter queues on the holder; the second, on the
            // first's tuple lock.
            let waiting: i64 = sqlx::query_scalar(
                "WITH first AS (SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))
                 SELECT count(*) FROM pg_stat_activity
                 WHERE pid IN (SELECT pid FROM first) OR pg_blocking_pids(pid) && ARRAY(SELECT pid FROM first)",
            )
            .bind(holder_pid)
            .fetch_one(app.db())
            .await
            .unwrap();
            (waiting == 2).then_some(())
        })
        .await;
        holder.commit().await.unwrap();
    };
    let (a, b, ()) =
        futures::join!(confirm_matching(&admin, "twice", &page), confirm_matching(&other, "twice", &page), release);
    let mut counts: Vec<String> = [a, b]
        .iter()
        .map(|r| {
            assert_eq!(r.status(), StatusCode::SEE_OTHER);
            location(r).rsplit("retried=").next().unwrap().to_string()
        })
        .collect();
    counts.sort();
    assert_eq!(counts, ["0", "20"], "one confirm retried them all, the other none");
    for id in &ids {
        let r = row(&app, *id).await;
        assert_eq!((r.max_attempts, r.generation), (10, generation + 1), "{id} retried exactly once");
    }
    assert_eq!(audit_rows(&app).await.len(), 1, "one audited retry");
}

/// A failure is stamped when its transaction starts and seen when it
/// commits: one stamped before the preview but committed after it is not in
/// the preview's count, so the confirm must not retry it either, whether its
/// transaction took its id before the preview (it wrote before) or after
/// (it began before and wrote after).
#[tokio::test]
async fn a_failure_committed_after_the_preview_is_not_retried_by_its_confirm() {
    let app = jobs_app().await;
    let shown = seed(&app, "probe", "failed", Some("late commit")).await;
    let wrote_before = seed(&app, "probe", "running", None).await;
    let wrote_after = seed(&app, "probe", "running", None).await;
    let fail = "UPDATE jobs SET status = 'failed', last_error = 'late commit', finished_at = now() WHERE id = $1";
    // Both failures' transactions start (and so stamp) before the preview;
    // one writes before it...
    let mut early = sessiond::db::begin(app.db()).await.unwrap();
    sqlx::query(fail).bind(wrote_before).execute(&mut *early).await.unwrap();
    let mut late = sessiond::db::begin(app.db()).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *late).await.unwrap();
    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/jobs/retry-matching?kind=probe&status=failed&q=late+commit").await;
    assert!(page.contains("Retry 1 failed job of kind probe"), "{page}");
    // ...the other after it, once other transactions have taken ids (on a
    // busy server they do); both commit after it.
    for _ in 0..3 {
        sqlx::query("SELECT pg_current_xact_id()").execute(app.db()).await.unwrap();
    }
    sqlx::query(fail).bind(wrote_after).execute(&mut *late).await.unwrap();
    early.commit().await.unwrap();
    late.commit().await.unwrap();

    let resp = confirm_matching(&admin, "late commit", &page).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(was_retried(&app, shown).await);
    for id in [wrote_before, wrote_after] {
        let r = row(&app, id).await;
        assert_eq!((r.status, r.max_attempts), (JobStatus::Failed, 5), "{id}: not shown, so not retried");
    }
    assert!(location(&resp).ends_with("&retried=1"), "{}", location(&resp));
}
