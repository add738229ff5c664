//! SSE subscribers whose connections are cut at 100 random points (inside the
//! headers, a chunk's size line, a frame, a chunk's closing CRLF, or between
//! frames) by a proxy in front of the server, while writers append to `.out`
//! and `.in`. Each subscriber resumes with `Last-Event-ID` like the official
//! client; what it ends with must equal the acknowledged records exactly: no
//! gap, no duplicate, in order, and no partial frame ever taken for records.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::cutting_proxy::{cutting_proxy, CutKind};
use crate::common::faults::{phase, report};
use crate::common::{session_body, SseRecord, TestApp};

const CUTS: usize = 100;

/// What one subscriber saw, over all its connections.
#[derive(Default, Debug)]
struct Followed {
    /// Data records in delivery order: (seq, body).
    records: Vec<(u64, String)>,
    /// Control records (none expected, counted apart).
    controls: usize,
    /// Gap records, and skips forward with no gap record.
    gaps: usize,
    /// Records at or before the cursor.
    dups: usize,
    /// Connections that ended (cut or not) with part of a frame in hand.
    partial_frames: usize,
    /// Requests sent after the first.
    reconnects: usize,
    /// Anything else a client must never see (a 4xx, an `id` that is not the
    /// batch's last seq, a malformed frame).
    violations: Vec<String>,
}

/// One SSE frame's records, checked against the cursor.
fn take_frame(frame: &str, last: &mut Option<u64>, seen: &mut Followed) {
    let mut event = None;
    let mut data = None;
    let mut id = None;
    for line in frame.lines() {
        if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v);
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v);
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v);
        }
    }
    match event {
        Some("batch") => {}
        Some(other) => {
            seen.violations.push(format!("event {other:?}: {frame:?}"));
            return;
        }
        None => return, // a keep-alive comment
    }
    let Some(records) = data
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .and_then(|v| serde_json::from_value::<Vec<SseRecord>>(v["records"].clone()).ok())
    else {
        seen.violations.push(format!("malformed batch frame {frame:?}"));
        return;
    };
    if id.and_then(|i| i.parse::<u64>().ok()) != records.last().map(|r| r.seq_num) {
        seen.violations.push(format!("frame id {id:?} is not its last record's seq"));
    }
    for r in records {
        let control = r.headers.iter().find(|(k, _)| k == "trigger-control").map(|(_, v)| v.as_str());
        // From the start, the first number may be a block up (a reader that
        // restores the channel's floor while the first append's lease is in
        // flight; see `streams::floor`): no record below it was ever
        // acknowledged, which the comparison with the acknowledged list checks.
        if last.is_some_and(|l| r.seq_num <= l) {
            seen.dups += 1;
        } else if control == Some("stream-gap") || last.is_some_and(|l| r.seq_num != l + 1) {
            seen.gaps += 1;
        }
        *last = Some(r.seq_num);
        match control {
            Some("stream-gap") => {}
            Some(_) => seen.controls += 1,
            None => seen.records.push((r.seq_num, r.body)),
        }
    }
}

/// Follows `session/io` through `base` like the official client: each request
/// resumes after the last record received, whatever ended the one before.
/// Stops once the writer is done and every acknowledged record has come.
async fn follow(
    base: String,
    token: String,
    path: String,
    writer_done: Arc<AtomicBool>,
    acked_last: Arc<Mutex<Option<u64>>>,
) -> Followed {
    // A fresh connection per request: each one is a new chance for the proxy.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut seen = Followed::default();
    let mut last: Option<u64> = None;
    let mut requests = 0usize;
    let deadline = Instant::now() + phase(60.0);
    loop {
        let done = writer_done.load(Ordering::SeqCst) && *acked_last.lock().unwrap() == last;
        if done || Instant::now() > deadline {
            break;
        }
        if requests > 0 {
            // A client's retry delay: appends pile up meanwhile, so resumes
            // start with multi-record backlog frames (cut too, mid-frame).
            let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 0..60);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        requests += 1;
        let mut req = client
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .header("accept", "text/event-stream")
            .header("timeout-seconds", "2");
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(_) => continue, // cut before the headers were whole
        };
        if resp.status() != StatusCode::OK {
            seen.violations.push(format!("resume after {last:?} answered {}", resp.status()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(Duration::from_secs(5), body.next()).await {
                Ok(Some(Ok(chunk))) => chunk,
                // Cut (the body broke off), ended (the window), or stalled.
                _ => break,
            };
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                match String::from_utf8(frame) {
                    Ok(frame) => take_frame(&frame, &mut last, &mut seen),
                    Err(_) => seen.violations.push("a frame that is not UTF-8".into()),
                }
            }
            if writer_done.load(Ordering::SeqCst) && *acked_last.lock().unwrap() == last {
                break;
            }
        }
        // What is left is part of a frame the connection lost: dropped, and
        // asked for again through the cursor.
        if !buf.is_empty() {
            seen.partial_frames += 1;
        }
    }
    seen.reconnects = requests.saturating_sub(1);
    seen
}

