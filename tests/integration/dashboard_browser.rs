//! The dashboard in headless Chromium (Debian's, driven by playwright-core;
//! scripts/test.sh installs both): `tests/browser/dashboard.mjs` signs in,
//! filters, watches an `.out` record arrive live, opens the runs pages and
//! retries a failed handoff, retries a failed probe job from its page and
//! sees it succeed, opens the schedules, starts a backfill and watches it
//! complete, rotates a key and sees it once, checks the viewer's view, and saves a screenshot of each
//! page under `target/test-artifacts/dashboard/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::{eventually, session_body, TestApp};
use crate::dashboard::{with_operators, ADMIN, VIEWER};
use crate::dashboard_runs::failed_manual_handoff;

/// Checks the script runs; update with the script.
const CHECKS: usize = 24;

fn browser_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/browser (scripts/test.sh does this)"
    );
    dir
}

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
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    // This run's screenshots only: numbering moves when checks are added.
    for entry in std::fs::read_dir(&shots).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "png") {
            std::fs::remove_file(path).unwrap();
        }
    }

    let dir = browser_dir();
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .current_dir(&dir)
        .env("DASHBOARD_URL", &app.base)
        .env("ADMIN_EMAIL", ADMIN.0)
        .env("ADMIN_PASSWORD", ADMIN.1)
        .env("VIEWER_EMAIL", VIEWER.0)
        .env("VIEWER_PASSWORD", VIEWER.1)
        .env("FILTER_TAG", "gold")
        .env("FILTER_MATCHES", "3")
        .env("LIVE_SESSION", &live)
        .env("PROBE_JOB", probe.to_string())
        .env("STUCK_JOB", stuck.to_string())
        .env("HANDOFF_SESSION", &handoff)
        .env("HANDOFF_KEEP", &handoff_kept)
        .env("ROTATE_ENV", app.b.env.id.to_string())
        .env("SCREENSHOT_DIR", &shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "waiting-for-out" {
                // The page is subscribed: a record appended now must appear live.
                let (status, _) = app.append(&live, "out", &app.a.key, "live-marker-42", &[]).await;
                assert_eq!(status, 200);
            }
            out.push(line);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("the browser checks finished in time");
    let status = child.wait().await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    let stdout = out.join("\n");
    println!("{stdout}\n{stderr}");
    assert!(status.success(), "browser checks failed:\n{stdout}\n{stderr}");
    assert_eq!(
        out.iter().rev().find(|l| l.ends_with(" failed")).map(String::as_str),
        Some(&*format!("{CHECKS} passed, 0 failed"))
    );
    assert_eq!(out.iter().filter(|l| l.starts_with("ok - ")).count(), CHECKS, "{stdout}");
    let pngs = std::fs::read_dir(&shots)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert!(pngs >= 6, "a screenshot of each page ({pngs} found)");
}

/// A probe job that fails its first `fail_first` attempts, with a budget of
/// two, once it has failed both.
async fn failed_probe(app: &TestApp, fail_first: u32) -> uuid::Uuid {
    use sessiond::jobs::store::{self, JobStatus};
    let id = app.state.jobs.submit_with_attempts(&sessiond::jobs::Job::Probe { fail_first }, 2).await.unwrap();
    eventually(10, "the probe failed its attempts", || async {
        let row = store::find(app.db(), id).await.unwrap().expect("job row");
        (row.status == JobStatus::Failed).then_some(())
    })
    .await;
    id
}
