//! Test harness: a real server on a random port, backed by its own Postgres
//! schema, so tests run in parallel without seeing each other's rows.
#![allow(dead_code)]

pub mod balancer;
pub mod clickhouse;
pub mod cutting_proxy;
pub mod faults;
pub mod held_job;
pub mod node;
pub mod redis_proc;
pub mod server_proc;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sessiond::app::{self, AppState};
use sessiond::config::Config;
use sessiond::tenancy::keys::MasterKey;
use sessiond::tenancy::{store as tenancy, EnvType, Environment};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct TestEnv {
    pub env: Environment,
    pub key: String,
}

pub struct TestApp {
    pub base: String,
    pub state: AppState,
    pub a: TestEnv,
    pub b: TestEnv,
    pub client: reqwest::Client,
    _shutdown: StopOnDrop,
    /// The server's task: ends once it has drained (its job runtime and
    /// replication consumer stopped).
    server: tokio::task::JoinHandle<()>,
    /// Shared by the servers of one deployment ([`TestApp::peer`]): the
    /// last to go drops the deployment's replication slot.
    slot_guard: Option<std::sync::Arc<SlotGuard>>,
}

/// Drops a deployment's replication slot and publication when the last of
/// its test servers goes, the test passed or failed: a slot left behind
/// keeps WAL on the shared Postgres for good, and slots are few. (A passing
/// test drops its slot itself and checks that it is gone; this catches the
/// rest.) The test's runtime is blocked meanwhile, so a stream still open is
/// ended rather than waited for.
pub struct SlotGuard {
    database_url: String,
    slot: String,
}

impl SlotGuard {
    /// A guard of `slot` alone, for a test whose slot no test server arms
    /// (one it names itself, or one taken over by hand).
    pub fn new(database_url: &str, slot: &str) -> SlotGuard {
        SlotGuard { database_url: database_url.to_string(), slot: slot.to_string() }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let (url, slot) = (self.database_url.clone(), self.slot.clone());
        let dropping = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(db) = sqlx::PgPool::connect(&url).await else { return };
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    )
                    .bind(&slot)
                    .execute(&db)
                    .await;
                    let dropped = sessiond::replication::slot::drop(&db, &slot).await.is_ok();
                    if dropped || tokio::time::Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let _ = dropping.join();
    }
}

