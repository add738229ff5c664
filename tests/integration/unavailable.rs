//! Redis unavailable is 503 with `Retry-After` on every route that needs it, as
//! a class (issue 22 item 3): whichever layer the Redis error passes through
//! (channel store, waitpoints, the close's seal, the run queue, the dashboard),
//! a Redis that is down, or up but refusing writes (OOM under `noeviction`, a
//! read-only replica), answers 503 with `Retry-After` and a JSON error (a page
//! on the dashboard), never 500, and writes nothing half-way to Postgres. Each
//! test runs its own `redis-server`, so the shared one is untouched.

use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, COOKIE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::redis_proc::{free_port, start_fresh, RedisProc, TempDir};
use crate::common::{eventually, running_session, session_body, TestApp};
use crate::dashboard::{with_operators, Operator, ADMIN};

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    text: String,
    took: Duration,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// One request of a route class, named for the failure messages.
struct Call {
    what: &'static str,
    method: Method,
    path: String,
    token: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

impl Call {
    fn new(what: &'static str, method: Method, path: String, token: &str, body: Option<Value>) -> Call {
        Call { what, method, path, token: token.to_string(), body, headers: Vec::new() }
    }

    fn header(mut self, name: &'static str, value: &str) -> Call {
        self.headers.push((name, value.to_string()));
        self
    }

    async fn send(&self, app: &TestApp) -> Answer {
        let mut req = app
            .client
            .request(self.method.clone(), format!("{}{}", app.base, self.path))
            .timeout(Duration::from_secs(20))
            .bearer_auth(&self.token);
        if let Some(body) = &self.body {
            req = req.json(body);
        }
        for (name, value) in &self.headers {
            req = req.header(*name, value);
        }
        let started = Instant::now();
        let resp = req.send().await.unwrap_or_else(|e| panic!("{}: {e}", self.what));
        let status = resp.status();
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(String::from);
        let text = resp.text().await.unwrap_or_default();
        Answer { status, retry_after, text, took: started.elapsed() }
    }
}

/// A clean "come back later": 503, `Retry-After`, a JSON error naming no
/// internals, within the fail-fast bound.
fn assert_unavailable(what: &str, a: &Answer) {
    eprintln!("{what}: {} in {:?} {}", a.status, a.took, a.text);
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {}", a.text);
    assert_eq!(a.retry_after.as_deref(), Some("1"), "{what}: no Retry-After");
    let error = a.json()["error"].as_str().map(str::to_lowercase).unwrap_or_else(|| panic!("{what}: {}", a.text));
    assert!(!error.contains("redis") && !error.contains("oom") && !error.contains("readonly"), "{what}: {error}");
    assert!(a.took < Duration::from_secs(3), "{what} took {:?}", a.took);
}

/// What the routes under test could write to Postgres: the rows a half-done
/// request would leave.
async fn postgres_rows(app: &TestApp) -> Vec<(String, i64)> {
    let mut rows = Vec::new();
    for (table, sql) in [
        ("sessions", "SELECT count(*) FROM sessions"),
        ("closed sessions", "SELECT count(*) FROM sessions WHERE closed_at IS NOT NULL"),
        ("task_runs", "SELECT count(*) FROM task_runs"),
        ("executing runs", "SELECT count(*) FROM task_runs WHERE status = 'EXECUTING'"),
        ("session_runs", "SELECT count(*) FROM session_runs"),
        ("waitpoints", "SELECT count(*) FROM waitpoints"),
        // (The sweeps' cron ticks add jobs of their own meanwhile.)
        ("jobs", "SELECT count(*) FROM jobs WHERE kind NOT LIKE '%-sweep'"),
    ] {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(app.db()).await.unwrap();
        rows.push((table.to_string(), n));
    }
    rows
}

/// A session with its run dequeued (so waits can be made), plus one waiting
/// in the queue for a dequeue.
struct Fixture {
    session: String,
    queued_session: String,
    run_id: String,
    run_token: String,
    queued_task: String,
}

async fn fixture(app: &TestApp, tag: &str) -> Fixture {
    let (session, run) = running_session(app, &format!("{tag}-running")).await;
    let queued_task = format!("task-{tag}-queued");
    let mut body = session_body(Some(&format!("{tag}-queued")));
    body["taskIdentifier"] = json!(queued_task);
    let queued_session = app.create_session(body).await["id"].as_str().unwrap().to_string();
    // The queued session's run is on the Redis run queue before Redis goes.
    eventually(10, "the trigger job pushed the queued run", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM task_runs WHERE task_identifier = $1 AND status = 'QUEUED'
               AND NOT EXISTS (SELECT 1 FROM jobs WHERE status IN ('pending', 'running') AND kind = 'trigger-run')",
        )
        .bind(&queued_task)
        .fetch_one(app.db())
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    Fixture { session, queued_session, run_id: run.id, run_token: run.token, queued_task }
}

/// The writing routes of each class (that change Redis).
fn write_calls(app: &TestApp, f: &Fixture) -> Vec<Call> {
    let key = &app.a.key;
    let channel = |io: &str, rest: &str| format!("/realtime/v1/sessions/{}/{io}{rest}", f.session);
    vec![
        Call::new("append .out", Method::POST, channel("out", "/append"), key, Some(json!("during"))),
        Call::new("append .in", Method::POST, channel("in", "/append"), key, Some(json!("during"))),
        Call::new(
            "waitpoint create",
            Method::POST,
            format!("/api/v1/runs/{}/session-streams/wait", f.run_id),
            &f.run_token,
            Some(json!({"session": f.session, "io": "in"})),
        ),
    ]
}

/// The reading routes of each class, on `session`'s channels (Redis down
/// only: a Redis refusing writes still serves them).
fn read_calls(app: &TestApp, f: &Fixture, session: &str) -> Vec<Call> {
    let key = &app.a.key;
    let channel = |io: &str, rest: &str| format!("/realtime/v1/sessions/{session}/{io}{rest}");
    vec![
        Call::new("initialize .out", Method::PUT, channel("out", ""), key, None),
        Call::new("records", Method::GET, channel("out", "/records"), key, None),
        Call::new("subscribe", Method::GET, channel("out", ""), key, None)
            .header(ACCEPT.as_str(), "text/event-stream")
            .header("timeout-seconds", "1"),
        Call::new(
            "worker dequeue",
            Method::POST,
            "/api/v1/worker/dequeue".into(),
            key,
            Some(json!({"tasks": [f.queued_task], "waitSeconds": 1})),
        ),
    ]
}

fn close_call(app: &TestApp, f: &Fixture) -> Call {
    Call::new("close", Method::POST, format!("/api/v1/sessions/{}/close", f.session), &app.a.key, Some(json!({})))
}

/// The dashboard's live tail (it reads the channel in Redis): a 503 page.
async fn assert_dashboard_unavailable(app: &TestApp, op: &Operator, session: &str) {
    let resp = reqwest::Client::new()
        .get(format!("{}/dashboard/sessions/{session}/out/tail", app.base))
        .header(COOKIE, format!("sessiond_dashboard={}", op.cookie))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let retry_after = resp.headers().get(RETRY_AFTER).cloned();
    let body = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "dashboard tail: {body}");
    assert_eq!(retry_after.as_ref().and_then(|v| v.to_str().ok()), Some("1"), "dashboard tail: no Retry-After");
    assert!(body.contains("<html") && !body.to_lowercase().contains("redis"), "{body}");
}

