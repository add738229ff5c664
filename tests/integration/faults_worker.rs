//! Fault case for the worker library: the server is killed with SIGKILL and
//! restarted two or three times under chat load while a live worker (the
//! library's `Worker` with the echo agent, in this test process) serves the
//! sessions. Runs ride out each restart: their heartbeats, long-polls, waits,
//! appends and final reports are retried until the server is back, so no run
//! ends CRASHED, every message is answered exactly once, and no acknowledged
//! message or session is lost. Prints `FAULT worker_kill9`: restarts, messages
//! sent and answered, duplicate answers, runs, crashed runs, the longest
//! restart downtime and the worker's retried calls.
//!
//! And, call by call: each worker-library call whose connection drops after
//! the server acted (and a turn token mint refused with a 503) is tried again
//! and answered as the first try would have been.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::{Worker, WorkerClient};
use tokio_util::sync::CancellationToken;

use crate::common::faults::{phase, report};
use crate::common::server_proc::ServerProc;
use crate::common::{chat_message, TestApp};

/// The server's heartbeat timeout in this case: past the longest outage plus a
/// heartbeat interval and a retry pause, short enough that a run left without
/// beats shows up CRASHED within the case.
const HEARTBEAT_TIMEOUT_MS: u64 = 7_000;
/// How long the server stays dead at each kill: an immediate restart, then
/// outages like a failover's.
const OUTAGES_MS: [u64; 3] = [0, 1_000, 2_000];
/// Chat sessions made before the load, and while it runs.
const SESSIONS_FIRST: usize = 6;
const SESSIONS_LATER: usize = 3;