/// Tells the server to stop when the test lets go of it, as SIGTERM would:
/// a dropped test server must not leave its job runtime or replication
/// consumer running (taking the lease again, recreating a slot the test
/// dropped). (The server stops on a closed channel too; this does not lean
/// on that.)
struct StopOnDrop(watch::Sender<bool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/sessiond_test".into())
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// A server with no cron at all: a test that needs a sweep runs it itself
    /// ([`TestApp::sweep`]), so what it shows does not hang on a tick.
    pub async fn spawn_without_sweeps() -> TestApp {
        Self::spawn_with(|c| c.job_schedules_file = Some(schedules_file(&[]))).await
    }

    /// Runs one sweep now, as its cron tick would; returns its summary.
    pub async fn sweep(&self, kind: sessiond::jobs::JobKind) -> String {
        let job = sessiond::jobs::Job::sweep(kind);
        sessiond::app::job_dispatch::execute(&self.state.job_context(), &job, 1).await.expect("sweep")
    }

    /// Applies the ClickHouse schema to this test's database.
    pub async fn clickhouse_ready(&self) {
        sessiond::analytics::schema::migrate(&self.state.analytics).await.expect("clickhouse schema");
    }

    /// Waits until this server's job runtime has done its start-up check of
    /// the job queue (it writes the queue's marker last). Until then the check
    /// may push every unfinished job once more, so a test that counts a job's
    /// deliveries or attempts waits for it before writing jobs. A test that
    /// wrote the marker itself would race the check still in flight.
    pub async fn job_queue_ready(&self) {
        let queue = self.state.jobs.queue(sessiond::jobs::Lane::Engine);
        eventually(10, "the job runtime's start-up queue check", || async {
            queue.intact().await.unwrap().then_some(())
        })
        .await
    }

    /// Waits until job `id` has succeeded.
    pub async fn job_succeeded(&self, secs: u64, what: &str, id: uuid::Uuid) {
        eventually(secs, what, || async {
            let row = sessiond::jobs::store::find(self.db(), id).await.unwrap().expect("job row");
            (row.status == sessiond::jobs::store::JobStatus::Succeeded).then_some(())
        })
        .await
    }

    /// Moves a run's clock back by `secs`: when it was created, started and
    /// last heard of, as if that much time had passed.
    pub async fn age_run(&self, run: &str, secs: i64) {
        sqlx::query(
            "UPDATE task_runs SET created_at = created_at - make_interval(secs => $2),
                started_at = started_at - make_interval(secs => $2),
                heartbeat_deadline = heartbeat_deadline - make_interval(secs => $2)
             WHERE friendly_id = $1",
        )
        .bind(run)
        .bind(secs as f64)
        .execute(self.db())
        .await
        .unwrap();
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        server_logs();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut config = Config::for_database(&database_url(), Some(schema.clone()));
        config.redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        config.redis_prefix = format!("test:{schema}");
        // Fast engine settings so liveness, retries and sweeps show within seconds.
        config.run_heartbeat_timeout_ms = 1_500;
        config.run_retry_base_ms = 50;
        config.run_retry_max_ms = 200;
        config.job_retry_base_ms = 50;
        config.job_schedules_file = Some(fast_schedules());
        // ClickHouse: a database per test, named like its schema. The schema is
        // applied by the tests that use ClickHouse (`clickhouse_ready`), not by
        // every server start.
        config.clickhouse_url = std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
        config.clickhouse_database = schema.clone();
        config.clickhouse_migrate_on_start = false;
        let master_hex = hex::encode(rand_bytes());
        config.master_key = Some(master_hex.clone());
        tweak(&mut config);
        let pool = sessiond::db::connect(&config).await.expect("connect to Postgres");
        sessiond::db::migrate(&pool).await.expect("migrate");
        let master = MasterKey::from_hex(&master_hex).unwrap();
        let (env_a, key_a) = tenancy::create_environment(&pool, &master, "org-a", "proj", EnvType::Dev).await.unwrap();
        let (env_b, key_b) = tenancy::create_environment(&pool, &master, "org-b", "proj", EnvType::Prod).await.unwrap();

        let state = AppState::connect(config, pool, master).await.expect("connect to Redis");
        let mut app = Self::serve(
            state,
            TestEnv { env: env_a, key: key_a.expose().to_string() },
            TestEnv { env: env_b, key: key_b.expose().to_string() },
        )
        .await;
        if app.state.config.replication_enabled {
            app.guard_slot();
        }
        app
    }

    /// Drops the deployment's replication slot when its last test server
    /// goes (see [`SlotGuard`]); armed by every server started replicating,
    /// and by a test that runs consumers of its own beside a server that
    /// does not.
    pub fn guard_slot(&mut self) {
        let config = &self.state.config;
        self.slot_guard.get_or_insert_with(|| {
            std::sync::Arc::new(SlotGuard {
                database_url: config.database_url.clone(),
                slot: config.replication_slot_name(),
            })
        });
    }

    /// A second server process of the same deployment: this one's database
    /// schema, Redis prefix, master key and environments, with `tweak` applied
    /// to its configuration, and its own caches and job runtime.
    pub async fn peer(&self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = self.state.config.clone();
        tweak(&mut config);
        let master = app::master_key(&config).unwrap();
        let state = AppState::connect(config, self.state.db.clone(), master).await.expect("connect to Redis");
        let env = |e: &TestEnv| TestEnv { env: e.env.clone(), key: e.key.clone() };
        let mut peer = Self::serve(state, env(&self.a), env(&self.b)).await;
        peer.slot_guard = self.slot_guard.clone();
        if peer.state.config.replication_enabled {
            peer.guard_slot();
        }
        peer
    }

    async fn serve(state: AppState, a: TestEnv, b: TestEnv) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = watch::channel(false);
        let serve_state = state.clone();
        let server = tokio::spawn(async move {
            if let Err(err) = app::serve(listener, serve_state, rx).await {
                eprintln!("test server stopped: {err:#}");
            }
        });
        TestApp {
            base,
            state,
            a,
            b,
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            _shutdown: StopOnDrop(tx),
            server,
            slot_guard: None,
        }
    }

    /// Stops this server and waits until it has drained: its job runtime and
    /// replication consumer have stopped (the lease released), so nothing of
    /// it touches the deployment afterwards. Fails the test if that takes
    /// longer than the shutdown grace and a margin.
    pub async fn stop(self) {
        let grace = Duration::from_millis(self.state.config.shutdown_grace_ms);
        let TestApp { server, _shutdown, .. } = self;
        drop(_shutdown);
        tokio::time::timeout(grace + Duration::from_secs(10), server)
            .await
            .expect("the server did not stop within its shutdown grace")
            .expect("the server's task");
    }

    /// Stops this server (its jobs and cron included) and starts a fresh
    /// process-like one on the same schema, Redis prefix and environments, as a
    /// restart would; `tweak` adjusts the new server's configuration.
    pub async fn restart(self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let TestApp { state, a, b, _shutdown, slot_guard, .. } = self;
        drop(_shutdown);
        let mut config = state.config.clone();
        tweak(&mut config);
        let master = app::master_key(&config).unwrap();
        let pool = sessiond::db::connect(&config).await.expect("connect to Postgres");
        drop(state);
        let state = AppState::connect(config, pool, master).await.expect("connect to Redis");
        let mut app = Self::serve(state, a, b).await;
        app.slot_guard = slot_guard;
        if app.state.config.replication_enabled {
            app.guard_slot();
        }
        app
    }

    /// Sends a request with an optional bearer token and JSON body; returns the
    /// status and the body parsed as JSON (`Value::Null` when not JSON). A body
    /// that does not arrive whole (the client's 30 s timeout) fails the test.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_else(|e| panic!("{path}: the body did not arrive: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body)).await
    }

    /// Creates a session in environment A and returns the response body.
    pub async fn create_session(&self, body: Value) -> Value {
        let (status, json) = self.post("/api/v1/sessions", &self.a.key, body).await;
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "create: {status} {json}");
        json
    }

    pub fn db(&self) -> &sqlx::PgPool {
        &self.state.db
    }

    pub fn worker(&self) -> sessiond::worker::WorkerClient {
        sessiond::worker::WorkerClient::new(&self.base, &self.a.key)
    }

    /// A run's status, by friendly id.
    pub async fn run_status(&self, run: &str) -> String {
        sqlx::query_scalar("SELECT status FROM task_runs WHERE friendly_id = $1")
            .bind(run)
            .fetch_one(self.db())
            .await
            .unwrap()
    }

    /// A session's row id, by friendly id.
    pub async fn session_uuid(&self, friendly: &str) -> uuid::Uuid {
        sqlx::query_scalar("SELECT id FROM sessions WHERE friendly_id = $1")
            .bind(friendly)
            .fetch_one(self.db())
            .await
            .unwrap()
    }

    /// The waitpoint ids in a channel's pending set.
    pub async fn pending_waiters(&self, key: sessiond::streams::ChannelKey) -> Vec<String> {
        redis::cmd("SMEMBERS")
            .arg(self.state.channels.waiters_key(key))
            .query_async(&mut self.state.redis.clone())
            .await
            .unwrap()
    }
}

