//! Channel sequence numbers when Redis loses its data: a private Redis is
//! killed (SIGKILL) under appends and an SSE subscriber, and restarted empty.
//! Numbers never go backwards or get reused, and a resume from before the
//! loss gets the gap signal, not a 400 (see `streams::floor`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::faults::{phase, report_line};
use crate::common::redis_proc::{start_fresh, RedisProc, TempDir};
use crate::common::{session_body, SseRecord, TestApp};
use reqwest::StatusCode;
use serde_json::Value;

const WRITERS: usize = 4;

/// One acknowledged append: when it was sent and answered, its seq and body.
#[derive(Debug, Clone)]
struct Ack {
    sent: Instant,
    acked: Instant,
    seq: u64,
    body: String,
}

fn is_gap(r: &SseRecord) -> bool {
    r.headers.iter().any(|(k, v)| k == "trigger-control" && v == "stream-gap")
}

fn header<'a>(r: &'a SseRecord, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What a client following the channel saw, over as many connections as it took.
#[derive(Default)]
struct Followed {
    /// seq → body of every data record delivered.
    bodies: BTreeMap<u64, String>,
    /// The first number seen from the start of the channel.
    first: Option<u64>,
    gaps: usize,
    /// Anything a client must never see: a number again or backwards, a skip
    /// without a gap record, a 400.
    violations: Vec<String>,
    connections: usize,
}

/// Follows `.out` like the official client: reconnects with `Last-Event-ID`
/// after every window, error or refused connection, until `stop`.
async fn follow(app: &TestApp, session: &str, stop: Arc<AtomicBool>, seen: Arc<Mutex<Followed>>) {
    let mut last: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut req = app
            .client
            .get(format!("{}/realtime/v1/sessions/{session}/out", app.base))
            .bearer_auth(&app.a.key)
            .header("timeout-seconds", "2");
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        seen.lock().unwrap().connections += 1;
        if resp.status() == StatusCode::BAD_REQUEST {
            seen.lock().unwrap().violations.push(format!("resume after {last:?} answered 400"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if !resp.status().is_success() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        use futures::StreamExt;
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                let frame = String::from_utf8_lossy(&frame).to_string();
                if !frame.contains("event: batch") {
                    continue;
                }
                let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
                let v: Value = serde_json::from_str(data).expect("batch data is JSON");
                let records: Vec<SseRecord> = serde_json::from_value(v["records"].clone()).expect("records");
                let mut seen = seen.lock().unwrap();
                for r in records {
                    let expected_next = last.map_or(0, |l| l + 1);
                    if last.is_none() {
                        // From the start, the first number may be a block up:
                        // a reader that restores the channel's floor while the
                        // first append's lease is in flight moves numbering to
                        // the next block (`streams::floor`). None below it was
                        // ever acknowledged; the test checks that at the end.
                        seen.first = Some(r.seq_num);
                    } else if last.is_some_and(|l| r.seq_num <= l) {
                        seen.violations.push(format!("{} after {last:?}", r.seq_num));
                    } else if is_gap(&r) {
                        seen.gaps += 1;
                    } else if r.seq_num != expected_next {
                        seen.violations.push(format!("skipped from {last:?} to {} with no gap record", r.seq_num));
                    }
                    if !is_gap(&r) {
                        if let Some(other) = seen.bodies.insert(r.seq_num, r.body.clone()) {
                            seen.violations.push(format!("seq {} carried {other:?} and then {:?}", r.seq_num, r.body));
                        }
                    }
                    last = Some(r.seq_num);
                }
            }
        }
    }
}

async fn append_loop(app: &TestApp, session: &str, writer: usize, stop: Arc<AtomicBool>) -> (Vec<Ack>, usize) {
    let (mut acks, mut failed) = (Vec::new(), 0);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let body = format!("w{writer}-{i}");
        i += 1;
        let sent = Instant::now();
        let resp = app
            .client
            .post(format!("{}/realtime/v1/sessions/{session}/out/append", app.base))
            .bearer_auth(&app.a.key)
            .body(body.clone())
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == StatusCode::OK => {
                let v: Value = r.json().await.expect("append answer");
                acks.push(Ack { sent, acked: Instant::now(), seq: v["seq"].as_u64().expect("seq"), body });
            }
            _ => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    (acks, failed)
}