/// Sends the request `make` builds until the server answers 2xx (a client
/// riding out the restart, as the official one does); panics on a 4xx or
/// after 60 s. The answer's JSON.
async fn acked(what: &str, make: impl Fn() -> RequestBuilder) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match make().timeout(Duration::from_secs(10)).send().await {
            Ok(resp) if resp.status().is_success() => {
                if let Ok(body) = resp.json::<Value>().await {
                    return body;
                }
            }
            Ok(resp) if resp.status().is_client_error() && resp.status() != StatusCode::TOO_MANY_REQUESTS => {
                let status = resp.status();
                panic!("{what}: {status} {}", resp.text().await.unwrap_or_default());
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{what}: no answer within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record on a session's channel `io`: (seq, headers).
async fn records(
    http: &reqwest::Client,
    base: &str,
    session: &str,
    io: &str,
    key: &str,
) -> Vec<(u64, Vec<(String, String)>)> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map(|(seq, _): &(u64, _)| format!("?afterEventId={seq}")).unwrap_or_default();
        let url = format!("{base}/realtime/v1/sessions/{session}/{io}/records{after}");
        let page = acked("read records", || http.get(&url).bearer_auth(key)).await;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        if records.is_empty() {
            return out;
        }
        for r in records {
            let headers = serde_json::from_value(r.get("headers").cloned().unwrap_or(json!([]))).unwrap_or_default();
            out.push((r["seqNum"].as_u64().unwrap(), headers));
        }
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// How many turn-completes answered each `.in` seq of the session.
async fn answers(http: &reqwest::Client, base: &str, session: &str, key: &str) -> BTreeMap<u64, usize> {
    let mut by_seq = BTreeMap::new();
    for (_, headers) in records(http, base, session, "out", key).await {
        if header(&headers, "trigger-control") == Some("turn-complete") {
            if let Some(seq) = header(&headers, "session-in-event-id").and_then(|s| s.parse().ok()) {
                *by_seq.entry(seq).or_insert(0) += 1;
            }
        }
    }
    by_seq
}

/// One chat client: creates its session, then until `stop` sends a message,
/// waits for its answer, and sends the next. Returns the session and the
/// `.in` seqs of its acknowledged messages.
async fn chat_client(
    http: reqwest::Client,
    base: String,
    key: String,
    name: String,
    stop: Arc<AtomicBool>,
) -> (String, Vec<u64>) {
    let body = json!({
        "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": name,
        "triggerConfig": {"basePayload": {"chatId": name}, "idleTimeoutInSeconds": 300}
    });
    let url = format!("{base}/api/v1/sessions");
    // A create is idempotent by its external id: a retry gets the same session.
    let created = acked("create", || http.post(&url).bearer_auth(&key).json(&body)).await;
    let pat = created["publicAccessToken"].as_str().unwrap().to_string();
    let append_url = format!("{base}/realtime/v1/sessions/{name}/in/append");
    let mut sent = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (message, part) = (chat_message(&format!("{name} message {i}")), format!("{name}-m{i}"));
        let ack = acked("append", || {
            http.post(&append_url).bearer_auth(&pat).header("x-part-id", &part).body(message.clone())
        })
        .await;
        let seq = ack["seq"].as_u64().expect("the append's seq");
        sent.push(seq);
        // Wait for the answer (the final check counts them all; this paces the load).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !answers(&http, &base, &name, &pat).await.contains_key(&seq) {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (name, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_worker_kill9_and_restart_under_chat_load_crashes_no_run_and_answers_every_message_once() {
    // The in-process server only holds the deployment; the child process runs
    // the jobs and sweeps and serves every client.
    let app = TestApp::spawn_with(|c| c.run_jobs = false).await;
    let timeout = HEARTBEAT_TIMEOUT_MS.to_string();
    let mut server = ServerProc::start(&app, &[("RUN_HEARTBEAT_TIMEOUT_MS", &timeout)]).await;
    let base = server.base();
    let key = app.a.key.clone();
    let http = reqwest::Client::new();
    let retries_before = sessiond::worker::retry::retries();

    let stop_worker = CancellationToken::new();
    let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: base.clone() }) };
    // More slots than the server hands out at once: the dequeue asks for its maximum.
    let worker = tokio::spawn(
        Worker::new(WorkerClient::new(&base, &key), vec!["echo-agent".into()], 200)
            .run(Arc::new(agent), stop_worker.clone()),
    );

    let load = phase(30.0);
    let restarts = OUTAGES_MS.len() as u32;
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let start_client = |i: usize| {
        let (http, base, key, stop) = (http.clone(), base.clone(), key.clone(), stop_load.clone());
        tokio::spawn(chat_client(http, base, key, format!("wk-{i}"), stop))
    };
    for i in 0..SESSIONS_FIRST {
        clients.push(start_client(i));
    }
    // Let every session's first run start and settle into waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Restarts spread over the load, a new session created after each.
    let mut max_down_ms = 0u64;
    let gap = load / (restarts + 1);
    for (r, outage) in OUTAGES_MS.into_iter().enumerate() {
        tokio::time::sleep(gap).await;
        let down = Instant::now();
        server.kill9().await;
        tokio::time::sleep(Duration::from_millis(outage)).await;
        server.restart().await;
        max_down_ms = max_down_ms.max(down.elapsed().as_millis() as u64);
        if r < SESSIONS_LATER {
            clients.push(start_client(SESSIONS_FIRST + r));
        }
    }
    tokio::time::sleep(gap).await;
    stop_load.store(true, Ordering::Relaxed);
    let mut sent: HashMap<String, Vec<u64>> = HashMap::new();
    for c in clients {
        let (name, seqs) = tokio::time::timeout(Duration::from_secs(60), c).await.expect("a client ends").unwrap();
        sent.insert(name, seqs);
    }

    // Every acknowledged message is on `.in` and answered; then past one more
    // heartbeat timeout (and a sweep), a run that lost its beats would show.
    let messages: usize = sent.values().map(Vec::len).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = loop {
        let mut answered = HashMap::new();
        for name in sent.keys() {
            answered.insert(name.clone(), answers(&http, &base, name, &key).await);
        }
        let all = sent.iter().all(|(name, seqs)| seqs.iter().all(|s| answered[name].contains_key(s)));
        if all || Instant::now() > deadline {
            break answered;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    tokio::time::sleep(Duration::from_millis(HEARTBEAT_TIMEOUT_MS + 2_500)).await;
    let mut lost_ins = 0;
    for (name, seqs) in &sent {
        let stored: Vec<u64> = records(&http, &base, name, "in", &key).await.into_iter().map(|(seq, _)| seq).collect();
        lost_ins += seqs.iter().filter(|s| !stored.contains(s)).count();
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM task_runs GROUP BY status ORDER BY status")
            .fetch_all(app.db())
            .await
            .unwrap();
    let count = |s: &str| statuses.iter().find(|(st, _)| st == s).map_or(0, |(_, n)| *n);
    let runs: i64 = statuses.iter().map(|(_, n)| n).sum();
    let crashed = count("CRASHED");
    let answered_count: usize =
        sent.iter().map(|(name, seqs)| seqs.iter().filter(|s| answered[name].contains_key(s)).count()).sum();
    let duplicates: usize = answered.values().flat_map(|m| m.values()).map(|n| n.saturating_sub(1)).sum();
    let retries = sessiond::worker::retry::retries() - retries_before;
    report(
        "worker_kill9",
        &[
            ("restarts", restarts.to_string()),
            ("sessions", sent.len().to_string()),
            ("messages", messages.to_string()),
            ("answered", answered_count.to_string()),
            ("duplicates", duplicates.to_string()),
            ("lost_in", lost_ins.to_string()),
            ("runs", runs.to_string()),
            ("crashed", crashed.to_string()),
            ("max_down_ms", max_down_ms.to_string()),
            ("worker_retries", retries.to_string()),
        ],
    );

    stop_worker.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), worker).await;
    assert_eq!(lost_ins, 0, "acknowledged messages missing from .in");
    assert_eq!(crashed, 0, "runs crashed through the restarts: {statuses:?}\n{}", server.log());
    assert_eq!(duplicates, 0, "messages answered more than once: {answered:?}");
    assert_eq!(answered_count, messages, "messages left unanswered");
    assert!(messages >= sent.len() * 3, "the load sent too little to show anything: {messages}");
}

