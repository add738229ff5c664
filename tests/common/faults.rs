//! What every fault case shares: a private Postgres to kill or bound, a load
//! of acknowledged creates, and the three verdicts each case ends with
//! (ClickHouse's copy equals Postgres row by row, no job stranded, no list
//! answer missing an acknowledged session), plus the one-line report of
//! figures (`FAULT <case>: key=value ...`).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sessiond::analytics::rows::{RunRow, SessionRow};
use sessiond::app::AppState;

use super::redis_proc::free_port;
use super::{session_body, TestApp};

/// Prints a case's figures on one line, so a run's output can be grepped for
/// `FAULT` and compared with earlier runs.
pub fn report(case: &str, figures: &[(&str, String)]) {
    let line: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    report_line(&format!("FAULT {case}: {}", line.join(" ")));
}

/// Prints a figures line, and appends it to `target/test-artifacts/faults.txt`
/// too: the test harness keeps a passing test's output to itself, and
/// `scripts/test.sh` shows that file after the fault cases ran.
pub fn report_line(line: &str) {
    use std::io::Write;
    println!("{line}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("faults.txt")) {
        let _ = writeln!(file, "{line}");
    }
}

/// How long a case's load or fault phase lasts: `secs` normally, ten times as
/// long under `FAULTS_FULL=1`, the soak variant of the same case (a longer
/// outage under more writes; a case then takes minutes instead of seconds).
pub fn phase(secs: f64) -> Duration {
    let full = std::env::var("FAULTS_FULL").is_ok_and(|v| v == "1");
    Duration::from_secs_f64(if full { secs * 10.0 } else { secs })
}

/// A Postgres server of the test's own (`wal_level=logical`), for cases that
/// kill it or change server-wide settings the shared one must keep. Its data
/// lives in a temporary directory; the whole process group is killed and the
/// directory removed on drop.
pub struct PrivatePostgres {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<(String, String)>,
}

/// The newest installed server binaries (`/usr/lib/postgresql/<major>/bin`).
fn pg_bin(name: &str) -> PathBuf {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort_unstable();
    let major = majors.last().expect("a PostgreSQL major version installed");
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{name}"))
}

/// initdb and postgres refuse to run as root: as root, run them as the
/// `postgres` user, which must own the data directory.
fn as_postgres_user(cmd: &mut Command, dir: &Path) {
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    if !is_root {
        return;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("id postgres");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("the postgres user's id")
    };
    let (uid, gid) = (id("-u"), id("-g"));
    let status = Command::new("chown").args(["-R", &format!("{uid}:{gid}"), &dir.to_string_lossy()]).status();
    assert!(status.is_ok_and(|s| s.success()), "chown the private Postgres directory");
    cmd.uid(uid).gid(gid);
}

