//! The dashboard in headless Chromium (see `browser`): `tests/browser/dashboard.mjs` signs in,
//! filters, watches an `.out` record arrive live, opens the runs pages and
//! retries a failed handoff, retries a failed probe job from its page and
//! sees it succeed, opens the schedules, starts a backfill and watches it
//! complete, rotates a key and sees it once, sets an environment's rate
//! limit, checks the viewer's view, and
//! tours every page at 1280 px and at 390 px (no sideways scroll, the page's
//! main control tappable on a phone), saving a screenshot of each page at
//! both widths under `target/test-artifacts/dashboard/`.

use std::time::Duration;

use crate::browser;
use crate::common::{eventually, session_body, TestApp};
use crate::dashboard::{with_operators, ADMIN, VIEWER};
use crate::dashboard_runs::failed_manual_handoff;

/// Checks the script runs; update with the script.
const CHECKS: usize = 43;

#[tokio::test]
async fn the_dashboard_in_a_browser() {
    let app = TestApp::spawn().await;
    // The operations checks start a backfill into ClickHouse.
    app.clickhouse_ready().await;
    with_operators(&app).await;
    for i in 0..12 {
        let mut body = session_body(Some(&format!("browser-{i}")));
        body["tags"] = serde_json::json!(if i % 4 == 0 { vec!["gold"] } else { vec!["tin"] });
        app.create_session(body).await;
    }
    let live = app.create_session(session_body(Some("browser-live"))).await;
    let live = live["id"].as_str().unwrap().to_string();
    // Probe jobs (they fail on purpose) that have failed every attempt: one
    // whose next attempt succeeds, for the admin to retry, and one that
    // stays failed, for the viewer's look.
    // The server's start-up queue check done first, so it pushes neither a
    // second time.
    app.job_queue_ready().await;
    let probe = failed_probe(&app, 2).await;
    let stuck = failed_probe(&app, 99).await;
    let (handoff, _) = failed_manual_handoff(&app, "browser-handoff-retried").await;
    let (handoff_kept, _) = failed_manual_handoff(&app, "browser-handoff-kept").await;
    let shots = browser::screenshots("dashboard");
    let env = [
        ("ADMIN_EMAIL", ADMIN.0.to_string()),
        ("ADMIN_PASSWORD", ADMIN.1.to_string()),
        ("VIEWER_EMAIL", VIEWER.0.to_string()),
        ("VIEWER_PASSWORD", VIEWER.1.to_string()),
        ("FILTER_TAG", "gold".to_string()),
        ("FILTER_MATCHES", "3".to_string()),
        ("LIVE_SESSION", live.clone()),
        ("PROBE_JOB", probe.to_string()),
        ("STUCK_JOB", stuck.to_string()),
        ("HANDOFF_SESSION", handoff),
        ("HANDOFF_KEEP", handoff_kept),
        ("ROTATE_ENV", app.b.env.id.to_string()),
    ];
    browser::run("dashboard.mjs", &app.base, &env, &shots, CHECKS, Duration::from_secs(120), |line| {
        let app = &app;
        let live = &live;
        async move {
            if line == "waiting-for-out" {
                // The page is subscribed: a record appended now must appear
                // live, its CR and LF shown as sent (not read as SSE framing).
                let (status, _) = app.append(live, "out", &app.a.key, LIVE_RECORD, &[]).await;
                assert_eq!(status, 200);
            }
        }
    })
    .await;
    assert!(browser::screenshot_count(&shots) >= 6, "a screenshot of each check");
    // The tour's: each page at both widths.
    let names: Vec<String> = std::fs::read_dir(&shots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-tour-"))
        .collect();
    let desktop: Vec<&String> = names.iter().filter(|n| n.ends_with("-1280.png")).collect();
    assert!(desktop.len() >= 17, "every page at 1280 px: {names:?}");
    for d in desktop {
        let page = &d[d.find("-tour-").unwrap()..d.len() - "-1280.png".len()];
        assert!(names.iter().any(|n| n.ends_with(&format!("{page}-390.png"))), "{page} at 390 px: {names:?}");
    }
}

/// The record the tail must show live; `dashboard.mjs` expects exactly this text.
const LIVE_RECORD: &str = "live-marker-42\nid: 7\r\nretry: 1\rend";

/// A probe job that fails its first `fail_first` attempts, with a budget of
/// two, once it has failed both.
async fn failed_probe(app: &TestApp, fail_first: u32) -> uuid::Uuid {
    use sessiond::jobs::store::{self, JobStatus};
    let id = app.state.jobs.submit_with_attempts(&sessiond::jobs::probe::Probe { fail_first }, 2).await.unwrap();
    eventually(10, "the probe failed its attempts", || async {
        let row = store::find(app.db(), id).await.unwrap().expect("job row");
        (row.status == JobStatus::Failed).then_some(())
    })
    .await;
    id
}
