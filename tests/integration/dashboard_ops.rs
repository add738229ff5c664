//! The dashboard's operations pages: schedules (next fire, last jobs),
//! replication health and backfills (off and on; starting a backfill), and
//! environments with key rotation: roles, CSRF, the audit row in the
//! action's transaction, and the new key shown once.

use std::time::Duration;

use reqwest::header::{CACHE_CONTROL, LOCATION};
use reqwest::StatusCode;
use sessiond::analytics::backfill::{self, BackfillStatus};
use uuid::Uuid;

use crate::common::{eventually, session_body, TestApp};
use crate::dashboard::{audit_rows, with_operators, Operator, ADMIN, VIEWER};
use crate::replication::{finish, replicating};

/// Renames `audit_log` away for the length of `f`: the action's audit insert
/// fails, so the action must roll back with it.
async fn without_audit_log<T>(app: &TestApp, f: impl std::future::Future<Output = T>) -> T {
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_gone").execute(app.db()).await.unwrap();
    let out = f.await;
    sqlx::query("ALTER TABLE audit_log_gone RENAME TO audit_log").execute(app.db()).await.unwrap();
    out
}

/// A 500 that is a dashboard page and names no SQL.
async fn assert_error_page(resp: reqwest::Response) {
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = resp.text().await.unwrap();
    assert!(body.contains("<html") && !body.contains("audit_log"), "{body}");
}

const SCHEDULES: &str = "\
[run-sweep]
# Finds crashed runs
# and due retries.
cron = \"* * * * * *\"

[session-expiry-sweep]
cron = \"0 0 3 * * *\"
";

#[tokio::test]
async fn the_schedules_page_shows_each_sweep_its_next_fire_and_last_jobs() {
    let path = std::env::temp_dir().join(format!("sessiond-ops-schedules-{}.toml", Uuid::now_v7()));
    std::fs::write(&path, SCHEDULES).unwrap();
    let file = path.to_str().unwrap().to_string();
    let app = TestApp::spawn_with(|c| c.job_schedules_file = Some(file)).await;
    with_operators(&app).await;
    // A failed expiry sweep, as if its last tick had broken.
    let failed = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, finished_at)
         VALUES ($1, 'session-expiry-sweep', '{\"kind\": \"session-expiry-sweep\"}', 'failed', 5, 5,
                 'the sweep broke on purpose', now(), now())",
    )
    .bind(failed)
    .execute(app.db())
    .await
    .unwrap();
    let swept: Uuid = eventually(10, "a run-sweep to succeed", || async {
        sqlx::query_scalar(
            "SELECT id FROM jobs WHERE kind = 'run-sweep' AND status = 'succeeded' ORDER BY created_at DESC LIMIT 1",
        )
        .fetch_optional(app.db())
        .await
        .unwrap()
    })
    .await;

    let viewer = Operator::login(&app, VIEWER).await;
    let (status, page) = viewer.get("/dashboard/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("data-schedule=\"run-sweep\"") && page.contains("data-schedule=\"session-expiry-sweep\""));
    assert!(page.contains("* * * * * *") && page.contains("0 0 3 * * *"), "the cron expressions");
    assert!(page.contains("Finds crashed runs and due retries."), "the schedule's comment");
    assert!(page.contains("T03:00:00Z\""), "the expiry sweep's next fire is at 03:00 UTC");
    assert!(page.contains(&format!("/dashboard/jobs/{swept}")), "a link to the newest run-sweep job");
    assert!(page.contains(&format!("/dashboard/jobs/{failed}")) && page.contains("the sweep broke on purpose"));
    assert!(page.contains("aria-current=\"page\">Schedules"));
    assert!(!page.contains("data-action"), "nothing to act on");
    std::fs::remove_file(path).ok();
}

