//! Node scripts that drive a test server with official JavaScript clients
//! (tests/official-client, tests/chat-client): running one, and reading its
//! "ok - …" lines and summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::TestApp;

/// A client package under tests/, with its dependencies installed
/// (`requires`: packages that must be in its node_modules).
pub fn client_dir(name: &str, requires: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name);
    for package in requires {
        assert!(
            dir.join("node_modules").join(package).exists(),
            "run `npm ci` in tests/{name} (scripts/test.sh does this)"
        );
    }
    dir
}

/// Runs `node <dir>/<script>` against `app` (environment A), with `env` added.
pub async fn run_script(app: &TestApp, dir: PathBuf, script: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("node");
    command.arg(dir.join(script)).env("TRIGGER_API_URL", &app.base).env("TRIGGER_SECRET_KEY", &app.a.key);
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::task::spawn_blocking(move || command.output().expect("run node")).await.unwrap()
}

/// Every check passed, and exactly `checks` of them ran (a script that
/// silently skips or loses checks fails here too).
pub fn assert_all_passed(output: &Output, checks: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "client checks failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().rev().find(|l| l.ends_with(" failed"));
    assert_eq!(summary, Some(format!("{checks} passed, 0 failed").as_str()), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), checks, "{stdout}");
}
