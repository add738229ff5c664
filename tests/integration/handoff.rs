//! One live run per session: who may hand a session off, how the replaced run
//! is fenced, where the new run picks up, and that a stored `.in` record always
//! gets a run to read it.

use crate::common;
use sessiond::audit::Actor;

use std::sync::Arc;
use std::time::Duration;

use crate::common::{chat_message, dequeue_one, eventually, session_body, tasks, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::worker::channels::{ChannelFactory, HttpChannelFactory};
use sessiond::worker::chat::turn::{complete_turn, PartIds, TurnWriter};
use sessiond::worker::chat::{ChatAgent, ChatInput, Turn};
use sessiond::worker::echo::{Echo, EchoAgent};
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Runs of the session by status.
async fn runs_by_status(app: &TestApp, session: Uuid) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT status, count(*) FROM task_runs WHERE session_id = $1 GROUP BY status ORDER BY status")
        .bind(session)
        .fetch_all(app.db())
        .await
        .unwrap()
}

async fn payload_of(app: &TestApp, run: &str) -> Value {
    sqlx::query_scalar("SELECT payload FROM task_runs WHERE friendly_id = $1")
        .bind(run)
        .fetch_one(app.db())
        .await
        .unwrap()
}

/// Every record on a channel: (seq, control subtype, body).
async fn channel(app: &TestApp, session: &str, io: &str) -> Vec<(u64, Option<String>, Value)> {
    let (status, body) = app.get(&format!("/realtime/v1/sessions/{session}/{io}/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let control = r["headers"]
                .as_array()
                .and_then(|h| h.iter().find(|p| p[0] == "trigger-control"))
                .and_then(|p| p[1].as_str().map(String::from));
            (r["seqNum"].as_u64().unwrap(), control, r["data"].clone())
        })
        .collect()
}

async fn end_and_continue(app: &TestApp, session: &str, token: &str, calling: &str) -> (StatusCode, Value) {
    app.post(
        &format!("/api/v1/sessions/{session}/end-and-continue"),
        token,
        json!({"callingRunId": calling, "reason": "upgrade"}),
    )
    .await
}