/// Every sweep every second. The file is named for its content, so test
/// binaries built from different checkouts never read each other's sweeps.
pub fn fast_schedules() -> String {
    schedules_file(&["run-sweep", "session-expiry-sweep", "waitpoint-timeout-sweep", "input-boot-sweep"])
}

/// A schedules file running each of `sweeps` every second.
pub fn schedules_file(sweeps: &[&str]) -> String {
    use std::hash::{Hash, Hasher};
    let text: String = sweeps.iter().map(|s| format!("[{s}]\ncron = \"* * * * * *\"\n")).collect();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    let path = std::env::temp_dir().join(format!("sessiond-test-schedules-{:016x}.toml", hasher.finish()));
    let text = text.as_str();
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
        let tmp = path.with_extension(format!("{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path.to_string_lossy().into_owned()
}

/// Polls `check` every 50 ms until it returns Some or `secs` pass.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The task every session of [`session_body`] runs.
pub fn tasks() -> Vec<String> {
    vec!["echo-agent".to_string()]
}

/// Dequeues exactly one run of [`tasks`], waiting up to 10 s.
pub async fn dequeue_one(w: &sessiond::worker::WorkerClient) -> sessiond::worker::AssignedRun {
    let runs = w.dequeue(&tasks(), 1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(runs.len(), 1, "expected one run");
    runs.into_iter().next().unwrap()
}

/// A session of its own task with its first run dequeued (EXECUTING).
pub async fn running_session(app: &TestApp, ext: &str) -> (String, sessiond::worker::AssignedRun) {
    let mut body = session_body(Some(ext));
    body["taskIdentifier"] = serde_json::json!(format!("task-{ext}"));
    let s = app.create_session(body).await;
    let run = app.worker().dequeue(&[format!("task-{ext}")], 1, Duration::from_secs(10)).await.unwrap().remove(0);
    (s["id"].as_str().unwrap().to_string(), run)
}

pub fn session_body(external_id: Option<&str>) -> Value {
    let mut body = serde_json::json!({
        "type": "chat.agent",
        "taskIdentifier": "echo-agent",
        "triggerConfig": {"basePayload": {"chatId": external_id.unwrap_or("none")}, "maxAttempts": 3},
        "tags": ["test"],
        "metadata": {"user": "u1"}
    });
    if let Some(ext) = external_id {
        body["externalId"] = Value::String(ext.into());
    }
    body
}

fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, chunk) in uuid::Uuid::new_v4().as_bytes().iter().chain(uuid::Uuid::new_v4().as_bytes()).enumerate() {
        b[i] = *chunk;
    }
    b
}

/// A parsed SSE record from a `batch` event.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SseRecord {
    pub seq_num: u64,
    pub body: String,
    pub headers: Vec<(String, String)>,
    pub timestamp: i64,
}