#[tokio::test]
async fn the_schedules_page_shows_what_the_server_loaded_after_the_file_changes() {
    let path = std::env::temp_dir().join(format!("sessiond-ops-schedules-{}.toml", Uuid::now_v7()));
    std::fs::write(&path, SCHEDULES).unwrap();
    let file = path.to_str().unwrap().to_string();
    let app = TestApp::spawn_with(|c| c.job_schedules_file = Some(file)).await;
    with_operators(&app).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let loaded = |page: &str| {
        page.contains("data-schedule=\"run-sweep\"")
            && page.contains("data-schedule=\"session-expiry-sweep\"")
            && page.contains("0 0 3 * * *")
            && page.contains("Finds crashed runs and due retries.")
            && !page.contains("data-schedule=\"waitpoint-timeout-sweep\"")
    };
    let (status, page) = viewer.get("/dashboard/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert!(loaded(&page), "{page}");

    // Edited after the start: the cron still runs what was loaded, and so
    // does the page show it.
    std::fs::write(&path, "[waitpoint-timeout-sweep]\ncron = \"0 0 4 * * *\"\n").unwrap();
    let (status, page) = viewer.get("/dashboard/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert!(loaded(&page) && !page.contains("0 0 4 * * *"), "the edit shows nowhere: {page}");

    // Deleted, or made unreadable as TOML: still the loaded ones, no error.
    std::fs::write(&path, "this is [ not toml").unwrap();
    let (status, page) = viewer.get("/dashboard/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert!(loaded(&page), "{page}");
    std::fs::remove_file(&path).unwrap();
    let (status, page) = viewer.get("/dashboard/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert!(loaded(&page), "{page}");
}

/// Backfills and backfill chunk jobs written so far.
async fn backfill_counts(app: &TestApp) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM clickhouse_backfills), (SELECT count(*) FROM jobs WHERE kind = 'backfill')",
    )
    .fetch_one(app.db())
    .await
    .unwrap()
}

/// Starts a backfill from the page as `admin` after the refusals every action
/// owes (viewer, missing token, audit insert failing): each leaves nothing.
/// (A server replicating through a new slot starts a backfill of its own.)
async fn start_backfill_checked(app: &TestApp, admin: &Operator, viewer: &Operator) {
    let start = "/dashboard/replication/backfill";
    let before = backfill_counts(app).await;
    assert_eq!(viewer.post(start, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(admin.post(start, None).await.status(), StatusCode::FORBIDDEN, "no CSRF token");
    assert_eq!(admin.post(start, Some(&viewer.csrf.clone())).await.status(), StatusCode::FORBIDDEN);
    without_audit_log(app, async { assert_error_page(admin.post(start, Some(&admin.csrf.clone())).await).await }).await;
    assert_eq!(backfill_counts(app).await, before, "refused starts wrote no backfill, nor a chunk job");
    assert!(audit_rows(app).await.is_empty());

    let done = admin.post(start, Some(&admin.csrf.clone())).await;
    assert_eq!(
        (done.status(), done.headers()[LOCATION].to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/dashboard/replication")
    );
    assert_eq!(audit_rows(app).await, vec![("clickhouse.backfill".to_string(), "clickhouse".to_string())]);
    let backfills = backfill::store::list(app.db(), 2).await.unwrap();
    assert_eq!(backfill_counts(app).await.0, before.0 + 2, "one per table");
    assert!(backfills.iter().all(|b| b.is_full()));
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert_eq!(detail["backfills"].as_array().unwrap().len(), 2, "{detail}");
}

/// Waits until every backfill completed and the page says so with its rows.
async fn backfills_done(app: &TestApp, op: &Operator) -> String {
    eventually(30, "the backfills to complete", || async {
        let all = backfill::store::list(app.db(), 10).await.unwrap();
        all.iter().all(|b| b.status == BackfillStatus::Completed).then_some(())
    })
    .await;
    let (status, page) = op.get("/dashboard/replication").await;
    assert_eq!(status, StatusCode::OK);
    let rows = page.matches("<tr data-backfill-id=").count();
    assert!(rows >= 2 && page.matches("badge completed").count() == rows, "{page}");
    page
}

#[tokio::test]
async fn with_replication_off_the_page_says_so_and_a_backfill_runs_to_completion() {
    let app = TestApp::spawn().await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    for i in 0..3 {
        app.create_session(session_body(Some(&format!("ops-{i}")))).await;
    }
    let viewer = Operator::login(&app, VIEWER).await;
    let (status, page) = viewer.get("/dashboard/replication").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"replication-off\""), "replication off, said plainly");
    assert!(page.contains("No backfill has run") && !page.contains("data-action"), "a viewer gets no button");
    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/replication").await;
    assert!(page.contains("data-action=\"start-backfill\"") && page.contains("data-confirm="));

    start_backfill_checked(&app, &admin, &viewer).await;
    let page = backfills_done(&app, &viewer).await;
    // Three sessions and their three runs, one table each.
    assert!(page.contains("data-label=\"Rows copied\" class=\"num\">3</td>"), "rows copied shown: {page}");
    assert!(page.contains("every row"));
}

#[tokio::test]
async fn with_replication_on_the_page_shows_the_slot_flushes_and_backfills() {
    let app = TestApp::spawn_with(replicating).await;
    app.clickhouse_ready().await;
    with_operators(&app).await;
    let slot = app.state.config.replication_slot_name();
    app.create_session(session_body(Some("ops-replicated"))).await;
    let viewer = Operator::login(&app, VIEWER).await;
    let page = eventually(20, "a flush to show on the page", || async {
        let (_, page) = viewer.get("/dashboard/replication").await;
        (page.contains("from commit to visible") && page.contains("badge executing\">active")).then_some(page)
    })
    .await;
    assert!(page.contains(&slot) && !page.contains("replication-off"));
    assert!(page.contains("fencing token"), "the lease holder");
    assert!(page.contains("Confirmed LSN") && page.contains("Retained WAL"));
    assert!(!page.contains("data-action"));

    // A batch whose flush keeps failing (ClickHouse away): listed with its
    // age, rows and the job's error, linked to the job. Its job waits an hour
    // for its next attempt, so nothing runs it meanwhile.
    let job = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, status, attempts, max_attempts, last_error, relayed_at, run_at)
         VALUES ($1, 'probe', '{\"kind\": \"probe\", \"fail_first\": 99}', 'pending', 2, 5,
                 'clickhouse is away on purpose', now(), now() + interval '1 hour')",
    )
    .bind(job)
    .execute(app.db())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO replication_flushes (id, slot, start_lsn, end_lsn, commit_time, row_count, rows, job_id, created_at)
         VALUES ($1, $2, '0/1', '0/2', now(), 7, '[]', $3, now() - interval '90 seconds')",
    )
    .bind(Uuid::now_v7())
    .bind(&slot)
    .bind(job)
    .execute(app.db())
    .await
    .unwrap();
    let (_, page) = viewer.get("/dashboard/replication").await;
    assert!(page.contains("table id=\"flushes\"") && page.contains(&format!("/dashboard/jobs/{job}")), "{page}");
    assert!(
        page.contains("clickhouse is away on purpose") && page.contains("data-label=\"Rows\" class=\"num\">7</td>")
    );
    assert!(page.contains("rows), the oldest"), "the oldest pending batch's age: {page}");

    let admin = Operator::login(&app, ADMIN).await;
    start_backfill_checked(&app, &admin, &viewer).await;
    backfills_done(&app, &admin).await;
    finish(app).await;
}

