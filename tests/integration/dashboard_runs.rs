//! The dashboard's runs pages, a run's cancel, the session page's pending
//! waitpoints, and failed handoffs with their retry.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::sessions::failed_handoffs::{self, HandoffReason};
use sessiond::sessions::run_manager::Ensured;

use crate::common::{eventually, running_session, session_body, TestApp};
use crate::dashboard::{audit_rows, with_operators, Operator, ADMIN, VIEWER};
use sessiond::audit::Actor;

fn count(html: &str, needle: &str) -> usize {
    html.matches(needle).count()
}

/// The `href` of the link marked `rel="{rel}"`, unescaped.
fn link(html: &str, rel: &str) -> Option<String> {
    let end = html.find(&format!("\" rel=\"{rel}\""))?;
    let start = html[..end].rfind("href=\"")? + "href=\"".len();
    Some(html[start..end].replace("&#38;", "&").replace("&amp;", "&"))
}

/// The run id of a list's first row.
fn first_row(html: &str) -> Option<&str> {
    html.split("data-run-id=\"").nth(1)?.split('"').next()
}

async fn run_uuid(app: &TestApp, run: &str) -> uuid::Uuid {
    sqlx::query_scalar("SELECT id FROM task_runs WHERE friendly_id = $1").bind(run).fetch_one(app.db()).await.unwrap()
}

/// Makes the trigger-run job of `run` one that spent its attempts. Making a
/// real one fail five times would take a broken Redis for the length of its
/// backoff; this waits until the job has really run, then rewrites its row as
/// the job runtime leaves a job that failed for good (status, attempts, last
/// error, finish time).
pub async fn fail_trigger_job(app: &TestApp, run: &str) {
    let run_id = run_uuid(app, run).await.to_string();
    let job: uuid::Uuid = eventually(10, "the trigger-run job ran", || async {
        sqlx::query_scalar(
            "SELECT id FROM jobs WHERE kind = 'trigger-run' AND payload->>'run_id' = $1 AND status = 'succeeded'",
        )
        .bind(&run_id)
        .fetch_optional(app.db())
        .await
        .unwrap()
    })
    .await;
    sqlx::query(
        "UPDATE jobs SET status = 'failed', attempts = max_attempts, finished_at = now(),
             last_error = 'could not queue the run: injected failure'
         WHERE id = $1",
    )
    .bind(job)
    .execute(app.db())
    .await
    .unwrap();
}

/// A session whose manual hand-off failed: its current run is QUEUED and
/// its trigger-run job spent its attempts. Returns (session, stuck run).
pub async fn failed_manual_handoff(app: &TestApp, ext: &str) -> (String, String) {
    let s = app.create_session(session_body(Some(ext))).await;
    let session = s["id"].as_str().unwrap().to_string();
    let sid = app.session_uuid(&session).await;
    let stuck = app.state.runs.trigger_manual(app.a.env.id, sid, &Actor::Cli).await.unwrap();
    fail_trigger_job(app, &stuck).await;
    (session, stuck)
}

/// A session whose run completed and whose `.in` then got a record no run
/// was booted for (the append's follow-up stopped by the `faults` seam).
async fn unanswered_input(app: &TestApp, ext: &str) -> (String, String) {
    let (session, run) = running_session(app, ext).await;
    app.worker().complete(&run, json!({})).await.unwrap();
    app.state.appender.stop_before_boot(true);
    let (status, _) = app.append(&session, "in", &app.a.key, "anyone there?", &[]).await;
    app.state.appender.stop_before_boot(false);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "the injected stop before the boot");
    (session, run.id)
}

/// The session's runs as (friendly id, status), oldest first.
async fn runs_of(app: &TestApp, session: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT r.friendly_id, r.status FROM task_runs r JOIN sessions s ON s.id = r.session_id
         WHERE s.friendly_id = $1 ORDER BY r.created_at, r.id",
    )
    .bind(session)
    .fetch_all(app.db())
    .await
    .unwrap()
}

