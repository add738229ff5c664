//! Processes come and go under load (issue 22 items 4 and 5): three server
//! processes of one deployment behind a round-robin TCP balancer, with
//! appenders, SSE subscribers that resume with `Last-Event-ID`, and chat
//! sessions answered by a live echo worker, all through the balancer.
//!
//! - A rolling restart (SIGTERM, exit, restart; one process after another)
//!   loses nothing: no acknowledged record, no SSE gap or duplicate, every
//!   chat turn answered, no run CRASHED, no job attempt counted that a
//!   shutdown cut off.
//! - One process killed with SIGKILL: connections through the others never
//!   break, subscribers of the dead one resume elsewhere with no gap, its
//!   runs and jobs are carried on by the others.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sessiond::worker::channels::HttpChannelFactory;
use sessiond::worker::echo::EchoAgent;
use sessiond::worker::{Worker, WorkerClient};
use tokio_util::sync::CancellationToken;

use crate::common::balancer::Balancer;
use crate::common::faults::{phase, report};
use crate::common::held_job::HeldJob;
use crate::common::server_proc::ServerProc;
use crate::common::{chat_message, eventually, fast_schedules, session_body, TestApp};

/// The grace the processes run with (`SHUTDOWN_GRACE_MS`).
const GRACE_MS: u64 = 8_000;

/// What the load saw.
#[derive(Default)]
struct Figures {
    appends_acked: AtomicU64,
    /// Failed attempts (transport error or 5xx) clients retried.
    client_errors: AtomicU64,
    sse_reconnects: AtomicU64,
    /// Streams ended by the server's `event: error` (a drain).
    sse_error_events: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    turns_sent: AtomicU64,
    turns_answered: AtomicU64,
    turn_failures: Mutex<Vec<String>>,
    /// The slowest answered turn, ms.
    slowest_turn_ms: AtomicU64,
}

struct Deployment {
    app: TestApp,
    procs: Vec<ServerProc>,
    lb: Balancer,
    client: reqwest::Client,
}

impl Deployment {
    async fn start() -> Deployment {
        // The test's own process serves no jobs; the three below do all the work.
        let app = TestApp::spawn_with(|c| {
            c.run_jobs = false;
            c.job_schedules_file = Some(crate::common::schedules_file(&[]));
            // A dead worker is noticed within 10 s (the default is 30 s): the
            // live worker here is never dead, so a run CRASHED is a server fault.
            c.run_heartbeat_timeout_ms = 10_000;
        })
        .await;
        let schedules = fast_schedules();
        let grace = GRACE_MS.to_string();
        let overrides = [("JOB_SCHEDULES_FILE", schedules.as_str()), ("SHUTDOWN_GRACE_MS", grace.as_str())];
        let mut procs = Vec::new();
        for _ in 0..3 {
            procs.push(ServerProc::start(&app, &overrides).await);
        }
        let lb = Balancer::start(procs.iter().map(|p| p.port).collect()).await;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Deployment { app, procs, lb, client }
    }

    fn base(&self) -> String {
        self.lb.base()
    }
}