#[tokio::test]
async fn only_the_current_run_or_a_secret_key_may_hand_off() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("who-hands-off"))).await;
    let session = s["id"].as_str().unwrap();
    let sid = app.session_uuid(session).await;
    let browser = s["publicAccessToken"].as_str().unwrap();

    // The browser's session token may write to the session, not replace its run,
    // however often it tries with the run id GET hands it.
    for _ in 0..10 {
        let (_, now) = app.get(&format!("/api/v1/sessions/{session}"), browser).await;
        let (status, body) = end_and_continue(&app, session, browser, now["currentRunId"].as_str().unwrap()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(runs_by_status(&app, sid).await, vec![("QUEUED".to_string(), 1)]);

    // A secret key may, and every swap cancels the run it replaces: ten swaps
    // leave one live run, and one dequeue hands out exactly that one.
    let mut current = s["runId"].as_str().unwrap().to_string();
    for _ in 0..10 {
        let (status, body) = end_and_continue(&app, session, &app.a.key, &current).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["swapped"], true);
        current = body["runId"].as_str().unwrap().to_string();
    }
    assert_eq!(runs_by_status(&app, sid).await, vec![("CANCELED".to_string(), 10), ("QUEUED".to_string(), 1)]);
    let runs = app.worker().dequeue(&tasks(), 50, Duration::from_secs(1)).await.unwrap();
    assert_eq!(runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![current.as_str()]);

    // A stale callingRunId keeps its answer: no swap, and who holds the session.
    let (status, body) = end_and_continue(&app, session, &app.a.key, s["runId"].as_str().unwrap()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"runId": current, "swapped": false})));
    // A run token may only name its own run.
    let run = &runs[0];
    let (status, _) = end_and_continue(&app, session, &run.token, s["runId"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = end_and_continue(&app, session, &run.token, &run.id).await;
    assert_eq!((status, body["swapped"].clone()), (StatusCode::OK, json!(true)), "{body}");
}

/// Two workers: the first answers a message, leaves a wait pending and hands
/// the session off (an upgrade); the second, running the example agent, takes
/// over. Nothing the first writes after the swap reaches the session.
#[tokio::test]
async fn a_hand_off_fences_the_old_run_and_the_new_one_resumes_after_the_last_answer() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("fence"))).await;
    let session = s["id"].as_str().unwrap().to_string();
    let browser = s["publicAccessToken"].as_str().unwrap();
    let (status, _) = app.append(&session, "in", browser, &chat_message("one"), &[]).await;
    assert_eq!(status, StatusCode::OK);

    // Worker A: run 1 answers message 0 as the example agent would, then waits on `.in`.
    let worker_a = app.worker();
    let run1 = dequeue_one(&worker_a).await;
    let channels1 = HttpChannelFactory { base_url: app.base.clone() }.for_run(&run1);
    let input = channels1.next_input(None, Duration::from_secs(5)).await.unwrap().expect("message 0");
    let ChatInput::Message { payload } = ChatInput::parse(&input.body).unwrap() else { panic!("a message") };
    let turn = Turn { in_seq: input.seq, payload };
    let mut ids = PartIds::default();
    Echo.respond(&turn, &mut TurnWriter::new(channels1.as_ref(), &mut ids)).await.unwrap();
    complete_turn(channels1.as_ref(), input.seq).await.unwrap();
    let (status, wait) = app
        .post(
            &format!("/api/v1/runs/{}/session-streams/wait", run1.id),
            &run1.token,
            json!({"session": session, "io": "in", "lastSeqNum": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{wait}");
    let pending = wait["waitpointId"].as_str().unwrap().to_string();

    let handoff = worker_a.end_and_continue(&run1, "upgrade").await.unwrap();
    assert!(handoff.swapped);
    let run2 = handoff.run_id.clone();

    // The old run is canceled and fenced.
    assert!(worker_a.heartbeat(&run1).await.unwrap().cancel);
    let (status, body) = app.append(&session, "out", &run1.token, "late", &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("superseded"), "{body}");
    let (status, _) = app.append(&session, "in", &run1.token, "late", &[]).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(channels1.append_output("late", &[]).await.is_err());
    let (status, body) = app
        .post(
            &format!("/api/v1/runs/{}/session-streams/wait", run1.id),
            &run1.token,
            json!({"session": session, "io": "in"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("superseded by {run2}")), "{body}");
    let (status, body) =
        app.get(&format!("/api/v1/runs/{}/waitpoints/{pending}?waitSeconds=0", run1.id), &run1.token).await;
    assert_eq!((status, body["status"].clone()), (StatusCode::OK, json!("CANCELED")), "{body}");
    for path in ["complete", "fail"] {
        let (status, body) = app
            .post(&format!("/api/v1/runs/{}/{path}", run1.id), &run1.token, json!({"output": 1, "error": {"m": 1}}))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("superseded"), "{path}: {body}");
    }

    // Subscribers learn of the upgrade from the server, right after run 1's answer.
    let out = channel(&app, &session, "out").await;
    assert_eq!(out.last().unwrap().1.as_deref(), Some("upgrade-required"), "{out:?}");
    let handed_at = out.last().unwrap().0;

    // The new run knows where to pick up.
    let payload = payload_of(&app, &run2).await;
    assert!(payload.get("trigger").is_none(), "the basePayload has no trigger and the server adds none");
    assert_eq!(payload["continuation"], true);
    assert_eq!(payload["previousRunId"], run1.id);
    assert_eq!(payload["resumeAfterInSeq"], 0);

    // Worker B runs the example agent; it answers the next message, not message 0 again.
    let stop = CancellationToken::new();
    let agent = Arc::new(EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) });
    let worker_b = tokio::spawn(Worker::new(app.worker(), tasks(), 1).run(agent, stop.clone()));
    let (status, _) = app.append(&session, "in", browser, &chat_message("two"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    eventually(15, "run 2 answers message 1", || async {
        let out = channel(&app, &session, "out").await;
        (out.iter().filter(|(_, c, _)| c.as_deref() == Some("turn-complete")).count() == 2).then_some(())
    })
    .await;
    stop.cancel();
    let _ = worker_b.await;

    let out = channel(&app, &session, "out").await;
    let text = |from: u64, to: u64| -> String {
        out.iter()
            .filter(|(seq, _, _)| (from..to).contains(seq))
            .filter_map(|(_, _, d)| d["delta"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(text(0, handed_at), "echo: one");
    assert_eq!(text(handed_at, u64::MAX), "echo: two", "{out:?}");
    assert!(out.iter().all(|(_, _, d)| d != "late"), "{out:?}");
    assert_eq!(app.run_status(&run1.id).await, "CANCELED");
}

#[tokio::test]
async fn manual_triggers_and_continuations_fence_the_run_they_replace() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("replaced"))).await;
    let session = s["id"].as_str().unwrap().to_string();
    let sid = app.session_uuid(&session).await;
    let w = app.worker();
    let run1 = dequeue_one(&w).await;
    let record = |text: &str| json!({"data": text, "id": text}).to_string();
    assert!(app.append(&session, "out", &run1.token, &record("from run 1"), &[]).await.0.is_success());

    // A manual trigger replaces a live run.
    let run2 = app.state.runs.trigger_manual(app.a.env.id, sid, &Actor::Cli).await.unwrap();
    assert_eq!(app.append(&session, "out", &run1.token, &record("late 1"), &[]).await.0, StatusCode::CONFLICT);
    assert!(w.heartbeat(&run1).await.unwrap().cancel);
    let payload = payload_of(&app, &run2).await;
    assert_eq!((payload["continuation"].clone(), payload["previousRunId"].clone()), (json!(true), json!(run1.id)));
    assert!(payload.get("resumeAfterInSeq").is_none(), "no turn ended yet: {payload}");

    // A continuation replaces a finished run, and fences it as well.
    let run2 = dequeue_one(&w).await;
    w.complete(&run2, json!({})).await.unwrap();
    assert_eq!(app.append(&session, "in", &app.a.key, "wake up", &[]).await.0, StatusCode::OK);
    let (_, now) = app.get(&format!("/api/v1/sessions/{session}"), &app.a.key).await;
    let run3 = now["currentRunId"].as_str().unwrap().to_string();
    assert_ne!(run3, run2.id);
    assert_eq!(payload_of(&app, &run3).await["previousRunId"], run2.id);
    let (status, body) = app.append(&session, "out", &run2.token, &record("late 2"), &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(app.append(&session, "out", &app.a.key, &record("from the server"), &[]).await.0.is_success());

    let out = channel(&app, &session, "out").await;
    assert_eq!(
        out.iter().map(|(_, _, d)| d.clone()).collect::<Vec<_>>(),
        vec![json!("from run 1"), json!("from the server")]
    );
}

#[tokio::test]
async fn a_retry_of_a_record_stored_before_the_hand_off_is_acknowledged() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("retry-after-swap"))).await;
    let session = s["id"].as_str().unwrap().to_string();
    let w = app.worker();
    let run1 = dequeue_one(&w).await;
    let (status, _) = app.append(&session, "out", &run1.token, "chunk", &[("x-part-id", "p1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(w.end_and_continue(&run1, "upgrade").await.unwrap().swapped);
    let (status, body) = app.append(&session, "out", &run1.token, "chunk", &[("x-part-id", "p1")]).await;
    assert_eq!((status, body["ok"].clone()), (StatusCode::OK, json!(true)), "{body}");
    let (status, _) = app.append(&session, "out", &run1.token, "chunk", &[("x-part-id", "p2")]).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_run_waits_only_on_its_own_session() {
    let app = TestApp::spawn().await;
    let mine = app.create_session(session_body(Some("mine"))).await;
    let theirs = app.create_session(session_body(Some("theirs"))).await;
    let w = app.worker();
    let runs = [dequeue_one(&w).await, dequeue_one(&w).await];
    let run = runs.iter().find(|r| r.id == mine["runId"]).expect("my run");
    let (status, body) = app
        .post(
            &format!("/api/v1/runs/{}/session-streams/wait", run.id),
            &app.a.key,
            json!({"session": theirs["id"], "io": "in"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "session");
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM waitpoints").fetch_one(app.db()).await.unwrap();
    assert_eq!(waits, 0);
}

/// A server that dies between storing a `.in` record and booting its run
/// leaves a durable boot intent; after a restart a run boots with no client
/// action.
#[tokio::test]
async fn a_stored_in_record_boots_a_run_even_if_the_server_dies_before_the_boot() {
    // The first server runs no boot sweep, so only the restarted one can boot.
    let app = TestApp::spawn_with(|c| {
        c.job_schedules_file =
            Some(common::schedules_file(&["run-sweep", "session-expiry-sweep", "waitpoint-timeout-sweep"]))
    })
    .await;
    let s = app.create_session(session_body(Some("crash"))).await;
    let session = s["id"].as_str().unwrap().to_string();
    let sid = app.session_uuid(&session).await;
    let w = app.worker();
    let run1 = dequeue_one(&w).await;
    w.complete(&run1, json!({})).await.unwrap();

    app.state.appender.stop_before_boot(true);
    let (status, _) = app.append(&session, "in", s["publicAccessToken"].as_str().unwrap(), "hello?", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(channel(&app, &session, "in").await.len(), 1, "the record is stored");
    assert_eq!(runs_by_status(&app, sid).await, vec![("COMPLETED".to_string(), 1)], "no run booted");
    assert_eq!(app.state.channels.boot_intents(10).await.unwrap().len(), 1);

    let app = app.restart(|c| c.job_schedules_file = Some(common::fast_schedules())).await;
    eventually(5, "a run booted for the unread record", || async {
        runs_by_status(&app, sid).await.contains(&("QUEUED".to_string(), 1)).then_some(())
    })
    .await;
    eventually(5, "the boot intent dropped", || async {
        app.state.channels.boot_intents(10).await.unwrap().is_empty().then_some(())
    })
    .await;
    let run2 = dequeue_one(&app.worker()).await;
    assert_eq!(payload_of(&app, &run2.id).await["previousRunId"], run1.id);
}

#[tokio::test]
async fn an_in_append_drops_its_boot_intent_once_a_run_will_read_it() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("intent"))).await;
    let session = s["id"].as_str().unwrap().to_string();
    for i in 0..3 {
        let (status, _) = app.append(&session, "in", &app.a.key, &format!("m{i}"), &[]).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(app.state.channels.boot_intents(10).await.unwrap().is_empty());
    // `.out` appends never note one.
    app.append(&session, "out", &app.a.key, "x", &[]).await;
    assert!(app.state.channels.boot_intents(10).await.unwrap().is_empty());
}