/// What a [`DroppingProxy`] does to the next connection it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mishap {
    /// Forwards the request, then closes both sides as soon as the server's
    /// answer begins: the server has acted on the request, the client hears
    /// nothing (a connection dropped mid-request, as a restart or a failover
    /// does it).
    DropAnswer,
    /// Answers 503 itself, without forwarding (a proxy or a server in trouble).
    Refuse,
}

/// A TCP proxy in front of the test server that spoils the next connections
/// it accepts as armed (one mishap a connection), then passes everything
/// through. Each call below goes through a fresh HTTP client, so its first
/// try opens a new connection: arming one mishap spoils exactly that try.
struct DroppingProxy {
    base: String,
    armed: Arc<std::sync::Mutex<Vec<Mishap>>>,
    /// Mishaps dealt so far.
    dealt: Arc<std::sync::atomic::AtomicUsize>,
}

impl DroppingProxy {
    async fn start(upstream: &str) -> DroppingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = DroppingProxy {
            base: format!("http://{}", listener.local_addr().unwrap()),
            armed: Default::default(),
            dealt: Default::default(),
        };
        let (armed, dealt) = (proxy.armed.clone(), proxy.dealt.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mishap = armed.lock().unwrap().pop();
                let (upstream, dealt) = (upstream.clone(), dealt.clone());
                tokio::spawn(async move {
                    if mishap == Some(Mishap::Refuse) {
                        // Read the request head first, so the client is not cut off mid-write.
                        let mut buf = [0u8; 16 * 1024];
                        let _ = client.read(&mut buf).await;
                        dealt.fetch_add(1, Ordering::SeqCst);
                        let body = r#"{"error":"try again"}"#;
                        let head = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = client.write_all(format!("{head}{body}").as_bytes()).await;
                        return;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                        (client.into_split(), server.into_split());
                    let requests = async move {
                        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                        std::future::pending::<()>().await
                    };
                    let answers = async move {
                        if mishap == Some(Mishap::DropAnswer) {
                            // The first byte of the answer: the server has acted.
                            let mut first = [0u8; 1];
                            let _ = server_rx.read(&mut first).await;
                            dealt.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    };
                    tokio::select! { _ = requests => {}, _ = answers => {} }
                });
            }
        });
        proxy
    }

    /// Spoils the next connection with `mishap`.
    fn arm(&self, mishap: Mishap) {
        self.armed.lock().unwrap().push(mishap);
    }

    fn dealt(&self) -> usize {
        self.dealt.load(Ordering::SeqCst)
    }
}

