//! The example echo agent on the real run engine, with in-memory session
//! channels standing in for the realtime streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{chat_message, eventually, TestApp};
use serde_json::json;
use sessiond::worker::channels::{ChannelFactory, MemoryChannels, SessionChannels};
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::{AssignedRun, Worker};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct PerSession(Mutex<HashMap<String, Arc<MemoryChannels>>>);

impl PerSession {
    fn get(&self, session: &str) -> Arc<MemoryChannels> {
        self.0.lock().unwrap().entry(session.to_string()).or_default().clone()
    }
}

struct Factory(Arc<PerSession>);

impl ChannelFactory for Factory {
    fn for_run(&self, run: &AssignedRun) -> Arc<dyn SessionChannels> {
        self.0.get(run.session_id.as_deref().unwrap_or_default())
    }
}

fn turn_text(out: &[sessiond::worker::channels::Record], answered: u64) -> Option<String> {
    let end = out.iter().position(|r| r.header("session-in-event-id") == Some(&answered.to_string()))?;
    let start = out[..end].iter().rposition(|r| r.header("trigger-control").is_some()).map(|i| i + 1).unwrap_or(0);
    Some(
        out[start..end]
            .iter()
            .filter_map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                v["data"]["delta"].as_str().map(String::from)
            })
            .collect(),
    )
}

#[tokio::test]
async fn echo_agent_answers_turns_exits_idle_and_resumes_in_a_continuation() {
    let app = TestApp::spawn().await;
    let channels = Arc::new(PerSession::default());
    let stop = CancellationToken::new();
    let worker = Worker::new(app.worker(), vec!["echo-agent".into()], 4);
    let running =
        tokio::spawn(worker.run(Arc::new(EchoAgent { channels: Arc::new(Factory(channels.clone())) }), stop.clone()));

    let s = app
        .create_session(json!({
            "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": "chat-echo",
            "triggerConfig": {"basePayload": {"chatId": "chat-echo"}, "idleTimeoutInSeconds": 1}
        }))
        .await;
    let sid = s["id"].as_str().unwrap().to_string();
    let ch = channels.get(&sid);
    ch.send_input(&chat_message("hello there"), &[]);
    let text = eventually(10, "first reply", || async { turn_text(&ch.output(), 0) }).await;
    assert_eq!(text, "echo: hello there");

    // Between turns the agent waits on .in; a second message in the same run.
    ch.send_input(&json!({"data": chat_message("again"), "id": "p2"}).to_string(), &[]);
    assert_eq!(eventually(10, "second reply", || async { turn_text(&ch.output(), 1) }).await, "echo: again");
    let first_run = s["runId"].as_str().unwrap().to_string();

    // Idle for longer than idleTimeoutInSeconds: the run exits and completes.
    eventually(10, "idle exit", || async { (app.run_status(&first_run).await == "COMPLETED").then_some(()) }).await;
    let output: serde_json::Value = sqlx::query_scalar("SELECT output FROM task_runs WHERE friendly_id = $1")
        .bind(&first_run)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(output, json!({"exit": "idle", "turns": 2}));

    // The next message boots a continuation (what an append to .in does), which
    // resumes after the last answered message instead of answering it again.
    ch.send_input(&chat_message("third"), &[]);
    let uuid: uuid::Uuid = sqlx::query_scalar("SELECT id FROM sessions WHERE friendly_id = $1")
        .bind(&sid)
        .fetch_one(app.db())
        .await
        .unwrap();
    let ensured = app.state.runs.ensure_run(app.a.env.id, uuid).await.unwrap();
    assert_ne!(ensured.run_id(), first_run);
    assert_eq!(
        eventually(10, "reply from the continuation", || async { turn_text(&ch.output(), 2) }).await,
        "echo: third"
    );
    let answers = ch.output().iter().filter(|r| r.header("trigger-control") == Some("turn-complete")).count();
    assert_eq!(answers, 3, "each message answered once");

    // Cancel reaches the agent through the worker's heartbeat.
    let run = ensured.run_id().to_string();
    app.post(&format!("/api/v2/runs/{run}/cancel"), &app.a.key, json!({})).await;
    eventually(10, "canceled", || async { (app.run_status(&run).await == "CANCELED").then_some(()) }).await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), running).await.expect("worker stops").unwrap();
}