/// After Redis is back (or writes again): the same routes work (on the
/// session left open; the other one's close was refused), and a retried close
/// seals the channels.
async fn assert_works_again(app: &TestApp, f: &Fixture) {
    eventually(15, "appends work again", || async {
        (app.append(&f.queued_session, "out", &app.a.key, "after", &[]).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    for call in read_calls(app, f, &f.queued_session) {
        let a = call.send(app).await;
        assert_eq!(a.status, StatusCode::OK, "{} after the outage: {}", call.what, a.text);
        if call.what == "worker dequeue" {
            assert_eq!(a.json()["runs"].as_array().map(Vec::len), Some(1), "the queued run: {}", a.text);
        }
    }
    let close = close_call(app, f).send(app).await;
    assert_eq!(close.status, StatusCode::OK, "close retried after the outage: {}", close.text);
    let sealed: bool = sqlx::query_scalar("SELECT channels_closed_at IS NOT NULL FROM sessions WHERE friendly_id = $1")
        .bind(&f.session)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert!(sealed, "the close's retry sealed the channels");
    let (status, body) = app.append(&f.session, "out", &app.a.key, "after close", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "append after close: {body}");
}

#[tokio::test]
async fn with_redis_killed_every_route_class_answers_503_with_retry_after_then_works_again() {
    let dir = TempDir::new();
    let mut redis = start_fresh(&dir.0).await;
    let (url, port) = (redis.url(), redis.port);
    let app = TestApp::spawn_with(|c| {
        c.redis_url = url;
        // The dequeued run stays EXECUTING through the test without heartbeats.
        c.run_heartbeat_timeout_ms = 120_000;
    })
    .await;
    with_operators(&app).await;
    let op = Operator::login(&app, ADMIN).await;
    let f = fixture(&app, "killed").await;
    assert_eq!(app.append(&f.session, "out", &app.a.key, "before", &[]).await.0, StatusCode::OK);

    redis.kill9();

    let before = postgres_rows(&app).await;
    for call in write_calls(&app, &f).into_iter().chain(read_calls(&app, &f, &f.session)) {
        assert_unavailable(call.what, &call.send(&app).await);
    }
    assert_eq!(postgres_rows(&app).await, before, "a refused request wrote to Postgres");

    // The close (measured at 500 before): the row is closed and its sealing
    // job queued in the ledger, but the answer waits for the seal: 503.
    assert_unavailable("close", &close_call(&app, &f).send(&app).await);
    assert_dashboard_unavailable(&app, &op, &f.session).await;
    // An update does not need Redis.
    let (status, updated) =
        app.patch(&format!("/api/v1/sessions/{}", f.queued_session), &app.a.key, json!({"metadata": {"k": 1}})).await;
    assert_eq!(status, StatusCode::OK, "update while Redis is down: {updated}");
    // A create does not need Redis: its trigger job waits in the ledger.
    let (status, created) = app.post("/api/v1/sessions", &app.a.key, session_body(Some("killed-create"))).await;
    assert_eq!(status, StatusCode::CREATED, "create while Redis is down: {created}");

    let mut redis = RedisProc::spawn(&dir.0, port);
    assert!(redis.wait_ready(Duration::from_secs(10)).await, "redis did not come back:\n{}", redis.log());
    assert_works_again(&app, &f).await;
    drop(redis);
}

/// Sets a config value on the private Redis (not through the app).
async fn redis_cmd(redis: &RedisProc, args: &[&str]) {
    let mut conn =
        redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.expect("connect to redis");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: () = cmd.query_async(&mut conn).await.unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

#[tokio::test]
async fn with_redis_refusing_writes_oom_or_read_only_writes_answer_503_with_retry_after() {
    let dir = TempDir::new();
    let redis = start_fresh(&dir.0).await;
    let url = redis.url();
    let app = TestApp::spawn_with(|c| {
        c.redis_url = url;
        // The dequeued run stays EXECUTING through the test without heartbeats.
        c.run_heartbeat_timeout_ms = 120_000;
    })
    .await;
    let f = fixture(&app, "refusing").await;
    assert_eq!(app.append(&f.session, "out", &app.a.key, "before", &[]).await.0, StatusCode::OK);

    // Out of memory with nothing to evict: every write is refused (OOM).
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).await;
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "1"]).await;
    let before = postgres_rows(&app).await;
    for call in write_calls(&app, &f) {
        assert_unavailable(&format!("{} (OOM)", call.what), &call.send(&app).await);
    }
    assert_eq!(postgres_rows(&app).await, before, "a refused request wrote to Postgres (OOM)");
    redis_cmd(&redis, &["CONFIG", "SET", "maxmemory", "0"]).await;
    eventually(10, "appends work again after OOM", || async {
        (app.append(&f.session, "out", &app.a.key, "after oom", &[]).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let wait = write_calls(&app, &f).pop().unwrap().send(&app).await;
    assert_eq!(wait.status, StatusCode::OK, "waitpoint create after OOM: {}", wait.text);

    // A replica of a master that is not there: writes are refused (READONLY).
    let dead_master = free_port().to_string();
    redis_cmd(&redis, &["REPLICAOF", "127.0.0.1", &dead_master]).await;
    let before = postgres_rows(&app).await;
    for call in write_calls(&app, &f) {
        assert_unavailable(&format!("{} (READONLY)", call.what), &call.send(&app).await);
    }
    assert_unavailable("close (READONLY)", &close_call(&app, &f).send(&app).await);
    let after = postgres_rows(&app).await;
    // The close's own row and job are committed before the seal is tried (its
    // retry completes it); nothing else changed.
    let expected: Vec<(String, i64)> = before
        .into_iter()
        .map(|(t, n)| if t == "closed sessions" || t == "jobs" { (t, n + 1) } else { (t, n) })
        .collect();
    assert_eq!(after, expected, "a refused request wrote to Postgres (READONLY)");

    redis_cmd(&redis, &["REPLICAOF", "NO", "ONE"]).await;
    assert_works_again(&app, &f).await;
}