#[tokio::test]
async fn redis_restarted_empty_never_reuses_or_rewinds_channel_numbers() {
    let started = Instant::now();
    let dir = TempDir::new();
    let mut redis = start_fresh(&dir.0).await;
    let port = redis.port;
    let url = redis.url();
    let app = Arc::new(TestApp::spawn_with(|c| c.redis_url = url).await);
    let s = app.create_session(session_body(Some("floor-busy"))).await["id"].as_str().unwrap().to_string();
    let quiet = app.create_session(session_body(Some("floor-quiet"))).await["id"].as_str().unwrap().to_string();
    // A channel nobody writes to after the loss: its tail is gone with Redis.
    let mut quiet_last = 0;
    for i in 0..10 {
        let (status, v) = app.append(&quiet, "out", &app.a.key, &format!("q{i}"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        quiet_last = v["seq"].as_u64().unwrap();
    }

    let stop_follow = Arc::new(AtomicBool::new(false));
    let followed = Arc::new(Mutex::new(Followed::default()));
    let follower = {
        let (app, s, stop, seen) = (app.clone(), s.clone(), stop_follow.clone(), followed.clone());
        tokio::spawn(async move { follow(&app, &s, stop, seen).await })
    };
    let stop_append = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (app, s, stop) = (app.clone(), s.clone(), stop_append.clone());
            tokio::spawn(async move { append_loop(&app, &s, w, stop).await })
        })
        .collect();

    tokio::time::sleep(phase(1.5)).await;
    let killed_at = Instant::now();
    redis.kill9();
    drop(redis);
    // Back on the same port, with none of its data.
    let empty_dir = TempDir::new();
    let mut redis = RedisProc::spawn(&empty_dir.0, port);
    assert!(redis.wait_ready(Duration::from_secs(10)).await, "redis did not come back: {}", redis.log());
    let ready_at = Instant::now();
    tokio::time::sleep(phase(2.0)).await;
    stop_append.store(true, Ordering::Relaxed);
    let (mut acks, mut failed) = (Vec::new(), 0);
    for w in writers {
        let (a, f) = w.await.unwrap();
        acks.extend(a);
        failed += f;
    }

    let before: Vec<&Ack> = acks.iter().filter(|a| a.acked < killed_at).collect();
    let after: Vec<&Ack> = acks.iter().filter(|a| a.sent > ready_at).collect();
    assert!(!before.is_empty() && !after.is_empty(), "appends before {} and after {}", before.len(), after.len());
    let max_before = before.iter().map(|a| a.seq).max().unwrap();
    let first_after = after.iter().map(|a| a.seq).min().unwrap();
    let mut by_seq: BTreeMap<u64, &str> = BTreeMap::new();
    let reused: Vec<u64> = acks.iter().filter(|a| by_seq.insert(a.seq, &a.body).is_some()).map(|a| a.seq).collect();
    // What a client must never see, collected so the figures print first.
    let mut problems: Vec<String> = Vec::new();
    if !reused.is_empty() {
        problems.push(format!(
            "{} numbers acknowledged twice, e.g. {:?}",
            reused.len(),
            &reused[..reused.len().min(8)]
        ));
    }
    if first_after <= max_before {
        problems.push(format!("after the loss {first_after}, before it up to {max_before}"));
    }

    // A client resuming from before the loss: the gap, then only new numbers.
    let mut gaps_signalled = 0;
    let resume_from = max_before.saturating_sub(3);
    match resume(&app, &s, resume_from).await {
        Err(status) => problems.push(format!("a resume after {resume_from} answered {status}")),
        Ok(resumed) if !resumed.first().is_some_and(is_gap) => {
            problems.push(format!("a resume after {resume_from} started with {:?}, not a gap", resumed.first()))
        }
        Ok(resumed) => {
            gaps_signalled += 1;
            let gap_to = resumed[0].seq_num;
            if header(&resumed[0], "gap-from") != Some((resume_from + 1).to_string().as_str()) || gap_to < max_before {
                problems.push(format!("the gap does not cover what was lost: {:?}", resumed[0]));
            }
            for r in &resumed[1..] {
                if is_gap(r) || r.seq_num <= max_before || by_seq.get(&r.seq_num).copied() != Some(r.body.as_str()) {
                    problems.push(format!("after the gap, not a new acknowledged record: {r:?}"));
                }
            }
            let got: Vec<u64> = resumed[1..].iter().map(|r| r.seq_num).collect();
            let acked: Vec<u64> = by_seq.range(gap_to + 1..).map(|(seq, _)| *seq).collect();
            if got != acked {
                problems.push(format!(
                    "the resume got {} records, {} were acknowledged after the gap",
                    got.len(),
                    acked.len()
                ));
            }
        }
    }

    // The same from the records API.
    let (status, page) =
        app.get(&format!("/realtime/v1/sessions/{s}/out/records?afterEventId={resume_from}"), &app.a.key).await;
    let page = page["records"].as_array().cloned().unwrap_or_default();
    if status != StatusCode::OK {
        problems.push(format!("the records API after {resume_from} answered {status}"));
    } else if page.first().map(|r| &r["headers"][0]) != Some(&serde_json::json!(["trigger-control", "stream-gap"])) {
        problems.push(format!("the records API after {resume_from} started with {:?}, not a gap", page.first()));
    } else {
        gaps_signalled += 1;
        if !page[1..].iter().all(|r| r["seqNum"].as_u64().unwrap() > max_before) {
            problems.push("the records API served old numbers after the gap".into());
        }
    }

    // The quiet channel ends at its floor now, not at 0: a resume from its
    // last record is a gap and nothing more, not a 400.
    match resume(&app, &quiet, quiet_last).await {
        Ok(got) if got.len() == 1 && is_gap(&got[0]) && got[0].seq_num > quiet_last => {
            gaps_signalled += 1;
            let (status, v) = app.append(&quiet, "out", &app.a.key, "q-after", &[]).await;
            if status != StatusCode::OK || v["seq"].as_u64().unwrap_or(0) <= got[0].seq_num {
                problems.push(format!("the quiet channel's next append: {status} {v}"));
            }
        }
        other => problems.push(format!("a resume of the quiet channel after {quiet_last}: {other:?}")),
    }

    // The live follower, reconnecting with Last-Event-ID throughout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_follow.store(true, Ordering::Relaxed);
    follower.await.unwrap();
    let followed = std::mem::take(&mut *followed.lock().unwrap());
    gaps_signalled += followed.gaps;
    problems.extend(followed.violations.iter().take(5).map(|v| format!("the follower saw {v}")));
    if let Some(first) = followed.first {
        let below = acks.iter().filter(|a| a.seq < first).count();
        if below > 0 {
            problems.push(format!("the follower started at {first}, above {below} acknowledged records"));
        }
    }
    for (seq, body) in &followed.bodies {
        if by_seq.get(seq).is_some_and(|acked| acked != body) {
            problems.push(format!("the follower's seq {seq} is {body:?}, acknowledged as {:?}", by_seq[seq]));
        }
    }
    let pg_writes = app.state.channels.floors().writes();
    report_line(&format!(
        "FAULT redis-empty-streams: appends={} max_before={max_before} first_after={first_after} pg_writes={pg_writes} \
         gaps_signalled={gaps_signalled} reused={} failed_appends={failed} follower_records={} follower_connections={} \
         secs={:.1}",
        acks.len(),
        reused.len(),
        followed.bodies.len(),
        followed.connections,
        started.elapsed().as_secs_f64()
    ));
    assert!(problems.is_empty(), "{} problems: {:#?}", problems.len(), &problems[..problems.len().min(12)]);
    assert!(pg_writes < 20, "Postgres written per block, not per append: {pg_writes} for {} appends", acks.len());
    drop(redis);
}

