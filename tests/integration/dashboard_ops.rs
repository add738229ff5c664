//! The dashboard's operations pages: schedules (next fire, last jobs),
//! replication health and backfills (off and on; starting a backfill), and
//! environments with key rotation: roles, CSRF, the audit row in the
//! action's transaction, and the new key shown once.

use reqwest::StatusCode;
use uuid::Uuid;

use crate::common::{eventually, TestApp};
use crate::dashboard::{with_operators, Operator, VIEWER};

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