/// Appends to `session/io` one record at a time until `stop`; the
/// acknowledged (seq, body) pairs in order.
async fn write(app: Arc<TestApp>, session: String, io: &'static str, stop: Arc<AtomicBool>) -> Vec<(u64, String)> {
    let mut acked = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let body =
            if io == "in" { json!({"data": {"n": i}, "id": format!("m{i}")}).to_string() } else { format!("{io}-{i}") };
        i += 1;
        let (status, v) = app.append(&session, io, &app.a.key, &body, &[]).await;
        assert_eq!(status, StatusCode::OK, "append {body}: {v}");
        acked.push((v["seq"].as_u64().expect("seq"), body));
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    acked
}

#[tokio::test]
async fn faults_sse_dropped_at_100_random_points_resumes_with_no_gap_or_duplicate() {
    let started = Instant::now();
    let seed: u64 = std::env::var("SSE_CUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("sse cuts: seed {seed} (SSE_CUT_SEED={seed} replays it)");
    let app = Arc::new(TestApp::spawn().await);
    let session = app.create_session(session_body(Some("sse-cuts"))).await["id"].as_str().unwrap().to_string();
    let upstream = app.base.trim_start_matches("http://").to_string();
    let proxy = cutting_proxy(upstream, seed, CUTS).await;

    let ios = ["out", "in"];
    let stop = Arc::new(AtomicBool::new(false));
    let done: Vec<Arc<AtomicBool>> = ios.iter().map(|_| Arc::new(AtomicBool::new(false))).collect();
    let acked_last: Vec<Arc<Mutex<Option<u64>>>> = ios.iter().map(|_| Arc::new(Mutex::new(None))).collect();
    let followers: Vec<_> = ios
        .iter()
        .enumerate()
        .map(|(i, io)| {
            let path = format!("/realtime/v1/sessions/{session}/{io}");
            tokio::spawn(follow(proxy.base.clone(), app.a.key.clone(), path, done[i].clone(), acked_last[i].clone()))
        })
        .collect();
    let writers: Vec<_> =
        ios.iter().map(|io| tokio::spawn(write(app.clone(), session.clone(), io, stop.clone()))).collect();

    // Write until the proxy has made its cuts (or the phase is over).
    let load_until = Instant::now() + phase(45.0);
    while proxy.cuts() < CUTS && Instant::now() < load_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for (i, w) in writers.into_iter().enumerate() {
        let a = w.await.unwrap();
        *acked_last[i].lock().unwrap() = a.last().map(|(s, _)| *s);
        done[i].store(true, Ordering::SeqCst);
        acked.push(a);
    }
    let mut followed = Vec::new();
    for f in followers {
        followed.push(f.await.unwrap());
    }

    let mut by_kind: BTreeMap<CutKind, usize> = BTreeMap::new();
    for k in proxy.kinds() {
        *by_kind.entry(k).or_default() += 1;
    }
    let sum = |f: fn(&Followed) -> usize| followed.iter().map(f).sum::<usize>();
    let missing: usize =
        acked.iter().zip(&followed).map(|(a, f)| a.iter().filter(|r| !f.records.contains(r)).count()).sum();
    report(
        "sse_cuts",
        &[
            ("cuts", proxy.cuts().to_string()),
            ("by_kind", format!("{by_kind:?}").replace(' ', "")),
            ("records", acked.iter().map(Vec::len).sum::<usize>().to_string()),
            ("delivered", followed.iter().map(|f| f.records.len()).sum::<usize>().to_string()),
            ("reconnects", sum(|f| f.reconnects).to_string()),
            ("missing", missing.to_string()),
            ("gaps", sum(|f| f.gaps).to_string()),
            ("dups", sum(|f| f.dups).to_string()),
            ("partial_frames_seen", sum(|f| f.partial_frames).to_string()),
            ("seed", seed.to_string()),
            ("total_ms", started.elapsed().as_millis().to_string()),
        ],
    );

    assert_eq!(proxy.cuts(), CUTS, "the proxy made all its cuts (seed {seed})");
    for kind in [CutKind::MidHeaders, CutKind::ChunkSizeLine, CutKind::MidFrame, CutKind::BetweenFrames] {
        assert!(by_kind.contains_key(&kind), "no cut of kind {kind:?} (seed {seed})");
    }
    for ((io, acked), seen) in ios.iter().zip(&acked).zip(&followed) {
        assert!(seen.violations.is_empty(), ".{io} (seed {seed}): {:?}", seen.violations);
        assert_eq!((seen.gaps, seen.dups, seen.controls), (0, 0, 0), ".{io}: gaps, dups, controls (seed {seed})");
        // Exactly the acknowledged records, in order, bodies included: a
        // partial frame taken for records would show here as a wrong body.
        assert!(
            seen.records == *acked,
            ".{io} (seed {seed}): delivered {} records, acknowledged {}; first difference at {:?}",
            seen.records.len(),
            acked.len(),
            seen.records.iter().zip(acked.iter()).position(|(a, b)| a != b)
        );
    }
    assert!(sum(|f| f.partial_frames) > 0, "no cut left a partial frame in hand (seed {seed})");
}
