//! Session channels on real Redis and Postgres: appends, reads, SSE, close.

use std::time::{Duration, Instant};

use crate::common::{eventually, session_body, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::streams::{ChannelKey, Io};

async fn new_session(app: &TestApp, ext: &str) -> String {
    app.create_session(session_body(Some(ext))).await["id"].as_str().unwrap().to_string()
}

/// A server whose channel feeds never re-read Redis on their own: a record
/// reaches live subscribers only through its announcement (or the gap an
/// announcement reveals), so a broken announcement path fails the test.
async fn spawn_without_safety_poll() -> TestApp {
    TestApp::spawn_with(|c| c.feed_safety_poll_ms = 600_000).await
}

fn envelope(data: Value, id: &str) -> String {
    json!({"data": data, "id": id}).to_string()
}

#[tokio::test]
async fn append_then_read_records_unwrapped() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "rw").await;
    for i in 0..3 {
        let (status, body) = app
            .append(&s, "out", &app.a.key, &envelope(json!({"type": "text-delta", "delta": i}), &format!("p{i}")), &[])
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({"ok": true, "seq": i})));
    }
    let (status, _) = app.append(&s, "out", &app.a.key, "", &[("x-trigger-control", "turn-complete")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 4);
    assert_eq!(records[0], json!({"data": {"type": "text-delta", "delta": 0}, "id": "p0", "seqNum": 0}));
    assert_eq!(records[3]["headers"], json!([["trigger-control", "turn-complete"]]));
    assert_eq!(records[3]["data"], Value::Null);
    let (_, after) = app.get(&format!("/realtime/v1/sessions/{s}/out/records?afterEventId=1"), &app.a.key).await;
    let seqs: Vec<u64> = after["records"].as_array().unwrap().iter().map(|r| r["seqNum"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![2, 3]);
    // By external id too; and the channels are separate.
    let (_, by_ext) = app.get("/realtime/v1/sessions/rw/out/records", &app.a.key).await;
    assert_eq!(by_ext["records"].as_array().unwrap().len(), 4);
    let (_, other) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
    assert_eq!(other["records"], json!([]));
    let (status, _) = app.get(&format!("/realtime/v1/sessions/{s}/sideways/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app.get(&format!("/realtime/v1/sessions/{s}/out/records?afterEventId=x"), &app.a.key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn seq_numbers_are_dense_and_ordered_under_concurrent_appenders() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "dense").await;
    let mut writers = Vec::new();
    for w in 0..32 {
        let (client, base, key, s) = (app.client.clone(), app.base.clone(), app.a.key.clone(), s.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..20 {
                let r = client
                    .post(format!("{base}/realtime/v1/sessions/{s}/out/append"))
                    .bearer_auth(&key)
                    .body(format!("{w}:{i}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let records = app.state.channels.read_after(key, None, 10_000).await.unwrap();
    assert_eq!(records.len(), 640);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq_num, i as u64, "dense");
    }
    // Each writer's records appear in the order it wrote them.
    let mut last = vec![-1i64; 32];
    for r in &records {
        let (w, i) = r.body.split_once(':').unwrap();
        let (w, i): (usize, i64) = (w.parse().unwrap(), i.parse().unwrap());
        assert!(i > last[w]);
        last[w] = i;
    }
    let stamps: Vec<i64> = records.iter().map(|r| r.timestamp).collect();
    assert!(stamps.windows(2).all(|p| p[0] <= p[1]), "server timestamps follow seq order");
}

#[tokio::test]
async fn a_retried_part_id_is_written_once() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "dedupe").await;
    let (s1, b1) = app.append(&s, "out", &app.a.key, "hello", &[("x-part-id", "part-1")]).await;
    let (s2, b2) = app.append(&s, "out", &app.a.key, "hello", &[("x-part-id", "part-1")]).await;
    assert_eq!((s1, b1["ok"].clone()), (StatusCode::OK, json!(true)));
    assert_eq!((s2, b2["ok"].clone()), (StatusCode::OK, json!(true)));
    assert!(b2["message"].as_str().unwrap().contains("duplicate"));
    assert_eq!((&b1["seq"], &b2["seq"]), (&json!(0), &json!(0)), "a retry answers the seq stored first");
    let (_, b3) = app.append(&s, "out", &app.a.key, "other", &[("x-part-id", "part-2")]).await;
    assert_eq!(b3["seq"], 1);
    let (_, body) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(body["records"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn part_ids_are_exactly_1_to_128_visible_ascii_characters() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "part-ids").await;
    let longest = "~".repeat(128);
    for good in ["!", "a", longest.as_str(), "part:1/2?x=#%"] {
        let (status, body) = app.append(&s, "out", &app.a.key, "x", &[("x-part-id", good)]).await;
        assert_eq!(status, StatusCode::OK, "{good:?}: {body}");
    }
    let too_long = "~".repeat(129);
    for bad in [too_long.as_str(), "a b", "a\tb", "", " "] {
        let (status, body) = app.append(&s, "out", &app.a.key, "x", &[("x-part-id", bad)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert_eq!(body["error"], "X-Part-Id must be 1-128 visible ASCII characters");
    }
    let (_, body) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(body["records"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn sse_resume_from_every_last_event_id_yields_each_record_once() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "resume").await;
    for i in 0..12 {
        app.append(&s, "out", &app.a.key, &format!("r{i}"), &[]).await;
    }
    let path = format!("/realtime/v1/sessions/{s}/out");
    let mut first = app.sse(&path, &app.a.key, &[("timeout-seconds", "1")]).await;
    assert_eq!(first.headers["x-stream-version"], "v2");
    assert_eq!(first.headers["content-type"], "text/event-stream");
    let all: Vec<u64> = first.collect(Duration::from_secs(5)).await.iter().map(|r| r.seq_num).collect();
    assert_eq!(all, (0..12).collect::<Vec<_>>());
    assert_eq!(first.last_event_id.as_deref(), Some("11"));
    let mut subs = Vec::new();
    for last in 0..12u64 {
        let id = last.to_string();
        subs.push((
            last,
            app.sse(&path, &app.a.key, &[("last-event-id", id.as_str()), ("timeout-seconds", "1")]).await,
        ));
    }
    for (last, mut sub) in subs {
        let got: Vec<u64> = sub.collect(Duration::from_secs(5)).await.iter().map(|r| r.seq_num).collect();
        assert_eq!(got, (last + 1..12).collect::<Vec<_>>(), "resume after {last}");
    }
}

#[tokio::test]
async fn sse_follows_live_appends_and_can_start_at_the_tail() {
    let app = spawn_without_safety_poll().await;
    let s = new_session(&app, "live").await;
    app.append(&s, "out", &app.a.key, "old", &[]).await;
    let path = format!("/realtime/v1/sessions/{s}/out");
    let mut latest =
        app.sse(&path, &app.a.key, &[("x-trigger-stream-start", "latest"), ("timeout-seconds", "5")]).await;
    let mut from_start = app.sse(&path, &app.a.key, &[("timeout-seconds", "5")]).await;
    assert_eq!(from_start.next_batch(Duration::from_secs(5)).await.unwrap()[0].body, "old");
    app.append(&s, "out", &app.a.key, "new", &[("x-record-headers", r#"[["k","v"]]"#)]).await;
    let got = latest.next_batch(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got[0].body, "new");
    assert_eq!(got[0].seq_num, 1);
    assert_eq!(got[0].headers, vec![("k".to_string(), "v".to_string())]);
    assert!(got[0].timestamp > 0);
    // (No latency bound: without the safety poll only the announcement delivers it.)
    assert_eq!(from_start.next_batch(Duration::from_secs(5)).await.unwrap()[0].body, "new");
}

#[tokio::test]
async fn keep_alives_and_the_long_poll_window() {
    let app = TestApp::spawn_with(|c| c.sse_keepalive_ms = 200).await;
    let s = new_session(&app, "ka").await;
    let r = app
        .client
        .get(format!("{}/realtime/v1/sessions/{s}/out", app.base))
        .bearer_auth(&app.a.key)
        .header("timeout-seconds", "1")
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    let text = r.text().await.unwrap();
    assert!(text.contains(": keep-alive"), "{text}");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Without Accept: text/event-stream it is still a stream.
    let r = app
        .client
        .get(format!("{}/realtime/v1/sessions/{s}/out", app.base))
        .bearer_auth(&app.a.key)
        .header("timeout-seconds", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.text().await.unwrap().contains(": keep-alive"));
    let r = app
        .client
        .get(format!("{}/realtime/v1/sessions/{s}/out", app.base))
        .bearer_auth(&app.a.key)
        .header("timeout-seconds", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn peek_settled_closes_fast_on_a_finished_turn_and_long_polls_otherwise() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "settle").await;
    let path = format!("/realtime/v1/sessions/{s}/out");
    app.append(&s, "out", &app.a.key, &envelope(json!({"type": "text-delta", "delta": "hi"}), "p1"), &[]).await;
    // Mid-turn: no settled header, the connection stays for the window.
    let t = Instant::now();
    let mut open = app.sse(&path, &app.a.key, &[("x-peek-settled", "1"), ("timeout-seconds", "2")]).await;
    assert!(open.headers.get("x-session-settled").is_none());
    assert_eq!(open.collect(Duration::from_secs(5)).await.len(), 1);
    assert!(t.elapsed() >= Duration::from_millis(1900), "long-polled: {:?}", t.elapsed());

    // Turn complete (control record): settled, drained, closed at once.
    app.append(&s, "out", &app.a.key, "", &[("x-trigger-control", "turn-complete")]).await;
    let t = Instant::now();
    let mut settled =
        app.sse(&path, &app.a.key, &[("x-peek-settled", "1"), ("last-event-id", "0"), ("timeout-seconds", "30")]).await;
    assert_eq!(settled.headers["x-session-settled"], "true");
    let got = settled.collect(Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(|r| r.seq_num).collect::<Vec<_>>(), vec![1]);
    // Closed by the settled check, not the window: well inside its 30 s
    // (a wider bound than a latency target, for a loaded two-core machine).
    assert!(t.elapsed() < Duration::from_secs(10), "settled close took {:?}", t.elapsed());

    // Older agents: a data chunk of type trigger:turn-complete, stringified inside the envelope.
    let s2 = new_session(&app, "settle-old").await;
    app.append(&s2, "out", &app.a.key, &envelope(json!("{\"type\":\"trigger:turn-complete\"}"), "p9"), &[]).await;
    let mut old = app
        .sse(
            &format!("/realtime/v1/sessions/{s2}/out"),
            &app.a.key,
            &[("x-peek-settled", "1"), ("timeout-seconds", "30")],
        )
        .await;
    assert_eq!(old.headers["x-session-settled"], "true");
    assert_eq!(old.collect(Duration::from_secs(5)).await.len(), 1);
}

#[tokio::test]
async fn peek_settled_is_ignored_on_in() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "settle-in").await;
    // `.in` ending with what would end a turn on `.out`.
    app.append(&s, "in", &app.a.key, "", &[("x-trigger-control", "turn-complete")]).await;
    let t = Instant::now();
    let mut sub = app
        .sse(&format!("/realtime/v1/sessions/{s}/in"), &app.a.key, &[("x-peek-settled", "1"), ("timeout-seconds", "1")])
        .await;
    assert!(sub.headers.get("x-session-settled").is_none());
    assert_eq!(sub.collect(Duration::from_secs(5)).await.len(), 1);
    assert!(t.elapsed() >= Duration::from_millis(900), "long-polled like any subscription: {:?}", t.elapsed());
}

#[tokio::test]
async fn a_last_event_id_before_retained_history_gets_a_gap_record() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "gap").await;
    for i in 0..10 {
        app.append(&s, "out", &app.a.key, &format!("r{i}"), &[]).await;
    }
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let mut conn = app.state.redis.clone();
    let _: i64 = redis::cmd("XTRIM")
        .arg(app.state.channels.stream_key(key))
        .arg("MINID")
        .arg("6-0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut sub = app
        .sse(&format!("/realtime/v1/sessions/{s}/out"), &app.a.key, &[("last-event-id", "2"), ("timeout-seconds", "1")])
        .await;
    let got = sub.collect(Duration::from_secs(5)).await;
    let gap = &got[0];
    assert_eq!(gap.headers[0], ("trigger-control".to_string(), "stream-gap".to_string()));
    assert!(
        gap.headers.contains(&("gap-from".into(), "3".into())) && gap.headers.contains(&("gap-to".into(), "5".into()))
    );
    assert_eq!(got[1..].iter().map(|r| r.seq_num).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
}

#[tokio::test]
async fn live_subscribers_get_big_records_and_records_whose_announcement_was_lost() {
    let app = spawn_without_safety_poll().await;
    let s = new_session(&app, "gaps").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let mut sub = app.sse(&format!("/realtime/v1/sessions/{s}/out"), &app.a.key, &[("timeout-seconds", "10")]).await;
    // What the feed itself broadcasts, once it knows where the channel ends.
    let feed = app.state.hub.feed(key);
    let mut rx = feed.subscribe();
    eventually(5, "feed ready", || async { feed.is_ready().then_some(()) }).await;
    // Too big to travel inside its announcement: the feed reads it back.
    let big = "x".repeat(40 * 1024);
    assert_eq!(app.append(&s, "out", &app.a.key, &big, &[]).await.0, StatusCode::OK);
    // It arrives on its own (before anything else could reveal it as a gap).
    let mut got = sub.next_batch(Duration::from_secs(5)).await.expect("the big record");
    // Written behind the hub's back, as if its announcement had been lost...
    let stream = app.state.channels.stream_key(key);
    let counter = format!("{}n", stream.strip_suffix('s').unwrap());
    let mut redis = app.state.redis.clone();
    let _: i64 = redis::cmd("INCR").arg(&counter).query_async(&mut redis).await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("1-1")
        .arg("b")
        .arg("lost")
        .arg("h")
        .arg("[]")
        .arg("t")
        .arg(1)
        .query_async(&mut redis)
        .await
        .unwrap();
    // ...until the next announcement shows the feed what it missed.
    assert_eq!(app.append(&s, "out", &app.a.key, "after", &[]).await.0, StatusCode::OK);
    while got.len() < 3 {
        got.extend(sub.next_batch(Duration::from_secs(5)).await.expect("records"));
    }
    let seen: Vec<(u64, usize)> = got.iter().map(|r| (r.seq_num, r.body.len())).collect();
    assert_eq!(seen, vec![(0, big.len()), (1, 4), (2, 5)]);
    assert_eq!(got[1].body, "lost");
    assert!(sub.next_batch(Duration::from_millis(300)).await.is_none_or(|b| b.is_empty()), "nothing twice");
    // The feed broadcast each record once, in order: the gap was filled from Redis.
    let mut broadcast = Vec::new();
    while let Ok(r) = rx.try_recv() {
        broadcast.push(r.seq_num);
    }
    assert_eq!(broadcast, vec![0, 1, 2]);
}

#[tokio::test]
async fn live_records_arrive_byte_for_byte() {
    let app = spawn_without_safety_poll().await;
    let s = new_session(&app, "bytes").await;
    let path = format!("/realtime/v1/sessions/{s}/out");
    let mut live = app.sse(&path, &app.a.key, &[("timeout-seconds", "10")]).await;
    // Newlines and multi-byte text in the body, a newline inside a header value:
    // the inline announcement must carry them unchanged.
    let body = "line one\nline two: ünïcödé ✓ 🚀\n\n{\"json\": true}";
    let (status, _) =
        app.append(&s, "out", &app.a.key, body, &[("x-record-headers", r#"[["k","v\nw"],["","empty name"]]"#)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an empty header name is refused");
    let (status, _) = app.append(&s, "out", &app.a.key, body, &[("x-record-headers", r#"[["k","v\nw"]]"#)]).await;
    assert_eq!(status, StatusCode::OK);
    let got = live.next_batch(Duration::from_secs(5)).await.expect("a live record");
    assert_eq!((got[0].seq_num, got[0].body.as_str()), (0, body));
    assert_eq!(got[0].headers, vec![("k".to_string(), "v\nw".to_string())]);
    // The same as a fresh subscriber reads it back from Redis.
    let mut replay = app.sse(&path, &app.a.key, &[("timeout-seconds", "1")]).await;
    let again = replay.next_batch(Duration::from_secs(5)).await.expect("the stored record");
    assert_eq!(
        (again[0].body.as_str(), &again[0].headers, again[0].timestamp),
        (body, &got[0].headers, got[0].timestamp)
    );
}

#[tokio::test]
async fn a_thousand_subscribers_share_one_upstream_reader() {
    // A thousand subscribers of one session: above its default cap, which
    // `quotas` tests; this one is about the fan-out.
    let app = TestApp::spawn_with(|c| c.sse_max_per_session = 1_000).await;
    let s = new_session(&app, "fanout").await;
    let path = format!("/realtime/v1/sessions/{s}/out");
    // This test's runtime runs the server too: its task count shows leaks.
    let tasks = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let tasks_before = tasks();
    let redis_clients_before = redis_clients(&app).await;
    let mut subs = Vec::new();
    for _ in 0..1000 {
        subs.push(app.sse(&path, &app.a.key, &[("timeout-seconds", "30")]).await);
    }
    assert_eq!(app.state.hub.active_feeds(), 1);
    // No Redis connection per subscriber (the slack is other tests' servers).
    let redis_clients_during = redis_clients(&app).await;
    assert!(
        redis_clients_during < redis_clients_before + 100,
        "{redis_clients_before} -> {redis_clients_during} Redis clients"
    );
    for i in 0..5 {
        app.append(&s, "out", &app.a.key, &format!("m{i}"), &[]).await;
    }
    let mut readers = Vec::new();
    for mut sub in subs {
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < 5 {
                let batch = sub.next_batch(Duration::from_secs(20)).await.expect("records");
                seqs.extend(batch.iter().map(|r| r.seq_num));
            }
            seqs
        }));
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), vec![0, 1, 2, 3, 4]);
    }
    // Every client is gone now: the feed and its reader go with them, and so
    // does every task the subscriptions started.
    eventually(10, "feeds released", || async { (app.state.hub.active_feeds() == 0).then_some(()) }).await;
    eventually(10, "subscription tasks to end", || async { (tasks() <= tasks_before + 10).then_some(()) }).await;
}

/// Clients connected to the shared Redis (all tests' servers together).
async fn redis_clients(app: &TestApp) -> usize {
    let info: String = redis::cmd("INFO").arg("clients").query_async(&mut app.state.redis.clone()).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix("connected_clients:")).and_then(|v| v.trim().parse().ok()).unwrap()
}

#[tokio::test]
async fn close_refuses_writes_and_wakes_in_with_a_session_closed_record() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "closing").await;
    app.append(&s, "out", &app.a.key, &envelope(json!("before"), "b1"), &[]).await;
    let mut watcher = app.sse(&format!("/realtime/v1/sessions/{s}/in"), &app.a.key, &[("timeout-seconds", "10")]).await;
    let (status, _) =
        app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({"reason": "user left"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.append(&s, "out", &app.a.key, "after", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["ok"], false);
    let (_, out) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(out["records"].as_array().unwrap().len(), 1, "nothing written after close");
    let batch = watcher.next_batch(Duration::from_secs(10)).await.unwrap();
    assert!(batch[0].headers.contains(&("trigger-control".into(), "session-closed".into())));
    assert!(batch[0].headers.contains(&("session-closed-reason".into(), "user left".into())));
    // Channel data now expires after the retention period.
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let ttls = app.state.channels.ttls(key).await.unwrap();
    assert!(ttls.iter().all(|(_, ttl)| *ttl > 0), "{ttls:?}");
    // History stays readable: both channels, every record.
    let (status, body) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{body}");
    assert_eq!(records[0]["headers"][0], json!(["trigger-control", "session-closed"]));
    let (status, body) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["records"][0]["data"], "before", "{body}");
}

#[tokio::test]
async fn a_close_from_the_current_run_does_not_wake_itself() {
    let app = TestApp::spawn().await;
    let created = app.create_session(session_body(Some("self-close"))).await;
    let s = created["id"].as_str().unwrap();
    let (status, _) =
        app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({"callingRunId": created["runId"]})).await;
    assert_eq!(status, StatusCode::OK);
    eventually(10, "channels closed", || async {
        let closed: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT channels_closed_at FROM sessions WHERE friendly_id = $1")
                .bind(s)
                .fetch_one(app.db())
                .await
                .unwrap();
        closed.map(|_| ())
    })
    .await;
    let (_, body) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
    assert_eq!(body["records"], json!([]));
    assert_eq!(app.append(s, "in", &app.a.key, "x", &[]).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_append_to_in_boots_a_run_when_none_is_alive() {
    let app = TestApp::spawn().await;
    let created = app.create_session(session_body(Some("boot"))).await;
    let s = created["id"].as_str().unwrap();
    let w = app.worker();
    let run = w.dequeue(&["echo-agent".to_string()], 1, Duration::from_secs(10)).await.unwrap().remove(0);
    w.complete(&run, json!(null)).await.unwrap();
    let (status, _) = app.append(s, "in", &app.a.key, &envelope(json!("hello"), "m1"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, now) = app.get(&format!("/api/v1/sessions/{s}"), &app.a.key).await;
    assert_ne!(now["currentRunId"], created["runId"]);
    let next = w.dequeue(&["echo-agent".to_string()], 1, Duration::from_secs(10)).await.unwrap().remove(0);
    assert_eq!((&next.payload["continuation"], &next.payload["previousRunId"]), (&json!(true), &created["runId"]));
    // The record was durable before the run existed: the new run reads it.
    let (_, recs) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &next.token).await;
    assert_eq!(recs["records"][0]["data"], "hello");
    // An append to .out never boots runs; while a run is alive .in does not either.
    app.append(s, "in", &app.a.key, "again", &[]).await;
    let (_, still) = app.get(&format!("/api/v1/sessions/{s}"), &app.a.key).await;
    assert_eq!(still["currentRunId"], next.id.as_str());
}

#[tokio::test]
async fn initialize_hands_out_a_channel_scoped_write_token() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "init").await;
    let r = app
        .client
        .put(format!("{}/realtime/v1/sessions/init/out", app.base))
        .bearer_auth(&app.a.key)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    // A browser may read them.
    let exposed = h["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    for name in ["x-append-url", "x-write-token", "x-write-token-expires-at"] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"version": "v2"}));
    let url = h["x-append-url"].to_str().unwrap().to_string();
    assert!(url.ends_with(&format!("/realtime/v1/sessions/{s}/out/append")), "{url}");
    let token = h["x-write-token"].to_str().unwrap().to_string();
    let r = app.client.post(&url).bearer_auth(&token).body(envelope(json!("direct"), "w1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"ok": true, "seq": 0}));
    let (_, recs) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(
        recs["records"],
        json!([{"data": "direct", "id": "w1", "seqNum": 0}]),
        "the write-token append was stored"
    );
    // Only that channel, and only writes.
    assert_eq!(app.append(&s, "in", &token, "nope", &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &token).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn realtime_auth_limits_and_preflight() {
    let app = TestApp::spawn_with(|c| c.max_body_bytes = 1024).await;
    let created = app.create_session(session_body(Some("lim"))).await;
    let s = created["id"].as_str().unwrap();
    let pat = created["publicAccessToken"].as_str().unwrap();
    // The session's public token reads and writes its own channels, in either URL form.
    assert_eq!(app.append("lim", "in", pat, "from browser", &[]).await.0, StatusCode::OK);
    assert_eq!(app.get(&format!("/realtime/v1/sessions/{s}/in/records"), pat).await.0, StatusCode::OK);
    let other = new_session(&app, "lim-other").await;
    assert_eq!(app.append(&other, "in", pat, "x", &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.append("session_missing", "in", pat, "x", &[]).await.0, StatusCode::FORBIDDEN);
    assert_eq!(app.append("session_missing", "in", &app.a.key, "x", &[]).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.append(s, "in", &app.b.key, "x", &[]).await.0, StatusCode::NOT_FOUND);
    let (status, body) = app.append(s, "out", &app.a.key, &"x".repeat(4096), &[]).await;
    assert_eq!((status, body["ok"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!(false)));
    let (status, _) = app.append(s, "out", &app.a.key, "x", &[("x-record-headers", "not json")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app.append(s, "out", &app.a.key, "x", &[("x-record-headers", r#"[["","cmd"]]"#)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for path in [
        format!("/realtime/v1/sessions/{s}/out"),
        format!("/realtime/v1/sessions/{s}/in/append"),
        format!("/realtime/v1/sessions/{s}/in/records"),
    ] {
        let r = app.preflight(&path, "authorization,x-part-id,last-event-id,x-peek-settled").await;
        assert!(r.status().is_success(), "{path}");
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
    }
    let (_, recs) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(recs["records"], json!([]), "rejected appends wrote nothing");
}

/// Many appends in flight on one channel go to Redis in groups; each still gets
/// its own dense seq, a part id repeated inside a group is written once, and
/// only the group's first new record completes the pending waitpoints.
#[tokio::test]
async fn concurrent_appends_to_one_channel_are_written_in_groups() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "groups").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let store = app.state.channels.clone();
    let waitpoint = uuid::Uuid::new_v4();
    store.register_waiter(key, waitpoint, 60_000).await.unwrap();
    let before = store.lanes().stats();

    // 300 appends at once; parts p0..p149 each sent twice.
    let appends = (0..300).map(|i| {
        let store = store.clone();
        async move {
            let part = format!("p{}", i % 150);
            (i, store.append(key, &format!("b{}", i % 150), &[], Some(&part)).await.unwrap())
        }
    });
    let outcomes = futures::future::join_all(appends).await;

    let stats = store.lanes().stats();
    assert_eq!(stats.records - before.records, 300);
    assert!(stats.calls - before.calls < 100, "appends were grouped: {before:?} -> {stats:?}");

    let written: Vec<_> = outcomes.iter().filter(|(_, a)| !a.duplicate).collect();
    assert_eq!(written.len(), 150, "each part id written once");
    let mut seqs: Vec<u64> = written.iter().map(|(_, a)| a.seq_num).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..150).collect::<Vec<_>>());
    // A duplicate answers the seq its part id was written with.
    let records = store.read_after(key, None, 1000).await.unwrap();
    for (i, a) in &outcomes {
        assert_eq!(records[a.seq_num as usize].body, format!("b{}", i % 150));
    }
    let woken: Vec<_> = outcomes.iter().filter(|(_, a)| !a.drained_waitpoints.is_empty()).collect();
    assert_eq!(woken.len(), 1, "one record completes the waitpoint");
    assert_eq!(woken[0].1.drained_waitpoints, vec![waitpoint]);
    assert_eq!(woken[0].1.seq_num, 0, "the first record written");
    eventually(5, "lanes to end when their queues empty", || async { (store.lanes().active() == 0).then_some(()) })
        .await;
}

/// A request that gives up while its append is queued or in flight does not
/// stall or lose the appends grouped with it, nor the waitpoints its record
/// drained; a closed channel refuses a whole group but still acknowledges
/// retries of records stored before the close.
#[tokio::test]
async fn abandoned_appends_do_not_stall_their_group_and_closed_refuses_all() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "abandon").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    // A store whose Redis traffic can be held, so appends stay queued.
    let (store, hold) = held_store(&app).await;
    let waitpoint = uuid::Uuid::new_v4();
    store.register_waiter(key, waitpoint, 60_000).await.unwrap();

    hold.send(true).unwrap();
    let spawn_append = |i: usize| {
        let store = store.clone();
        tokio::spawn(async move { store.append(key, &format!("r{i}"), &[], None).await })
    };
    // The first append's call is in flight (held); the rest queue behind it.
    let first = spawn_append(0);
    eventually(5, "the first append to be sent", || async { (store.lanes().stats().calls == 1).then_some(()) }).await;
    let rest: Vec<_> = (1..100).map(spawn_append).collect();
    tokio::time::sleep(Duration::from_millis(100)).await; // (they run and queue)
    assert_eq!(store.lanes().stats().calls, 1, "still one call, held");
    // Abandon the first (it holds the drained waitpoint) and every other queued one.
    first.abort();
    let mut kept = Vec::new();
    for (i, t) in rest.into_iter().enumerate() {
        if i % 2 == 0 {
            t.abort();
        } else {
            kept.push(t);
        }
    }
    hold.send(false).unwrap();
    let mut seqs = Vec::new();
    for t in kept {
        seqs.push(t.await.unwrap().unwrap().seq_num);
    }
    assert_eq!(seqs.len(), 49);
    let records = store.read_after(key, None, 1000).await.unwrap();
    assert!(records.len() >= 50, "the abandoned first record was written too");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq_num, i as u64, "dense");
    }
    for seq in &seqs {
        assert!(records.iter().any(|r| r.seq_num == *seq), "acknowledged seq {seq} is stored");
    }
    eventually(5, "lanes to end", || async { (store.lanes().active() == 0).then_some(()) }).await;
    // Nobody took the waitpoint the first record drained: it is pending again.
    assert_eq!(app.pending_waiters(key).await, vec![waitpoint.to_string()]);

    let before_close = store.append(key, "pre", &[], Some("pre")).await.unwrap();
    store.close(key, 60_000).await.unwrap();
    // A retry of an append stored before the close is still acknowledged.
    let retry = store.append(key, "pre", &[], Some("pre")).await.unwrap();
    assert!(retry.duplicate && retry.seq_num == before_close.seq_num);
    let bodies: Vec<String> = (0..20).map(|i| format!("late{i}")).collect();
    let refused = futures::future::join_all(bodies.iter().map(|b| store.append(key, b, &[], None))).await;
    assert!(refused.iter().all(|r| matches!(r, Err(sessiond::streams::store::ChannelError::Closed))));
    assert_eq!(
        store.read_after(key, None, 1000).await.unwrap().len(),
        records.len() + 1,
        "nothing written after close"
    );
}

#[tokio::test]
async fn writes_are_refused_after_close_or_expiry_but_retries_are_acknowledged() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "late").await;
    assert_eq!(app.append(&s, "out", &app.a.key, "kept", &[("x-part-id", "p1")]).await.0, StatusCode::OK);
    app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({})).await;
    let (status, body) = app.append(&s, "out", &app.a.key, "kept", &[("x-part-id", "p1")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["message"].as_str().unwrap().contains("duplicate"));
    let (status, body) = app.append(&s, "out", &app.a.key, "new", &[("x-part-id", "p2")]).await;
    assert_eq!((status, body["error"].clone()), (StatusCode::BAD_REQUEST, json!("Session is closed")));
    let r = app
        .client
        .put(format!("{}/realtime/v1/sessions/{s}/out", app.base))
        .bearer_auth(&app.a.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, out) = app.get(&format!("/realtime/v1/sessions/{s}/out/records"), &app.a.key).await;
    assert_eq!(out["records"].as_array().unwrap().len(), 1);

    // Expired: refused even before the expiry sweep seals the channels.
    let e = new_session(&app, "expired").await;
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE friendly_id = $1")
        .bind(&e)
        .execute(app.db())
        .await
        .unwrap();
    // (The session lookup cache holds a row for up to a second.)
    let body = eventually(5, "the expiry to show", || async {
        let (status, body) = app.append(&e, "in", &app.a.key, "", &[("x-trigger-control", "probe")]).await;
        (status == StatusCode::BAD_REQUEST).then_some(body)
    })
    .await;
    assert_eq!(body["error"], "Session is expired");
}

/// The server's own `session-closed` record cannot be suppressed by a client
/// that sent the same part id.
#[tokio::test]
async fn client_part_ids_cannot_shadow_the_close_record() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "shadow").await;
    assert_eq!(app.append(&s, "in", &app.a.key, "hi", &[("x-part-id", "session-closed")]).await.0, StatusCode::OK);
    app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({})).await;
    let records = eventually(10, "the close record", || async {
        let (_, body) = app.get(&format!("/realtime/v1/sessions/{s}/in/records"), &app.a.key).await;
        let records = body["records"].as_array().unwrap().clone();
        (records.len() == 2).then_some(records)
    })
    .await;
    assert_eq!(records[1]["headers"][0], json!(["trigger-control", "session-closed"]));
}

/// A retried `.in` append (its first attempt stored, its answer lost) still
/// makes sure a run is alive to read it.
#[tokio::test]
async fn a_retried_in_append_still_boots_a_run() {
    let app = TestApp::spawn().await;
    let mut body = session_body(Some("retry-boot"));
    body["taskIdentifier"] = json!("task-retry-boot");
    let created = app.create_session(body).await;
    let s = created["id"].as_str().unwrap().to_string();
    let worker = app.worker();
    let first = worker.dequeue(&["task-retry-boot".to_string()], 1, Duration::from_secs(10)).await.unwrap().remove(0);
    assert_eq!(app.append(&s, "in", &app.a.key, "hello", &[("x-part-id", "m1")]).await.0, StatusCode::OK);
    worker.complete(&first, json!(null)).await.unwrap();
    let (status, body) = app.append(&s, "in", &app.a.key, "hello", &[("x-part-id", "m1")]).await;
    assert!(status == StatusCode::OK && body["message"].as_str().unwrap().contains("duplicate"), "{body}");
    let next = worker.dequeue(&["task-retry-boot".to_string()], 1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(next.len(), 1, "a continuation was booted");
    assert_ne!(next[0].id, first.id);
}

/// The long-poll window ends the response on time even when there is always
/// more to send: here a backlog that a slow reader takes seconds to drain.
#[tokio::test]
async fn the_long_poll_window_ends_on_time_while_records_remain() {
    use futures::StreamExt;
    use sessiond::streams::sse::{self, Subscription};
    let app = TestApp::spawn().await;
    let s = new_session(&app, "window").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let bodies: Vec<String> = (0..3000).map(|i| format!("r{i}")).collect();
    futures::future::join_all(bodies.iter().map(|b| app.state.channels.append(key, b, &[], None))).await;
    let sub = Subscription {
        store: app.state.channels.clone(),
        key,
        feed: app.state.hub.feed(key),
        cursor: None,
        settled: false,
        window: Duration::from_millis(500),
        keepalive: Duration::from_secs(30),
        gap: None,
        first_read: None,
        drain: Default::default(),
    };
    let mut frames = Box::pin(sse::stream(sub));
    let started = Instant::now();
    let mut sent = 0;
    // Each backlog frame holds at most 500 records; read one every 400 ms, so
    // draining all six frames would take 2.4 s.
    let read = async {
        while let Some(frame) = frames.next().await {
            sent += String::from_utf8(frame.unwrap().to_vec()).unwrap().matches("\"seq_num\"").count();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the stream ended");
    assert!(sent < 3000, "stopped with records left ({sent} sent)");
    // The window is 500 ms: the stream ended after the frame in hand at its end,
    // not after the backlog (the bound leaves room for a loaded machine).
    assert!(started.elapsed() < Duration::from_millis(2000), "ran {:?}", started.elapsed());
}

/// A resume id the channel never reached is refused, not silently skipped
/// ahead of; after the records expire, a resume still gets its gap signal.
#[tokio::test]
async fn resume_ids_past_the_end_are_refused_and_expired_history_still_signals_a_gap() {
    let app = TestApp::spawn().await;
    let s = new_session(&app, "past-end").await;
    for i in 0..3 {
        app.append(&s, "out", &app.a.key, &format!("r{i}"), &[]).await;
    }
    let r = app
        .client
        .get(format!("{}/realtime/v1/sessions/{s}/out", app.base))
        .bearer_auth(&app.a.key)
        .header("last-event-id", "3")
        .header("timeout-seconds", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    app.post(&format!("/api/v1/sessions/{s}/close"), &app.a.key, json!({})).await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    let retention = app.state.config.channel_retention_secs as i64 * 1000;
    let ttls = app.state.channels.ttls(key).await.unwrap();
    assert!(ttls[0].1 > 0 && ttls[0].1 <= retention, "records expire with retention: {ttls:?}");
    assert!(ttls[1].1 > retention && ttls[2].1 > retention, "counter and marker outlive them: {ttls:?}");
    // The records expire (as they will after the retention period).
    let _: i64 = redis::cmd("DEL")
        .arg(app.state.channels.stream_key(key))
        .query_async(&mut app.state.redis.clone())
        .await
        .unwrap();
    let mut sub = app
        .sse(&format!("/realtime/v1/sessions/{s}/out"), &app.a.key, &[("last-event-id", "0"), ("timeout-seconds", "1")])
        .await;
    let got = sub.collect(Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].headers.contains(&("trigger-control".into(), "stream-gap".into())));
    assert!(
        got[0].headers.contains(&("gap-from".into(), "1".into()))
            && got[0].headers.contains(&("gap-to".into(), "2".into()))
    );
}

/// A channel store like the app's whose commands can be held back (`true`
/// on the sender holds, `false` releases).
async fn held_store(app: &TestApp) -> (sessiond::streams::store::ChannelStore, tokio::sync::watch::Sender<bool>) {
    let upstream = app.state.config.redis_url.trim_start_matches("redis://").trim_end_matches('/').to_string();
    let (port, hold) = holding_proxy(upstream).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let proxied = redis::aio::ConnectionManager::new(client).await.unwrap();
    (
        sessiond::streams::store::ChannelStore::new(proxied, app.db().clone(), &app.state.config.redis_prefix, 60_000),
        hold,
    )
}

/// A TCP proxy to Redis that can hold back what clients send (not what Redis
/// answers): a way to make one connection's command run after others.
async fn holding_proxy(upstream: String) -> (u16, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (hold, held) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                (client.into_split(), server.into_split());
            let mut held = held.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                    if held.wait_for(|h| !*h).await.is_err() || server_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
            });
        }
    });
    (port, hold)
}

/// A subscriber whose backlog read came before a record, and whose feed
/// learnt the channel's tail after it, reads that record from Redis before
/// going live (the feed never broadcasts what came before its start).
#[tokio::test]
async fn a_record_between_the_backlog_read_and_the_feed_start_is_not_missed() {
    use futures::StreamExt;
    use sessiond::streams::hub::Hub;
    use sessiond::streams::sse::{self, Subscription};
    let app = TestApp::spawn().await;
    let s = new_session(&app, "feed-start").await;
    let key = ChannelKey { session_id: app.session_uuid(&s).await, io: Io::Out };
    // A feed whose Redis traffic can be held, so its tail read comes after
    // the append.
    let (store, hold) = held_store(&app).await;
    let hub = Hub::new(store, Duration::from_secs(600));
    hold.send(true).unwrap();
    // The subscriber's backlog read (direct, empty), done here as the route
    // does it before answering: it is over before the append.
    let first_read = app.state.channels.read_after(key, None, 512).await.unwrap();
    assert!(first_read.is_empty());
    let sub = Subscription {
        store: app.state.channels.clone(),
        key,
        feed: hub.feed(key),
        cursor: None,
        settled: false,
        window: Duration::from_secs(5),
        keepalive: Duration::from_secs(30),
        gap: None,
        first_read: Some(first_read),
        drain: Default::default(),
    };
    let reader = tokio::spawn(async move {
        let mut frames = Box::pin(sse::stream(sub));
        frames.next().await.map(|f| String::from_utf8(f.unwrap().to_vec()).unwrap())
    });
    app.state.channels.append(key, "between", &[], None).await.unwrap();
    hold.send(false).unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap().expect("a frame");
    assert!(frame.contains("\"body\":\"between\""), "{frame}");
}
