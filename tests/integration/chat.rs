//! A full chat round trip over HTTP with the example worker: create → send on
//! `.in` → reply streamed on `.out` → idle exit → the next message boots a
//! continuation and the same subscription keeps receiving.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use crate::common::{chat_message, eventually, SseRecord, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

/// Reads SSE batches until a turn-complete record arrives; returns the turn's text
/// and the `.in` seq it answered.
async fn read_turn(sub: &mut common::SseClient) -> (String, String) {
    let mut text = String::new();
    loop {
        let batch: Vec<SseRecord> = sub.next_batch(Duration::from_secs(20)).await.expect("stream open");
        for r in batch {
            if r.headers.iter().any(|(k, v)| k == "trigger-control" && v == "turn-complete") {
                let answered =
                    r.headers.iter().find(|(k, _)| k == "session-in-event-id").map(|(_, v)| v.clone()).unwrap();
                return (text, answered);
            }
            let v: Value = serde_json::from_str(&r.body).unwrap();
            if v["data"]["type"] == "text-delta" {
                text.push_str(v["data"]["delta"].as_str().unwrap());
            }
        }
    }
}

#[tokio::test]
async fn chat_round_trip_across_runs_with_one_subscription() {
    let app = TestApp::spawn().await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()));

    let created = app
        .create_session(json!({
            "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": "chat-42",
            "triggerConfig": {"basePayload": {"chatId": "chat-42"}, "idleTimeoutInSeconds": 2}
        }))
        .await;
    let pat = created["publicAccessToken"].as_str().unwrap().to_string();
    let first_run = created["runId"].as_str().unwrap().to_string();
    // The browser holds only the session token, addressed by its own chat id.
    let mut sub = app.sse("/realtime/v1/sessions/chat-42/out", &pat, &[("timeout-seconds", "60")]).await;

    let (status, appended) =
        app.append("chat-42", "in", &pat, &chat_message("hello there"), &[("x-part-id", "m1")]).await;
    assert_eq!((status, &appended["ok"], &appended["seq"]), (StatusCode::OK, &json!(true), &json!(0)), "{appended}");
    assert_eq!(read_turn(&mut sub).await, ("echo: hello there".to_string(), "0".to_string()));
    // Between turns the run waits on .in through a waitpoint.
    eventually(10, "run waiting", || async { (app.run_status(&first_run).await == "WAITING").then_some(()) }).await;

    // Idle past idleTimeoutInSeconds: the run exits cleanly.
    eventually(15, "idle exit", || async { (app.run_status(&first_run).await == "COMPLETED").then_some(()) }).await;

    // The next message boots a continuation; the same subscription gets the reply.
    let (status, appended) =
        app.append("chat-42", "in", &pat, &chat_message("still there?"), &[("x-part-id", "m2")]).await;
    assert_eq!((status, &appended["ok"], &appended["seq"]), (StatusCode::OK, &json!(true), &json!(1)), "{appended}");
    assert_eq!(read_turn(&mut sub).await, ("echo: still there?".to_string(), "1".to_string()));
    let (_, session) = app.get("/api/v1/sessions/chat-42", &pat).await;
    assert_ne!(session["currentRunId"], first_run.as_str());
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM session_runs sr JOIN sessions s ON s.id = sr.session_id WHERE s.external_id = 'chat-42' ORDER BY sr.created_at",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    assert_eq!(reasons, vec!["initial", "continuation"]);

    // Closing wakes the waiting agent with session-closed; it exits.
    let second_run = session["currentRunId"].as_str().unwrap().to_string();
    let (status, closed) = app.post("/api/v1/sessions/chat-42/close", &app.a.key, json!({"reason": "bye"})).await;
    assert_eq!((status, &closed["closedReason"]), (StatusCode::OK, &json!("bye")), "{closed}");
    assert!(closed["closedAt"].is_string(), "{closed}");
    eventually(15, "agent exits on close", || async {
        (app.run_status(&second_run).await == "COMPLETED").then_some(())
    })
    .await;
    let output: Value = sqlx::query_scalar("SELECT output FROM task_runs WHERE friendly_id = $1")
        .bind(&second_run)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(output["exit"], "session-closed");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap();
}