/// Sends a request built by `build` until it is answered below 500, counting
/// the failed tries: what a client of a rolling deployment does. The final
/// answer, or a panic after 30 s of failures.
async fn retried(figures: &Figures, what: &str, build: impl Fn() -> reqwest::RequestBuilder) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match build().send().await {
            Ok(resp) if !resp.status().is_server_error() => {
                let status = resp.status();
                match resp.text().await {
                    Ok(text) => return (status, serde_json::from_str(&text).unwrap_or(Value::Null)),
                    Err(_) => {
                        figures.client_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                figures.client_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        assert!(Instant::now() < deadline, "{what}: still failing after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends to `.out` of `session` until `stop`, one record at a time, each
/// with its own part id (reused on retries, so a retry never duplicates).
/// Returns the acknowledged (seq, body) pairs.
async fn appender(
    client: reqwest::Client,
    base: String,
    key: String,
    session: String,
    stop: Arc<AtomicBool>,
    figures: Arc<Figures>,
) -> Vec<(u64, String)> {
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = format!("{session}-r{i}");
        let part = format!("p{i}");
        let (status, json) = retried(&figures, "append", || {
            client
                .post(format!("{base}/realtime/v1/sessions/{session}/out/append"))
                .bearer_auth(&key)
                .header("x-part-id", &part)
                .body(body.clone())
        })
        .await;
        assert_eq!(status, StatusCode::OK, "append: {json}");
        acked.push((json["seq"].as_u64().expect("seq"), body));
        figures.appends_acked.fetch_add(1, Ordering::Relaxed);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

/// Follows `.out` of `session` through the balancer, resuming with
/// `Last-Event-ID` whenever its stream ends (a drain's `event: error`, a
/// window's end, a broken connection), until `stop` and it has reached
/// `until` (set once the appender is done). Returns what it received, in order.
async fn subscriber(
    client: reqwest::Client,
    base: String,
    key: String,
    session: String,
    until: Arc<Mutex<Option<u64>>>,
    figures: Arc<Figures>,
) -> Vec<(u64, String)> {
    let mut got: Vec<(u64, String)> = Vec::new();
    let mut last: Option<u64> = None;
    let deadline_after_stop = Duration::from_secs(20);
    let mut stopped_at: Option<Instant> = None;
    loop {
        let target = *until.lock().unwrap();
        if let Some(t) = target {
            if last.is_some_and(|l| l >= t) {
                return got;
            }
            let at = *stopped_at.get_or_insert_with(Instant::now);
            assert!(at.elapsed() < deadline_after_stop, "{session}: subscriber stuck at {last:?}, target {t}");
        }
        let mut req = client
            .get(format!("{base}/realtime/v1/sessions/{session}/out"))
            .bearer_auth(&key)
            .header("accept", "text/event-stream")
            .header("timeout-seconds", "20")
            .timeout(Duration::from_secs(40));
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            _ => {
                figures.client_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        'stream: loop {
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = buf.drain(..end + 2).collect();
                let frame = String::from_utf8_lossy(&raw).to_string();
                let event = frame.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("");
                let data = frame.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("");
                match event {
                    "batch" => {
                        let v: Value = serde_json::from_str(data).expect("batch data");
                        for r in v["records"].as_array().expect("records") {
                            let seq = r["seq_num"].as_u64().unwrap();
                            let control = r["headers"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|h| h[0] == "trigger-control" && h[1] == "stream-gap");
                            // A read from the start gets what is there (a fresh
                            // channel's numbers may start at a leased block's
                            // floor); after a cursor, the next number must follow.
                            let skipped = last.is_some_and(|l| seq > l + 1);
                            let expected = last.map_or(0, |l| l + 1);
                            if control || skipped {
                                figures.gaps.fetch_add(1, Ordering::Relaxed);
                                eprintln!("GAP {session}: got {r} expecting {expected}");
                            }
                            if last.is_some_and(|l| seq <= l) {
                                figures.dups.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            last = Some(seq);
                            got.push((seq, r["body"].as_str().unwrap_or_default().to_string()));
                        }
                    }
                    "error" => {
                        figures.sse_error_events.fetch_add(1, Ordering::Relaxed);
                        break 'stream;
                    }
                    _ => {}
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(_)) => {
                    figures.client_errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => break,
            }
        }
        figures.sse_reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Drives one chat session: sends a message, waits for the turn that answers
/// it (its `turn-complete` names the `.in` seq), and again until `stop`.
async fn chat_driver(
    client: reqwest::Client,
    base: String,
    key: String,
    chat: String,
    stop: Arc<AtomicBool>,
    figures: Arc<Figures>,
) {
    let mut after: Option<u64> = None;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let part = format!("m{i}");
        let text = chat_message(&format!("hello {i}"));
        let (status, json) = retried(&figures, "chat send", || {
            client
                .post(format!("{base}/realtime/v1/sessions/{chat}/in/append"))
                .bearer_auth(&key)
                .header("x-part-id", &part)
                .body(text.clone())
        })
        .await;
        assert_eq!(status, StatusCode::OK, "chat send: {json}");
        figures.turns_sent.fetch_add(1, Ordering::Relaxed);
        let seq = json["seq"].as_u64().unwrap().to_string();
        let sent_at = Instant::now();
        let deadline = sent_at + Duration::from_secs(45);
        let answered = 'wait: loop {
            if Instant::now() > deadline {
                break false;
            }
            let url = match after {
                Some(a) => format!("{base}/realtime/v1/sessions/{chat}/out/records?afterEventId={a}"),
                None => format!("{base}/realtime/v1/sessions/{chat}/out/records"),
            };
            let (status, page) = retried(&figures, "chat read", || client.get(&url).bearer_auth(&key)).await;
            assert_eq!(status, StatusCode::OK, "chat read: {page}");
            for r in page["records"].as_array().cloned().unwrap_or_default() {
                after = r["seqNum"].as_u64();
                let answers = r["headers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|h| h[0] == "session-in-event-id" && h[1] == seq.as_str());
                let complete = r["headers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|h| h[0] == "trigger-control" && h[1] == "turn-complete");
                if answers && complete {
                    break 'wait true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if answered {
            figures.turns_answered.fetch_add(1, Ordering::Relaxed);
            figures.slowest_turn_ms.fetch_max(sent_at.elapsed().as_millis() as u64, Ordering::Relaxed);
        } else {
            figures.turn_failures.lock().unwrap().push(format!("{chat} message {i} (.in seq {seq})"));
        }
        i += 1;
    }
}

/// An appender: its session, where its subscriber must get to (set when
/// the appender stops), and the task returning what it had acknowledged.
type AppenderTask = (String, Arc<Mutex<Option<u64>>>, tokio::task::JoinHandle<Vec<(u64, String)>>);

/// The load: appenders with a subscriber each, chat sessions with a live
/// echo worker; all through the balancer.
struct Load {
    stop: Arc<AtomicBool>,
    figures: Arc<Figures>,
    appenders: Vec<AppenderTask>,
    subscribers: Vec<tokio::task::JoinHandle<Vec<(u64, String)>>>,
    chats: Vec<tokio::task::JoinHandle<()>>,
    worker_stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(d: &Deployment, streams: usize, chats: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let figures = Arc::new(Figures::default());
        let base = d.base();
        let key = d.app.a.key.clone();
        let worker_stop = CancellationToken::new();
        let agent = EchoAgent { channels: Arc::new(HttpChannelFactory { base_url: base.clone() }) };
        let worker = tokio::spawn(
            Worker::new(WorkerClient::new(&base, &key), vec!["echo-agent".into()], 8)
                .run(Arc::new(agent), worker_stop.clone()),
        );
        let mut appenders = Vec::new();
        let mut subscribers = Vec::new();
        for i in 0..streams {
            let ext = format!("stream-{i}");
            let mut body = session_body(Some(&ext));
            // A task nobody serves: these sessions only carry records.
            body["taskIdentifier"] = json!("task-streams");
            d.app.create_session(body).await;
            let until = Arc::new(Mutex::new(None));
            subscribers.push(tokio::spawn(subscriber(
                d.client.clone(),
                base.clone(),
                key.clone(),
                ext.clone(),
                until.clone(),
                figures.clone(),
            )));
            let task = tokio::spawn(appender(
                d.client.clone(),
                base.clone(),
                key.clone(),
                ext.clone(),
                stop.clone(),
                figures.clone(),
            ));
            appenders.push((ext, until, task));
        }
        let mut chat_tasks = Vec::new();
        for i in 0..chats {
            let ext = format!("chat-{i}");
            d.app
                .create_session(json!({
                    "type": "chat.agent", "taskIdentifier": "echo-agent", "externalId": ext,
                    "triggerConfig": {"basePayload": {"chatId": ext}, "idleTimeoutInSeconds": 60}
                }))
                .await;
            chat_tasks.push(tokio::spawn(chat_driver(
                d.client.clone(),
                base.clone(),
                key.clone(),
                ext,
                stop.clone(),
                figures.clone(),
            )));
        }
        Load { stop, figures, appenders, subscribers, chats: chat_tasks, worker_stop, worker }
    }

    /// Stops the load and checks what the streams hold. Returns (acked, lost).
    async fn finish(self, d: &Deployment) -> (Arc<Figures>, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked_total = 0;
        let mut lost = 0;
        let mut acked_by_session = BTreeMap::new();
        for (ext, until, task) in self.appenders {
            let acked = task.await.expect("appender");
            *until.lock().unwrap() = acked.last().map(|(s, _)| *s);
            acked_by_session.insert(ext, acked);
        }
        for task in self.chats {
            task.await.expect("chat driver");
        }
        let mut received = Vec::new();
        for task in self.subscribers {
            received.push(task.await.expect("subscriber"));
        }
        let mut missed_by_sse = 0;
        for ((ext, acked), got) in acked_by_session.iter().zip(received) {
            // Every acknowledged record is in the stream under its seq, and
            // its subscriber received it.
            let session_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM sessions WHERE external_id = $1")
                .bind(ext)
                .fetch_one(d.app.db())
                .await
                .unwrap();
            let key = sessiond::streams::ChannelKey { session_id, io: sessiond::streams::Io::Out };
            let stored: BTreeMap<u64, String> = d
                .app
                .state
                .channels
                .read_after(key, None, 1_000_000)
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.seq_num, r.body))
                .collect();
            let got: BTreeMap<u64, String> = got.into_iter().collect();
            for (seq, body) in acked {
                acked_total += 1;
                if stored.get(seq) != Some(body) {
                    lost += 1;
                }
                if got.get(seq) != Some(body) {
                    missed_by_sse += 1;
                }
            }
        }
        assert_eq!(missed_by_sse, 0, "acknowledged records a subscriber never received");
        self.worker_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.worker).await;
        (self.figures, acked_total, lost)
    }
}

/// Runs ended CRASHED, and job attempts a shutdown cut off yet counted
/// (left `running`, or abandoned without being handed back), and jobs failed.
async fn run_and_job_verdicts(app: &TestApp) -> (i64, i64, i64, i64) {
    let crashed: i64 = sqlx::query_scalar("SELECT count(*) FROM task_runs WHERE status = 'CRASHED'")
        .fetch_one(app.db())
        .await
        .unwrap();
    let counted_cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_attempts WHERE status = 'running' OR (status = 'abandoned' AND error IS NULL)",
    )
    .fetch_one(app.db())
    .await
    .unwrap();
    let handed_back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_attempts WHERE status = 'abandoned' AND error = 'handed back at shutdown'",
    )
    .fetch_one(app.db())
    .await
    .unwrap();
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'failed'").fetch_one(app.db()).await.unwrap();
    (crashed, counted_cut, handed_back, failed)
}

/// Runs that ended in failure, with their error: what explains an unanswered
/// turn (a worker call caught by a process going away and not retried would
/// show here as FAILED, e.g. "connection closed before message completed").
async fn failed_runs(app: &TestApp) -> Vec<String> {
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT friendly_id, status, error->>'message' FROM task_runs
         WHERE status NOT IN ('COMPLETED', 'EXECUTING', 'WAITING', 'QUEUED', 'PENDING', 'CANCELED')",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    rows.into_iter().map(|(r, s, e)| format!("{r} {s}: {}", e.unwrap_or_default())).collect()
}

/// How a load ended, as both load cases read it: the clients' figures and the
/// deployment's runs and jobs once it has caught up.
struct Outcome {
    figures: Arc<Figures>,
    acked: u64,
    lost: u64,
    sent: u64,
    answered: u64,
    crashed: i64,
    counted_cut: i64,
    handed_back: i64,
    failed: i64,
}

impl Outcome {
    /// Stops `load` and waits up to `settle_secs` for every job to finish.
    async fn of(load: Load, d: &Deployment, settle_secs: u64) -> Outcome {
        let (figures, acked, lost) = load.finish(d).await;
        jobs_settled(&d.app, settle_secs).await;
        let (crashed, counted_cut, handed_back, failed) = run_and_job_verdicts(&d.app).await;
        let sent = figures.turns_sent.load(Ordering::Relaxed);
        let answered = figures.turns_answered.load(Ordering::Relaxed);
        Outcome { figures, acked, lost, sent, answered, crashed, counted_cut, handed_back, failed }
    }

    /// The figures every load case reports, before its own.
    fn report_figures(&self) -> Vec<(&'static str, String)> {
        let f = &self.figures;
        vec![
            ("appends_acked", self.acked.to_string()),
            ("lost", self.lost.to_string()),
            ("sse_reconnects", f.sse_reconnects.load(Ordering::Relaxed).to_string()),
            ("gaps", f.gaps.load(Ordering::Relaxed).to_string()),
            ("dups", f.dups.load(Ordering::Relaxed).to_string()),
            ("turns_sent", self.sent.to_string()),
            ("turns_answered", self.answered.to_string()),
            ("slowest_turn_ms", f.slowest_turn_ms.load(Ordering::Relaxed).to_string()),
            ("crashed", self.crashed.to_string()),
            ("jobs_failed", self.failed.to_string()),
            ("attempts_cut_and_counted", self.counted_cut.to_string()),
        ]
    }

    /// What no process coming or going may cost: an acknowledged record, an
    /// SSE record missed or seen twice, a chat turn, a job.
    async fn assert_nothing_lost(&self, app: &TestApp) {
        let f = &self.figures;
        assert!(self.acked > 100, "too little load: {} appends", self.acked);
        assert_eq!(self.lost, 0, "acknowledged records lost");
        assert_eq!(f.gaps.load(Ordering::Relaxed), 0, "SSE gaps");
        assert_eq!(f.dups.load(Ordering::Relaxed), 0, "SSE duplicates");
        let unanswered = f.turn_failures.lock().unwrap().clone();
        let failed_runs = if self.sent == self.answered { Vec::new() } else { failed_runs(app).await };
        assert_eq!(self.sent, self.answered, "unanswered turns: {unanswered:?}; failed runs: {failed_runs:?}");
        assert_eq!(self.failed, 0, "jobs failed");
    }
}

/// Waits until no job is pending or running (the deployment has caught up).
async fn jobs_settled(app: &TestApp, secs: u64) {
    eventually(secs, "every job finished", || async {
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')")
            .fetch_one(app.db())
            .await
            .unwrap();
        (open == 0).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_processes_rolling_restart_of_three_loses_nothing() {
    let mut d = Deployment::start().await;
    let load = Load::start(&d, 4, 3).await;
    tokio::time::sleep(phase(3.0)).await;

    let mut drains = Vec::new();
    let mut readyz_during_drain = Vec::new();
    for i in 0..3 {
        let started = Instant::now();
        d.procs[i].terminate();
        // Right after SIGTERM (once the signal is handled) the process is not
        // ready: 503 on a connection it still serves, or refused (its
        // listener is closed).
        let ready = loop {
            let probe = d.procs[i].client.get(format!("{}/readyz", d.procs[i].base())).timeout(Duration::from_secs(2));
            match probe.send().await {
                Ok(r) if r.status() == StatusCode::OK => {}
                Ok(r) => break format!("{}@{}ms", r.status().as_u16(), started.elapsed().as_millis()),
                Err(_) => break format!("refused@{}ms", started.elapsed().as_millis()),
            }
            assert!(started.elapsed() < Duration::from_millis(500), "process {i} still ready 500 ms after SIGTERM");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        readyz_during_drain.push(ready);
        let status = d.procs[i].wait_exit(Duration::from_millis(GRACE_MS + 5_000)).await;
        let drain_ms = started.elapsed().as_millis() as u64;
        let status = status.unwrap_or_else(|| panic!("process {i} still running {drain_ms} ms after SIGTERM"));
        assert!(status.success(), "process {i} exited with {status}; log:\n{}", d.procs[i].log());
        assert!(drain_ms <= GRACE_MS + 1_000, "process {i} took {drain_ms} ms to exit (grace {GRACE_MS} ms)");
        drains.push(drain_ms);
        d.procs[i].restart().await;
        tokio::time::sleep(phase(3.0)).await;
    }
    tokio::time::sleep(phase(2.0)).await;
    let outcome = Outcome::of(load, &d, 30).await;
    let mut figures = outcome.report_figures();
    figures.extend([
        ("sse_error_events", outcome.figures.sse_error_events.load(Ordering::Relaxed).to_string()),
        ("attempts_handed_back", outcome.handed_back.to_string()),
        ("drain_ms", format!("{drains:?}").replace(' ', "")),
        ("readyz_after_sigterm", readyz_during_drain.join(",")),
        ("client_errors_retried", outcome.figures.client_errors.load(Ordering::Relaxed).to_string()),
    ]);
    report("rolling_restart", &figures);
    outcome.assert_nothing_lost(&d.app).await;
    assert!(
        outcome.figures.sse_error_events.load(Ordering::Relaxed) >= 1,
        "a drain ends its SSE responses with event: error"
    );
    assert!(outcome.sent >= 3, "too few chat turns: {}", outcome.sent);
    assert_eq!(outcome.crashed, 0, "runs CRASHED");
    assert_eq!(outcome.counted_cut, 0, "job attempts cut off by a shutdown yet counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_processes_sigkill_of_one_of_three_under_load() {
    let mut d = Deployment::start().await;
    let load = Load::start(&d, 4, 3).await;
    tokio::time::sleep(phase(4.0)).await;

    let victim = 1;
    let open_at_kill = d.lb.open(victim);
    let errors_before = load.figures.client_errors.load(Ordering::Relaxed);
    d.procs[victim].kill9().await;
    tokio::time::sleep(phase(8.0)).await;
    // Restarted later, as an orchestrator would; it takes its share again.
    d.procs[victim].restart().await;
    tokio::time::sleep(phase(3.0)).await;
    let outcome = Outcome::of(load, &d, 40).await;
    let errors = outcome.figures.client_errors.load(Ordering::Relaxed) - errors_before;
    let broken_others: u64 = (0..3).filter(|b| *b != victim).map(|b| d.lb.broken(b)).sum();
    let mut figures = outcome.report_figures();
    figures.extend([
        ("victim_open_connections", open_at_kill.to_string()),
        ("client_errors_after_kill", errors.to_string()),
        ("broken_connections_of_others", broken_others.to_string()),
        ("broken_connections_of_victim", d.lb.broken(victim).to_string()),
    ]);
    report("sigkill_one_of_three", &figures);
    outcome.assert_nothing_lost(&d.app).await;
    assert_eq!(broken_others, 0, "connections through the surviving processes broke");
    assert!(
        errors <= open_at_kill,
        "clients saw {errors} errors; only the {open_at_kill} connections the killed process held may fail"
    );
}

/// A job attempt whose process is killed outright is run again by another
/// process within apalis' orphan bound: the dead worker's tasks go back on
/// the queue once it has missed its heartbeats (5 s × 3), at the next
/// heartbeat of a live worker (every 5 s), so within about 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_processes_sigkill_mid_job_is_recovered_within_the_orphan_bound() {
    let held = HeldJob::start("task-killed-mid-job").await;
    let (app, job) = (&held.app, held.job);
    let mut victim = ServerProc::start(app, &[]).await;
    held.attempt_under_way().await;
    let survivor = ServerProc::start(app, &[]).await;
    victim.kill9().await;
    let killed = Instant::now();
    held.release().await;
    app.job_succeeded(phase(30.0).as_secs(), "the killed process's job, run by the survivor", job).await;
    let recovered_ms = killed.elapsed().as_millis() as u64;
    let statuses = held.attempt_statuses().await;
    report("sigkill_mid_job", &[("recovered_ms", recovered_ms.to_string()), ("attempts", statuses.join(","))]);
    assert!(recovered_ms <= 25_000, "the job was run again only after {recovered_ms} ms");
    assert_eq!(statuses, ["abandoned", "succeeded"]);
    drop(survivor);
}
