//! `sessiond serve` as a child process, for the cases where a process comes
//! and goes: SIGKILL, SIGTERM, and a restart on the same port (clients keep
//! their URL, as behind a load balancer's stable address).
//!
//! It joins the deployment of a [`TestApp`]: that app's database schema,
//! Redis prefix, master key, ClickHouse database and environments; the
//! environments' keys work against it unchanged.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::redis_proc::free_port;
use super::TestApp;

pub struct ServerProc {
    child: Option<Child>,
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    pub client: reqwest::Client,
}

/// The settings a test server runs with (see `TestApp::spawn_with`), as the
/// binary reads them, with `overrides` applied last.
fn environment(app: &TestApp, port: u16, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
    let c = &app.state.config;
    let mut env: Vec<(String, String)> = [
        ("DATABASE_URL", c.database_url.clone()),
        ("DATABASE_SCHEMA", c.database_schema.clone().unwrap_or_default()),
        // Few connections: the shared server has 100 for every test at once.
        ("DATABASE_MAX_CONNECTIONS", "10".into()),
        ("REDIS_URL", c.redis_url.clone()),
        ("REDIS_PREFIX", c.redis_prefix.clone()),
        ("CLICKHOUSE_URL", c.clickhouse_url.clone()),
        ("CLICKHOUSE_DATABASE", c.clickhouse_database.clone()),
        ("CLICKHOUSE_MIGRATE_ON_START", "false".into()),
        ("SESSIOND_MASTER_KEY", c.master_key.clone().unwrap_or_default()),
        ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("JOB_SCHEDULES_FILE", c.job_schedules_file.clone().unwrap_or_default()),
        ("RUN_HEARTBEAT_TIMEOUT_MS", c.run_heartbeat_timeout_ms.to_string()),
        ("RUN_RETRY_BASE_MS", c.run_retry_base_ms.to_string()),
        ("RUN_RETRY_MAX_MS", c.run_retry_max_ms.to_string()),
        ("JOB_RETRY_BASE_MS", c.job_retry_base_ms.to_string()),
        ("RUST_LOG", "sessiond=info".into()),
        ("NO_COLOR", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

impl ServerProc {
    /// Starts a process of `app`'s deployment on a free port and waits until
    /// it answers `/healthz`; `overrides` are environment settings.
    pub async fn start(app: &TestApp, overrides: &[(&str, &str)]) -> ServerProc {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("sessiond-serve-{}.log", uuid::Uuid::new_v4().simple()));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let mut proc = ServerProc { child: None, port, env: environment(app, port, overrides), log, client };
        proc.spawn().await;
        proc
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Everything the process (and its earlier lives) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL: the process ends at once, with no chance to tidy up.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// SIGTERM: asks the process to shut down gracefully (it keeps running
    /// until it exits; see [`ServerProc::wait_exit`]).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if
    /// it is still running (or was never started).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, child.wait()).await.ok()?.ok();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Starts the process again on the same port (killing it first if it
    /// still runs) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open the server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiond"));
        cmd.arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .kill_on_drop(true);
        // The port was free when picked, and the last life's socket may
        // linger a moment: a bind failure is retried with a fresh process.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut child = cmd.spawn().expect("start sessiond serve");
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (e.g. the port was still held): start again
                }
                let healthy = self
                    .client
                    .get(format!("{}/healthz", self.base()))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    self.child = Some(child);
                    return;
                }
                assert!(Instant::now() < deadline, "sessiond serve did not start; log:\n{}", self.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(Instant::now() < deadline, "sessiond serve kept exiting; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
