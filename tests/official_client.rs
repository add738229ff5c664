//! The official Trigger.dev client (`@trigger.dev/core@4.8.3`'s ApiClient) drives
//! the control plane of a running server. Node dependencies are installed by
//! scripts/test.sh.

mod common;

use std::path::Path;
use std::process::Command;

use common::TestApp;

#[tokio::test]
async fn official_client_control_plane() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official-client");
    assert!(
        dir.join("node_modules/@trigger.dev/core").exists(),
        "run `npm ci` in tests/official-client (scripts/test.sh does this)"
    );
    let app = TestApp::spawn().await;
    let base = app.base.clone();
    let key = app.a.key.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("control-plane.mjs"))
            .env("TRIGGER_API_URL", base)
            .env("TRIGGER_SECRET_KEY", key)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "official client checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