/// The worker library's calls ride out a connection dropped after the server
/// acted but before it answered: each is tried again (dequeue with its request
/// id, an append with its part id, a heartbeat, the final report with its
/// attempt) and the retry's answer is the one the lost answer would have been,
/// with nothing done twice. A turn token mint is tried again too, after a
/// dropped connection and after a 503 (a failed mint would end the turn
/// without a fresh token, silently).
#[tokio::test]
async fn worker_calls_are_tried_again_after_a_connection_dropped_mid_request_and_mints_after_a_503() {
    // A heartbeat timeout that a loaded machine cannot pass between the calls.
    let app = TestApp::spawn_with(|c| c.run_heartbeat_timeout_ms = 10_000).await;
    let proxy = DroppingProxy::start(&app.base).await;
    let created = app
        .create_session(json!({
            "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": "cut-calls",
            "triggerConfig": {"basePayload": {"chatId": "cut-calls"}}
        }))
        .await;
    let run_id = created["runId"].as_str().unwrap().to_string();
    let session = created["id"].as_str().unwrap().to_string();
    let factory = HttpChannelFactory { base_url: proxy.base.clone() };
    use sessiond::worker::channels::ChannelFactory;

    // Dequeue: the server claimed the run; the retry, with the same request
    // id, is handed that run rather than nothing. (A long wait, so the first
    // try answers when it claims the run, however late the run is queued.)
    proxy.arm(Mishap::DropAnswer);
    let runs = WorkerClient::new(&proxy.base, &app.a.key)
        .dequeue(&["echo-agent".to_string()], 1, Duration::from_secs(20))
        .await
        .expect("the dequeue is tried again");
    assert_eq!(proxy.dealt(), 1);
    assert_eq!(runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [run_id.as_str()]);
    let run = &runs[0];

    // An append: stored once, though sent twice.
    proxy.arm(Mishap::DropAnswer);
    factory.for_run(run).append_output(r#"{"data":{"type":"probe"},"id":"p-1"}"#, &[]).await.expect("the append lands");
    assert_eq!(proxy.dealt(), 2);
    let (status, page) = app.get(&format!("/realtime/v1/sessions/{session}/out/records"), &app.a.key).await;
    assert_eq!(status, StatusCode::OK);
    let seqs: Vec<&Value> = page["records"].as_array().unwrap().iter().map(|r| &r["seqNum"]).collect();
    assert_eq!(seqs, [&json!(0)], "one record: {page}");

    // Token mints: after a dropped connection, and after a 503.
    for mishap in [Mishap::DropAnswer, Mishap::Refuse] {
        let dealt = proxy.dealt();
        proxy.arm(mishap);
        let token = factory.for_run(run).turn_token().await.expect("the mint is tried again");
        assert_eq!(proxy.dealt(), dealt + 1, "{mishap:?}");
        let token = token.expect("a minted token");
        let (status, _) = app.get(&format!("/realtime/v1/sessions/{session}/out/records"), &token).await;
        assert_eq!(status, StatusCode::OK, "the minted token ({mishap:?}) reads the session");
    }

    // A heartbeat, then the final report: the run completes once, with its output.
    proxy.arm(Mishap::DropAnswer);
    let beat = WorkerClient::new(&proxy.base, &app.a.key).heartbeat(run).await.expect("the heartbeat lands");
    assert!(beat.ok && !beat.cancel, "{beat:?}");
    proxy.arm(Mishap::DropAnswer);
    WorkerClient::new(&proxy.base, &app.a.key)
        .complete(run, json!({"exit": "cut-test"}))
        .await
        .expect("the completion is tried again and answered as the first");
    assert_eq!(proxy.dealt(), 6);
    assert_eq!(app.run_status(&run_id).await, "COMPLETED");
    let (attempts, output): (i32, Value) =
        sqlx::query_as("SELECT attempt_number, output FROM task_runs WHERE friendly_id = $1")
            .bind(&run_id)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!((attempts, output), (1, json!({"exit": "cut-test"})));
}