/// One SSE window on `.out` resumed after `last`: its records, or the status
/// it was refused with.
async fn resume(app: &TestApp, session: &str, last: u64) -> Result<Vec<SseRecord>, StatusCode> {
    let resp = app
        .client
        .get(format!("{}/realtime/v1/sessions/{session}/out", app.base))
        .bearer_auth(&app.a.key)
        .header("last-event-id", last.to_string())
        .header("timeout-seconds", "1")
        .send()
        .await
        .expect("sse connect");
    if !resp.status().is_success() {
        return Err(resp.status());
    }
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text()).await.expect("window ends").expect("body");
    let mut out = Vec::new();
    for frame in text.split("\n\n").filter(|f| f.contains("event: batch")) {
        let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
        let v: Value = serde_json::from_str(data).expect("batch data is JSON");
        out.extend(serde_json::from_value::<Vec<SseRecord>>(v["records"].clone()).expect("records"));
    }
    Ok(out)
}

/// The cost on the append path: Postgres is written once per leased block.
#[tokio::test]
async fn ten_thousand_appends_write_postgres_a_handful_of_times() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("floor-count"))).await["id"].as_str().unwrap().to_string();
    let key = sessiond::streams::ChannelKey { session_id: app.session_uuid(&s).await, io: sessiond::streams::Io::Out };
    let store = app.state.channels.clone();
    let writes_before = store.floors().writes();
    let t = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::with_capacity(625);
                for i in 0..625 {
                    seqs.push(store.append(key, &format!("{w}-{i}"), &[], None).await.expect("append").seq_num);
                }
                seqs
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.extend(task.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    let writes = store.floors().writes() - writes_before;
    seqs.sort_unstable();
    assert_eq!(seqs, (0..10_000).collect::<Vec<u64>>(), "dense from 0 while Redis keeps its data");
    println!("STREAMS floor: appends=10000 pg_writes={writes} secs={secs:.2} appends_per_sec={:.0}", 10_000.0 / secs);
    assert!(writes <= 6, "blocks doubling from 1k: {writes} writes");
}