/// The new key on the page that answered the rotation.
fn shown_key(page: &str) -> String {
    let at = page.find("id=\"new-key\"").expect("the new key") + "id=\"new-key\"".len();
    let rest = &page[at..];
    let start = rest.find('>').unwrap() + 1;
    rest[start..].split('<').next().unwrap().trim().to_string()
}

fn hint_field(page: &str, env: Uuid) -> String {
    let row = &page[page.find(&format!("data-env-id=\"{env}\"")).unwrap()..];
    let at = row.find("name=\"hint\" value=\"").unwrap() + "name=\"hint\" value=\"".len();
    row[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn rotating_a_key_shows_the_new_key_once_and_the_old_one_stops_working() {
    let app = TestApp::spawn_with(|c| c.auth_cache_ttl_ms = 200).await;
    with_operators(&app).await;
    let env = app.a.env.id;
    let old = app.a.key.clone();
    assert_eq!(app.get("/api/v1/sessions", &old).await.0, StatusCode::OK, "the old key works, and is cached");
    let rotate = format!("/dashboard/environments/{env}/rotate-key");

    let viewer = Operator::login(&app, VIEWER).await;
    let (status, page) = viewer.get("/dashboard/environments").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&env.to_string()) && page.contains(&app.b.env.id.to_string()));
    assert!(page.contains("org-a") && page.contains(&old[..12]), "organization and key hint");
    assert!(!page.contains(&old) && !page.contains(&app.b.key), "never a key");
    assert!(!page.contains("data-action"), "a viewer gets no button");

    let admin = Operator::login(&app, ADMIN).await;
    let (_, page) = admin.get("/dashboard/environments").await;
    assert!(page.contains("data-action=\"rotate-key\"") && !page.contains(&old));
    let hint = hint_field(&page, env);
    assert_eq!(
        viewer.post_form(&rotate, &[("csrf", &viewer.csrf), ("hint", &hint)]).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(admin.post_form(&rotate, &[("hint", &hint)]).await.status(), StatusCode::FORBIDDEN, "no token");
    without_audit_log(&app, async {
        assert_error_page(admin.post_form(&rotate, &[("csrf", &admin.csrf), ("hint", &hint)]).await).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get("/api/v1/sessions", &old).await.0, StatusCode::OK, "refused rotations changed no key");
    assert!(audit_rows(&app).await.is_empty());

    let done = admin.post_form(&rotate, &[("csrf", &admin.csrf), ("hint", &hint)]).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert_eq!(done.headers()[CACHE_CONTROL], "no-store");
    let page = done.text().await.unwrap();
    let new = shown_key(&page);
    assert!(new.starts_with("tr_dev_") && new != old, "{new}");
    assert_eq!(audit_rows(&app).await, vec![("environment.rotate_key".to_string(), format!("environment:{env}"))]);
    let detail: String = sqlx::query_scalar("SELECT detail::text FROM audit_log").fetch_one(app.db()).await.unwrap();
    assert!(!detail.contains(&new), "the audit row holds no key: {detail}");

    // Shown once: the list shows its hint only, and the same form again
    // (a reload of the response) rotates nothing.
    let (_, list) = admin.get("/dashboard/environments").await;
    assert!(!list.contains(&new) && list.contains(&new[..12]));
    let again = admin.post_form(&rotate, &[("csrf", &admin.csrf), ("hint", &hint)]).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert!(!again.text().await.unwrap().contains(&new));
    assert_eq!(audit_rows(&app).await.len(), 1);

    // Past the key cache's lifetime the old key is refused; the new one works.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get("/api/v1/sessions", &old).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/v1/sessions", &new).await.0, StatusCode::OK);
    let bad =
        admin.post_form("/dashboard/environments/nope/rotate-key", &[("csrf", &admin.csrf), ("hint", &hint)]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

/// The `href` of the pager link marked `rel`, unescaped (askama escapes `&`).
fn pager_link(page: &str, rel: &str) -> Option<String> {
    let pager = &page[page.rfind("class=\"pager\"")?..];
    let at = pager.find(&format!("rel=\"{rel}\""))?;
    let href = pager[..at].rsplit("href=\"").next()?;
    Some(href.split('"').next()?.replace("&amp;", "&").replace("&#x2B;", "+"))
}

/// The backfill ids a page lists, in its order.
fn backfill_ids(page: &str) -> Vec<String> {
    page.split("<tr data-backfill-id=\"").skip(1).map(|r| r.split('"').next().unwrap().to_string()).collect()
}

#[tokio::test]
async fn the_backfills_list_pages_older_and_newer() {
    let app = TestApp::spawn().await;
    with_operators(&app).await;
    // 30 finished backfills, a second apart, and two started in the same
    // instant (as a full backfill's pair is), which only the id orders.
    for i in 0..30 {
        sqlx::query(
            "INSERT INTO clickhouse_backfills (id, target, chunk_size, status, started_at, completed_at)
             VALUES ($1, 'sessions', 500, 'completed', now() - make_interval(secs => $2), now())",
        )
        .bind(Uuid::now_v7())
        .bind(f64::from(100 - i))
        .execute(app.db())
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO clickhouse_backfills (id, target, chunk_size, status, started_at, completed_at)
         SELECT x, 'runs', 500, 'completed', now() - interval '1 hour', now() FROM unnest($1::uuid[]) x",
    )
    .bind(vec![Uuid::now_v7(), Uuid::now_v7()])
    .execute(app.db())
    .await
    .unwrap();
    let all: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM clickhouse_backfills ORDER BY started_at DESC, id DESC")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(all.len(), 32);
    let viewer = Operator::login(&app, VIEWER).await;

    let (status, first) = viewer.get("/dashboard/replication").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backfill_ids(&first), all[..25], "the newest 25, newest first");
    assert_eq!(pager_link(&first, "prev"), None, "nothing newer than the newest");
    let older = pager_link(&first, "next").expect("an older link");
    assert!(older.starts_with("/dashboard/replication?after="), "{older}");

    let (status, second) = viewer.get(&older).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backfill_ids(&second), all[25..], "the rest, the same-instant pair included");
    assert_eq!(pager_link(&second, "next"), None, "nothing older than the oldest");
    let newer = pager_link(&second, "prev").expect("a newer link");
    assert!(newer.starts_with("/dashboard/replication?before="), "{newer}");

    let (status, back) = viewer.get(&newer).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backfill_ids(&back), all[..25], "newer than the second page is the first");
    assert_eq!(pager_link(&back, "prev"), None);
    assert!(pager_link(&back, "next").is_some());

    let (status, _) = viewer.get("/dashboard/replication?after=yesterday").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a cursor that is none");
}
