//! Trigger.dev's official chat clients (`@trigger.dev/sdk@4.8.3`'s AgentChat
//! and TriggerChatTransport, with `ai@5`) hold conversations with the example
//! agent, unchanged. The scripts live in tests/chat-client; scripts/test.sh
//! installs their dependencies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::common::node::{self, assert_all_passed};
use crate::common::TestApp;
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

fn client_dir() -> PathBuf {
    node::client_dir("chat-client", &["@trigger.dev/sdk", "ai"])
}

/// How many checks each script runs; update with the scripts.
const CONVERSATION_CHECKS: usize = 10;
const KILLED_WORKER_CHECKS: usize = 2;

#[tokio::test]
async fn agent_chat_and_the_use_chat_transport_talk_to_the_example_agent() {
    let dir = client_dir();
    // Crashes are the other test's subject: here a heartbeat late under a
    // loaded machine must not end a run mid-turn (the suite's default is 1.5 s).
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 10_000).await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 8).run(Arc::new(agent), stop.clone()));

    let output = node::run_script(&app, dir, "conversations.mjs", &[]).await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
    assert_all_passed(&output, CONVERSATION_CHECKS);
}

/// The script runs the workers itself (`sessiond worker`) and kills one with
/// SIGKILL mid-turn; the test server's heartbeat timeout is 1.5 s.
#[tokio::test]
async fn a_worker_killed_mid_turn_is_replaced_and_the_message_answered_once() {
    let dir = client_dir();
    let app = TestApp::spawn().await;
    let output =
        node::run_script(&app, dir, "killed-worker.mjs", &[("SESSIOND_BIN", env!("CARGO_BIN_EXE_sessiond"))]).await;
    assert_all_passed(&output, KILLED_WORKER_CHECKS);
}