/// An open SSE response, read frame by frame.
pub struct SseClient {
    pub headers: reqwest::header::HeaderMap,
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    /// Bytes, not text: a chunk may end inside a multi-byte character.
    buf: Vec<u8>,
    pub last_event_id: Option<String>,
}

impl SseClient {
    /// The next frame's records (`None` when the server closed the stream, or
    /// nothing came within `timeout`), skipping keep-alive comments. A broken
    /// body (the client's own timeout included) fails the test.
    pub async fn next_batch(&mut self, timeout: Duration) -> Option<Vec<SseRecord>> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let frame = String::from_utf8(raw).expect("SSE frames are UTF-8");
                let mut event = None;
                let mut data = None;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        self.last_event_id = Some(v.to_string());
                    }
                }
                if event.as_deref() == Some("batch") {
                    let v: serde_json::Value = serde_json::from_str(&data.unwrap_or_default()).unwrap();
                    return Some(serde_json::from_value(v["records"].clone()).unwrap());
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next()).await.ok()??;
            self.buf.extend_from_slice(&chunk.expect("the SSE body broke off"));
        }
    }

    /// Every record until the server closes the stream; fails the test if it
    /// is still open after `timeout` (give the request a shorter window).
    pub async fn collect(&mut self, timeout: Duration) -> Vec<SseRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut all = Vec::new();
        while let Some(batch) = self.next_batch(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            all.extend(batch);
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream was still open after {timeout:?}");
        all
    }
}

