//! No record can poison a session, and no client input reaches the database or
//! chrono out of range: NUL in records, run results and client strings; durations,
//! timestamps and sequence numbers at and past their limits. Never a 500.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{chat_message, eventually, running_session, session_body, SseClient, SseRecord, TestApp};
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::Worker;
use tokio_util::sync::CancellationToken;

/// Reads SSE batches until a turn-complete record arrives; returns the turn's
/// text and the `.in` seq it answered.
async fn read_turn(sub: &mut SseClient) -> (String, String) {
    let mut text = String::new();
    loop {
        let batch: Vec<SseRecord> =
            sub.next_batch(Duration::from_secs(20)).await.expect("a reply before the stream ends");
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

async fn failed_jobs(app: &TestApp) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT kind, last_error FROM jobs WHERE status = 'failed' OR last_error IS NOT NULL")
        .fetch_all(app.db())
        .await
        .unwrap()
}

#[tokio::test]
async fn records_holding_nul_reach_a_waiting_run_and_the_echo_agent_answers_them() {
    let app = TestApp::spawn().await;
    let stop = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: app.base.clone() }) };
    let worker =
        tokio::spawn(Worker::new(app.worker(), vec!["echo-agent".into()], 4).run(Arc::new(agent), stop.clone()));
    let created = app
        .create_session(json!({
            "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": "nul-chat",
            "triggerConfig": {"basePayload": {"chatId": "nul-chat"}, "idleTimeoutInSeconds": 60}
        }))
        .await;
    let pat = created["publicAccessToken"].as_str().unwrap().to_string();
    let run = created["runId"].as_str().unwrap().to_string();
    let mut sub = app.sse("/realtime/v1/sessions/nul-chat/out", &pat, &[("timeout-seconds", "60")]).await;
    let waiting = || async { (app.run_status(&run).await == "WAITING").then_some(()) };

    // The run waits on .in through a waitpoint; each record below completes it.
    eventually(10, "run waiting", waiting).await;
    let first = chat_message("raw\0byte");
    let (status, _) = app.append("nul-chat", "in", &pat, &first, &[("x-part-id", "m1")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_turn(&mut sub).await, ("echo: raw\0byte".to_string(), "0".to_string()));

    eventually(10, "run waiting again", waiting).await;
    // The same record in the stream envelope, as a JSON string.
    let envelope = json!({"data": chat_message("a\u{0}b"), "id": "m2"}).to_string();
    assert!(envelope.contains("\\u0000"));
    let (status, _) = app
        .append(
            "nul-chat",
            "in",
            &pat,
            &envelope,
            &[("x-part-id", "m2"), ("x-record-headers", r#"[["note","x\u0000y"]]"#)],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_turn(&mut sub).await, ("echo: a\0b".to_string(), "1".to_string()));

    // The session is not poisoned: the same run answers the next message.
    eventually(10, "run waiting once more", waiting).await;
    app.append("nul-chat", "in", &pat, &chat_message("after"), &[("x-part-id", "m3")]).await;
    assert_eq!(read_turn(&mut sub).await, ("echo: after".to_string(), "2".to_string()));
    eventually(10, "the same run waiting for more", waiting).await;
    let outputs: Vec<Value> =
        sqlx::query_scalar("SELECT output FROM waitpoints WHERE status = 'COMPLETED' ORDER BY created_at")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert_eq!(outputs[0]["body"], first);
    assert_eq!(outputs[1]["body"], envelope);
    assert_eq!(outputs[1]["headers"], json!([["note", "x\u{0}y"]]));
    assert_eq!(failed_jobs(&app).await, vec![]);
    stop.cancel();
    worker.await.unwrap();
}

#[tokio::test]
async fn the_drain_job_completes_a_wait_with_a_nul_record() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "nul-drain").await;
    let (status, body) = app
        .post(&format!("/api/v1/runs/{}/session-streams/wait", run.id), &run.token, json!({"session": s, "io": "in"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wp = body["waitpointId"].as_str().unwrap().to_string();
    app.append(&s, "in", &app.a.key, "x\0y", &[("x-record-headers", r#"[["k\u0000","v\u0000"]]"#)]).await;
    // Nobody polls: only the drain job can complete it.
    let db_status = || async {
        let st: String = sqlx::query_scalar("SELECT status FROM waitpoints WHERE friendly_id = $1")
            .bind(&wp)
            .fetch_one(app.db())
            .await
            .unwrap();
        (st == "COMPLETED").then_some(())
    };
    eventually(10, "the drain job completing the wait", db_status).await;
    let (status, done) = app.get(&format!("/api/v1/runs/{}/waitpoints/{wp}?waitSeconds=0", run.id), &run.token).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["output"]["body"], "x\0y");
    assert_eq!(done["output"]["headers"], json!([["k\u{0}", "v\u{0}"]]));
    assert_eq!(app.run_status(&run.id).await, "EXECUTING");
    assert_eq!(failed_jobs(&app).await, vec![]);
}

#[tokio::test]
async fn a_run_whose_output_or_error_holds_nul_completes_with_it_kept() {
    let app = TestApp::spawn().await;
    let (_, run) = running_session(&app, "nul-output").await;
    let output = json!({"text": "a\u{0}b", "k\u{0}": ["\u{0}"]});
    let done = app.worker().complete(&run, output.clone()).await.unwrap();
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"], output);
    let (status, read) = app.get(&format!("/api/v1/runs/{}", run.id), &app.a.key).await;
    assert_eq!((status, read["output"].clone()), (StatusCode::OK, output));

    let (_, run) = running_session(&app, "nul-error").await;
    let error = json!({"message": "bad \u{0} input"});
    let failed = app.worker().fail(&run, error.clone(), false).await.unwrap();
    assert_eq!((failed["status"].clone(), failed["error"].clone()), (json!("FAILED"), error));
}

fn expect_422(what: &str, field: &str, (status, body): (StatusCode, Value)) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    assert_eq!(body["field"], field, "{what}: {body}");
}

/// Copies `patch`'s top-level fields over a valid create body.
fn create_body(ext: &str, patch: &Value) -> Value {
    let mut body = session_body(Some(ext));
    for (k, v) in patch.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

const NUL: &str = "a\u{0}b";

/// Each control-plane JSON entry point, with NUL in each kind of string it
/// takes: a 422 naming the field, and nothing changed.
#[tokio::test]
async fn nul_in_a_session_body_is_a_clean_422() {
    let app = TestApp::spawn().await;
    let key = app.a.key.clone();
    let creates = [
        (json!({"type": NUL}), "type"),
        (json!({"taskIdentifier": NUL}), "taskIdentifier"),
        (json!({"externalId": NUL}), "externalId"),
        (json!({"tags": ["ok", NUL]}), "tags[1]"),
        (json!({"metadata": {"deep": {"list": [NUL]}}}), "metadata.deep.list[0]"),
        (json!({"metadata": {"a\u{0}": 1}}), "metadata.a\u{0}"),
        (json!({"triggerConfig": {"basePayload": {"chatId": NUL}}}), "triggerConfig.basePayload.chatId"),
        (json!({"triggerConfig": {"basePayload": {}, "region": NUL}}), "triggerConfig.region"),
        (json!({"triggerConfig": {"basePayload": {}, "lockToVersion": NUL}}), "triggerConfig.lockToVersion"),
        (json!({"triggerConfig": {"basePayload": {}, "concurrencyKey": NUL}}), "triggerConfig.concurrencyKey"),
    ];
    for (patch, field) in creates {
        expect_422(
            &format!("create {patch}"),
            field,
            app.post("/api/v1/sessions", &key, create_body("nul-create", &patch)).await,
        );
    }
    let (_, list) = app.get("/api/v1/sessions", &key).await;
    assert_eq!(list["data"], json!([]), "no create got through");

    let s = app.create_session(session_body(Some("nul-target"))).await;
    let path = format!("/api/v1/sessions/{}", s["id"].as_str().unwrap());
    for (body, field) in [
        (json!({"tags": [NUL]}), "tags[0]"),
        (json!({"metadata": {"m": NUL}}), "metadata.m"),
        (json!({"externalId": NUL}), "externalId"),
    ] {
        expect_422(&format!("update {body}"), field, app.patch(&path, &key, body).await);
    }
    expect_422("close", "reason", app.post(&format!("{path}/close"), &key, json!({"reason": NUL})).await);
    let handoff = json!({"callingRunId": s["runId"], "reason": NUL});
    expect_422("end-and-continue", "reason", app.post(&format!("{path}/end-and-continue"), &key, handoff).await);
    let (_, unchanged) = app.get(&path, &key).await;
    assert_eq!(
        (
            unchanged["tags"].clone(),
            unchanged["metadata"].clone(),
            unchanged["closedAt"].clone(),
            unchanged["currentRunId"].clone()
        ),
        (json!(["test"]), json!({"user": "u1"}), Value::Null, s["runId"].clone())
    );
}

#[tokio::test]
async fn nul_in_a_worker_body_is_a_clean_422() {
    let app = TestApp::spawn().await;
    let key = app.a.key.clone();
    expect_422("dequeue", "tasks[0]", app.post("/api/v1/worker/dequeue", &key, json!({"tasks": [NUL]})).await);
    expect_422(
        "dequeue",
        "workerId",
        app.post("/api/v1/worker/dequeue", &key, json!({"tasks": ["t"], "workerId": NUL})).await,
    );

    let (s, run) = running_session(&app, "nul-wait").await;
    let wait = format!("/api/v1/runs/{}/session-streams/wait", run.id);
    for (body, field) in [
        (json!({"session": s, "io": "in", "tags": [NUL]}), "tags[0]"),
        (json!({"session": s, "io": "in", "tags": NUL}), "tags"),
        (json!({"session": s, "io": "in", "idempotencyKey": NUL}), "idempotencyKey"),
        (json!({"session": s, "io": "in", "timeout": NUL}), "timeout"),
        (json!({"session": s, "io": "in", "idempotencyKeyTTL": NUL}), "idempotencyKeyTTL"),
        (json!({"session": NUL, "io": "in"}), "session"),
    ] {
        expect_422(&format!("wait {body}"), field, app.post(&wait, &run.token, body).await);
    }
    let waits: i64 = sqlx::query_scalar("SELECT count(*) FROM waitpoints").fetch_one(app.db()).await.unwrap();
    assert_eq!((waits, app.run_status(&run.id).await), (0, "EXECUTING".to_string()));
}

#[tokio::test]
async fn nul_in_a_list_filter_is_a_clean_422() {
    let app = TestApp::spawn().await;
    for filter in [
        "filter[type]",
        "filter[tags]",
        "filter[taskIdentifier]",
        "filter[externalId]",
        "filter[status]",
        "filter[createdAt][period]",
    ] {
        expect_422(filter, filter, app.get(&format!("/api/v1/sessions?{filter}=a%00b"), &app.a.key).await);
    }
}

/// Years chrono takes and Postgres does not (before 4713 BC).
const FAR_PAST_MS: i64 = -8_210_266_876_800_000;
const HUGE_SECS: &str = "9223372036854775807";

#[tokio::test]
async fn session_durations_and_timestamps_out_of_range_are_422() {
    let app = TestApp::spawn().await;
    let key = app.a.key.clone();
    for (patch, field) in [
        (json!({"expiresAt": FAR_PAST_MS}), "expiresAt"),
        (json!({"expiresAt": 253_402_300_800_000i64}), "expiresAt"), // year 10000
        (json!({"triggerConfig": {"basePayload": {}, "maxDuration": i64::MAX}}), "triggerConfig.maxDuration"),
        (json!({"triggerConfig": {"basePayload": {}, "ttl": i64::MAX}}), "triggerConfig.ttl"),
        (json!({"triggerConfig": {"basePayload": {}, "ttl": "106751991167300d"}}), "triggerConfig.ttl"),
    ] {
        expect_422(
            &format!("create {patch}"),
            field,
            app.post("/api/v1/sessions", &key, create_body("range", &patch)).await,
        );
    }
    for (query, field) in [
        (format!("filter[createdAt][period]={HUGE_SECS}"), "filter[createdAt][period]"),
        ("filter[createdAt][period]=15250284452w".to_string(), "filter[createdAt][period]"),
        (format!("filter[createdAt][from]={FAR_PAST_MS}"), "filter[createdAt][from]"),
        (format!("filter[createdAt][to]={FAR_PAST_MS}"), "filter[createdAt][to]"),
    ] {
        expect_422(&query, field, app.get(&format!("/api/v1/sessions?{query}"), &key).await);
    }
    let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}.{}.-.-",
        FAR_PAST_MS * 1000,
        uuid::Uuid::nil().simple()
    ));
    let (status, body) = app.get(&format!("/api/v1/sessions?page[after]={cursor}"), &key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn wait_durations_out_of_range_are_422() {
    let app = TestApp::spawn().await;
    let (s, run) = running_session(&app, "range-wait").await;
    let wait = format!("/api/v1/runs/{}/session-streams/wait", run.id);
    for (body, field) in [
        (json!({"session": s, "io": "in", "timeout": HUGE_SECS}), "timeout"),
        (json!({"session": s, "io": "in", "timeout": "15250284452w"}), "timeout"),
        (json!({"session": s, "io": "in", "idempotencyKey": "k", "idempotencyKeyTTL": HUGE_SECS}), "idempotencyKeyTTL"),
        (
            json!({"session": s, "io": "in", "idempotencyKey": "k", "idempotencyKeyTTL": "15250284452w"}),
            "idempotencyKeyTTL",
        ),
    ] {
        expect_422(&format!("wait {body}"), field, app.post(&wait, &run.token, body.clone()).await);
    }
    // lastSeqNum: -1 ..= i64::MAX (the largest seq a channel can reach); the top one just waits.
    for bad in [json!(-2), json!(u64::MAX), json!(i64::MAX as u64 + 1)] {
        expect_422(
            &format!("lastSeqNum {bad}"),
            "lastSeqNum",
            app.post(&wait, &run.token, json!({"session": s, "io": "in", "lastSeqNum": bad})).await,
        );
    }
    let (status, body) = app.post(&wait, &run.token, json!({"session": s, "io": "in", "lastSeqNum": i64::MAX})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.append(&s, "in", &app.a.key, "later", &[]).await.0, StatusCode::OK);
    let wp = body["waitpointId"].as_str().unwrap();
    let (status, polled) = app.get(&format!("/api/v1/runs/{}/waitpoints/{wp}?waitSeconds=1", run.id), &run.token).await;
    assert_eq!((status, polled["status"].clone()), (StatusCode::OK, json!("WAITING")), "{polled}");
}

/// `afterEventId=u64::MAX` wrapped to "from the start" and returned the whole history.
#[tokio::test]
async fn sequence_numbers_out_of_range_or_past_the_end_are_400() {
    let app = TestApp::spawn().await;
    let key = app.a.key.clone();
    let s = app.create_session(session_body(Some("range-seq"))).await;
    let s = s["id"].as_str().unwrap();
    for body in ["r0", "r1"] {
        assert_eq!(app.append(s, "out", &key, body, &[]).await.0, StatusCode::OK);
    }
    let app = &app;
    let records = |after: String| {
        let (path, key) = (format!("/realtime/v1/sessions/{s}/out/records?afterEventId={after}"), key.clone());
        async move { app.get(&path, &key).await }
    };
    for after in [u64::MAX.to_string(), (i64::MAX as u64 + 1).to_string(), i64::MAX.to_string(), "2".into()] {
        let (status, body) = records(after.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "afterEventId={after}: {body}");
    }
    let (status, body) = records("1".into()).await;
    assert_eq!((status, body["records"].clone()), (StatusCode::OK, json!([])));
    let (status, body) = records("0".into()).await;
    assert_eq!((status, body["records"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
    for last in [u64::MAX.to_string(), (i64::MAX as u64 + 1).to_string()] {
        let resp = app
            .client
            .get(format!("{}/realtime/v1/sessions/{s}/out", app.base))
            .bearer_auth(&key)
            .header("last-event-id", &last)
            .header("timeout-seconds", "5")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "Last-Event-ID {last}");
    }
}
