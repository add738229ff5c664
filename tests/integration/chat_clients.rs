//! Trigger.dev's official chat clients (`@trigger.dev/sdk@4.8.3`'s AgentChat
//! and TriggerChatTransport, with `ai@5`) hold conversations with the example
//! agent, unchanged. The scripts live in tests/chat-client; scripts/test.sh
//! installs their dependencies.

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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat-client");
    assert!(
        dir.join("node_modules/@trigger.dev/sdk").exists() && dir.join("node_modules/ai").exists(),
        "run `npm ci` in tests/chat-client (scripts/test.sh does this)"
    );
    dir
}

/// How many checks each script runs; update with the scripts.
const CONVERSATION_CHECKS: usize = 10;
const KILLED_WORKER_CHECKS: usize = 2;

/// Runs `node <script>` from tests/chat-client against `app` (environment A).
async fn run_script(app: &TestApp, script: &str) -> Output {
    let script = client_dir().join(script);
    let (base, key) = (app.base.clone(), app.a.key.clone());
    tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("TRIGGER_API_URL", base)
            .env("TRIGGER_SECRET_KEY", key)
            .env("SESSIOND_BIN", env!("CARGO_BIN_EXE_sessiond"))
            .output()
            .expect("run node")
    })
    .await
    .unwrap()
}

/// Every check passed, and exactly `checks` of them ran.
fn assert_all_passed(output: &Output, checks: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "chat client checks failed:\n{stdout}\n{stderr}");
    let summary = stdout.lines().rev().find(|l| l.ends_with(" failed"));
    assert_eq!(summary, Some(format!("{checks} passed, 0 failed").as_str()), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), checks, "{stdout}");
}

#[tokio::test]
async fn agent_chat_and_the_use_chat_transport_talk_to_the_example_agent() {
    client_dir();
    let app = TestApp::spawn().await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 8).run(Arc::new(agent), stop.clone()));

    let output = run_script(&app, "conversations.mjs").await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
    assert_all_passed(&output, CONVERSATION_CHECKS);
}

/// The script runs the workers itself (`sessiond worker`) and kills one with
/// SIGKILL mid-turn; the test server's heartbeat timeout is 1.5 s.
#[tokio::test]
async fn a_worker_killed_mid_turn_is_replaced_and_the_message_answered_once() {
    client_dir();
    let app = TestApp::spawn().await;
    let output = run_script(&app, "killed-worker.mjs").await;
    assert_all_passed(&output, KILLED_WORKER_CHECKS);
}