impl TestApp {
    /// Opens an SSE subscription; `headers` must set its window
    /// (`timeout-seconds`), so that no test waits out the 30 s default unawares.
    pub async fn sse(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> SseClient {
        assert!(
            headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("timeout-seconds")),
            "set the subscription's window (timeout-seconds)"
        );
        let mut req =
            self.client.get(format!("{}{}", self.base, path)).bearer_auth(token).header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("sse connect");
        assert!(resp.status().is_success(), "sse status {}", resp.status());
        SseClient {
            headers: resp.headers().clone(),
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            last_event_id: None,
        }
    }

    /// A CORS preflight for `path`, as a browser would send it before a POST.
    pub async fn preflight(&self, path: &str, request_headers: &str) -> reqwest::Response {
        self.client
            .request(Method::OPTIONS, format!("{}{}", self.base, path))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", request_headers)
            .send()
            .await
            .expect("preflight")
    }

    /// Appends `body` to a channel; returns the status and JSON answer.
    pub async fn append(
        &self,
        session: &str,
        io: &str,
        token: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .post(format!("{}/realtime/v1/sessions/{session}/{io}/append", self.base))
            .bearer_auth(token)
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("append");
        let status = resp.status();
        let text =
            resp.text().await.unwrap_or_else(|e| panic!("append to {session}/{io}: the body did not arrive: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// `host:port` of the test Redis.
pub fn redis_addr() -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    url.trim_start_matches("redis://").trim_end_matches('/').to_string()
}

/// A TCP proxy to Redis that can make Redis fail (`true` on the sender) and
/// recover (`false`). Each switch drops the connections open through it; while
/// failing, new connections are answered by a stand-in that refuses every
/// command with an error at once (no timeouts, no reconnect back-off).
pub async fn failing_redis_proxy() -> (String, watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = redis_addr();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let (fail, failing) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut failing = failing.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let fail_now = *failing.borrow_and_update();
                let switched = async move {
                    let _ = failing.changed().await;
                };
                if fail_now {
                    let refuse = async {
                        let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                        while let Ok(n @ 1..) = client.read(&mut chunk).await {
                            buf.extend_from_slice(&chunk[..n]);
                            while let Some(len) = resp_command_len(&buf) {
                                buf.drain(..len);
                                if client.write_all(b"-ERR injected failure\r\n").await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    tokio::select! { _ = refuse => {}, _ = switched => {} }
                } else if let Ok(server) = tokio::net::TcpStream::connect(&upstream).await {
                    let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                        (client.into_split(), server.into_split());
                    tokio::select! {
                        _ = tokio::io::copy(&mut client_rx, &mut server_tx) => {}
                        _ = tokio::io::copy(&mut server_rx, &mut client_tx) => {}
                        _ = switched => {}
                    }
                }
            });
        }
    });
    (url, fail)
}

/// The length of the first complete command (a RESP array of bulk strings) in `buf`.
fn resp_command_len(buf: &[u8]) -> Option<usize> {
    // A `<type><number>\r\n` line at `at`: the number and where the next line starts.
    let line = |at: usize| -> Option<(usize, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((std::str::from_utf8(buf.get(at + 1..end)?).ok()?.parse().ok()?, end + 2))
    };
    let (count, mut at) = line(0)?;
    for _ in 0..count {
        let (len, data) = line(at)?;
        at = data + len + 2;
    }
    (at <= buf.len()).then_some(at)
}

/// A user message record as the official chat clients append it to `.in`.
pub fn chat_message(text: &str) -> String {
    serde_json::json!({"kind": "message", "payload": {
        "message": {"id": format!("u-{}", uuid::Uuid::new_v4().simple()), "role": "user", "parts": [{"type": "text", "text": text}]},
        "chatId": "test", "trigger": "submit-message"
    }})
    .to_string()
}

/// The servers' warnings and errors, in the output of the test that logged
/// them (libtest shows it when the test fails): a failure in CI then says what
/// the server saw. `RUST_LOG` overrides the filter.
fn server_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sessiond=warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}