impl PrivatePostgres {
    /// Initialises and starts a server on a free port; `extra_conf` are
    /// settings for `postgresql.conf` (e.g. `("max_slot_wal_keep_size", "64MB")`).
    pub async fn start(extra_conf: &[(&str, &str)]) -> PrivatePostgres {
        let dir = std::env::temp_dir().join(format!("sessiond-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the private Postgres directory");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .args(["-D", "data", "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8", "--locale=C"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_postgres_user(&mut initdb, &dir);
        let out = initdb.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let extra = extra_conf.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut pg = PrivatePostgres { child: None, port: free_port(), dir, extra };
        pg.spawn().await;
        pg
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's log (start-up, errors, slot invalidations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub async fn create_database(&self, db: &str) {
        let admin = sqlx::PgPool::connect(&self.url("postgres")).await.expect("connect to the private Postgres");
        sqlx::query(&format!("CREATE DATABASE \"{db}\"")).execute(&admin).await.expect("create database");
        admin.close().await;
    }

    /// SIGKILL to the server and every backend (its own process group), as a
    /// crashed machine would leave it.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // `--` so that the negative pid (the group) is not read as an option.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        let _ = child.kill();
        // Bounded, so a failed kill cannot hang the test's runtime for good.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (if running) and starts it again on the same port and
    /// data: crash recovery runs, as after a power cut.
    pub async fn restart(&mut self) {
        self.kill9();
        // Backends of the killed group exit on SIGKILL; give the kernel a
        // moment to release their shared memory before the new postmaster checks.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the server log");
        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.args(["-D", "data", "-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", self.dir.display())])
            .args(["-c", "wal_level=logical", "-c", "fsync=off", "-c", "max_connections=200"])
            .args(["-c", "max_replication_slots=10", "-c", "max_wal_senders=10"]);
        for (k, v) in &self.extra {
            cmd.args(["-c", &format!("{k}={v}")]);
        }
        cmd.current_dir(&self.dir).stdout(Stdio::null()).stderr(log).process_group(0);
        as_postgres_user(&mut cmd, &self.dir);
        self.child = Some(cmd.spawn().expect("start the private Postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(pool) = sqlx::PgPool::connect(&self.url("postgres")).await {
                if sqlx::query("SELECT 1").execute(&pool).await.is_ok() {
                    pool.close().await;
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the private Postgres did not start; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many rows the compared copy held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyFigures {
    pub sessions: usize,
    pub runs: usize,
}

/// One table's comparison: what Postgres has that ClickHouse lacks, what
/// ClickHouse shows that Postgres no longer has, and rows that differ.
#[derive(Debug, Default)]
struct TableDiff {
    rows: usize,
    problems: Vec<String>,
}

/// A row of the copy, as far as the comparison needs it.
trait CopyRow: PartialEq + std::fmt::Debug + clickhouse::RowOwned + clickhouse::RowRead {
    fn id(&self) -> &str;
    fn version(&self) -> u64;
}

impl CopyRow for SessionRow {
    fn id(&self) -> &str {
        &self.session_id
    }
    fn version(&self) -> u64 {
        self._version
    }
}

impl CopyRow for RunRow {
    fn id(&self) -> &str {
        &self.run_id
    }
    fn version(&self) -> u64 {
        self._version
    }
}

/// Postgres's sessions by id (every one: a test's schema is small).
async fn postgres_sessions(state: &AppState) -> BTreeMap<String, sessiond::sessions::model::Session> {
    let mut conn = state.db.acquire().await.expect("a Postgres connection");
    let (mut rows, mut after) = (BTreeMap::new(), None);
    loop {
        let chunk = sessiond::sessions::store::export_chunk(&mut conn, after, None, None, 5_000)
            .await
            .expect("read sessions from Postgres");
        let Some(last) = chunk.last() else { break };
        after = Some((last.created_at, last.id));
        rows.extend(chunk.into_iter().map(|s| (s.id.to_string(), s)));
    }
    rows
}

/// Postgres's runs by id.
async fn postgres_runs(state: &AppState) -> BTreeMap<String, sessiond::runs::store::Run> {
    let mut conn = state.db.acquire().await.expect("a Postgres connection");
    let (mut rows, mut after) = (BTreeMap::new(), None);
    loop {
        let chunk = sessiond::runs::store::export_chunk(&mut conn, after, None, None, 5_000)
            .await
            .expect("read runs from Postgres");
        let Some(last) = chunk.last() else { break };
        after = Some((last.created_at, last.id));
        rows.extend(chunk.into_iter().map(|r| (r.id.to_string(), r)));
    }
    rows
}

/// Compares the copy's live rows of `table` with Postgres's, `expected`
/// turning a Postgres row into the copy's row at a given version. A copy
/// that cannot be read counts as empty (every row missing).
async fn table_diff<P, R: CopyRow>(
    state: &AppState,
    table: &str,
    kind: &str,
    pg: BTreeMap<String, P>,
    expected: impl Fn(&P, u64) -> R,
) -> TableDiff {
    let ch: Vec<R> = state
        .analytics
        .client()
        .query(&format!("SELECT ?fields FROM {table} FINAL WHERE _is_deleted = 0"))
        .fetch_all()
        .await
        .unwrap_or_default();
    let mut diff = TableDiff { rows: pg.len(), problems: Vec::new() };
    let mut seen = HashSet::new();
    for row in ch {
        seen.insert(row.id().to_string());
        match pg.get(row.id()) {
            None => diff.problems.push(format!("{kind} {} is in ClickHouse but not in Postgres", row.id())),
            Some(p) => {
                let want = expected(p, row.version());
                if want != row {
                    diff.problems.push(format!("{kind} {} differs: postgres {want:?} clickhouse {row:?}", row.id()));
                }
            }
        }
    }
    for id in pg.keys().filter(|id| !seen.contains(*id)) {
        diff.problems.push(format!("{kind} {id} is in Postgres but not in ClickHouse"));
    }
    diff
}

/// Every difference between ClickHouse's copy (`sessions_v1` and
/// `task_runs_v1` under FINAL, deleted rows left out) and this app's Postgres
/// schema, row by row and every column but the version, with the row counts.
pub async fn copy_differences(state: &AppState) -> (CopyFigures, Vec<String>) {
    let sessions =
        table_diff(state, "sessions_v1", "session", postgres_sessions(state).await, SessionRow::from_session).await;
    let runs = table_diff(state, "task_runs_v1", "run", postgres_runs(state).await, RunRow::from_run).await;
    let figures = CopyFigures { sessions: sessions.rows, runs: runs.rows };
    (figures, sessions.problems.into_iter().chain(runs.problems).collect())
}

/// Waits up to `settle_secs` for [`copy_differences`] to find none; panics
/// with the first differences if it never does.
pub async fn assert_copy_equal(state: &AppState, settle_secs: u64) -> CopyFigures {
    let deadline = Instant::now() + Duration::from_secs(settle_secs);
    loop {
        let (figures, problems) = copy_differences(state).await;
        if problems.is_empty() {
            return figures;
        }
        if Instant::now() >= deadline {
            let first: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
            panic!(
                "ClickHouse's copy differs from Postgres after {settle_secs} s: {} problems, first:\n{}",
                problems.len(),
                first.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits up to `settle_secs` for every job that was unfinished (pending or
/// running) when called to end; returns how many did not: stranded jobs.
/// Jobs written meanwhile (cron sweeps, new flushes) are not waited for, so a
/// busy server still settles.
pub async fn stuck_jobs(db: &sqlx::PgPool, settle_secs: u64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(settle_secs);
    let cutoff: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now()").fetch_one(db).await.expect("read the clock");
    loop {
        let unfinished: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running') AND created_at <= $1")
                .bind(cutoff)
                .fetch_one(db)
                .await
                .expect("count unfinished jobs");
        if unfinished == 0 || Instant::now() >= deadline {
            return unfinished;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One list answer checked against what had been acknowledged before it.
#[derive(Debug, Clone)]
pub struct ListCheck {
    /// Acknowledged sessions the answer left out.
    pub missing: usize,
    /// Sessions listed (every page).
    pub listed: usize,
    /// `x-sessiond-list-source` of the first page (`clickhouse` or `postgres`).
    pub source: String,
    /// The status of the first page that was not 200, if any.
    pub failed: Option<u16>,
}

impl ListCheck {
    /// A wrong answer: a 200 that left out an acknowledged session. A refusal
    /// (503) is not wrong, only unavailable.
    pub fn wrong(&self) -> bool {
        self.failed.is_none() && self.missing > 0
    }
}

/// Lists every session of `token`'s environment through the API, following
/// `pagination.next`, and counts which of `expected` (friendly ids whose
/// create was acknowledged before this call) are missing.
pub async fn list_check(app: &TestApp, token: &str, expected: &[String]) -> ListCheck {
    list_check_at(&app.client, &app.base, token, expected).await
}

/// [`list_check`] against any server of the deployment.
pub async fn list_check_at(client: &reqwest::Client, base: &str, token: &str, expected: &[String]) -> ListCheck {
    let mut listed = HashSet::new();
    let mut source = String::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v1/sessions?page[size]=100");
        if let Some(cursor) = &after {
            url.push_str(&format!("&page[after]={}", urlencode(cursor)));
        }
        let resp = client.get(&url).bearer_auth(token).send().await.expect("list request");
        let status = resp.status();
        if source.is_empty() {
            source = resp
                .headers()
                .get(sessiond::sessions::routes::LIST_SOURCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
        }
        if !status.is_success() {
            return ListCheck { missing: 0, listed: listed.len(), source, failed: Some(status.as_u16()) };
        }
        let body: Value = resp.json().await.expect("a JSON list");
        for item in body["data"].as_array().into_iter().flatten() {
            if let Some(id) = item["id"].as_str() {
                listed.insert(id.to_string());
            }
        }
        match body["pagination"]["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    let missing = expected.iter().filter(|id| !listed.contains(*id)).count();
    ListCheck { missing, listed: listed.len(), source, failed: None }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A steady load of session creates against one server, in the background:
/// what a fault case runs its fault under. Only acknowledged creates (a 2xx
/// with an id) are remembered; refusals are counted.
pub struct CreateLoad {
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<u64>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CreateLoad {
    /// Starts creating about `per_sec` sessions a second in `token`'s
    /// environment on the server at `base`, each tagged `tag`. Creates overlap
    /// (up to 32 in flight), so a slow answer does not slow the load down.
    pub fn start(base: &str, token: &str, per_sec: u32, tag: &str) -> CreateLoad {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0u64));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("a client");
        let (base, token, tag) = (base.to_string(), token.to_string(), tag.to_string());
        let (acked_w, refused_w) = (acked.clone(), refused.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1))));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let in_flight = Arc::new(tokio::sync::Semaphore::new(32));
            let mut creates = tokio::task::JoinSet::new();
            for n in 0u64.. {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let mut body = session_body(None);
                body["tags"] = serde_json::json!([tag]);
                body["metadata"] = serde_json::json!({ "n": n });
                let req = client.post(format!("{base}/api/v1/sessions")).bearer_auth(&token).json(&body);
                let (acked, refused) = (acked_w.clone(), refused_w.clone());
                creates.spawn(async move {
                    let _permit = permit;
                    let id = match req.send().await {
                        Ok(resp) if resp.status().is_success() => {
                            resp.json::<Value>().await.ok().and_then(|v| v["id"].as_str().map(str::to_string))
                        }
                        _ => None,
                    };
                    match id {
                        Some(id) => acked.lock().expect("acked").push(id),
                        None => *refused.lock().expect("refused") += 1,
                    }
                });
            }
            while creates.join_next().await.is_some() {}
        });
        CreateLoad { acked, refused, stop, task }
    }

    /// The creates acknowledged so far.
    pub fn acked(&self) -> Vec<String> {
        self.acked.lock().expect("acked").clone()
    }

    /// Stops the load; returns every acknowledged id and how many creates were refused.
    pub async fn stop(self) -> (Vec<String>, u64) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let acked = self.acked.lock().expect("acked").clone();
        let refused = *self.refused.lock().expect("refused");
        (acked, refused)
    }
}