async fn audit_details(app: &TestApp, action: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT target, detail FROM audit_log WHERE action = $1 ORDER BY created_at")
        .bind(action)
        .fetch_all(app.db())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_runs_list_filters_pages_and_shows_an_empty_state() {
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    let mut first = String::new();
    for i in 0..28 {
        let s = app.create_session(session_body(Some(&format!("list-{i}")))).await;
        if i == 0 {
            first = s["id"].as_str().unwrap().to_string();
        }
    }
    let (other_session, executing) = running_session(&app, "other").await;
    let op = Operator::login(&app, VIEWER).await;
    let env = app.a.env.id;
    let rows = |html: &str| count(html, "<tr data-run-id=");

    let (status, page) = op.get(&format!("/dashboard/runs?env={env}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rows(&page), 25, "a page holds 25");
    assert!(page.contains(&format!("href=\"/dashboard/runs/{}\"", executing.id)), "newest first, linked");
    assert!(page.contains(&format!("href=\"/dashboard/sessions/{other_session}\"")), "its session, linked");
    assert!(link(&page, "prev").is_none());
    let older = link(&page, "next").expect("a link to older runs");
    assert!(older.contains("after=") && older.contains(&format!("env={env}")), "{older}");
    let (_, page2) = op.get(&older).await;
    assert_eq!(rows(&page2), 4);
    assert!(link(&page2, "next").is_none());
    let newer = link(&page2, "prev").expect("a link back to newer runs");
    let (_, back) = op.get(&newer).await;
    assert_eq!(rows(&back), 25);
    assert_eq!(first_row(&back), first_row(&page), "back to the same first row");

    let (_, by_status) = op.get(&format!("/dashboard/runs?env={env}&status=EXECUTING")).await;
    assert_eq!(rows(&by_status), 1);
    assert!(by_status.contains(&executing.id) && by_status.contains("1 of 3"), "attempt of max");
    let (_, by_task) = op.get(&format!("/dashboard/runs?env={env}&task=task-other")).await;
    assert_eq!(rows(&by_task), 1);
    let (_, by_session) = op.get(&format!("/dashboard/runs?env={env}&session={first}")).await;
    assert_eq!(rows(&by_session), 1);
    let (_, by_ext) = op.get(&format!("/dashboard/runs?env={env}&session=list-3")).await;
    assert_eq!(rows(&by_ext), 1, "a session's external id works too");
    let (_, unknown) = op.get(&format!("/dashboard/runs?env={env}&session=session_nope")).await;
    assert_eq!(rows(&unknown), 0);
    let (_, none) = op.get(&format!("/dashboard/runs?env={env}&status=TIMED_OUT")).await;
    assert_eq!(rows(&none), 0);
    assert!(none.contains("class=\"empty\"") && none.contains("No runs match"), "an empty state says what to do");
    let (_, other_env) = op.get(&format!("/dashboard/runs?env={}", app.b.env.id)).await;
    assert_eq!(rows(&other_env), 0);

    // Bad input: a 400 page, never a raw error.
    for bad in [
        format!("/dashboard/runs?env={env}&status=RUNNING"),
        format!("/dashboard/runs?env={env}&after=yesterday"),
        "/dashboard/runs?env=not-an-id".to_string(),
    ] {
        let (status, body) = op.get(&bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body.contains("<html") && body.contains("class=\"error\""), "{body}");
    }
    // The session page links its runs to their pages.
    let (_, session_page) = op.get(&format!("/dashboard/sessions/{other_session}")).await;
    assert!(session_page.contains(&format!("href=\"/dashboard/runs/{}\"", executing.id)));
}

#[tokio::test]
async fn the_run_page_and_the_session_page_show_waitpoints() {
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    let op = Operator::login(&app, VIEWER).await;
    let (session, run) = running_session(&app, "detail").await;

    let (_, before) = op.get(&format!("/dashboard/sessions/{session}")).await;
    assert!(before.contains("Pending waitpoints") && before.contains("No run is waiting"), "an empty state");

    let (status, wait) = app
        .post(
            &format!("/api/v1/runs/{}/session-streams/wait", run.id),
            &run.token,
            json!({"session": session, "io": "in", "timeout": "10m"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{wait}");
    let waitpoint = wait["waitpointId"].as_str().unwrap().to_string();

    let (_, page) = op.get(&format!("/dashboard/sessions/{session}")).await;
    let row = page.split(&format!("<tr data-waitpoint-id=\"{waitpoint}\">")).nth(1).expect("the waitpoint's row");
    let row = row.split("</tr>").next().unwrap();
    assert!(row.contains(&format!("href=\"/dashboard/runs/{}\"", run.id)) && row.contains(".in"), "{row}");
    assert!(row.contains("any record") && count(row, "<time datetime=") == 2, "after seq, created, timeout: {row}");

    let (status, detail) = op.get(&format!("/dashboard/runs/{}", run.id)).await;
    assert_eq!(status, StatusCode::OK);
    for expected in [
        format!("href=\"/dashboard/sessions/{session}\""),
        "initial".to_string(),
        "1 of 3".to_string(),
        "WAITING".to_string(),
        "alive".to_string(),
        "&#34;chatId&#34;: &#34;detail&#34;".to_string(),
        waitpoint.clone(),
    ] {
        assert!(detail.contains(&expected), "the run page shows {expected}");
    }
    assert!(!detail.contains("data-action"), "a viewer sees no cancel button");

    // An ended run: its output, its error-free end, no liveness.
    app.worker().complete(&run, json!({"answer": 42})).await.unwrap();
    let (_, done) = op.get(&format!("/dashboard/runs/{}", run.id)).await;
    assert!(done.contains("COMPLETED") && done.contains("&#34;answer&#34;: 42") && done.contains("not alive"));
    let (status, missing) = op.get("/dashboard/runs/run_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(missing.contains("<html") && missing.contains("No run run_nope"));
}

#[tokio::test]
async fn cancel_needs_an_admin_and_the_token_and_is_audited_with_its_job() {
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("to-cancel"))).await;
    let run = s["runId"].as_str().unwrap().to_string();
    let path = format!("/dashboard/runs/{run}/cancel");
    let cancel_jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE kind = 'cancel-run'")
            .fetch_one(app.db())
            .await
            .unwrap()
    };

    let viewer = Operator::login(&app, VIEWER).await;
    let (_, page) = viewer.get(&format!("/dashboard/runs/{run}")).await;
    assert!(page.contains(&run) && !page.contains("data-action"));
    assert_eq!(viewer.post(&path, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);

    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get(&format!("/dashboard/runs/{run}")).await;
    assert!(page.contains("data-action=\"cancel\""));
    assert_eq!(admin.post(&path, None).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    assert_eq!(admin.post(&path, Some("wrong")).await.status(), StatusCode::FORBIDDEN, "another token");
    assert_eq!(cancel_jobs().await, 0);

    // The audit insert fails: the cancel's job is rolled back with it.
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone").execute(app.db()).await.unwrap();
    let failed = admin.post(&path, Some(&admin.csrf.clone())).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = failed.text().await.unwrap();
    assert!(body.contains("<html") && !body.contains("audit_log"), "{body}");
    sqlx::query("ALTER TABLE audit_log_gone RENAME TO audit_log").execute(app.db()).await.unwrap();
    assert_eq!(cancel_jobs().await, 0, "no cancel job without its audit row");
    assert_eq!(app.run_status(&run).await, "QUEUED");

    let done = admin.post(&path, Some(&admin.csrf.clone())).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(done.headers()["location"].to_str().unwrap(), format!("/dashboard/runs/{run}"));
    eventually(10, "the cancel job canceled the run", || async {
        (app.run_status(&run).await == "CANCELED").then_some(())
    })
    .await;
    assert_eq!(audit_rows(&app).await, vec![("run.cancel".to_string(), format!("run:{run}"))]);
    let (_, detail) = audit_details(&app, "run.cancel").await.remove(0);
    let job = uuid::Uuid::parse_str(detail["job"].as_str().unwrap()).unwrap();
    app.job_succeeded(10, "the audited cancel job", job).await;

    // A final run: no button, and a POST is refused with a page.
    let (_, page) = admin.get(&format!("/dashboard/runs/{run}")).await;
    assert!(page.contains("CANCELED") && !page.contains("data-action=\"cancel\""));
    let refused = admin.post(&path, Some(&admin.csrf.clone())).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused.text().await.unwrap().contains("cannot be canceled"));
    assert_eq!(cancel_jobs().await, 1);
}

#[tokio::test]
async fn the_api_cancel_writes_the_same_durable_job() {
    let app = TestApp::spawn_without_sweeps().await;
    let s = app.create_session(session_body(Some("api-cancel"))).await;
    let run = s["runId"].as_str().unwrap().to_string();
    let (status, body) = app.post(&format!("/api/v2/runs/{run}/cancel"), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job = uuid::Uuid::parse_str(body["jobId"].as_str().unwrap()).unwrap();
    app.job_succeeded(10, "the cancel job", job).await;
    assert_eq!(app.run_status(&run).await, "CANCELED");
}

#[tokio::test]
async fn the_handoffs_page_lists_both_kinds_and_a_retry_replaces_the_stuck_run_once() {
    // No cron: the input-boot sweep would boot a run for the unanswered record.
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let (status, empty) = viewer.get("/dashboard/handoffs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(empty.contains("class=\"empty\"") && empty.contains("No failed handoffs"), "the empty state");

    let (failed, stuck) = failed_manual_handoff(&app, "failed-manual").await;
    let (waiting, ended) = unanswered_input(&app, "unanswered").await;
    // Served, or waiting for nothing: not listed.
    app.create_session(session_body(Some("healthy"))).await;
    let (idle, idle_run) = running_session(&app, "idle").await;
    app.worker().complete(&idle_run, json!({})).await.unwrap();

    let (_, page) = viewer.get("/dashboard/handoffs").await;
    assert_eq!(count(&page, "<tr data-session-id="), 2, "{page}");
    let row = |html: &str, session: &str| -> String {
        let rest = html.split(&format!("<tr data-session-id=\"{session}\">")).nth(1).unwrap_or_default();
        rest.split("</tr>").next().unwrap_or_default().to_string()
    };
    let manual = row(&page, &failed);
    assert!(manual.contains("manual") && manual.contains(&stuck) && manual.contains("QUEUED"), "{manual}");
    assert!(manual.contains("injected failure"), "the failed job's last error: {manual}");
    let input = row(&page, &waiting);
    assert!(input.contains("unanswered input") && input.contains(&ended) && input.contains("COMPLETED"), "{input}");
    assert!(!page.contains(&idle) && !page.contains("data-action"), "a viewer sees no retry button");
    let (_, stuck_page) = viewer.get(&format!("/dashboard/runs/{stuck}")).await;
    assert!(stuck_page.contains("not alive") && stuck_page.contains("stuck: its trigger-run job failed"));

    // A scan examines a bounded number of sessions and goes on from the last.
    let mut after = None;
    let mut found = Vec::new();
    let mut pages = 0;
    loop {
        let scan = failed_handoffs::scan(app.db(), &app.state.runs, after, 1, 25).await.unwrap();
        assert_eq!(scan.examined, 1);
        found.extend(scan.found.iter().map(|f| (f.session.friendly_id.clone(), f.reason)));
        pages += 1;
        match scan.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(pages >= 4, "one page per open session");
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![(failed.clone(), HandoffReason::Manual), (waiting.clone(), HandoffReason::UnansweredInput)];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(found, expected);

    let retry = format!("/dashboard/handoffs/{failed}/retry");
    assert_eq!(viewer.post(&retry, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);
    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/handoffs").await;
    assert_eq!(count(&page, "data-action=\"retry\""), 2);
    assert_eq!(admin.post(&retry, None).await.status(), StatusCode::FORBIDDEN, "no CSRF token");

    // The audit insert fails: the claim, the new run and the cancel roll back.
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone").execute(app.db()).await.unwrap();
    assert_eq!(admin.post(&retry, Some(&admin.csrf.clone())).await.status(), StatusCode::INTERNAL_SERVER_ERROR);
    sqlx::query("ALTER TABLE audit_log_gone RENAME TO audit_log").execute(app.db()).await.unwrap();
    let before = runs_of(&app, &failed).await;
    assert_eq!(before.len(), 2);
    assert_eq!(before[1], (stuck.clone(), "QUEUED".to_string()), "nothing committed without the audit row");
    assert!(audit_details(&app, "handoff.retry").await.is_empty());

    // Two retries at once: one continuation; the stuck run is canceled.
    let csrf = admin.csrf.clone();
    let (a, b) = tokio::join!(admin.post(&retry, Some(&csrf)), admin.post(&retry, Some(&csrf)));
    assert_eq!((a.status(), b.status()), (StatusCode::SEE_OTHER, StatusCode::SEE_OTHER));
    let after_retry = runs_of(&app, &failed).await;
    assert_eq!(after_retry.len(), 3, "exactly one new run: {after_retry:?}");
    assert_eq!(after_retry[1], (stuck.clone(), "CANCELED".to_string()));
    let (new_run, new_status) = after_retry[2].clone();
    assert_eq!(new_status, "QUEUED");
    let reason: String = sqlx::query_scalar(
        "SELECT sr.reason FROM session_runs sr JOIN task_runs r ON r.id = sr.run_id WHERE r.friendly_id = $1",
    )
    .bind(&new_run)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert_eq!(reason, "continuation");
    assert_eq!(
        audit_details(&app, "handoff.retry").await,
        vec![(format!("session:{failed}"), json!({"reason": "manual", "run": new_run, "canceled": stuck}))]
    );

    // A live run now: a retry (from the page, or straight to the run manager) does nothing.
    assert_eq!(admin.post(&retry, Some(&csrf)).await.status(), StatusCode::SEE_OTHER);
    let operator: uuid::Uuid = sqlx::query_scalar("SELECT id FROM operators WHERE email = $1")
        .bind(ADMIN.0)
        .fetch_one(app.db())
        .await
        .unwrap();
    let sid = app.session_uuid(&failed).await;
    let again = app
        .state
        .runs
        .retry_handoff(app.a.env.id, sid, &Actor::Operator(operator), HandoffReason::Manual)
        .await
        .unwrap();
    assert_eq!(again, Ensured::Alive(new_run.clone()));
    assert_eq!(runs_of(&app, &failed).await.len(), 3);
    assert_eq!(audit_details(&app, "handoff.retry").await.len(), 1);

    // Unanswered input: a continuation; the ended run is left as it was.
    let done = admin.post(&format!("/dashboard/handoffs/{waiting}/retry"), Some(&csrf)).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(done.headers()["location"].to_str().unwrap(), "/dashboard/handoffs");
    let runs = runs_of(&app, &waiting).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0], (ended, "COMPLETED".to_string()));
    let details = audit_details(&app, "handoff.retry").await;
    assert_eq!(details[1].1, json!({"reason": "unanswered input", "run": runs[1].0, "canceled": null}));

    let (_, page) = admin.get("/dashboard/handoffs").await;
    assert_eq!(count(&page, "<tr data-session-id="), 0, "both left the page");
    assert!(page.contains("No failed handoffs"));

    // A closed session runs nothing: a 400 page, no run, no audit row.
    let (closed, _) = failed_manual_handoff(&app, "closed").await;
    let (status, _) = app.post(&format!("/api/v1/sessions/{closed}/close"), &app.a.key, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let refused = admin.post(&format!("/dashboard/handoffs/{closed}/retry"), Some(&csrf)).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(refused.text().await.unwrap().contains("closed"));
    assert_eq!(runs_of(&app, &closed).await.len(), 2);
    assert_eq!(audit_details(&app, "handoff.retry").await.len(), 2);
}

/// A session's page shows its newest runs as a timeline and links to the
/// paged runs list for the rest; the list, filtered to the session, has them all.
#[tokio::test]
async fn the_session_page_shows_its_newest_runs_and_links_to_every_run() {
    let app = TestApp::spawn_without_sweeps().await;
    with_operators(&app).await;
    let s = app.create_session(session_body(Some("many-runs"))).await;
    let id = s["id"].as_str().unwrap().to_string();
    let sid = app.session_uuid(&id).await;
    let mut newest = String::new();
    for _ in 0..26 {
        newest = app.state.runs.trigger_manual(app.a.env.id, sid, &Actor::Cli).await.unwrap();
    }
    let op = Operator::login(&app, VIEWER).await;
    let (_, page) = op.get(&format!("/dashboard/sessions/{id}")).await;
    assert_eq!(count(&page, "<tr data-run-id="), 25, "the newest 25 of 27 runs");
    assert!(!page.contains(s["runId"].as_str().unwrap()), "the first run is on the runs list only");
    let last_row = page.rfind("<tr data-run-id=").unwrap();
    assert!(page[last_row..].starts_with(&format!("<tr data-run-id=\"{newest}\"")), "oldest first, newest last");
    let link = format!("/dashboard/runs?env={}&amp;session={id}", app.a.env.id);
    assert!(page.contains(&link) || page.contains(&link.replace("&amp;", "&#38;")), "a link to every run");

    let (_, first) = op.get(&format!("/dashboard/runs?env={}&session={id}", app.a.env.id)).await;
    assert_eq!(count(&first, "<tr data-run-id="), 25);
    assert!(first.contains("rel=\"next\""), "the rest are a page away");

    // A session with few runs has no such link.
    let few = app.create_session(session_body(Some("few-runs"))).await;
    let (_, page) = op.get(&format!("/dashboard/sessions/{}", few["id"].as_str().unwrap())).await;
    assert!(!page.contains("id=\"more-runs\""));
}