/// A channel written before sequence floors existed has a counter in Redis but
/// no reservation and no floor: it carries on densely from its counter.
#[tokio::test]
async fn a_channel_from_before_floors_continues_from_its_counter() {
    let app = TestApp::spawn().await;
    let s = app.create_session(session_body(Some("floor-upgrade"))).await["id"].as_str().unwrap().to_string();
    for i in 0..3 {
        let (_, v) = app.append(&s, "out", &app.a.key, &format!("r{i}"), &[]).await;
        assert_eq!(v["seq"], i);
    }
    let key = sessiond::streams::ChannelKey { session_id: app.session_uuid(&s).await, io: sessiond::streams::Io::Out };
    let stream = app.state.channels.stream_key(key);
    let reserved = format!("{}:r", stream.trim_end_matches(":s"));
    let _: i64 = redis::cmd("DEL").arg(&reserved).query_async(&mut app.state.redis.clone()).await.unwrap();
    sqlx::query("DELETE FROM channel_seq_floors").execute(app.db()).await.unwrap();

    assert_eq!(app.state.channels.next_seq(key).await.unwrap(), 3);
    let (_, v) = app.append(&s, "out", &app.a.key, "r3", &[]).await;
    assert_eq!(v["seq"], 3, "{v}");
    let floor: i64 =
        sqlx::query_scalar("SELECT reserved_upto FROM channel_seq_floors").fetch_one(app.db()).await.unwrap();
    assert!(floor > 3, "the floor is leased above the counter: {floor}");
}

/// `.in` records lost with Redis leave nothing for a run to answer: the
/// counter restarts at the channel's floor with no record under it, and a
/// crashed run's replacement (or the failed hand-offs page) must not see
/// "unanswered input" in that gap and boot a run that finds nothing to read.
#[tokio::test]
async fn input_lost_with_redis_is_not_unanswered() {
    let dir = TempDir::new();
    let mut redis = start_fresh(&dir.0).await;
    let port = redis.port;
    let url = redis.url();
    let app = TestApp::spawn_with(|c| c.redis_url = url).await;
    let s = app.create_session(session_body(Some("lost-input"))).await["id"].as_str().unwrap().to_string();
    let (status, _) = app.append(&s, "in", &app.a.key, "hello", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let session = app.session_uuid(&s).await;
    assert!(app.state.runs.has_unanswered_input(session).await.unwrap(), "a message nobody answered yet");

    redis.kill9();
    drop(redis);
    let empty_dir = TempDir::new();
    let mut redis = RedisProc::spawn(&empty_dir.0, port);
    assert!(redis.wait_ready(Duration::from_secs(10)).await, "redis did not come back: {}", redis.log());
    let unanswered = crate::common::eventually(10, "Redis to answer again", || async {
        app.state.runs.has_unanswered_input(session).await.ok()
    })
    .await;
    assert!(!unanswered, "nothing is left in .in to answer");
    drop(redis);
}
