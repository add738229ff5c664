//! Postgres restarted mid-transaction (issue 22): a server on a private
//! Postgres under creates (each a session, its first run, its audit row and
//! its trigger job in one transaction), appends and closes, while Postgres is
//! SIGKILLed and started again twice. Every failed request must be a clean 503
//! with `Retry-After` (no 500, none past the client's timeout); every create
//! acknowledged (at once, or on a retry after a 503) must exist whole; nothing
//! may exist half-written (a session without its run or audit row, a run or
//! audit row without its session, a session whose create never succeeded).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::faults::{phase, report, PrivatePostgres};
use crate::common::{eventually, session_body, TestApp};

/// How long a request may take before the client gives up: well past the
/// server's connection wait (`DATABASE_ACQUIRE_TIMEOUT_MS` below).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const ACQUIRE_TIMEOUT_MS: u64 = 2_000;

#[derive(Default)]
struct Tally {
    requests: u64,
    acked: u64,
    unavailable: u64,
    /// 503s without `Retry-After` or without a JSON error.
    unclean: Vec<String>,
    server_errors: Vec<String>,
    other: Vec<String>,
    /// When each create succeeded (for the recovery time).
    create_successes: Vec<Instant>,
}

#[derive(Clone, Default)]
struct Shared {
    tally: Arc<Mutex<Tally>>,
    /// External id → friendly id of every acknowledged create.
    acked_creates: Arc<Mutex<HashMap<String, String>>>,
    /// Creates never acknowledged (every try refused until the end).
    unresolved_creates: Arc<Mutex<Vec<String>>>,
    acked_closes: Arc<Mutex<Vec<String>>>,
    /// (session, sequence number) of every acknowledged append.
    acked_appends: Arc<Mutex<Vec<(String, u64)>>>,
}

enum Outcome {
    Ok(Value),
    /// A clean 503: try again.
    Retry,
    /// Anything else: recorded, not retried.
    Failed,
}

impl Shared {
    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Outcome {
        let started = Instant::now();
        let result = req.timeout(CLIENT_TIMEOUT).send().await;
        self.tally.lock().unwrap().requests += 1;
        let resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                self.tally.lock().unwrap().other.push(format!("{what}: {err} after {:?}", started.elapsed()));
                return Outcome::Failed;
            }
        };
        let status = resp.status();
        let retry_after = resp.headers().contains_key(RETRY_AFTER);
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let mut t = self.tally.lock().unwrap();
        if status.is_success() {
            t.acked += 1;
            if what == "create" {
                t.create_successes.push(Instant::now());
            }
            return Outcome::Ok(body);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            t.unavailable += 1;
            if !retry_after || !body["error"].is_string() {
                t.unclean.push(format!("{what}: 503 retry-after={retry_after} {text}"));
            }
            return Outcome::Retry;
        }
        if status.is_server_error() {
            t.server_errors.push(format!("{what}: {status} {text}"));
        } else {
            t.other.push(format!("{what}: {status} {text}"));
        }
        Outcome::Failed
    }
}

/// Creates sessions one after another until `stop`; each create is retried
/// after a 503 (same external id) until it succeeds or `give_up`.
async fn creates(app: Arc<TestApp>, s: Shared, worker: usize, stop: Instant, give_up: Instant) {
    for n in 0.. {
        if Instant::now() >= stop {
            return;
        }
        let ext = format!("pg-{worker}-{n}");
        loop {
            let req = app.client.post(format!("{}/api/v1/sessions", app.base)).bearer_auth(&app.a.key);
            match s.send("create", req.json(&session_body(Some(&ext)))).await {
                Outcome::Ok(body) => {
                    let id = body["id"].as_str().unwrap_or_default().to_string();
                    s.acked_creates.lock().unwrap().insert(ext.clone(), id);
                    break;
                }
                Outcome::Retry if Instant::now() < give_up => tokio::time::sleep(Duration::from_millis(250)).await,
                _ => {
                    s.unresolved_creates.lock().unwrap().push(ext.clone());
                    break;
                }
            }
        }
    }
}

/// Appends to the given sessions' `.out` until `stop`.
async fn appends(app: Arc<TestApp>, s: Shared, sessions: Vec<String>, stop: Instant) {
    for n in 0usize.. {
        if Instant::now() >= stop {
            return;
        }
        let session = &sessions[n % sessions.len()];
        let req = app
            .client
            .post(format!("{}/realtime/v1/sessions/{session}/out/append", app.base))
            .bearer_auth(&app.a.key)
            .body(format!("record {n}"));
        match s.send("append", req).await {
            Outcome::Ok(body) => {
                let seq = body["seq"].as_u64().expect("an acknowledged append's seq");
                s.acked_appends.lock().unwrap().push((session.clone(), seq));
            }
            Outcome::Retry => tokio::time::sleep(Duration::from_millis(100)).await,
            Outcome::Failed => {}
        }
    }
}

