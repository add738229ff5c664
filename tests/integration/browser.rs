//! Runs a script of `tests/browser/` (playwright-core driving Debian's
//! headless Chromium; scripts/test.sh installs both) and checks its report:
//! the protocol of `tests/browser/harness.mjs`, one `ok - ` line per check
//! and a `<P> passed, <F> failed` line last.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn browser_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run `npm ci` in tests/browser (scripts/test.sh does this)"
    );
    dir
}

/// `target/test-artifacts/<name>/`, emptied of an earlier run's screenshots
/// (their numbering moves when checks are added).
pub fn screenshots(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "png") {
            std::fs::remove_file(path).unwrap();
        }
    }
    dir
}

/// The screenshots in `dir`.
pub fn screenshot_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count()
}

/// Runs `script` against the server at `base` with `env`, saving screenshots
/// in `shots`; every stdout line goes to `on_line` as it arrives (a script
/// can ask the test to act mid-run). Asserts that exactly `checks` checks
/// ran and passed, within `timeout`.
pub async fn run<F, Fut>(
    script: &str,
    base: &str,
    env: &[(&str, String)],
    shots: &Path,
    checks: usize,
    timeout: Duration,
    mut on_line: F,
) where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = browser_dir();
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join(script))
        .current_dir(&dir)
        .env("DASHBOARD_URL", base)
        .env("SCREENSHOT_DIR", shots)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            on_line(line.clone()).await;
            out.push(line);
        }
    };
    tokio::time::timeout(timeout, read).await.expect("the browser checks finished in time");
    let status = child.wait().await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    let stdout = out.join("\n");
    println!("{stdout}\n{stderr}");
    assert!(status.success(), "browser checks failed:\n{stdout}\n{stderr}");
    assert_eq!(
        out.iter().rev().find(|l| l.ends_with(" failed")).map(String::as_str),
        Some(&*format!("{checks} passed, 0 failed"))
    );
    assert_eq!(out.iter().filter(|l| l.starts_with("ok - ")).count(), checks, "{stdout}");
}
