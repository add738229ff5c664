//! The official Trigger.dev client (`@trigger.dev/core@4.8.3`'s ApiClient) drives
//! a running server: the control plane, and the realtime session channels
//! against the in-process echo worker. Node dependencies are installed by
//! scripts/test.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use crate::common::TestApp;
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

fn client_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official-client");
    assert!(
        dir.join("node_modules/@trigger.dev/core").exists(),
        "run `npm ci` in tests/official-client (scripts/test.sh does this)"
    );
    dir
}

/// How many checks each script runs; update with the scripts.
const CONTROL_PLANE_CHECKS: usize = 19;
const REALTIME_CHECKS: usize = 23;

/// Runs `node <script>` from tests/official-client against `app` (environment A).
async fn run_script(app: &TestApp, script: &str) -> Output {
    let script = client_dir().join(script);
    let base = app.base.clone();
    let key = app.a.key.clone();
    tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("TRIGGER_API_URL", base)
            .env("TRIGGER_SECRET_KEY", key)
            .output()
            .expect("run node")
    })
    .await
    .unwrap()
}

/// Every check passed, and exactly `checks` of them ran (a script that
/// silently skips or loses checks fails here too).
fn assert_all_passed(output: &Output, checks: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "official client checks failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().rev().find(|l| l.ends_with(" failed"));
    assert_eq!(summary, Some(format!("{checks} passed, 0 failed").as_str()), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), checks, "{stdout}");
}

#[tokio::test]
async fn official_client_control_plane() {
    client_dir();
    let app = TestApp::spawn().await;
    let output = run_script(&app, "control-plane.mjs").await;
    assert_all_passed(&output, CONTROL_PLANE_CHECKS);
}

#[tokio::test]
async fn official_client_realtime() {
    client_dir();
    let app = TestApp::spawn().await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()));

    let output = run_script(&app, "realtime.mjs").await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
    assert_all_passed(&output, REALTIME_CHECKS);
}