/// Closes acknowledged sessions (the oldest not yet closed) until `stop`,
/// each retried after a 503 until it succeeds or `give_up`.
async fn closes(app: Arc<TestApp>, s: Shared, stop: Instant, give_up: Instant) {
    let mut done: HashSet<String> = HashSet::new();
    while Instant::now() < stop {
        let next = s.acked_creates.lock().unwrap().values().find(|id| !done.contains(*id)).cloned();
        let Some(id) = next else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        done.insert(id.clone());
        loop {
            let req = app.client.post(format!("{}/api/v1/sessions/{id}/close", app.base)).bearer_auth(&app.a.key);
            match s.send("close", req.json(&json!({"reason": "fault case"}))).await {
                Outcome::Ok(_) => {
                    s.acked_closes.lock().unwrap().push(id.clone());
                    break;
                }
                Outcome::Retry if Instant::now() < give_up => tokio::time::sleep(Duration::from_millis(250)).await,
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sequence numbers `session`'s `.out` holds, read page by page.
async fn stored_seqs(app: &TestApp, session: &str) -> HashSet<u64> {
    let mut seqs = HashSet::new();
    let mut after: Option<u64> = None;
    loop {
        let cursor = after.map(|a| format!("?afterEventId={a}")).unwrap_or_default();
        let (status, body) = app.get(&format!("/realtime/v1/sessions/{session}/out/records{cursor}"), &app.a.key).await;
        assert_eq!(status, StatusCode::OK, "records of {session}: {body}");
        let page: Vec<u64> = body["records"].as_array().unwrap().iter().filter_map(|r| r["seqNum"].as_u64()).collect();
        if page.is_empty() {
            return seqs;
        }
        after = page.iter().max().copied();
        seqs.extend(page);
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.db()).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_postgres_restart_mid_transaction_gives_clean_503s_and_no_half_written_rows() {
    let started = Instant::now();
    let mut pg = PrivatePostgres::start(&[]).await;
    pg.create_database("sessiond").await;
    let url = pg.url("sessiond");
    let app = Arc::new(
        TestApp::spawn_with(|c| {
            c.database_url = url;
            c.database_acquire_timeout_ms = ACQUIRE_TIMEOUT_MS;
        })
        .await,
    );
    // Sessions the appends write to, made before any fault.
    let mut targets = Vec::new();
    for i in 0..4 {
        targets.push(
            app.create_session(session_body(Some(&format!("pg-target-{i}")))).await["id"].as_str().unwrap().to_string(),
        );
    }

    let s = Shared::default();
    let load = phase(14.0);
    let stop = Instant::now() + load;
    let give_up = stop + Duration::from_secs(20);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..6 {
        tasks.spawn(creates(app.clone(), s.clone(), worker, stop, give_up));
    }
    for _ in 0..2 {
        tasks.spawn(appends(app.clone(), s.clone(), targets.clone(), stop));
    }
    tasks.spawn(closes(app.clone(), s.clone(), stop, give_up));

    // Two crashes of Postgres mid-load, each down for a while, then crash
    // recovery on the same data.
    let (mut outage, mut restarts) = (Duration::ZERO, Vec::new());
    for down in [phase(1.5), phase(2.5)] {
        tokio::time::sleep(load / 4).await;
        let killed = Instant::now();
        pg.kill9();
        tokio::time::sleep(down).await;
        pg.restart().await;
        outage += killed.elapsed();
        restarts.push(Instant::now());
    }
    while tasks.join_next().await.is_some() {}

    let t = std::mem::take(&mut *s.tally.lock().unwrap());
    let acked = s.acked_creates.lock().unwrap().clone();
    let unresolved = s.unresolved_creates.lock().unwrap().clone();
    let closed = s.acked_closes.lock().unwrap().clone();
    // Recovery: from each restart to the first create acknowledged after it.
    let recovery = restarts
        .iter()
        .map(|r| t.create_successes.iter().filter(|at| *at >= r).map(|at| at.duration_since(*r)).min())
        .collect::<Option<Vec<_>>>()
        .expect("a create succeeded after each restart")
        .into_iter()
        .max()
        .unwrap_or_default();

    // Every acknowledged create exists whole: the session, its first run and
    // its audit row.
    let whole: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT s.external_id,
                (SELECT count(*) FROM task_runs r WHERE r.session_id = s.id),
                (SELECT count(*) FROM session_runs a WHERE a.session_id = s.id AND a.reason = 'initial')
         FROM sessions s WHERE s.external_id LIKE 'pg-%' AND s.external_id NOT LIKE 'pg-target-%'",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    let stored: HashMap<String, (i64, i64)> = whole.into_iter().map(|(e, r, a)| (e, (r, a))).collect();
    let missing: Vec<&String> = acked.keys().filter(|e| !stored.contains_key(*e)).collect();
    let partial: Vec<&String> = stored.iter().filter(|(_, (r, a))| *r < 1 || *a != 1).map(|(e, _)| e).collect();
    // A session whose create was never acknowledged (not even on a retry).
    let unacked: Vec<&String> = stored.keys().filter(|e| !acked.contains_key(*e)).collect();
    let orphans = count(
        &app,
        "SELECT (SELECT count(*) FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM task_runs r WHERE r.session_id = s.id))
              + (SELECT count(*) FROM task_runs r WHERE r.session_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = r.session_id))
              + (SELECT count(*) FROM session_runs a WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = a.session_id)
                   OR NOT EXISTS (SELECT 1 FROM task_runs r WHERE r.id = a.run_id))",
    )
    .await;
    // Every acknowledged close is closed, and its channels sealed (by the close
    // itself: it answers only once sealed).
    let mut unsealed = 0;
    for id in &closed {
        let sealed: bool = sqlx::query_scalar(
            "SELECT closed_at IS NOT NULL AND channels_closed_at IS NOT NULL FROM sessions WHERE friendly_id = $1",
        )
        .bind(id)
        .fetch_one(app.db())
        .await
        .unwrap();
        unsealed += i64::from(!sealed);
    }
    // Every acknowledged append is still there.
    let appended = s.acked_appends.lock().unwrap().clone();
    let mut lost_appends = 0;
    for session in &targets {
        let stored = stored_seqs(&app, session).await;
        lost_appends += appended.iter().filter(|(s, seq)| s == session && !stored.contains(seq)).count();
    }
    // The server is whole again: a create answers at once.
    eventually(10, "a create after the faults", || async {
        let (status, _) = app.post("/api/v1/sessions", &app.a.key, session_body(None)).await;
        (status == StatusCode::CREATED).then_some(())
    })
    .await;

    report(
        "postgres_restart",
        &[
            ("requests", t.requests.to_string()),
            ("acked", t.acked.to_string()),
            ("creates_acked", acked.len().to_string()),
            ("closes_acked", closed.len().to_string()),
            ("appends_acked", appended.len().to_string()),
            ("appends_lost", lost_appends.to_string()),
            ("503s", t.unavailable.to_string()),
            ("500s", t.server_errors.len().to_string()),
            ("other_errors", t.other.len().to_string()),
            ("unclean_503s", t.unclean.len().to_string()),
            ("orphans", orphans.to_string()),
            ("outage_ms", outage.as_millis().to_string()),
            ("recovery_ms", recovery.as_millis().to_string()),
            ("secs", format!("{:.1}", started.elapsed().as_secs_f64())),
        ],
    );
    assert!(t.server_errors.is_empty(), "500s: {:?}", &t.server_errors[..t.server_errors.len().min(5)]);
    assert!(t.other.is_empty(), "other errors: {:?}", &t.other[..t.other.len().min(5)]);
    assert!(t.unclean.is_empty(), "unclean 503s: {:?}", &t.unclean[..t.unclean.len().min(5)]);
    assert!(t.unavailable > 0, "the outages were never seen: the case tested nothing");
    assert!(unresolved.is_empty(), "creates never acknowledged, even after Postgres came back: {unresolved:?}");
    assert!(missing.is_empty(), "acknowledged creates missing: {missing:?}");
    assert!(partial.is_empty(), "sessions without their run or audit row: {partial:?}");
    assert!(unacked.is_empty(), "sessions whose create was never acknowledged: {unacked:?}");
    assert_eq!(orphans, 0, "orphan rows");
    assert_eq!(unsealed, 0, "acknowledged closes not sealed");
    assert_eq!(lost_appends, 0, "acknowledged appends lost");
    assert!(!acked.is_empty() && !closed.is_empty());
}
